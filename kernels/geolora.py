"""GeoLoRA's batched steps on stacks of same-shape layers, ΔW = s·U S Vᵀ with
U (G, m, r), S (G, r, r), V (G, n, r) (Schotthöfer et al., *GeoLoRA: Geometric
integration for parameter efficient fine-tuning*, ICLR 2025, arXiv 2410.18720).

From the factor gradients of one backward pass, G_U = s·M V Sᵀ and G_V = s·Mᵀ U S
(M = ∂L/∂ΔW), the basis directions are G_K = G_U S⁻ᵀ = s·M V and G_L = G_V S⁻¹ = s·Mᵀ U.
Small r×r work (SVDs) runs in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def basis_directions(gu: Tensor, gv: Tensor, s: Tensor, damping: float = 1e-3) -> tuple[Tensor, Tensor]:
    """(G_K, G_L) = (G_U·S⁻ᵀ, G_V·S⁻¹) for stacks gu (G, m, r), gv (G, n, r), s (G, r, r),
    with S inverted through its SVD, 1/σ damped to σ/(σ² + δ²), δ = damping·σ_max (a
    near-singular S — zero at init — gives small directions, not huge ones)."""
    p, sig, qh = torch.linalg.svd(s.double())
    delta = damping * sig.amax(-1, keepdim=True)
    inv = sig / (sig * sig + delta * delta).clamp_min(torch.finfo(torch.float64).tiny)
    s_inv_t = (p * inv[..., None, :]) @ qh       # (Sᵀ)⁺ = P Σ⁺ Qᵀ
    s_inv = s_inv_t.mT                           # S⁺ = Q Σ⁺ Pᵀ
    return gu @ s_inv_t.to(gu.dtype), gv @ s_inv.to(gv.dtype)


def _augmented_basis(x: Tensor, directions: Tensor) -> Tensor:
    """[X | X̃] (G, n, r + k): Q of the QR of [X, directions] with its first r columns
    sign-fixed to X (so they are X, re-orthonormalised); X̃ ⊥ X even where the
    directions are zero or dependent."""
    q, rr = torch.linalg.qr(torch.cat([x, directions], -1))
    r = x.shape[-1]
    sign = torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1)[..., :r])
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return torch.cat([q[..., :r] * sign[..., None, :], q[..., r:]], -1)


def augment(u: Tensor, s: Tensor, v: Tensor, gk: Tensor, gl: Tensor, lr: Tensor,
            new_rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """GeoLoRA's basis augmentation and augmented core to `new_rank` (r < new_rank ≤ 2r):
    Û = [U | Ũ] from the QR of [U, G_K], V̂ = [V | Ṽ] from [V, G_L], and

        Ŝ = [[S, −λ (Ṽᵀ G_L)ᵀ], [−λ Ũᵀ G_K, 0]]

    — a gradient step of size λ (`lr`, (G,)) on the blocks that couple old and new
    directions (Ũᵀ M Ṽ needs a second backward pass: 0). Returns (Û, Ŝ, V̂)."""
    r = u.shape[-1]
    k = new_rank - r
    u_hat = _augmented_basis(u, gk[..., :k])
    v_hat = _augmented_basis(v, gl[..., :k])
    u_new, v_new = u_hat[..., r:], v_hat[..., r:]
    lam = lr.to(s.dtype)[:, None, None]
    s_hat = s.new_zeros(*s.shape[:-2], new_rank, new_rank)
    s_hat[..., :r, :r] = s
    s_hat[..., r:, :r] = -lam * (u_new.mT @ gk)
    s_hat[..., :r, r:] = -lam * (v_new.mT @ gl).mT
    return u_hat, s_hat, v_hat


def core_svd(s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(P, σ, Q) with S = P diag(σ) Qᵀ, σ descending, in float64; S (G, r, r)."""
    p, sig, qh = torch.linalg.svd(s.double())
    return p, sig, qh.mT


def tolerance_ranks(sig: Tensor, tau: float) -> Tensor:
    """Per stack entry, the smallest j with ‖σ_{j:}‖ < τ‖σ‖ (σ (G, r) descending; the tail
    after j kept values); r where σ = 0 (nothing to judge by). Returns (G,) long."""
    tail = torch.cat([sig.flip(-1).square().cumsum(-1).flip(-1), sig.new_zeros(*sig.shape[:-1], 1)], -1)
    thr = (tau * tau) * tail[..., :1]                    # compare squares: no sqrt rounding
    ok = tail < thr
    ok[..., -1] |= ~ok.any(-1)                           # ‖σ‖ = 0: keep everything
    return ok.float().argmax(-1)
