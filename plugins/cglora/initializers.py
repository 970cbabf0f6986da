"""Data-aware initializers: `cg` (CG-LoRA), `lora_ga` (LoRA-GA) and `pissa` (PiSSA).

Each computes a rank-r update u·diag(σ)·vᵀ per layer (fp32) and writes it into the
adapter with `set_from_svd`: two-factor adapters get the balanced split
B = u√(σ/s), A = √(σ/s)vᵀ (BᵀB = AAᵀ), three-factor ones U = u, S = σ/s, V = v, so that
the adapter's ΔW = s·(factors) is the update. `shift` subtracts it from the base weight
(`geopeft.shift.shift_base`, recorded for save/load/export) so the model's function is
unchanged at step 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from geopeft import Adapter, ConfigError, Initializer, calibrate
from geopeft.calibration import DEFAULT_BATCHES, DEFAULT_DENSE_LIMIT, check_sketch_size
from geopeft.shift import shift_base

from .lowrank import newton_lowrank, product_svd, top_svd


def set_from_svd(name: str, adapter: Adapter, u: Tensor, sigma: Tensor, v: Tensor) -> None:
    """Set `adapter`'s factors so that its ΔW (matrix view) is u (m, r)·diag(σ (r,))·v (n, r)ᵀ.

    Two factors (A, B): balanced split; a component with σ_k ≤ max(m, n)·ε·σ_1 (the
    update has rank < r) keeps its column of B and row of A as the adapter built them
    (LoRA's init: zero B column), so it contributes nothing yet still trains.
    Three factors (U, S, V): U = u, S = σ/s (diagonal), V = v, all orthonormal."""
    names = set(adapter.factor_names)
    s = adapter.scaling
    if {"A", "B"} == names:
        m, n = adapter.shape
        keep = sigma > max(m, n) * torch.finfo(torch.float32).eps * sigma.max()
        root = (sigma / s).sqrt()
        b = torch.where(keep, u * root, adapter.B.float())
        a = torch.where(keep[:, None], root[:, None] * v.mT, adapter.A.float())
        adapter.B.copy_(b)
        adapter.A.copy_(a)
    elif {"U", "S", "V"} == names:
        adapter.U.copy_(u)
        adapter.V.copy_(v)
        diag = sigma / s
        adapter.S.copy_(diag if adapter.S.dim() == 1 else torch.diag(diag))
    else:
        raise ConfigError(f"layer {name!r}: this initializer writes two-factor (A, B) or three-factor "
                          f"(U, S, V) adapters; {type(adapter).__name__} has factors "
                          f"{', '.join(adapter.factor_names)}")


def _check_batches(num_batches: int) -> int:
    if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    return num_batches


#: the scales `scale="auto"` may try: decades from 10⁻⁶ to 1, starting at `SCALE_START`
SCALE_DECADES = tuple(10.0 ** k for k in range(-6, 1))
SCALE_START = 1e-3


def search_scale(loss_at: Callable[[float], float]) -> float:
    """The γ that `scale="auto"` picks along the ray γ·ΔW₀, from `loss_at(γ)` evaluations.

    Walks the decades of `SCALE_DECADES` downhill from `SCALE_START`: upward while the
    loss does not rise (10⁻³, 10⁻², … up to 1), or, when it rises from the start, downward
    while it falls (10⁻⁴, … down to 10⁻⁶: with many layers overshooting together the best
    γ can be small). Three evaluations when the minimum is at the start's neighbour or
    the start, at most five. Then, if the best decade has an evaluated neighbour on each
    side, returns the vertex of the parabola through the three points in log10 γ, kept
    within half a decade of the best one (not evaluated again). A non-finite loss counts
    as a rise."""
    seen: dict[int, float] = {}

    def loss(i: int) -> float:
        if i not in seen:
            y = loss_at(SCALE_DECADES[i])
            seen[i] = y if math.isfinite(y) else math.inf
        return seen[i]

    last = len(SCALE_DECADES) - 1
    i = SCALE_DECADES.index(SCALE_START)
    if loss(i + 1) <= loss(i):
        i += 1
        while i < last and loss(i + 1) <= loss(i):
            i += 1
    else:
        while i > 0 and loss(i - 1) < loss(i):
            i -= 1
    if i - 1 not in seen or i + 1 not in seen or not all(map(math.isfinite, (seen[i - 1], seen[i], seen[i + 1]))):
        return SCALE_DECADES[i]
    y0, y1, y2 = seen[i - 1], seen[i], seen[i + 1]
    bend = y0 - 2 * y1 + y2  # > 0 unless y1 ties a neighbour (the decades are 1 apart in log10)
    if not bend > 0:
        return SCALE_DECADES[i]
    x1 = math.log10(SCALE_DECADES[i])
    vertex = x1 - 0.5 * (y2 - y0) / bend
    return 10 ** min(max(vertex, x1 - 0.5), x1 + 0.5)


@torch.no_grad()
def mean_loss(model, batches: Sequence, loss_fn) -> float:
    """The mean of `loss_fn(model, batch)` over `batches` in eval mode (modes restored)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        total = sum(float(loss_fn(model, b)) for b in batches) / len(batches)
    finally:
        for m, mode in modes:
            m.training = mode
    return total if math.isfinite(total) else math.inf


class CurvatureGuidedInit(Initializer):
    """CG-LoRA (Zheng & Proutière, arXiv 2603.29824): ΔW₀ = −γ·G^{-1/2}[G^{-1/2}∇W A^{-1/2}]_r A^{-1/2},
    γ times the best rank-r approximation, in the K-FAC curvature norm, of the damped Newton
    step (derivation: docs/methods/cglora.md).

    Options: `damping` λ (relative: λ·tr(M)/k is added to each K-FAC factor M (k, k));
    `scale` γ: a number (1 = the full Newton step), or "auto" (default): `search_scale` on
    the loss of the first `search_batches` calibration batches (3–4 forward passes each;
    the layers' Newton steps are computed independently and overshoot together);
    `shift` (subtract ΔW₀ from W: the model starts at its base function); `num_batches`
    (calibration batches used); `dense_limit` (a larger side keeps its diagonal, or with
    `sketch_size=s` > 0 a rank-s Nyström sketch of its second moment, whose curvature is
    never below the true one: `geopeft.calibration.Sketch`); `progress` (a tqdm bar)."""

    name = "cg"
    needs_data = True

    def __init__(self, damping: float = 0.1, scale: float | str = "auto", shift: bool = False,
                 num_batches: int = DEFAULT_BATCHES, search_batches: int = 1,
                 dense_limit: int = DEFAULT_DENSE_LIMIT, sketch_size: int = 0,
                 progress: bool = True):
        if not float(damping) >= 0:
            raise ValueError(f"damping must be >= 0, got {damping!r}")
        if scale != "auto" and not (isinstance(scale, (int, float)) and float(scale) > 0):
            raise ValueError(f"scale must be 'auto' or a number > 0, got {scale!r}")
        self.damping = float(damping)
        self.scale = scale if scale == "auto" else float(scale)
        self.shift = bool(shift)
        self.num_batches = _check_batches(num_batches)
        self.search_batches = _check_batches(search_batches)
        self.dense_limit = int(dense_limit)
        self.sketch_size = check_sketch_size(sketch_size)
        self.progress = bool(progress)
        #: the γ the last `initialize` used (the search's choice when scale="auto")
        self.chosen_scale: float | None = None

    def initialize(self, adapters: Sequence[tuple[str, Adapter]], model=None, batches=None, loss_fn=None):
        taken = list(itertools.islice(batches, self.num_batches)) if batches is not None else None
        stats = calibrate(model, adapters, taken, loss_fn, num_batches=self.num_batches,
                          dense_limit=self.dense_limit, sketch_size=self.sketch_size, progress=self.progress)
        steps = {}
        for name, adapter in adapters:
            st = stats.pop(name)  # each layer's statistics freed once used
            p, q = newton_lowrank(st.grad, st.input_moment, st.output_moment, adapter.rank, self.damping)
            steps[name] = product_svd(p, q)

        def write(gamma: float) -> None:
            for name, adapter in adapters:
                u, sigma, v = steps[name]
                set_from_svd(name, adapter, u, gamma * sigma, v)

        if self.scale == "auto":
            search = taken[:self.search_batches]

            def loss_at(gamma: float) -> float:
                write(gamma)
                return mean_loss(model, search, loss_fn)

            self.chosen_scale = search_scale(loss_at)
        else:
            self.chosen_scale = self.scale
        write(self.chosen_scale)
        if self.shift:
            for _, adapter in adapters:
                shift_base(adapter)

    def options(self):
        return {"damping": self.damping, "scale": self.scale, "shift": self.shift,
                "num_batches": self.num_batches, "search_batches": self.search_batches,
                "dense_limit": self.dense_limit, "sketch_size": self.sketch_size, "progress": self.progress}


class LoRAGAInit(Initializer):
    """LoRA-GA (Wang, Yu, Li, NeurIPS 2024, arXiv 2407.05000): with ∇W = U Σ Vᵀ over the
    calibration batches, A₀ = ζ·V[:, :r]ᵀ, B₀ = ζ·U[:, r:2r], ζ = d_out^{1/4}/√γ (the paper's
    "stable" scale, γ = `stable_gamma`), and W ← W − s·B₀A₀ (`shift`, default True): the first
    step's ΔW then follows the top-2r part of the gradient. Needs 2r ≤ min(m, n)."""

    name = "lora_ga"
    requires = frozenset({"A", "B"})
    needs_data = True

    def __init__(self, stable_gamma: float = 16.0, shift: bool = True,
                 num_batches: int = DEFAULT_BATCHES, progress: bool = True):
        if not float(stable_gamma) > 0:
            raise ValueError(f"stable_gamma must be > 0, got {stable_gamma!r}")
        self.stable_gamma = float(stable_gamma)
        self.shift = bool(shift)
        self.num_batches = _check_batches(num_batches)
        self.progress = bool(progress)

    def initialize(self, adapters, model=None, batches=None, loss_fn=None):
        for name, adapter in adapters:
            m, n = adapter.shape
            if 2 * adapter.rank > min(m, n):
                raise ConfigError(f"lora_ga splits 2r = {2 * adapter.rank} singular vectors between B and A, "
                                  f"more than layer {name!r} ({m}x{n}) has: use rank <= {min(m, n) // 2}")
        stats = calibrate(model, adapters, batches, loss_fn, num_batches=self.num_batches,
                          moments=False, progress=self.progress)
        for name, adapter in adapters:
            r, m = adapter.rank, adapter.shape[0]
            u, _, v = top_svd(stats[name].grad, 2 * r)
            zeta = m ** 0.25 / self.stable_gamma ** 0.5
            adapter.A.copy_(zeta * v[:, :r].mT)
            adapter.B.copy_(zeta * u[:, r:2 * r])
            if self.shift:
                shift_base(adapter)

    def options(self):
        return {"stable_gamma": self.stable_gamma, "shift": self.shift,
                "num_batches": self.num_batches, "progress": self.progress}


class PiSSAInit(Initializer):
    """PiSSA (Meng, Wang, Zhang, NeurIPS 2024, arXiv 2404.02948): the adapter takes the
    principal part of W = U Σ Vᵀ, ΔW₀ = U_r Σ_r V_rᵀ, and the base keeps the residual
    W − ΔW₀ (always shifted: the model's function is unchanged). SVD in fp32."""

    name = "pissa"

    def initialize(self, adapters, model=None, batches=None, loss_fn=None):
        for name, adapter in adapters:
            w = adapter.base_weight()
            if w.is_meta:
                raise ConfigError(f"pissa needs the base weight of {name!r}, which is on the meta device")
            u, sigma, v = top_svd(w.detach().float(), adapter.rank)
            set_from_svd(name, adapter, u, sigma, v)
            shift_base(adapter)
