"""Calibration statistics for data-aware initializers, collected in one pass.

`calibrate(model, adapters, batches, loss_fn)` runs the user's `loss_fn(model, batch)`
on the first `num_batches` calibration batches (any iterable: a list, a DataLoader)
at the *base* function (adapters skipped) and returns, per adapted layer with matrix
view W (m, n), float32:

    grad          ∇W (m, n), the mean over batches of the loss gradient
    input_moment  A = E[x xᵀ] (n, n): the mean over the T rows x_t (n,) of the layer's input
    output_moment G = T·Σ_t δ_t δ_tᵀ (m, m): δ_t = ∂loss/∂y_t for the matching output rows y_t

Only rows whose gradient δ_t is not zero count (T is their number): padding and other
positions the loss does not see change neither ∇W nor the true curvature, so they are
left out of A as well as of G.

For a loss that is a mean over the T rows, T·δ_t is the row's own loss gradient, so G
is E[g gᵀ] of the per-row output gradients, and A ⊗ G = (Σ x xᵀ) ⊗ (Σ δ δᵀ) is the
K-FAC (Kronecker-factored empirical Fisher) block of the layer whatever T is. Both are
averaged over batches. A "row" is a token (Linear, Conv1D), a patch position (Conv2d,
x the unfolded patch) or a token id (Embedding: x one-hot, so A is diagonal).

Memory is bounded by those matrices: in the backward pass each layer adds x xᵀ of the
input it saw (kept from its forward until then, as a LoRA training step keeps it for
∇A) straight into its (n, n) total and δ δᵀ into its (m, m) total (no per-batch copies,
except for a layer called more than once in a batch). A side k larger than `dense_limit`
keeps a streamed Nyström `Sketch` of rank `sketch_size` (2·k·s + k floats; exact when
the moment has rank ≤ s) or, with `sketch_size=0`, only its diagonal (k,); the input
side of an Embedding (one-hot rows) is always its diagonal. Total: Σ_layers
(m·n + m² + n²) floats at most.

One forward and one backward per batch, and no weight gradient: a forward hook passes
each adapted layer's output through an identity autograd node that also takes a shared
zero leaf z (so the output is differentiable while every weight stays frozen; no copy),
`torch.autograd.grad(loss, z)` runs the backward, and each node hands δ to the layer's
accumulator, which adds Σ δ xᵀ to ∇W (and the moments) from the rows that carry gradient.

Always restored, also when `loss_fn` raises: hooks removed, every module's training
flag, every parameter's `requires_grad`, the adapters' enabled state; parameters'
`.grad` are never touched.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .interfaces import Adapter

#: batches taken from `init_batches` unless an initializer asks for another number
DEFAULT_BATCHES = 8
#: sides of at most this size keep a dense second moment; larger ones a sketch or the diagonal
DEFAULT_DENSE_LIMIT = 8192


class Sketch:
    """A streamed Nyström sketch of a PSD second moment M (k, k) too large to keep dense:
    Y = M·Ω (k, s) for a fixed Gaussian test matrix Ω (k, s), and diag(M) (k,) exactly.
    Memory 2·k·s + k floats instead of k²; adding the rows X (T, k) costs 4·T·k·s flops
    instead of 2·T·k². `nystrom()` gives M̂ = Y(ΩᵀY)⁺Yᵀ (rank ≤ s), exact when
    rank(M) ≤ s, and M̂ ⪯ M (the single-pass Nyström approximation of a PSD matrix, as
    in Tropp, Yurtsever, Udell, Cevher, "Fixed-rank approximation of a positive-
    semidefinite matrix from streaming data", NeurIPS 2017)."""

    def __init__(self, y: Tensor, omega: Tensor, diag: Tensor):
        self.y, self.omega, self.diag = y, omega, diag

    @classmethod
    def zeros(cls, k: int, size: int, device: torch.device) -> Sketch:
        gen = torch.Generator(device=device).manual_seed(0)
        omega = torch.randn(k, size, generator=gen, device=device)
        return cls(torch.zeros(k, size, device=device), omega, torch.zeros(k, device=device))

    def empty_like(self) -> Sketch:
        return Sketch(torch.zeros_like(self.y), self.omega, torch.zeros_like(self.diag))

    def add_rows_(self, x: Tensor, alpha: float) -> None:
        """M += alpha·XᵀX for rows X (T, k)."""
        self.y.addmm_(x.T, x @ self.omega, alpha=alpha)
        self.diag.add_((x * x).sum(0), alpha=alpha)

    def add_(self, other: Sketch, alpha: float) -> None:
        self.y.add_(other.y, alpha=alpha)
        self.diag.add_(other.diag, alpha=alpha)

    def __truediv__(self, c: float) -> Sketch:
        return Sketch(self.y / c, self.omega, self.diag / c)

    def nystrom(self) -> tuple[Tensor, Tensor]:
        """(U (k, r) orthonormal, λ (r,) > 0), r ≤ s, with M̂ = U·diag(λ)·Uᵀ = Y·(ΩᵀY)⁺·Yᵀ, in
        float64; the pseudo-inverse drops the core's eigenvalues below `NYSTROM_CUTOFF`
        times the largest (the float32 rounding of Y, which it would otherwise amplify)."""
        y, omega = self.y.double(), self.omega.double()
        core = omega.T @ y
        mu, vecs = torch.linalg.eigh((core + core.T) / 2)
        keep = mu > NYSTROM_CUTOFF * mu.max().clamp_min(0)
        if not bool(keep.any()):  # M = 0
            return y.new_zeros(y.shape[0], 0), y.new_zeros(0)
        f = y @ (vecs[:, keep] * mu[keep].rsqrt())  # M̂ = F Fᵀ
        u, sigma, _ = torch.linalg.svd(f, full_matrices=False)
        return u, sigma.square()


#: relative size below which the Nyström core's eigenvalues count as rounding (float32 Y)
NYSTROM_CUTOFF = 1e-5


@dataclass
class LayerStats:
    """Calibration statistics of one layer (matrix view W (m, n)), float32."""

    grad: Tensor                   #: ∇W (m, n), mean over batches
    #: E[x xᵀ] (n, n), its diagonal (n,) or a `Sketch`; None if not collected
    input_moment: Tensor | Sketch | None
    #: T·Σ δ δᵀ (m, m), its diagonal (m,) or a `Sketch`; None if not collected
    output_moment: Tensor | Sketch | None
    batches: int                   #: how many batches were averaged


class _Accumulator:
    """One layer's running sums: ∇W straight into its total, the moments either straight into
    theirs (normalised by the batch's row count T at once: the usual case of one call per
    batch, no per-batch buffers) or, for a layer called more than once in a batch (a shared
    module), into per-batch sums folded by `end_batch`, when T is known."""

    def __init__(self, adapter: Adapter, moments: bool, dense_limit: int, sketch_size: int):
        self.ops = adapter.ops
        m, n = adapter.shape
        dev = adapter.base_layer.weight.device
        self.moments = moments
        if moments:
            one_hot = self.ops.kind == "embedding"  # its input moment is diagonal: the id counts
            self.in_total = _moment_zeros(n, dense_limit, sketch_size, one_hot, dev)
            self.out_total = _moment_zeros(m, dense_limit, sketch_size, False, dev)
        self.grad_total = torch.zeros(m, n, device=dev)
        self.batches = self.moment_batches = 0
        self.start_batch()

    def start_batch(self) -> None:
        self.calls = 0  # forward calls in this batch, counted by the probe before the backward
        self.sum_xx = self.sum_gg = None
        self.rows = 0

    def add_rows(self, module: nn.Module, x: Tensor, grad: Tensor) -> None:
        """Add the rows that carry gradient (δ ≠ 0: not padding, not masked out):
        ∇W += Σ δ xᵀ, and (with moments) Σ x xᵀ, Σ δ δᵀ."""
        d = _output_rows(self.ops, grad)
        x = _input_rows(self.ops, module, x)
        live = d.any(1)
        if not bool(live.all()):
            d, x = d[live], x[live]
        d = d.float()
        rows = int(d.shape[0])
        self.rows += rows
        if self.ops.kind == "embedding":  # one-hot rows x = e_id
            self.grad_total.index_add_(1, x, d.T)
        else:
            x = x.float()
            self.grad_total.addmm_(d.T, x)
        if not self.moments or rows == 0:
            return
        if self.calls == 1:  # this batch's only call: T = rows, straight into the totals
            self._add_moments(self.in_total, self.out_total, x, d, 1.0 / rows, float(rows))
            self.moment_batches += 1
            return
        if self.sum_xx is None:
            self.sum_xx, self.sum_gg = _empty_like(self.in_total), _empty_like(self.out_total)
        self._add_moments(self.sum_xx, self.sum_gg, x, d, 1.0, 1.0)

    def _add_moments(self, xx: Tensor | Sketch, gg: Tensor | Sketch, x: Tensor, d: Tensor,
                     a: float, g: float) -> None:
        """xx += a·Σ x xᵀ (Embedding: the id counts on the diagonal), gg += g·Σ δ δᵀ."""
        if self.ops.kind == "embedding":
            xx.add_(torch.bincount(x, minlength=self.ops.n).float(), alpha=a)
        else:
            _add_rows(xx, x, a)
        _add_rows(gg, d, g)

    def end_batch(self) -> None:
        if self.sum_xx is not None and self.rows:  # a shared layer: T is known only now
            self.in_total.add_(self.sum_xx, alpha=1.0 / self.rows)
            self.out_total.add_(self.sum_gg, alpha=float(self.rows))
            self.moment_batches += 1
        self.batches += 1
        self.start_batch()

    def result(self) -> LayerStats:
        grad = self.grad_total / max(self.batches, 1)
        if not self.moments:
            return LayerStats(grad, None, None, self.batches)
        k = max(self.moment_batches, 1)
        return LayerStats(grad, self.in_total / k, self.out_total / k, self.batches)


def check_sketch_size(size: Any) -> int:
    """`size` if it is an int >= 0, else a ConfigError naming the fix."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ConfigError(f"sketch_size must be an int >= 0 (0: keep diagonals above dense_limit), got {size!r}")
    return size


def _moment_zeros(k: int, dense_limit: int, sketch_size: int, diagonal: bool,
                  device: torch.device) -> Tensor | Sketch:
    """The running sum of one side's moment: dense (k, k) up to `dense_limit`, above it a
    rank-`sketch_size` `Sketch` (when 0 < sketch_size < k) or the diagonal (k,)."""
    if not diagonal and k <= dense_limit:
        return torch.zeros(k, k, device=device)
    if not diagonal and 0 < sketch_size < k:
        return Sketch.zeros(k, sketch_size, device)
    return torch.zeros(k, device=device)


def _empty_like(total: Tensor | Sketch) -> Tensor | Sketch:
    return total.empty_like() if isinstance(total, Sketch) else torch.zeros_like(total)


def _add_rows(total: Tensor | Sketch, rows: Tensor, alpha: float) -> None:
    """total += alpha·Σ_t r_t r_tᵀ for rows (T, k): dense, sketched or on the diagonal."""
    if isinstance(total, Sketch):
        total.add_rows_(rows, alpha)
    elif total.dim() == 2:
        total.addmm_(rows.T, rows, alpha=alpha)
    else:
        total.add_((rows * rows).sum(0), alpha=alpha)


class _Tap(torch.autograd.Function):
    """y ↦ y (marked as changed in place, so later in-place ops on y still work), with the
    zero scalar leaf z as a second input so that y requires grad; the backward hands
    δ = ∂loss/∂y to `callback` and passes it on. No copy of y in the forward, no reduction
    for z in the backward (z gets no gradient)."""

    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, callback: Callable[[Tensor], None]) -> Tensor:
        ctx.callback = callback
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.callback(grad)
        return grad, None, None


class _Probe:
    """Makes every adapted layer's output differentiable without differentiating its weight
    (`_Tap` with a shared leaf z). Backpropagating the loss to z sends δ = ∂loss/∂y to
    each layer's accumulator and computes no weight gradient."""

    def __init__(self, accs: dict[int, _Accumulator]):
        self.accs = accs
        self.leaves: dict[torch.device, Tensor] = {}  # one zero scalar leaf per device

    def hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not isinstance(output, Tensor) or not output.is_floating_point():
            return None
        x = args[0].detach()  # the input, kept until this batch's backward (as LoRA's A keeps it)
        acc = self.accs[id(module)]
        acc.calls += 1
        leaf = self.leaves.get(output.device)
        if leaf is None:
            leaf = self.leaves[output.device] = torch.zeros((), device=output.device, requires_grad=True)
        return _Tap.apply(output, leaf, lambda grad: acc.add_rows(module, x, grad))

    def backward(self, loss: Tensor) -> None:
        if self.leaves:
            torch.autograd.grad(loss, list(self.leaves.values()), allow_unused=True)


def _input_rows(ops, module: nn.Module, x: Tensor) -> Tensor:
    """The rows the layer multiplies by W: (T, n) (Embedding: the (T,) ids)."""
    if ops.kind == "embedding":
        return x.reshape(-1)
    if ops.kind == "conv2d":
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        else:
            padding = module.padding
        if isinstance(padding, str):
            raise ConfigError(f"calibration of Conv2d with padding={padding!r} is not supported; "
                              "give the padding as numbers")
        cols = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)  # (N, n, L)
        return cols.transpose(1, 2).reshape(-1, ops.n)
    return x.reshape(-1, ops.n)


