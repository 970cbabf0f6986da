"""The LoRA linear layer as one autograd function: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ.

x (..., n), W (m, n) and bias (m,) of the base layer (frozen in LoRA training, but their
gradients are computed when they require one), A (r, n), B (m, r), s the scaling.
Backward saves only what it needs: x and h = x Aᵀ (plus references to the parameters),
no (tokens × m) tensor and no dropout mask.

Contraction order by FLOPs (the idea of RunLoRA: Cherniuk et al., "Run LoRA Run: Faster
and Lighter LoRA Implementations", arXiv 2312.03415), for T tokens:
- forward: "expand" x Wᵀ + s·h Bᵀ costs 2T·m·r on top of the base product and h;
  "fold" x (W + s·BA)ᵀ costs 2m·n·r — cheaper when n < T;
- dx: "expand" dy W + dh A costs 2T·n·r on top of dy W (dh = s·dy B is needed for dA
  anyway); "fold" dy (W + s·BA) costs 2m·n·r — cheaper when m < T.
Folding rounds W + s·BA to W's dtype, so it is used for float32 / float64 weights only
(in bf16 it would round the small update into W's 8-bit mantissa).

On CUDA the thin products run as Triton kernels when dispatch picks them
(`geopeft.kernels.triton.lora`): the shrink h = x Aᵀ (and dh = s·dy B), and the expand
y += s·h Bᵀ accumulated into the base output in place (and dx += dh A).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import triton_module, use_triton


def fold_forward(tokens: int, m: int, n: int, r: int, dtype: torch.dtype) -> bool:
    """Whether the forward folds s·BA into W (fewer FLOPs, full-precision weights only)."""
    return dtype in (torch.float32, torch.float64) and m * n * r < tokens * m * r


def fold_backward(tokens: int, m: int, n: int, r: int, dtype: torch.dtype) -> bool:
    """Whether dx is computed as dy·(W + s·BA) (fewer FLOPs, full-precision weights only)."""
    return dtype in (torch.float32, torch.float64) and m * n * r < tokens * n * r


def _thin(x: Tensor) -> bool:
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def shrink(x: Tensor, a: Tensor, scale: float = 1.0) -> Tensor:
    """scale·x aᵀ for x (T, n), a (r, n): (T, r), x's dtype."""
    if use_triton("lora_shrink", x, a, supported=_thin(x) and x.dtype == a.dtype):
        return triton_module("lora").shrink(x, a, scale)
    out = x @ a.mT
    return out if scale == 1.0 else out.mul_(scale)


def expand_(y: Tensor, h: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """y += scale·h bᵀ in place, for y (T, m), h (T, r), b (m, r); returns y."""
    if use_triton("lora_expand", y, h, b, supported=_thin(y) and y.dtype == h.dtype == b.dtype):
        return triton_module("lora").expand_(y, h, b, scale)
    return y.addmm_(h, b.mT, alpha=scale)


def unviewed(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """t (contiguous) reshaped to `shape` without autograd's view tracking, as torch's own
    linear and matmul return their folded products: an in-place op on the result (a
    ReLU(inplace=True) after the layer, `out += residual`) then works, where a view made
    inside a custom Function raises, and FSDP2 keeps its pre-backward hook."""
    return t if t.shape == shape else torch.ops.aten._unsafe_view(t, shape)


class LoRALinearFunction(torch.autograd.Function):
    """forward(x, weight, bias, A, B, scaling); see the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                scaling: float) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        tokens, (m, n), r = x2.shape[0], weight.shape, A.shape[0]
        h = shrink(x2, A)
        if fold_forward(tokens, m, n, r, weight.dtype):
            y = torch.addmm(weight, B, A, alpha=scaling)           # W + s·BA  (m, n)
            y = x2 @ y.mT if bias is None else torch.addmm(bias, x2, y.mT)
        else:
            y = x2 @ weight.mT if bias is None else torch.addmm(bias, x2, weight.mT)
            expand_(y, h, B, scaling)
        ctx.save_for_backward(x2, h, weight, A, B)
        ctx.scaling, ctx.shape, ctx.has_bias = scaling, shape, bias is not None
        return unviewed(y, (*shape[:-1], m))

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, h, weight, A, B = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype != x2.dtype:
            dy2 = dy2.to(x2.dtype)
        tokens, (m, n), r = dy2.shape[0], weight.shape, A.shape[0]
        dx = dw = db = da = dbb = None
        dh = shrink(dy2, B.mT, s) if (need_x or need_a) else None   # s·dy B  (T, r)
        if need_x:
            if fold_backward(tokens, m, n, r, weight.dtype):
                dx = dy2 @ torch.addmm(weight, B, A, alpha=s)
            else:
                dx = expand_(dy2 @ weight, dh, A.mT)
            dx = dx.view(ctx.shape)
        if need_w:
            dw = dy2.mT @ x2
        if need_b and ctx.has_bias:
            db = dy2.sum(0)
        if need_a:
            da = dh.mT @ x2
        if need_bb:
            dbb = (dy2.mT @ h).mul_(s)
        return dx, dw, db, da, dbb, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                scaling: float) -> Tensor:
    """y = x Wᵀ + b + scaling·(x Aᵀ) Bᵀ for x (..., n), W (m, n), A (r, n), B (m, r), one
    dtype throughout; backward saves x and x Aᵀ only (`LoRALinearFunction`)."""
    return LoRALinearFunction.apply(x, weight, bias, A, B, float(scaling))
