"""Calibration statistics for data-aware initializers, collected in one pass.

`calibrate(model, adapters, batches, loss_fn)` runs the user's `loss_fn(model, batch)`
on the first `num_batches` calibration batches (any iterable: a list, a DataLoader)
at the *base* function (adapters skipped) and returns, per adapted layer with matrix
view W (m, n), float32:

    grad          ∇W (m, n), the mean over batches of the loss gradient
    input_moment  A = E[x xᵀ] (n, n): the mean over the rows x (n,) the layer sees
    output_moment G = T·Σ_t δ_t δ_tᵀ (m, m): δ_t = ∂loss/∂y_t for the T output rows y_t

For a loss that is a mean over the T rows, T·δ_t is the row's own loss gradient, so G
is E[g gᵀ] of the per-row output gradients, and A ⊗ G = (Σ x xᵀ) ⊗ (Σ δ δᵀ) is the
K-FAC (Kronecker-factored empirical Fisher) block of the layer whatever T is. Both are
averaged over batches. A "row" is a token (Linear, Conv1D), a patch position (Conv2d,
x the unfolded patch) or a token id (Embedding: x one-hot, so A is diagonal).

Memory is bounded by those matrices: each forward adds x xᵀ to an (n, n) sum and each
backward δ δᵀ to an (m, m) sum, so no activation is kept beyond what autograd keeps
anyway; a side larger than `dense_limit` (and the input side of an Embedding) keeps
only its diagonal, (n,) or (m,), and `output_moment`/`input_moment` are then vectors.
Total: Σ_layers (m·n + m² + n²) floats at most.

Always restored, also when `loss_fn` raises: hooks removed, every module's training
flag, every parameter's `requires_grad`, the adapters' enabled state; parameters'
`.grad` are never touched (gradients come from `torch.autograd.grad`).
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
#: sides of at most this size keep a dense second moment; larger ones keep the diagonal
DEFAULT_DENSE_LIMIT = 8192


@dataclass
class LayerStats:
    """Calibration statistics of one layer (matrix view W (m, n)), float32."""

    grad: Tensor                   #: ∇W (m, n), mean over batches
    input_moment: Tensor | None    #: E[x xᵀ] (n, n), or its diagonal (n,); None if not collected
    output_moment: Tensor | None   #: T·Σ δ δᵀ (m, m), or its diagonal (m,); None if not collected
    batches: int                   #: how many batches were averaged


class _Accumulator:
    """Per-layer running sums for one batch, folded into batch averages by `end_batch`."""

    def __init__(self, adapter: Adapter, moments: bool, dense_limit: int):
        self.ops = adapter.ops
        m, n = adapter.shape
        dev = adapter.base_layer.weight.device
        self.moments = moments
        self.dense_in = moments and n <= dense_limit and self.ops.kind != "embedding"
        self.dense_out = moments and m <= dense_limit
        self.sum_xx = self.sum_gg = None
        self.rows = 0
        if moments:
            self.in_total = torch.zeros((n, n) if self.dense_in else (n,), device=dev)
            self.out_total = torch.zeros((m, m) if self.dense_out else (m,), device=dev)
        self.grad_total = torch.zeros(m, n, device=dev)
        self.batches = 0

    def start_batch(self) -> None:
        self.sum_xx, self.sum_gg, self.rows = None, None, 0

    # -- hooks
    def forward_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not self.moments:
            return
        x = _input_rows(self.ops, module, args[0])
        self.rows += x.shape[0] if x.dim() == 2 else int(x.numel())
        if self.ops.kind == "embedding":  # one-hot rows: Σ x xᵀ is the diagonal of id counts
            xx = torch.bincount(x.reshape(-1), minlength=self.ops.n).float()
        else:
            xx = x.T @ x if self.dense_in else (x * x).sum(0)
        self.sum_xx = xx if self.sum_xx is None else self.sum_xx + xx
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(self._grad_hook)

    def _grad_hook(self, grad: Tensor) -> None:
        g = _output_rows(self.ops, grad)
        gg = g.T @ g if self.dense_out else (g * g).sum(0)
        self.sum_gg = gg if self.sum_gg is None else self.sum_gg + gg

    def end_batch(self, grad: Tensor | None) -> None:
        if grad is not None:
            self.grad_total += self.ops.as_matrix(grad).float()
        if self.moments and self.rows:
            self.in_total += self.sum_xx / self.rows
            if self.sum_gg is not None:
                self.out_total += self.sum_gg * self.rows
        self.batches += 1

    def result(self) -> LayerStats:
        k = max(self.batches, 1)
        if not self.moments:
            return LayerStats(self.grad_total / k, None, None, self.batches)
        return LayerStats(self.grad_total / k, self.in_total / k, self.out_total / k, self.batches)


def _input_rows(ops, module: nn.Module, x: Tensor) -> Tensor:
    """The rows the layer multiplies by W: (T, n) float32 (Embedding: the (T,) ids)."""
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
        return cols.transpose(1, 2).reshape(-1, ops.n).float()
    return x.detach().reshape(-1, ops.n).float()


def _output_rows(ops, grad: Tensor) -> Tensor:
    """The output gradient as (T, m) float32 rows, matching `_input_rows`."""
    if ops.kind == "conv2d":  # (N, m, H, W) -> (N·H·W, m)
        return grad.movedim(1, -1).reshape(-1, ops.m).float()
    return grad.reshape(-1, ops.m).float()


def calibrate(model: nn.Module, adapters: Sequence[tuple[str, Adapter]], batches: Iterable[Any],
              loss_fn: Callable[[nn.Module, Any], Tensor], *, num_batches: int = DEFAULT_BATCHES,
              moments: bool = True, dense_limit: int = DEFAULT_DENSE_LIMIT, train_mode: bool = False,
              progress: bool = True) -> dict[str, LayerStats]:
    """Run `loss_fn(model, batch)` on the first `num_batches` of `batches` at the base function
    and return {layer name: LayerStats}. `moments=False` collects ∇W only (cheaper).
    `train_mode=False` runs the model in eval mode (no dropout: deterministic statistics)."""
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ConfigError(f"the number of calibration batches must be a positive int, got {num_batches!r}")
    if loss_fn is None or not callable(loss_fn):
        raise ConfigError("loss_fn must be a callable loss_fn(model, batch) -> scalar loss tensor")
    if batches is None:
        raise ConfigError("calibration needs init_batches= (an iterable of batches for loss_fn)")
    accs = {name: _Accumulator(a, moments, dense_limit) for name, a in adapters}
    weights = [a.base_layer.weight for _, a in adapters]
    for name, a in adapters:
        if a.base_layer.weight.is_meta:
            raise ConfigError(f"calibration needs the base weight of {name!r}, which is on the meta "
                              "device; load the model's weights first")
    todo = itertools.islice(batches, num_batches)
    with ExitStack() as stack:
        stack.enter_context(_calibration_mode(model, adapters, train_mode))
        for (name, a) in adapters:
            stack.callback(a.base_layer.register_forward_hook(accs[name].forward_hook).remove)
        stack.enter_context(torch.enable_grad())
        for batch in _progress(todo, num_batches, progress):
            for acc in accs.values():
                acc.start_batch()
            loss = loss_fn(model, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ConfigError("loss_fn(model, batch) must return a scalar loss tensor computed from "
                                  f"the model's outputs; got {_describe(loss)}")
            grads = torch.autograd.grad(loss.reshape(()), weights, allow_unused=True)
            for (name, _), g in zip(adapters, grads):
                accs[name].end_batch(g)
    stats = {name: acc.result() for name, acc in accs.items()}
    if not stats or next(iter(stats.values())).batches == 0:
        raise ConfigError("init_batches yielded no batch; pass a few calibration batches (default 8)")
    return stats


@contextmanager
def _calibration_mode(model: nn.Module, adapters: Sequence[tuple[str, Adapter]], train_mode: bool):
    """Adapters skipped, base weights of adapted layers differentiable, the model in eval
    (or train) mode; everything put back on exit."""
    from .model import adapted_layers

    modes = [(m, m.training) for m in model.modules()]
    params = {id(p): p for p in model.parameters()}
    params.update({id(a.base_layer.weight): a.base_layer.weight for _, a in adapters})
    flags = [(p, p.requires_grad) for p in params.values()]
    ours = {id(a) for _, a in adapters}
    layers = [layer for _, layer in adapted_layers(model) if id(layer.adapter) in ours]
    disabled = [(layer, layer.disabled) for layer in layers]
    try:
        model.train(train_mode)
        for layer in layers:
            layer.disabled = True
        for _, a in adapters:
            a.base_layer.weight.requires_grad_(True)
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
