"""Batched Stiefel-manifold ops: points x (..., n, p) with xᵀx = I_p, n ≥ p.

Pure torch functions, batched over the leading dims so that every same-shape
factor of a model is handled in one call. Costs are O(n·p²) per matrix: no
n×n matrix is ever formed (geoopt's canonical Stiefel solves an n×n system).
Run them in float32 or float64 (`geopeft.kernels.stack_fp32` gives fp32 stacks).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .products import pair_grams, two_products, wide_dtype

POLAR_METHODS = ("gram", "svd", "newton_schulz")


def sym(a: Tensor) -> Tensor:
    """(a + aᵀ)/2 over the last two dims."""
    return 0.5 * (a + a.mT)


def tangent_project(x: Tensor, u: Tensor) -> Tensor:
    """u − x·sym(xᵀu): the orthogonal projection of u onto T_x (Euclidean metric)."""
    return u - x @ sym(x.mT @ u)


def canonical_rgrad(x: Tensor, g: Tensor) -> Tensor:
    """g − x·gᵀ·x: the Riemannian gradient under the canonical metric (tangent at x)."""
    return g - x @ (g.mT @ x)


def gram_violation(x: Tensor) -> Tensor:
    """‖xᵀx − I‖_F per matrix: shape x.shape[:-2]."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.linalg.matrix_norm(x.mT @ x - eye)


def polar(y: Tensor, method: str = "gram", iters: int = 40, tol: float | None = None) -> Tensor:
    """The orthonormal polar factor y·(yᵀy)^{-1/2} of full-column-rank y (..., n, p).

    Every route does its O(n·p²) work in y's dtype and its small p×p work in float64
    (O(p³), negligible; an fp32 eigh/SVD of the p×p core loses an order of magnitude of
    orthonormality at p = 64):
    - "gram": eigendecomposition of the p×p Gram matrix yᵀy; exact to rounding when yᵀy
      is well conditioned, as it is in a retraction (yᵀy = I + ΔᵀΔ for y = x + Δ with Δ
      tangent, so its eigenvalues are ≥ 1);
    - "svd": y = QR, R = PΣWᵀ → Q·P·Wᵀ; the reference, robust for any full-rank y;
    - "newton_schulz": the coupled Newton–Schulz iteration for (yᵀy)^{-1/2} (matrix
      products only: the GPU-friendly route); converges quadratically, stops when
      ‖ZY − I‖_F ≤ tol or after `iters` iterations.
    """
    if method == "svd":
        q, r = torch.linalg.qr(y)
        p, _, wh = torch.linalg.svd(r.to(wide_dtype(r)))
        return q @ (p @ wh).to(y.dtype)
    gram = (y.mT @ y).to(wide_dtype(y))
    if method == "gram":
        w, q = torch.linalg.eigh(gram)
        w = w.clamp_min(torch.finfo(w.dtype).tiny)
        return y @ ((q * w.rsqrt().unsqueeze(-2)) @ q.mT).to(y.dtype)
    if method == "newton_schulz":
        return y @ inv_sqrt_newton_schulz(gram, iters, tol).to(y.dtype)
    raise ValueError(f"unknown polar method {method!r}; choose one of {', '.join(POLAR_METHODS)}")


def inv_sqrt_newton_schulz(c: Tensor, iters: int = 40, tol: float | None = None) -> Tensor:
    """C^{-1/2} of symmetric positive definite c (..., p, p) by the coupled Newton–Schulz
    iteration Y₀ = C/κ, Z₀ = I, T = (3I − ZY)/2, Y ← YT, Z ← TZ (Z → (C/κ)^{-1/2}).
    κ = max row sum of |C| ≥ ‖C‖₂, so the scaled spectrum lies in (0, 1] and it converges."""
    eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
    kappa = c.abs().sum(-1).amax(-1)[..., None, None].clamp_min(torch.finfo(c.dtype).tiny)
    tol = tol if tol is not None else 10 * c.shape[-1] * torch.finfo(c.dtype).eps
    y, z = c / kappa, eye.expand_as(c).clone()
    for _ in range(iters):
        t = 1.5 * eye - 0.5 * (z @ y)
        y, z = y @ t, t @ z
        if float(torch.linalg.matrix_norm(z @ y - eye).amax()) <= tol:
            break
    return z * kappa.rsqrt()


