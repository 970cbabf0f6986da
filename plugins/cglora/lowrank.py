"""The low-rank linear algebra of the data-aware initializers (fp32, one layer at a time).

    damped_factor(M, λ)         L with L·Lᵀ = M + λ·tr(M)/k·I (Cholesky; √ of a diagonal (k,);
                                for a `Sketch`, a low-rank-plus-identity `SketchFactor`
                                whose curvature is never below M's)
    top_svd(M, r)               the r leading singular triplets (exact, or randomized when large)
    newton_lowrank(stats, r, λ) (P (m, r), Q (r, n)): P·Q is the best rank-r approximation, in
                                the K-FAC curvature norm, of the damped Newton step
    product_svd(P, Q)           a thin SVD u·diag(σ)·vᵀ of P·Q from two QRs and an r×r SVD
"""

from __future__ import annotations

import torch
from torch import Tensor

from geopeft.calibration import Sketch

#: above this min(m, n) the top-r SVD is randomized (torch.svd_lowrank: r + max(r, 16)
#: columns, 6 power iterations); exact at or below it
EXACT_SVD_LIMIT = 2048


class SketchFactor:
    """The symmetric root S = C^{1/2} of the damped curvature a `Sketch` stands for,
    C = M̂ + (t + λ̄)·I with M̂ = U·diag(λ)·Uᵀ the Nyström approximation (U (k, r)) and
    t = tr(M) − tr(M̂) ≥ ‖M − M̂‖ (the residual is PSD), so C ⪰ M + λ̄I: the curvature is
    never underestimated and the Newton step under it decreases the dense quadratic model
    too. Exact (t = 0) when rank(M) ≤ s. Held as U, (λ + t + λ̄)^{-1/2} (r,) and
    (t + λ̄)^{-1/2}; S⁻¹ costs O(k·r) per column."""

    def __init__(self, u: Tensor, inv_root: Tensor, tail_inv_root: float):
        self.u, self.inv_root, self.tail_inv_root = u, inv_root, tail_inv_root

    def solve(self, x: Tensor, transpose: bool) -> Tensor:
        """S⁻¹·x (= S⁻ᵀ·x: S is symmetric) for x (k, cols)."""
        return self.tail_inv_root * x + self.u @ ((self.inv_root - self.tail_inv_root)[:, None] * (self.u.mT @ x))


def _sketch_factor(sketch: Sketch, damping: float) -> SketchFactor:
    """The damped factor of a sketched moment, λ̄ = damping·tr(M)/k from the exact trace."""
    u, lam = sketch.nystrom()
    trace = sketch.diag.double().clamp_min(0).sum()
    mean = trace / sketch.diag.numel()
    lam_bar = damping * mean if mean > 0 else torch.ones_like(mean)
    lam_bar = lam_bar.clamp_min(max(1e-6 * float(mean), torch.finfo(torch.float64).tiny))
    shift = (trace - lam.sum()).clamp_min(0) + lam_bar
    return SketchFactor(u.float(), (lam + shift).rsqrt().float(), float(shift.rsqrt()))


def damped_factor(moment: Tensor | Sketch, damping: float) -> Tensor | SketchFactor:
    """L with L·Lᵀ = M + λ̄I, λ̄ = damping·tr(M)/k (damping relative to M's mean eigenvalue,
    so it does not depend on how the loss is normalised): M (k, k) symmetric PSD → its
    lower Cholesky factor (k, k); M (k,) a diagonal → √(M + λ̄) (k,); a `Sketch` → the
    symmetric root `SketchFactor` of M̂ + (tr M − tr M̂ + λ̄)·I (M̂ its Nyström
    approximation). M = 0 gives I.
    A matrix that is not numerically positive definite (damping 0) gets a jitter of
    1e-6·tr(M)/k."""
    if isinstance(moment, Sketch):
        return _sketch_factor(moment, damping)
    m = moment.float()
    mean = (m if m.dim() == 1 else torch.diagonal(m)).mean().clamp_min(0)
    lam = damping * mean if mean > 0 else torch.ones_like(mean)
    if m.dim() == 1:
        return (m.clamp_min(0) + lam).clamp_min(torch.finfo(m.dtype).tiny).sqrt()
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    factor, info = torch.linalg.cholesky_ex(m + lam * eye)
    if info != 0:
        factor = torch.linalg.cholesky(m + (lam + 1e-6 * mean.clamp_min(1e-30)) * eye)
    return factor


