"""Stacking same-shape factors for batched geometry; resizing along rank dims."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def stack_fp32(tensors: Sequence[Tensor]) -> Tensor:
    """(G, n, p) float32 (or float64, kept) stack of G same-shape (n, p) tensors."""
    dtype = tensors[0].dtype
    out = torch.stack([t.detach() for t in tensors])
    return out if dtype in (torch.float32, torch.float64) else out.float()


def write_stacked(targets: Sequence[Tensor], stack: Tensor) -> None:
    """targets[i] ← stack[i], cast to each target's dtype, in place (no autograd)."""
    with torch.no_grad():
        values = list(stack.to(targets[0].dtype).unbind(0))
        torch._foreach_copy_(list(targets), values)


def resize_along(t: Tensor, dims: Sequence[int], new_rank: int, keep: Tensor | None = None) -> Tensor:
    """`t` with each of `dims` cut to the indices `keep` (default: the leading ones)
    and then zero-padded to `new_rank`. Used for factors and their optimizer state alike."""
    out = t
    for d in dims:
        old = out.shape[d]
        idx = keep if keep is not None else torch.arange(min(old, new_rank), device=t.device)
        idx = idx[:new_rank].to(device=t.device, dtype=torch.long)
        out = out.index_select(d, idx)
        if out.shape[d] < new_rank:
            pad_shape = list(out.shape)
            pad_shape[d] = new_rank - out.shape[d]
            out = torch.cat([out, out.new_zeros(pad_shape)], dim=d)
    return out.contiguous()
