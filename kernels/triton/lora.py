"""LoRA's thin products as Triton kernels: the shrink x·aᵀ (T × n → T × r) and the
expand y += s·h·bᵀ (T × r → T × m) accumulated into y in place.

Both keep the rank side r (padded to a power of two ≥ 16) in one block, so each
(T × n) or (T × m) tile is read once, and the expand reads and writes y once (no
separate scale or add over the tokens × m output). Products accumulate in float32;
float32 inputs use exact float32 products ("ieee": no TF32), bf16 / fp16 inputs the
tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import INTERPRETED, block, dot


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, out_ptr, T, n, r, scale,
                   sxt, sxn, sar, san,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < T
    rank_ok = ranks < r
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < n
        x = tl.load(x_ptr + rows[:, None] * sxt + ks[None, :] * sxn,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptr + ranks[None, :] * sar + ks[:, None] * san,
                     mask=k_ok[:, None] & rank_ok[None, :], other=0.0)     # aᵀ tile (K, R)
        acc = dot(x, at, acc, UPCAST, PRECISION)
    acc = acc * scale
    tl.store(out_ptr + rows[:, None] * r + ranks[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _expand_kernel(y_ptr, h_ptr, b_ptr, T, m, r, scale,
                   syt, sym, sht, shr, sbm, sbr,
                   BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < T
    col_ok = cols < m
    rank_ok = ranks < r
    h = tl.load(h_ptr + rows[:, None] * sht + ranks[None, :] * shr,
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    bt = tl.load(b_ptr + ranks[:, None] * sbr + cols[None, :] * sbm,
                 mask=rank_ok[:, None] & col_ok[None, :], other=0.0)      # bᵀ tile (R, M)
    acc = dot(h, bt, tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32), UPCAST, PRECISION)
    ok = row_ok[:, None] & col_ok[None, :]
    ys = y_ptr + rows[:, None] * syt + cols[None, :] * sym
    y = tl.load(ys, mask=ok, other=0.0).to(tl.float32)
    tl.store(ys, (y + scale * acc).to(y_ptr.dtype.element_ty), mask=ok)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def shrink(x: Tensor, a: Tensor, scale: float = 1.0) -> Tensor:
    """scale·x aᵀ for x (T, n), a (r, n) (any strides): (T, r) in x's dtype."""
    T, n = x.shape
    r = a.shape[0]
    out = common.alloc((T, r), x.dtype, x.device)
    block_r = block(r)
    block_t = 64
    block_k = 64 if block_r <= 32 else 32
    _shrink_kernel[(triton.cdiv(T, block_t),)](
        x, a, out, T, n, r, float(scale), *x.stride(), *a.stride(),
        BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_R=block_r,
        UPCAST=INTERPRETED, PRECISION=_precision(x.dtype), num_warps=4)
    return out


def expand_(y: Tensor, h: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """y += scale·h bᵀ in place for y (T, m), h (T, r), b (m, r) (any strides); returns y."""
    T, m = y.shape
    r = h.shape[1]
    block_r = block(r)
    block_t, block_m = 64, 64
    _expand_kernel[(triton.cdiv(T, block_t), triton.cdiv(m, block_m))](
        y, h, b, T, m, r, float(scale), *y.stride(), *h.stride(), *b.stride(),
        BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_R=block_r,
        UPCAST=INTERPRETED, PRECISION=_precision(y.dtype), num_warps=4)
    return y