def _solve_left(factor: Tensor | SketchFactor, x: Tensor, transpose: bool) -> Tensor:
    """L⁻¹·x (or L⁻ᵀ·x) for a lower-triangular (k, k) L, a (k,) diagonal or a `SketchFactor`."""
    if isinstance(factor, SketchFactor):
        return factor.solve(x, transpose)
    if factor.dim() == 1:
        return x / factor[:, None]
    return torch.linalg.solve_triangular(factor.mT if transpose else factor, x, upper=transpose)


def top_svd(m: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U (m, r), σ (r,), V (n, r)) of the r largest singular values of m, descending.

    Up to min(m, n) = EXACT_SVD_LIMIT: exact, from the eigendecomposition of the smaller
    Gram matrix (k × k, k = min(m, n): cheaper than a full SVD when r ≪ k; the top
    singular pairs keep full accuracy); above it randomized. A zero singular value gets
    a zero column on the long side."""
    if min(m.shape) > EXACT_SVD_LIMIT:
        u, s, v = torch.svd_lowrank(m, q=min(rank + max(rank, 16), min(m.shape)), niter=6)
        return u[:, :rank], s[:rank], v[:, :rank]
    wide = m.shape[0] <= m.shape[1]
    x = m if wide else m.mT                      # (k, l), k ≤ l
    evals, evecs = torch.linalg.eigh(x @ x.mT)   # ascending
    short = evecs[:, -rank:].flip(-1)
    s = evals[-rank:].flip(-1).clamp_min(0).sqrt()
    long = (x.mT @ short) / torch.where(s > 0, s, torch.ones_like(s))
    return (short, s, long) if wide else (long, s, short)


def newton_lowrank(grad: Tensor, input_moment: Tensor, output_moment: Tensor, rank: int,
                   damping: float) -> tuple[Tensor, Tensor]:
    """(P (m, r), Q (r, n)) with P·Q = argmin_{rank ≤ r} ‖G^{1/2}(ΔW − ΔW_N)A^{1/2}‖_F, where
    A, G are the damped moments and ΔW_N = −G⁻¹·∇W·A⁻¹ the damped K-FAC Newton step.

    With G = L_G L_Gᵀ, A = L_A L_Aᵀ (Cholesky) the norm is ‖L_Gᵀ(ΔW − ΔW_N)L_A‖_F = ‖Z + M‖_F
    for Z = L_Gᵀ ΔW L_A and M = L_G⁻¹ ∇W L_A⁻ᵀ (ranks of Z and ΔW agree), so Eckart–Young
    gives Z = −[M]_r = −U_r Σ_r V_rᵀ and ΔW = −L_G⁻ᵀ U_r Σ_r V_rᵀ L_A⁻¹. M differs from the
    symmetric whitening G^{-1/2} ∇W A^{-1/2} by orthogonal factors on each side
    (G^{-1/2} = O·L_G⁻¹ with O orthogonal), so Σ_r and ΔW are the same; Cholesky is the
    cheaper factorisation."""
    lg = damped_factor(output_moment, damping)
    la = damped_factor(input_moment, damping)
    whitened = _solve_left(la, _solve_left(lg, grad.float(), transpose=False).mT, transpose=False).mT
    u, s, v = top_svd(whitened, rank)
    return -_solve_left(lg, u * s, transpose=True), _solve_left(la, v, transpose=True).mT


def product_svd(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(u (m, r), σ (r,), v (n, r)) with u·diag(σ)·vᵀ = P·Q, u and v orthonormal, σ descending:
    P = Q_P R_P, Qᵀ = Q_Q R_Q, R_P R_Qᵀ = a·diag(σ)·bᵀ → u = Q_P a, v = Q_Q b. O((m + n) r²)."""
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q.mT)
    a, s, bh = torch.linalg.svd(rp @ rq.mT)
    return qp @ a, s, qq @ bh.mT
