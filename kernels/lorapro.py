"""LoRA-Pro's closed-form gradient adjustment, batched over same-shape adapters.

For ΔW = s·B·A (B (G, m, r), A (G, r, n), s per adapter) and the factor gradients
g_A = s·Bᵀg, g_B = s·g·Aᵀ of a full gradient g that is never formed, the adjusted
gradients (Wang et al., LoRA-Pro, ICLR 2025, arXiv 2407.18242)

    ĝ_A = (1/s²)·P⁺ g_A + X A
    ĝ_B = (1/s²)·(I − B P⁺ Bᵀ) g_B Q⁺ − B X,        P = BᵀB, Q = AAᵀ (r × r)

make the equivalent gradient g̃ = s(B ĝ_A + ĝ_B A) = Π_B g + (I − Π_B) g Π_A the
orthogonal projection of g onto {B·Y + Z·A}: the closest low-rank-realisable
gradient. X (any r × r) does not change g̃; it is chosen to keep (ĝ_A, ĝ_B) closest
to (g_A, g_B), which is the Sylvester equation  P X + X Q = −(1/s²)·P⁺ g_A Aᵀ.

Numerics. Everything runs in float32 (float64 stays float64). P and Q are
eigendecomposed once (`torch.linalg.eigh`, symmetric), and both the inverses and
the Sylvester solve use those eigenpairs:

- P⁺, Q⁺ are *truncated spectral pseudo-inverses*: eigenvalues λ ≤ δ·λ_max (and
  below the dtype's smallest normal number) count as zero. δ is relative, so the
  result does not depend on the factors' magnitude (the official code adds an
  absolute 1e-8·I, not negligible while B is small: right after B = 0 BᵀB is of
  order m·lr², e.g. 4e-8 for m = 384, lr = 1e-5). For a
  rank-deficient B (or A) B P⁺ Bᵀ is then still the exact orthogonal projector
  onto range(B), so g̃ stays the least-squares optimum; B = 0 gives P⁺ = 0,
  ĝ_A = 0 and ĝ_B = (1/s²) g_B Q⁺ (g̃ = g Π_A).
- X = U [(Uᵀ C V) ⊘ (λ_i + μ_j)] Vᵀ with P = U diag(λ) Uᵀ, Q = V diag(μ) Vᵀ; entries
  whose λ_i + μ_j is zero (both directions truncated) are set to 0, which is the
  least-norm solution.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .products import pair_grams, two_products

#: default relative eigenvalue cutoff: ~10·r·eps(float32) for r = 8; below it
#: float32 eigenvalues of a Gram matrix are rounding noise
DEFAULT_DELTA = 1e-6


class Adjusted(NamedTuple):
    """LoRA-Pro's adjusted gradients (G, r, n) and (G, m, r), and the Sylvester X (G, r, r)."""

    grad_A: Tensor
    grad_B: Tensor
    X: Tensor


class _Eig(NamedTuple):
    vals: Tensor   # (G, r) eigenvalues, truncated ones set to 0
    vecs: Tensor   # (G, r, r)
    inv: Tensor    # (G, r) 1/λ for kept eigenvalues, 0 for truncated ones

    def pinv(self) -> Tensor:
        return (self.vecs * self.inv.unsqueeze(-2)) @ self.vecs.mT


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _eig(gram: Tensor, delta: float) -> _Eig:
    vals, vecs = torch.linalg.eigh(gram)
    vals = vals.clamp_min(0)
    floor = vals.amax(-1, keepdim=True) * delta
    floor = floor.clamp_min(torch.finfo(vals.dtype).tiny)
    keep = vals > floor
    vals = torch.where(keep, vals, torch.zeros_like(vals))
    inv = torch.where(keep, 1.0 / torch.where(keep, vals, torch.ones_like(vals)), torch.zeros_like(vals))
    return _Eig(vals, vecs, inv)


def gram_eigs(A: Tensor, B: Tensor, delta: float = DEFAULT_DELTA) -> tuple[_Eig, _Eig]:
    """Eigen-data of P = BᵀB and Q = AAᵀ from one batched eigh over (2G, r, r), in the
    compute dtype; pass it as `eigs=` to both functions below to decompose only once."""
    dtype = compute_dtype(A.dtype)
    A, B = A.to(dtype), B.to(dtype)
    return eigs_of(B.mT @ B, A @ A.mT, delta)


def eigs_of(P: Tensor, Q: Tensor, delta: float = DEFAULT_DELTA) -> tuple[_Eig, _Eig]:
    """Eigen-data of the Gram matrices P, Q (G, r, r), one batched eigh over (2G, r, r)."""
    g = P.shape[0]
    both = _eig(torch.cat([P, Q]), delta)
    return (_Eig(both.vals[:g], both.vecs[:g], both.inv[:g]),
            _Eig(both.vals[g:], both.vecs[g:], both.inv[g:]))


