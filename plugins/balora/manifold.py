"""The `balanced` manifold: LoRA pairs (B, A) with BᵀB = AAᵀ, reached without changing BA."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from geopeft import Manifold
from geopeft.kernels import (
    balance,
    balance_violation,
    balanced_tangent,
    default_rank_rtol,
    push_through_basis_change,
)

logger = logging.getLogger("geopeft.plugins.balora")

Pair = tuple[Tensor, Tensor]


class BalancedManifold(Manifold):
    """Pairs (B (…, m, r), A (…, r, n)) with BᵀB = AAᵀ; a coupled manifold on the key "B,A".

    `project` maps each pair to the nearest balanced pair with the same product BA,
    (B R⁻¹, R A) with R symmetric positive definite (`geopeft.kernels.balance`): the
    identity on balanced pairs, continuous, no column flipped or reordered; batched over
    same-shape pairs, thin QRs in the stack's dtype, r×r work in float64. Pairs whose product has
    numerical rank < r — σ_r(BA) ≤ rank_rtol·σ_1(BA), default rank_rtol = max(m, n)·ε
    of the dtype (ε = 1.19e-7 in float32) — are left unchanged, and how many is logged
    at debug level on the "geopeft.plugins.balora" logger: balancing them would zero
    directions for good (LoRA's B = 0 at init). They are balanced as soon as BA has full rank.

    The optimizer calls `project` after every `project_every`-th step (post_step = "project")
    and, with `moments="transport"`, `transport` to push the first moments through the
    change of basis. Weight decay shrinks B and A alike and keeps a pair balanced, so the
    optimizer applies it as for LoRA (`scale_invariant`).
    """

    name = "balanced"
    coupled = True
    post_step = "project"
    scale_invariant = True  # (cB, cA) is balanced when (B, A) is: weight decay is kept

    def __init__(self, rank_rtol: float | None = None):
        if rank_rtol is not None and not 0.0 <= float(rank_rtol) < 1.0:
            raise ValueError(f"rank_rtol must be in [0, 1) (a relative singular-value tolerance), "
                             f"got {rank_rtol!r}")
        self.rank_rtol = None if rank_rtol is None else float(rank_rtol)

    def shape_problem(self, shape):
        if (len(shape) != 2 or len(shape[0]) != 2 or len(shape[1]) != 2 or shape[0][1] != shape[1][0]
                or shape[0][1] > min(shape[0][0], shape[1][1])):
            return ("balanced pairs a B (m, r) with an A (r, n), r <= min(m, n) — two factors, the "
                    "columns of the first matching the rows of the second (key 'B,A', in that order)")
        return None

    def project(self, x: Pair) -> Pair:
        b, a = x
        out = balance(b, a, self.rank_rtol)
        if logger.isEnabledFor(logging.DEBUG):  # counting needs a device sync: only when asked
            skipped = int((~out.full_rank).sum())
            if skipped:
                m, r = b.shape[-2:]
                n = a.shape[-1]
                rtol = default_rank_rtol(m, n, b.dtype) if self.rank_rtol is None else self.rank_rtol
                logger.debug("balanced: %d of %d pairs B %dx%d, A %dx%d left unbalanced: their "
                             "product BA has numerical rank < %d (sigma_min <= %.3g * sigma_max); "
                             "they are balanced once BA has full rank", skipped,
                             out.full_rank.numel(), m, r, r, n, r, rtol)
        return out.B, out.A

    def violation(self, x: Pair) -> Tensor:
        """‖BᵀB − AAᵀ‖_F / ‖BᵀB‖_F per pair."""
        return balance_violation(*x)

    def initial_violation(self, x: Pair) -> Tensor:
        """0 for the pairs `project` leaves as they are by design (rank(BA) < r: LoRA's
        B = 0 at init), `violation` for the others."""
        full = balance(x[0], x[1], self.rank_rtol).full_rank
        v = self.violation(x)
        return torch.where(full, v, torch.zeros_like(v))

    def project_tangent(self, x: Pair, u: Pair) -> Pair:
        return balanced_tangent(x[0], x[1], u[0], u[1])

    def retract(self, x: Pair, u: Pair) -> Pair:
        return self.project((x[0] + u[0], x[1] + u[1]))

    def transport(self, x: Pair, y: Pair, v: Pair) -> Pair:
        """Gradient-like v = (v_B, v_A) at x = (B, A) carried to y = (B R⁻¹, R A), a pair with
        the same product (y = project(x)): (v_B Rᵀ, R⁻ᵀ v_A), as gradients of L(BA) change
        under the basis change, then projected onto T_y. Used for the optimizer's first
        moments (moments="transport").

        A gradient of L(BA) at a balanced pair is already tangent (sym(BᵀG Aᵀ − BᵀG Aᵀ) = 0),
        and it is pushed to the gradient at y exactly, so the projection only drops the normal
        part {(BΛ, −ΛA): Λ symmetric} — directions that change the basis, not BA, which the
        next projection undoes anyway — and makes the result tangent at y for any y and v."""
        pushed = push_through_basis_change(x[0], x[1], y[0], y[1], v[0], v[1])
        return balanced_tangent(y[0], y[1], *pushed)

    def random_point(self, shape: Sequence[Any], generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> Pair:
        """`shape` is the pair of shapes ((…, m, r), (…, r, n)); a Gaussian pair, balanced."""
        shape_b, shape_a = (tuple(s) for s in shape)
        b = torch.randn(*shape_b, generator=generator, dtype=dtype)
        a = torch.randn(*shape_a, generator=generator, dtype=dtype)
        return self.project((b, a))

    def options(self) -> dict[str, Any]:
        return {"rank_rtol": self.rank_rtol}
