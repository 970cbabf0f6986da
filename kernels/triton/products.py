"""Thin products of (G, n, p) stacks in one Triton pass each: the two halves of the
Stiefel step and of LoRA-Pro's adjustment (`geopeft.kernels.products`).

`pair_grams(x, y, scale, difference)`: the p × p products xᵀx, xᵀd, dᵀd with
d = scale·y, or d = scale·(y − x) (the Stiefel step's Δ, formed in registers) — one
read of x and of y. The n rows are split over `splits` programs per matrix (so that
G·splits fills the GPU); each writes float32 partial sums and torch adds them in
float64 (deterministic: no atomics).

`two_products(x, ma, y, mb)`: x·ma + y·mb (or x·ma alone), each (n, p) tile read once
and the result written once.

Between the two the p × p work runs in torch, float64. For the Stiefel step x and new
are each read once per pass and the result is written once: five passes over n × p
data, against about twelve for the separate torch ops of the reference.
Every load is upcast to float32 and every product is float32 ("ieee": no TF32),
whatever the stack's dtype; p ≤ `geopeft.kernels.products.TRITON_MAX_P` (the
dispatch checks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import block, sm_count


@triton.jit
def _grams_kernel(x_ptr, new_ptr, out_ptr, n, p, scale, rows_per_split,
                  sxg, sxn, sxp, syg, syn, syp,
                  BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, DIFF: tl.constexpr):
    g = tl.program_id(0)
    s = tl.program_id(1)
    splits = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_P)
    col_ok = cols < p
    acc_xx = tl.zeros((BLOCK_P, BLOCK_P), dtype=tl.float32)
    acc_xd = tl.zeros((BLOCK_P, BLOCK_P), dtype=tl.float32)
    acc_dd = tl.zeros((BLOCK_P, BLOCK_P), dtype=tl.float32)
    start = s * rows_per_split
    for r0 in range(start, start + rows_per_split, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        ok = (rows < n)[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + g * sxg + rows[:, None] * sxn + cols[None, :] * sxp, mask=ok, other=0.0)
        y = tl.load(new_ptr + g * syg + rows[:, None] * syn + cols[None, :] * syp, mask=ok, other=0.0)
        x = x.to(tl.float32)
        if DIFF:
            d = (y.to(tl.float32) - x) * scale
        else:
            d = y.to(tl.float32) * scale
        xt = tl.trans(x)
        acc_xx = tl.dot(xt, x, acc_xx, input_precision="ieee")
        acc_xd = tl.dot(xt, d, acc_xd, input_precision="ieee")
        acc_dd = tl.dot(tl.trans(d), d, acc_dd, input_precision="ieee")
    # out: (3, G, splits, p, p) float32
    out_ok = col_ok[:, None] & col_ok[None, :]
    tile = cols[:, None] * p + cols[None, :]
    part = (g * splits + s) * p * p
    stride3 = tl.num_programs(0) * splits * p * p
    tl.store(out_ptr + part + tile, acc_xx, mask=out_ok)
    tl.store(out_ptr + stride3 + part + tile, acc_xd, mask=out_ok)
    tl.store(out_ptr + 2 * stride3 + part + tile, acc_dd, mask=out_ok)


@triton.jit
def _two_products_kernel(x_ptr, y_ptr, ma_ptr, mb_ptr, out_ptr, n, p,
                         sxg, sxn, sxp, syg, syn, syp,
                         BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, HAS_Y: tl.constexpr):
    g = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_P)
    col_ok = cols < p
    ok = (rows < n)[:, None] & col_ok[None, :]
    m_ok = col_ok[:, None] & col_ok[None, :]
    m_off = g * p * p + cols[:, None] * p + cols[None, :]
    ma = tl.load(ma_ptr + m_off, mask=m_ok, other=0.0)
    x = tl.load(x_ptr + g * sxg + rows[:, None] * sxn + cols[None, :] * sxp, mask=ok, other=0.0)
    acc = tl.dot(x.to(tl.float32), ma, input_precision="ieee")
    if HAS_Y:
        mb = tl.load(mb_ptr + m_off, mask=m_ok, other=0.0)
        y = tl.load(y_ptr + g * syg + rows[:, None] * syn + cols[None, :] * syp, mask=ok, other=0.0)
        acc = tl.dot(y.to(tl.float32), mb, acc, input_precision="ieee")
    out = out_ptr + g * n * p + rows[:, None] * p + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _splits(count: int, n: int, block_n: int, device: torch.device) -> int:
    """Programs per matrix for the n-reduction: enough for ~4 programs per SM in all,
    never a split shorter than one block of rows."""
    want = triton.cdiv(4 * sm_count(device), count)
    return max(1, min(want, triton.cdiv(n, block_n)))


def pair_grams(x: Tensor, y: Tensor, scale: float = 1.0,
               difference: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(xᵀx, xᵀd, dᵀd) for x, y (G, n, p), d = scale·(y − x) if `difference` else
    scale·y: three (G, p, p) float64."""
    count, n, p = x.shape
    block_p = block(p)
    block_n = 64 if block_p <= 32 else 32
    splits = _splits(count, n, block_n, x.device)
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = triton.cdiv(n, rows_per_split)
    out = common.alloc((3, count, splits, p, p), torch.float32, x.device)
    _grams_kernel[(count, splits)](x, y, out, n, p, float(scale), rows_per_split,
                                   *x.stride(), *y.stride(), BLOCK_N=block_n, BLOCK_P=block_p,
                                   DIFF=bool(difference), num_warps=4 if block_p <= 32 else 8)
    total = out.sum(2, dtype=torch.float64)
    return total[0], total[1], total[2]


def two_products(x: Tensor, ma: Tensor, y: Tensor | None = None, mb: Tensor | None = None) -> Tensor:
    """x·ma + y·mb for x, y (G, n, p), ma, mb (G, p, p) — or x·ma alone when y is None —
    in x's dtype (float32 math)."""
    count, n, p = x.shape
    block_p = block(p)
    block_n = 128 if block_p <= 32 else 64
    ma = ma.to(torch.float32).expand(count, p, p).contiguous()
    has_y = y is not None
    y = y if has_y else x
    mb = mb.to(torch.float32).expand(count, p, p).contiguous() if has_y else ma
    out = common.alloc((count, n, p), x.dtype, x.device)
    _two_products_kernel[(count, triton.cdiv(n, block_n))](
        x, y, ma, mb, out, n, p, *x.stride(), *y.stride(), BLOCK_N=block_n, BLOCK_P=block_p,
        HAS_Y=has_y, num_warps=4 if block_p <= 32 else 8)
    return out
