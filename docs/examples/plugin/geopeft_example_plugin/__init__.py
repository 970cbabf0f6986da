"""Example geopeft plugin: the `oblique` manifold and the `scaled_gd` preconditioner."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

import geopeft
from geopeft.kernels import full


class ObliqueManifold(geopeft.Manifold):
    """Rows on the unit sphere: x (..., n, p) with ‖x[..., i, :]‖ = 1 for every row i."""

    name = "oblique"

    def project_tangent(self, x: Tensor, u: Tensor) -> Tensor:
        return u - x * (x * u).sum(-1, keepdim=True)

    def retract(self, x: Tensor, u: Tensor) -> Tensor:
        return self.project(x + u)

    def project(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)

    def violation(self, x: Tensor) -> Tensor:
        return (x.norm(dim=-1) - 1).abs().amax(-1)

    def random_point(self, shape: Sequence[int], generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        return self.project(torch.randn(*shape, generator=generator, dtype=dtype))


class ScaledGD(geopeft.GradientTransform):
    """g_A ← (BᵀB + δI)⁻¹ g_A and g_B ← g_B (AAᵀ + δI)⁻¹, batched over same-shape adapters.
    The r×r solves run in fp32; δ > 0 keeps them finite when B = 0."""

    name = "scaled_gd"
    requires = frozenset({"A", "B"})
    exclusive = "gram_preconditioner"  # not to be chained with another such (e.g. lorapro)

    def __init__(self, delta: float = 1e-6):
        if delta <= 0:
            raise ValueError(f"delta must be > 0, got {delta}")
        self.delta = float(delta)

    def transform(self, adapter, grads, state):
        return self.transform_group([adapter], [grads], [state])[0]

    def transform_group(self, adapters, grads, states):
        a = torch.stack([full(ad.A).detach().float() for ad in adapters])  # (G, r, n)
        b = torch.stack([full(ad.B).detach().float() for ad in adapters])  # (G, m, r)
        ga = torch.stack([g["A"].float() for g in grads])
        gb = torch.stack([g["B"].float() for g in grads])
        eye = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
        new_ga = torch.linalg.solve(b.mT @ b + self.delta * eye, ga)
        new_gb = torch.linalg.solve(a @ a.mT + self.delta * eye, gb.mT).mT  # gb (AAᵀ+δI)⁻¹, symmetric
        return [{"A": new_ga[i].to(g["A"].dtype), "B": new_gb[i].to(g["B"].dtype)}
                for i, g in enumerate(grads)]

    def options(self):
        return {"delta": self.delta}


@geopeft.hookimpl
def register_manifolds(register):
    register("oblique", ObliqueManifold)


@geopeft.hookimpl
def register_gradient_transforms(register):
    register("scaled_gd", ScaledGD)
