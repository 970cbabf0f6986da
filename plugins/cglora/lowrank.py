"""The low-rank linear algebra of the data-aware initializers (fp32, one layer at a time).

    damped_inv_sqrt(M, λ)       (M + λ·tr(M)/k·I)^{-1/2} of a PSD (k, k) matrix, or of a diagonal (k,)
    top_svd(M, r)               the r leading singular triplets (exact, or randomized when large)
    newton_lowrank(stats, r, λ) (P (m, r), Q (r, n)): P·Q is the best rank-r approximation, in
                                the K-FAC curvature norm, of the damped Newton step
    product_svd(P, Q)           a thin SVD u·diag(σ)·vᵀ of P·Q from two QRs and an r×r SVD
"""

from __future__ import annotations

import torch
from torch import Tensor

#: above this min(m, n) the top-r SVD is randomized (torch.svd_lowrank, 4 power iterations)
EXACT_SVD_LIMIT = 2048


def damped_inv_sqrt(moment: Tensor, damping: float) -> Tensor:
    """(M + λ̄ I)^{-1/2} with λ̄ = damping · tr(M)/k (damping relative to M's mean
    eigenvalue, so it does not depend on how the loss is normalised). M (k, k)
    symmetric PSD → (k, k); M (k,) a diagonal → (k,). M = 0 gives the identity."""
    m = moment.float()
    mean = (m if m.dim() == 1 else torch.diagonal(m)).mean().clamp_min(0)
    lam = damping * mean if mean > 0 else torch.ones_like(mean)
    if m.dim() == 1:
        return (m.clamp_min(0) + lam).clamp_min(torch.finfo(m.dtype).tiny).rsqrt()
    evals, evecs = torch.linalg.eigh(m)
    inv = (evals.clamp_min(0) + lam).clamp_min(torch.finfo(m.dtype).tiny).rsqrt()
    return (evecs * inv) @ evecs.mT


def _left(w: Tensor, x: Tensor) -> Tensor:
    """w·x for w a (m, m) matrix or a (m,) diagonal."""
    return w[:, None] * x if w.dim() == 1 else w @ x


def _right(x: Tensor, w: Tensor) -> Tensor:
    """x·w for w a (n, n) matrix or a (n,) diagonal."""
    return x * w if w.dim() == 1 else x @ w


def top_svd(m: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U (m, r), σ (r,), V (n, r)) of the r largest singular values of m, descending."""
    if min(m.shape) > EXACT_SVD_LIMIT:
        u, s, v = torch.svd_lowrank(m, q=min(rank + 10, min(m.shape)), niter=4)
        return u[:, :rank], s[:rank], v[:, :rank]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank].mT


def newton_lowrank(grad: Tensor, input_moment: Tensor, output_moment: Tensor, rank: int,
                   damping: float) -> tuple[Tensor, Tensor]:
    """(P (m, r), Q (r, n)) with P·Q = argmin_{rank ≤ r} ‖G^{1/2}(ΔW − ΔW_N)A^{1/2}‖_F, where
    A, G are the damped moments and ΔW_N = −G⁻¹·∇W·A⁻¹ the damped K-FAC Newton step.

    With Z = G^{1/2}·ΔW·A^{1/2} the norm is ‖Z + M‖_F, M = G^{-1/2}·∇W·A^{-1/2} (ranks of Z
    and ΔW agree), so Eckart–Young gives Z = −[M]_r = −U_r Σ_r V_rᵀ and
    ΔW = −G^{-1/2} U_r Σ_r V_rᵀ A^{-1/2}."""
    gi = damped_inv_sqrt(output_moment, damping)
    ai = damped_inv_sqrt(input_moment, damping)
    whitened = _right(_left(gi, grad.float()), ai)
    u, s, v = top_svd(whitened, rank)
    return -_left(gi, u * s), _right(v.mT, ai)


def product_svd(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(u (m, r), σ (r,), v (n, r)) with u·diag(σ)·vᵀ = P·Q, u and v orthonormal, σ descending:
    P = Q_P R_P, Qᵀ = Q_Q R_Q, R_P R_Qᵀ = a·diag(σ)·bᵀ → u = Q_P a, v = Q_Q b. O((m + n) r²)."""
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q.mT)
    a, s, bh = torch.linalg.svd(rp @ rq.mT)
    return qp @ a, s, qq @ bh.mT
