"""Stacking same-shape factors for batched geometry; resizing along rank dims."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

try:  # sharded parameters (FSDP2); absent from builds without torch.distributed
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    class DTensor:  # type: ignore[no-redef]  # nothing is an instance of it
        pass

    distribute_tensor = None


def full(t: Tensor) -> Tensor:
    """The whole value of `t` on this rank: a sharded DTensor (FSDP2) is all-gathered,
    anything else returned as is. Factors are thin (n × r), so gathering is cheap."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def stack_fp32(tensors: Sequence[Tensor]) -> Tensor:
    """(G, n, p) float32 (or float64, kept) stack of G same-shape (n, p) tensors
    (DTensors are gathered whole)."""
    dtype = tensors[0].dtype
    out = torch.stack([full(t).detach() for t in tensors])
    return out if dtype in (torch.float32, torch.float64) else out.float()


def write_stacked(targets: Sequence[Tensor], stack: Tensor) -> None:
    """targets[i] ← stack[i], cast to each target's dtype, in place (no autograd).
    A DTensor target keeps its own shard of the value (every rank holds the same stack)."""
    with torch.no_grad():
        values = list(stack.to(targets[0].dtype).unbind(0))
        plain = [(t, v) for t, v in zip(targets, values) if not isinstance(t, DTensor)]
        if plain:
            torch._foreach_copy_([t for t, _ in plain], [v for _, v in plain])
        for t, v in zip(targets, values):
            if isinstance(t, DTensor):
                assign_(t, v)


def assign_(target: Tensor, value: Tensor) -> None:
    """target ← value in place, in target's dtype; a DTensor target keeps its shard of
    `value` (which must be the same on every rank)."""
    with torch.no_grad():
        if isinstance(target, DTensor):
            shard = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements,
                                      src_data_rank=None)
            target.to_local().copy_(shard.to_local())
        else:
            target.copy_(value)


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


def mean_into_new(t: Tensor, dims: Sequence[int], bases: Sequence[Tensor]) -> Tensor:
    """Stacked tensors t (G, ...) after a change of basis by `bases[i]` (G, r_old, r_new)
    along `dims[i]` (as `change_basis`): per member, the entries at a *new* coordinate
    along any of `dims` — an index j whose column bases[i][g, :, j] is zero, no old
    direction maps to it — set to the mean of the entries at old coordinates only (0 when
    there are none). A rank controller's start for new directions' second moments."""
    new = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    for d, basis in zip(dims, bases):
        fresh = basis.abs().amax(-2) == 0                          # (G, r_new)
        shape = [t.shape[0]] + [1] * (t.dim() - 1)
        shape[d + 1] = fresh.shape[-1]
        new |= fresh.to(t.device).view(shape)
    if not bool(new.any()):
        return t
    old = (~new).to(t.dtype)
    flat = tuple(range(1, t.dim()))
    mean = (t * old).sum(flat, keepdim=True) / old.sum(flat, keepdim=True).clamp_min(1)
    return torch.where(new, mean, t)


def change_basis(t: Tensor, dims: Sequence[int], bases: Sequence[Tensor]) -> Tensor:
    """Stacked tensors t (G, ...) with each rank dim `dims[i]` (counted in the unstacked
    tensor) mapped by the stacked matrices `bases[i]` (G, r_old, r_new):
    out[g] = t[g] ×_d bases[g] (the new index j along d is Σ_k t[.., k, ..]·basis[k, j]).
    A rank controller's change of basis: a rotation, a selection, a zero-padded embedding."""
    out = t
    for d, basis in zip(dims, bases):
        moved = out.movedim(d + 1, -1)
        shape = moved.shape
        mapped = moved.reshape(shape[0], -1, shape[-1]) @ basis.to(moved.dtype)
        out = mapped.reshape(*shape[:-1], basis.shape[-1]).movedim(-1, d + 1)
    return out.contiguous()
