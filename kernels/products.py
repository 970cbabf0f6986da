"""Thin products of same-shape stacks x, y (G, n, p), n ≫ p, that geometric steps are
made of: the p × p Gram matrices of a pair in one pass (`pair_grams`) and a result
written once from one or two thin products (`two_products`). The Stiefel step and
LoRA-Pro's adjustment are each these two passes with p × p work in between.

The torch code here is the reference and the CPU path; on CUDA the Triton kernels in
`geopeft.kernels.triton.products` take the same arguments (see `geopeft.kernels.dispatch`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import triton_module, use_triton

#: the widest p the Triton kernels hold in registers (three p×p float32 accumulators)
TRITON_MAX_P = 64


def wide_dtype(t: Tensor) -> torch.dtype:
    """float64 for the small p×p work (float32 on MPS, which has no float64)."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def at_least_fp32(t: Tensor) -> Tensor:
    """t in float32, or as it is when already float32 / float64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _triton_ok(x: Tensor, y: Tensor) -> bool:
    """Whether the Triton kernels take stacks x, y: 3-d, same shape and dtype,
    p ≤ TRITON_MAX_P, float32 / bfloat16 / float16 (float64 stays on torch)."""
    return (x.dim() == 3 and x.shape == y.shape and x.dtype == y.dtype and x.shape[-1] <= TRITON_MAX_P
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


def pair_grams(x: Tensor, y: Tensor, scale: float = 1.0,
               difference: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(xᵀx, xᵀd, dᵀd) for stacks x, y (G, n, p), with d = scale·(y − x) when `difference`
    (formed in float32, never in memory on CUDA) and d = scale·y otherwise. Returns three
    (G, p, p) float64 (float32 on MPS); the n×p products run in float32 (float64 inputs
    in float64). On CUDA the Triton kernel reads x and y once, splitting the n rows."""
    if use_triton("pair_grams", x, y, supported=_triton_ok(x, y)):
        return triton_module("products").pair_grams(x, y, scale, difference)
    wide = wide_dtype(x)
    x, y = at_least_fp32(x), at_least_fp32(y)
    d = y - x if difference else y
    if scale != 1.0:
        d = d * scale
    return (x.mT @ x).to(wide), (x.mT @ d).to(wide), (d.mT @ d).to(wide)


def two_products(x: Tensor, ma: Tensor, y: Tensor | None = None, mb: Tensor | None = None) -> Tensor:
    """x·ma + y·mb for stacks x, y (G, n, p) and ma, mb (G, p, p) — x·ma alone when y is
    None — in x's dtype (float32 math at least). On CUDA the Triton kernel reads each
    n×p tile once and writes the result once."""
    if use_triton("two_products", x, supported=_triton_ok(x, x if y is None else y)):
        return triton_module("products").two_products(x, ma, y, mb)
    work = at_least_fp32(x).dtype
    out = x.to(work) @ ma.to(work)
    if y is not None:
        out = torch.baddbmm(out, y.to(work), mb.to(work))
    return out.to(x.dtype)