def _output_rows(ops, grad: Tensor) -> Tensor:
    """The output gradient as (T, m) rows, matching `_input_rows`."""
    if ops.kind == "conv2d":  # (N, m, H, W) -> (N·H·W, m)
        return grad.movedim(1, -1).reshape(-1, ops.m)
    return grad.reshape(-1, ops.m)


def calibrate(model: nn.Module, adapters: Sequence[tuple[str, Adapter]], batches: Iterable[Any],
              loss_fn: Callable[[nn.Module, Any], Tensor], *, num_batches: int = DEFAULT_BATCHES,
              moments: bool = True, dense_limit: int = DEFAULT_DENSE_LIMIT, sketch_size: int = 0,
              train_mode: bool = False,
              progress: bool = True) -> dict[str, LayerStats]:
    """Run `loss_fn(model, batch)` on the first `num_batches` of `batches` at the base function
    and return {layer name: LayerStats}. `moments=False` collects ∇W only (cheaper). A side
    larger than `dense_limit` keeps a rank-`sketch_size` `Sketch` of its moment, or (0, the
    default) only its diagonal. `train_mode=False` runs the model in eval mode (no dropout:
    deterministic statistics)."""
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ConfigError(f"the number of calibration batches must be a positive int, got {num_batches!r}")
    if loss_fn is None or not callable(loss_fn):
        raise ConfigError("loss_fn must be a callable loss_fn(model, batch) -> scalar loss tensor")
    if batches is None:
        raise ConfigError("calibration needs init_batches= (an iterable of batches for loss_fn)")
    for name, a in adapters:
        if a.base_layer.weight.is_meta:
            raise ConfigError(f"calibration needs the base weight of {name!r}, which is on the meta "
                              "device; load the model's weights first")
    accs = {name: _Accumulator(a, moments, dense_limit, check_sketch_size(sketch_size)) for name, a in adapters}
    probe = _Probe({id(a.base_layer): accs[name] for name, a in adapters})
    todo = itertools.islice(batches, num_batches)
    with ExitStack() as stack:
        stack.enter_context(_calibration_mode(model, adapters, train_mode))
        for _, a in adapters:
            stack.callback(a.base_layer.register_forward_hook(probe.hook).remove)
        stack.enter_context(torch.enable_grad())
        for batch in _progress(todo, num_batches, progress):
            loss = loss_fn(model, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ConfigError("loss_fn(model, batch) must return a scalar loss tensor computed from "
                                  f"the model's outputs; got {_describe(loss)}")
            probe.backward(loss.reshape(()))
            for acc in accs.values():
                acc.end_batch()
    stats = {name: acc.result() for name, acc in accs.items()}
    if not stats or next(iter(stats.values())).batches == 0:
        raise ConfigError("init_batches yielded no batch; pass a few calibration batches (default 8)")
    return stats


@contextmanager
def _calibration_mode(model: nn.Module, adapters: Sequence[tuple[str, Adapter]], train_mode: bool):
    """Adapters skipped, the model in eval (or train) mode; put back on exit, with every
    parameter's `requires_grad` (which calibration itself does not change)."""
    from .model import adapted_layers

    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    ours = {id(a) for _, a in adapters}
    layers = [layer for _, layer in adapted_layers(model)
              if any(id(a) in ours for a in layer.adapters.values())]
    disabled = [(layer, layer.disabled) for layer in layers]
    try:
        model.train(train_mode)
        for layer in layers:
            layer.disabled = True
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
        for layer, flag in disabled:
            layer.disabled = flag


def _progress(it: Iterable[Any], total: int, enabled: bool) -> Iterable[Any]:
    """A tqdm bar over calibration batches that shows only when they take over a second."""
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return it
    return tqdm(it, total=total, desc="geopeft calibration", unit="batch", delay=1.0, leave=False)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        grad = "" if value.requires_grad else ", which does not require grad"
        return f"a tensor of shape {tuple(value.shape)}{grad}"
    return type(value).__name__
