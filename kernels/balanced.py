"""Balanced LoRA pairs (BaLoRA): B (…, m, r), A (…, r, n) with the same product BA and
BᵀB = AAᵀ. Pure batched torch functions over stacked pairs; the `balanced` manifold of
the BaLoRA plugin calls them.

For every invertible R, (B R⁻¹, R A) has the same product; it is balanced iff P = RᵀR
solves P·AAᵀ·P = BᵀB, whose only symmetric positive-definite solution is the matrix
geometric mean P = (AAᵀ)⁻¹ # BᵀB. So the balancing changes of basis are R = O·P^½ with O
orthogonal, and the balanced pairs with product BA form the orbit (B₀Oᵀ, O A₀). `balance`
takes R = P^½ itself, the symmetric one, nearest the identity (‖R − I‖_F is smallest at
O = I, by the polar decomposition): the identity on balanced pairs (P = I), continuous
in (B, A), never flipping or reordering columns. Through thin QRs and r×r work:

    B = Q_B R_B,  Aᵀ = Q_A R_A,  R_B R_Aᵀ = U Σ Vᵀ            (σ(BA) = Σ)
    R₀ = Σ^-½ Uᵀ R_B = X Λ Yᵀ,  O = Y Xᵀ                       (R = O R₀ = Y Λ Yᵀ = P^½)
    B ← Q_B U √Σ X Yᵀ,  A ← Y Xᵀ √Σ Vᵀ Q_Aᵀ                   (= B R⁻¹, R A)

R₀ balances (it gives the pair in BA's singular basis), O turns that pair to the one
reached by a symmetric R, and no inverse is ever applied to B or A. O((m + n) r²) per
pair; the r×r work in float64. The singular values Σ of the core are those of BA, so the
same SVD tells whether BA has full numerical rank r; a pair whose product is
rank-deficient is left as it is (balancing it would put zero columns in B *and* zero
rows in A, a saddle the gradient never leaves: B = 0 at LoRA's init would stay 0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .products import two_products


class Balanced(NamedTuple):
    """The result of `balance`: the new pair and which members were balanced."""

    B: Tensor
    A: Tensor
    #: (…,) bool: True where BA had full numerical rank r and the pair was balanced;
    #: False where it was left unchanged.
    full_rank: Tensor


def default_rank_rtol(m: int, n: int, dtype: torch.dtype) -> float:
    """The relative tolerance of the numerical-rank test: max(m, n)·ε of `dtype` (the
    convention of numpy's and torch's `matrix_rank`): BA has full rank r when
    σ_r(BA) > rtol·σ_1(BA)."""
    return max(m, n) * torch.finfo(dtype).eps


def _check_pair(B: Tensor, A: Tensor) -> None:
    if B.dim() < 2 or A.dim() < 2 or B.shape[-1] != A.shape[-2] or B.shape[:-2] != A.shape[:-2]:
        raise ValueError(f"a balanced pair is (B (..., m, r), A (..., r, n)) with the same leading "
                         f"dims; got B {tuple(B.shape)} and A {tuple(A.shape)} (is the manifold key "
                         f"'B,A', in that order?)")


def balance(B: Tensor, A: Tensor, rtol: float | None = None) -> Balanced:
    """The balanced pair with the same product as (B, A) nearest to it, member by member:
    (B R⁻¹, R A) with R the symmetric positive-definite change of basis that balances the
    pair (module docstring). The identity on balanced pairs (up to rounding), continuous in
    (B, A): no column is flipped or reordered.

    B (…, m, r), A (…, r, n), float32 or float64; the thin QRs run in that dtype, the r×r
    work in float64. Members whose product has numerical rank < r (σ_r ≤ rtol·σ_1, `rtol`
    default `default_rank_rtol(m, n, dtype)`) are returned unchanged and flagged False in
    `full_rank`; no Python loop over members.
    """
    _check_pair(B, A)
    m, r = B.shape[-2:]
    n = A.shape[-1]
    if r > min(m, n):  # BA (m, n) can never have rank r: nothing to balance
        return Balanced(B, A, torch.zeros(B.shape[:-2], dtype=torch.bool, device=B.device))
    tol = default_rank_rtol(m, n, B.dtype) if rtol is None else float(rtol)
    q_b, r_b = torch.linalg.qr(B)          # (…, m, r), (…, r, r)
    q_a, r_a = torch.linalg.qr(A.mT)       # (…, n, r), (…, r, r)
    r_b = r_b.double()
    u, s, vh = torch.linalg.svd(r_b @ r_a.double().mT)  # the r×r core; s descending: σ(BA)
    full = s[..., -1] > tol * s[..., 0]    # B = 0: 0 > 0 is False
    root = torch.where(full.unsqueeze(-1), s, 1.0).sqrt()  # members left alone: any finite value
    # R₀ = Σ^-½ Uᵀ R_B balances, (B R₀⁻¹, R₀ A) = (Q_B U √Σ, √Σ Vᵀ Q_Aᵀ); every balancing R is
    # O R₀ (O orthogonal), and the symmetric one is R = Y Xᵀ R₀ for R₀ = X Λ Yᵀ (polar factor)
    x, _, yh = torch.linalg.svd((u.mT @ r_b) / root.unsqueeze(-1))
    turn = x @ yh                          # Oᵀ = X Yᵀ
    k_b = (u * root.unsqueeze(-2)) @ turn  # B' = Q_B U √Σ X Yᵀ
    k_a = turn.mT @ (root.unsqueeze(-1) * vh)  # A' = Y Xᵀ √Σ Vᵀ Q_Aᵀ
    new_b = two_products(q_b, k_b)                 # the thin products: Triton on CUDA
    new_a = two_products(q_a, k_a.mT).mT
    keep = full[..., None, None]
    return Balanced(torch.where(keep, new_b, B), torch.where(keep, new_a, A), full)


def balance_violation(B: Tensor, A: Tensor) -> Tensor:
    """‖BᵀB − AAᵀ‖_F / ‖BᵀB‖_F per member, shape (…,): 0 for a balanced pair (0 for
    B = A = 0 too; inf for B = 0 with A ≠ 0, which no change of basis balances)."""
    _check_pair(B, A)
    gram_b = B.mT @ B
    gap = torch.linalg.matrix_norm(gram_b - A @ A.mT)
    ref = torch.linalg.matrix_norm(gram_b)
    return torch.where(gap == 0, torch.zeros_like(gap), gap / ref)


def balanced_tangent(B: Tensor, A: Tensor, u_b: Tensor, u_a: Tensor) -> tuple[Tensor, Tensor]:
    """Orthogonal projection of (u_b, u_a) onto the tangent space at (B, A) of the level
    set {BᵀB − AAᵀ = 0}: tangent vectors satisfy sym(Bᵀξ_B) = sym(ξ_A Aᵀ); the normal
    space is {(BΛ, −ΛA): Λ symmetric}. Λ solves the Lyapunov equation
    ½(MΛ + ΛM) = sym(Bᵀu_B − u_A Aᵀ) with M = BᵀB + AAᵀ, through the eigenbasis of M
    (pseudo-inverse where M is singular).

    Computed in float64 and returned in u's dtype: the Lyapunov solve amplifies rounding by
    cond(M) = cond(BA) at a balanced pair, which float32 would turn into a projection that
    is not idempotent to 1e-4."""
    _check_pair(B, A)
    dtypes = (u_b.dtype, u_a.dtype)
    B, A, u_b, u_a = (t.double() for t in (B, A, u_b, u_a))
    c = B.mT @ u_b - u_a @ A.mT
    c = (c + c.mT) / 2
    d, w = torch.linalg.eigh(B.mT @ B + A @ A.mT)
    ct = w.mT @ c @ w
    denom = d.unsqueeze(-1) + d.unsqueeze(-2)
    floor = denom.amax((-2, -1), keepdim=True) * torch.finfo(denom.dtype).eps
    lam_t = torch.where(denom > floor, 2 * ct / torch.where(denom > floor, denom, 1), 0)
    lam = w @ lam_t @ w.mT
    return (u_b - B @ lam).to(dtypes[0]), (u_a + lam @ A).to(dtypes[1])


def push_through_basis_change(B: Tensor, A: Tensor, new_b: Tensor, new_a: Tensor,
                              g_b: Tensor, g_a: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients (or first moments) at (B, A) carried to the same-product pair
    (new_b, new_a) = (B R⁻¹, R A): (g_b Rᵀ, R⁻ᵀ g_a) — exactly how the gradients of
    L(BA) change with the basis (∂L/∂B = G Aᵀ, ∂L/∂A = BᵀG).

    R is recovered from the pairs: Rᵀ = R_A⁻¹ Q_Aᵀ new_aᵀ (Aᵀ = Q_A R_A) and
    R⁻¹ = R_B⁻¹ Q_Bᵀ new_b (B = Q_B R_B), so (B, A) must have full rank r where the pair
    moved; members whose pair did not change (e.g. skipped by `balance`) keep g."""
    _check_pair(B, A)
    m, r = B.shape[-2:]
    if r > min(m, A.shape[-1]):  # never full rank: `balance` never moves such pairs
        return g_b, g_a
    moved = ((new_b != B).flatten(-2).any(-1) | (new_a != A).flatten(-2).any(-1))[..., None, None]
    eye = torch.eye(r, dtype=B.dtype, device=B.device)
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.mT)
    r_b = torch.where(moved, r_b, eye)  # members that did not move: an identity to solve with
    r_a = torch.where(moved, r_a, eye)
    basis_t = torch.linalg.solve_triangular(r_a, q_a.mT @ new_a.mT, upper=True)  # Rᵀ
    basis_inv = torch.linalg.solve_triangular(r_b, q_b.mT @ new_b, upper=True)   # R⁻¹
    return (torch.where(moved, g_b @ basis_t, g_b),
            torch.where(moved, basis_inv.mT @ g_a, g_a))