def polar_retract(x: Tensor, u: Tensor, method: str = "gram") -> Tensor:
    """The polar retraction: the orthonormal polar factor of x + u."""
    return polar(x + u, method)


def stiefel_step_grams(x: Tensor, new: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The three p×p products of a Stiefel step, (xᵀx, xᵀΔ, ΔᵀΔ) with Δ = scale·(new − x),
    for stacks x, new (G, n, p): `pair_grams(x, new, scale, difference=True)`."""
    return pair_grams(x, new, scale, difference=True)


def polar_retract_step(x: Tensor, new: Tensor, scale: float = 1.0, method: str = "gram") -> Tensor:
    """StelLA's whole post-step geometry in one pass: with Δ = scale·(new − x), the polar
    retraction of x + Δ − x·sym(xᵀΔ) (the step projected to the tangent space at x).

    Fused: y = x·T + Δ with T = I − sym(xᵀΔ), so yᵀy = Tᵀ(xᵀx)T + Tᵀ(xᵀΔ) + (Δᵀx)T + ΔᵀΔ
    comes from three p×p reductions (`stiefel_step_grams`, one pass over x and new), and
    the result y·(yᵀy)^{-1/2} = x·(TZ) + Δ·Z = x·(TZ − scale·Z) + new·(scale·Z) from two
    products written once (`two_products`) — y is never formed. The p×p work runs in
    float64. xᵀx enters as computed (not assumed I), so the result is orthonormal to
    rounding even when x has drifted. `method`: "gram" (eigh) or "newton_schulz" for
    Z = (yᵀy)^{-1/2}; any other polar method retracts the projected step unfused.
    """
    if method not in ("gram", "newton_schulz"):
        return polar(x + tangent_project(x, scale * (new - x)), method)
    shape = x.shape
    x3, new3 = x.reshape(-1, *shape[-2:]), new.reshape(-1, *shape[-2:])
    xtx, xtd, dtd = stiefel_step_grams(x3, new3, scale)
    wide = xtx.dtype
    t = torch.eye(shape[-1], dtype=wide, device=x.device) - 0.5 * (xtd + xtd.mT)
    gram = t.mT @ xtx @ t + t.mT @ xtd + xtd.mT @ t + dtd
    if method == "gram":
        w, q = torch.linalg.eigh(gram)
        z = (q * w.clamp_min(torch.finfo(wide).tiny).rsqrt().unsqueeze(-2)) @ q.mT
    else:
        z = inv_sqrt_newton_schulz(gram)
    return two_products(x3, t @ z - scale * z, new3, scale * z).reshape(shape)


def qr_retract(x: Tensor, u: Tensor) -> Tensor:
    """The QR retraction: Q of x + u = QR, signs fixed so that diag(R) > 0 (unique)."""
    q, r = torch.linalg.qr(x + u)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign.unsqueeze(-2)


def cayley_retract(x: Tensor, u: Tensor) -> Tensor:
    """The Cayley retraction y = (I − W/2)⁻¹(I + W/2)x with the skew W = ûxᵀ − xûᵀ,
    û = u − x(xᵀu)/2 (so Wx = u for tangent u), in its low-rank form:
    W = L·Rᵀ with L = [û, x], R = [x, −û] (n × 2p), and by Woodbury
    y = x + L (I − RᵀL/2)⁻¹ Rᵀx — a 2p×2p solve, O(n·p²), never an n×n one."""
    p = x.shape[-1]
    xtu = x.mT @ u
    u_hat = u - 0.5 * (x @ xtu)
    left = torch.cat([u_hat, x], dim=-1)  # (..., n, 2p)
    right = torch.cat([x, -u_hat], dim=-1)
    eye = torch.eye(2 * p, dtype=x.dtype, device=x.device)
    rhs = right.mT @ x  # (..., 2p, p)
    return x + left @ torch.linalg.solve(eye - 0.5 * (right.mT @ left), rhs)


def random_stiefel(shape, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> Tensor:
    """Random points (..., n, p): sign-fixed QR of a Gaussian matrix (Haar-distributed)."""
    g = torch.randn(*shape, generator=generator, dtype=dtype, device=device)
    return qr_retract(g, torch.zeros_like(g))