def _scales(scaling: Tensor | float, like: Tensor) -> Tensor:
    s = torch.as_tensor(scaling, dtype=like.dtype, device=like.device)
    return s.reshape(-1, 1, 1) if s.dim() else s


def sylvester_eig(p: _Eig, q: _Eig, c: Tensor) -> Tensor:
    """Least-norm X with P X + X Q = C for symmetric PSD P, Q given by their eigen-data."""
    denom = p.vals.unsqueeze(-1) + q.vals.unsqueeze(-2)  # (G, r, r): λ_i + μ_j
    safe = denom > 0
    inv = torch.where(safe, 1.0 / torch.where(safe, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    return p.vecs @ ((p.vecs.mT @ c @ q.vecs) * inv) @ q.vecs.mT


def lorapro_adjust(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor, scaling: Tensor | float,
                   delta: float = DEFAULT_DELTA, eigs: tuple[_Eig, _Eig] | None = None) -> Adjusted:
    """LoRA-Pro's adjusted gradients for stacked factors A (G, r, n), B (G, m, r) and their
    gradients; `scaling` is a float or a (G,) tensor. Inputs are upcast to float32 (float64
    kept); the result is in that compute dtype.

    Two passes over each side's thin data, r × r work in between: `pair_grams` gives
    BᵀB, Bᵀg_B (over m) and AAᵀ, A g_Aᵀ (over n); then, with P⁺c = P⁺/s², Q⁺c = Q⁺/s²,
        ĝ_A = P⁺c·g_A + X·A                         (`two_products` on g_Aᵀ, Aᵀ)
        ĝ_B = g_B·Q⁺c + B·(−P⁺(Bᵀg_B)Q⁺c − X)        (`two_products` on g_B, B)
    which is (1/s²)(I − B P⁺ Bᵀ) g_B Q⁺ − B X of the module docstring, expanded."""
    dtype = compute_dtype(A.dtype)
    A, B, ga, gb = (t.to(dtype) for t in (A, B, grad_A, grad_B))
    c = 1.0 / _scales(scaling, A)  # 1/s, applied twice so that huge or tiny s cannot overflow
    a_t, ga_t = A.mT, ga.mT                        # (G, n, r) views
    bb, bgb, _ = (t.to(dtype) for t in pair_grams(B, gb))       # BᵀB, Bᵀg_B
    aa, aga, _ = (t.to(dtype) for t in pair_grams(a_t, ga_t))   # AAᵀ, A g_Aᵀ
    p, q = eigs or eigs_of(bb, aa, delta)
    p_inv = p.pinv()
    pc = (p_inv * c) * c                           # P⁺/s²                    (G, r, r)
    qc = (q.pinv() * c) * c                        # Q⁺/s²
    x = sylvester_eig(p, q, -(pc @ aga.mT))        # P X + X Q = −(1/s²) P⁺ g_A Aᵀ
    grad_a = two_products(ga_t, pc.mT, a_t, x.mT).mT
    grad_b = two_products(gb, qc, B, -(p_inv @ bgb @ qc) - x)
    return Adjusted(grad_a, grad_b, x)


def equivalent_gradient(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor,
                        scaling: Tensor | float) -> Tensor:
    """g̃ = s·(B ĝ_A + ĝ_B A) for the given factor gradients (G, m, n), in the compute dtype."""
    dtype = compute_dtype(A.dtype)
    A, B, ga, gb = (t.to(dtype) for t in (A, B, grad_A, grad_B))
    return _scales(scaling, A) * (B @ ga + gb @ A)


def lorapro_equivalent_gradient(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor,
                                scaling: Tensor | float, delta: float = DEFAULT_DELTA,
                                eigs: tuple[_Eig, _Eig] | None = None) -> Tensor:
    """LoRA-Pro's g̃ = Π_B g + (I − Π_B) g Π_A (G, m, n) from the factor gradients alone
    (X drops out), in the compute dtype; used by the full mode."""
    dtype = compute_dtype(A.dtype)
    A, B, ga, gb = (t.to(dtype) for t in (A, B, grad_A, grad_B))
    c = 1.0 / _scales(scaling, A)
    p, q = eigs or gram_eigs(A, B, delta)
    p_inv = p.pinv()
    h = (gb * c) @ q.pinv()                        # (1/s) g_B Q⁺
    h = h - B @ (p_inv @ (B.mT @ h))
    return B @ (p_inv @ (ga * c)) + h @ A
