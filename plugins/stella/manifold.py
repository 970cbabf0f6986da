"""The Stiefel manifold St(n, p) = {x ∈ R^{n×p} : xᵀx = I}, batched over leading dims."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from geopeft import Manifold
from geopeft.kernels import (
    POLAR_METHODS,
    canonical_rgrad,
    cayley_retract,
    gram_violation,
    polar,
    polar_retract_step,
    qr_retract,
    random_stiefel,
    tangent_project,
)

METRICS = ("canonical", "euclidean")
RETRACTIONS = ("polar", "qr", "cayley")


class StiefelManifold(Manifold):
    """Orthonormal columns: x (..., n, p), n ≥ p, xᵀx = I_p.

    Options:
      metric       "canonical" (Riemannian gradient g − x gᵀ x, StelLA's step 1) or
                   "euclidean" (g − x·sym(xᵀg));
      retraction   "polar" (default), "qr" (sign-fixed) or "cayley" (low-rank, O(n·p²));
      polar_method "gram" (default; eigh of the p×p Gram matrix), "svd" or "newton_schulz";
      step_scaling StelLA's post-step scaling of Δ by √(d/n) for an n-row factor
                   (skipped when n = d): True takes d = `hidden_size`; a number is d itself;
                   False (default) leaves Δ alone;
      hidden_size  the model's hidden size d; `geopeft.adapt` fills it from the model's
                   config when the model declares one, else with the most common dimension
                   among the adapted layers (logged at INFO); an explicit value wins.
    """

    name = "stiefel"

    def __init__(self, metric: str = "canonical", retraction: str = "polar", polar_method: str = "gram",
                 step_scaling: bool | float = False, hidden_size: int | None = None):
        for label, value, allowed in (("metric", metric, METRICS), ("retraction", retraction, RETRACTIONS),
                                      ("polar_method", polar_method, POLAR_METHODS)):
            if value not in allowed:
                raise ValueError(f"stiefel {label}={value!r} is not one of {', '.join(allowed)}")
        if isinstance(step_scaling, bool):
            if step_scaling and hidden_size is None:
                raise ValueError(
                    "step_scaling=True scales each step by √(d/n) with d the model's hidden size, "
                    "which this model does not declare (no config.hidden_size): pass hidden_size=<d>, "
                    "a number step_scaling=<d>, or step_scaling=False")
        elif not (isinstance(step_scaling, (int, float)) and step_scaling > 0):
            raise ValueError(f"step_scaling must be True, False or a positive number d, got {step_scaling!r}")
        if hidden_size is not None and not (isinstance(hidden_size, int) and hidden_size > 0):
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.metric = metric
        self.retraction = retraction
        self.polar_method = polar_method
        self.step_scaling = step_scaling
        self.hidden_size = hidden_size

    @property
    def reference_size(self) -> float | None:
        """d of the √(d/n) step scaling, or None when steps are not scaled."""
        if self.step_scaling is True:
            return float(self.hidden_size)
        if self.step_scaling is False:
            return None
        return float(self.step_scaling)

    def shape_problem(self, shape):
        n, p = shape
        if n < p:
            return (f"stiefel needs at least as many rows as columns (p orthonormal columns in "
                    f"R^n, n >= p), and {n} < {p}")
        return None

    def project_tangent(self, x: Tensor, u: Tensor) -> Tensor:
        return tangent_project(x, u)

    def egrad_to_rgrad(self, x: Tensor, g: Tensor) -> Tensor:
        return canonical_rgrad(x, g) if self.metric == "canonical" else tangent_project(x, g)

    def retract(self, x: Tensor, u: Tensor) -> Tensor:
        if self.retraction == "polar":
            return polar(x + u, self.polar_method)
        if self.retraction == "qr":
            return qr_retract(x, u)
        return cayley_retract(x, u)

    def step_scale(self, rows: int) -> float:
        """√(d/n) for an n-row factor; 1 when steps are not scaled or n = d."""
        d = self.reference_size
        return 1.0 if d is None or rows == d else math.sqrt(d / rows)

    def retract_step(self, x: Tensor, new: Tensor) -> Tensor:
        """StelLA's step 3: Δ = new − x scaled by √(d/n), projected to T_x, retracted from x.
        The polar routes run it as one fused kernel (the same point)."""
        scale = self.step_scale(x.shape[-2])
        if self.retraction == "polar" and self.polar_method in ("gram", "newton_schulz"):
            return polar_retract_step(x, new, scale, self.polar_method)
        return self.retract(x, self.project_tangent(x, scale * (new - x)))

    def project(self, x: Tensor) -> Tensor:
        """The nearest orthonormal matrix (polar factor by SVD: x need not be near St)."""
        return polar(x, "svd")

    def violation(self, x: Tensor) -> Tensor:
        """‖xᵀx − I‖_F per matrix."""
        return gram_violation(x)

    def random_point(self, shape: Sequence[int], generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        return random_stiefel(shape, generator=generator, dtype=dtype)

    def options(self) -> dict[str, Any]:
        return {"metric": self.metric, "retraction": self.retraction, "polar_method": self.polar_method,
                "step_scaling": self.step_scaling, "hidden_size": self.hidden_size}
