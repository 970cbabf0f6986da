"""Base-weight shifts: W ← W − s·B₀·A₀, recorded so that every later operation stays exact.

Initializers that start an adapter at ΔW₀ = s·B₀·A₀ ≠ 0 but must keep the model's
function at step 0 (PiSSA's residual, LoRA-GA's offset, CG-LoRA's `shift`) call
`shift_base(adapter)`. The shift factors (B₀ (m, r₀), A₀ (r₀, n), in the factor dtype,
with the adapter's fixed `scaling` s) stay on the adapter as non-persistent buffers
(`shift_B`, `shift_A`: they follow `.to()` but are not in its state_dict), and:

- the subtraction is formed in float64 and rounded once to W's dtype, so `load`, which
  applies the saved B₀, A₀ to a fresh base model the same way, rebuilds W bit for bit;
- `disable_adapters` adds s·B₀·A₀·x back: the original base function (up to rounding);
- `export_peft` writes the exact LoRA of the *original* base, rank r + r₀:
  [B, −B₀]·[A; A₀] with the same scaling (as PEFT converts PiSSA adapters);
- `merge` / `unmerge` act on the shifted W as usual: merged, W − s·B₀A₀ + ΔW is the
  fine-tuned weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import GeopeftError
from .interfaces import Adapter


def base_shift(adapter: Adapter) -> tuple[Tensor, Tensor] | None:
    """(B₀ (m, r₀), A₀ (r₀, n)) subtracted (times `adapter.scaling`) from the base weight, or None."""
    b = adapter.__dict__.get("_buffers", {}).get("shift_B")
    return None if b is None else (b, adapter.shift_A)


@torch.no_grad()
def shift_base(adapter: Adapter, b0: Tensor | None = None, a0: Tensor | None = None) -> None:
    """W ← W − s·B₀·A₀ and record it. Default (B₀, A₀): the adapter's own `to_lora()`, so
    the model computes its base function at step 0. One shift per adapter."""
    if base_shift(adapter) is not None:
        raise GeopeftError("this layer's base weight is already shifted; an initializer shifts it once")
    if b0 is None or a0 is None:
        b0, a0 = adapter.to_lora()
    b0 = b0.detach().to(adapter.factor_dtype).clone()
    a0 = a0.detach().to(adapter.factor_dtype).clone()
    _add_to_base(adapter, b0, a0, sign=-1)
    adapter.register_buffer("shift_B", b0, persistent=False)
    adapter.register_buffer("shift_A", a0, persistent=False)


@torch.no_grad()
def unshift_base(adapter: Adapter) -> None:
    """Undo `shift_base` (W ← W + s·B₀·A₀, up to one rounding in W's dtype) and forget it."""
    shift = base_shift(adapter)
    if shift is None:
        return
    _add_to_base(adapter, *shift, sign=+1)
    del adapter._buffers["shift_B"], adapter._buffers["shift_A"]


def forget_shift(adapter: Adapter) -> None:
    """Drop the record of a shift without touching W (the caller put W back itself)."""
    adapter._buffers.pop("shift_B", None)
    adapter._buffers.pop("shift_A", None)


def add_shift_output(adapter: Adapter, x: Tensor, out: Tensor) -> Tensor:
    """`out` (the shifted base layer's output) plus s·B₀·A₀·x: the original base output."""
    b0, a0 = base_shift(adapter)
    if x.is_floating_point() and x.dtype != a0.dtype:
        x = x.to(a0.dtype)
    return adapter.ops.add_lowered(out, adapter.ops.lift(x, a0, adapter.base_layer), b0, adapter.scaling)


def lora_of_original_base(adapter: Adapter) -> tuple[Tensor, Tensor]:
    """(B, A) with scaling·B·A = ΔW − s·B₀·A₀: the adapter as a LoRA of the unshifted base."""
    b, a = adapter.to_lora()
    shift = base_shift(adapter)
    if shift is None:
        return b, a
    b0, a0 = shift
    return torch.cat([b, -b0.to(b.dtype)], 1), torch.cat([a, a0.to(a.dtype)], 0)


def _add_to_base(adapter: Adapter, b0: Tensor, a0: Tensor, sign: int) -> None:
    w = adapter.base_layer.weight
    if w.is_meta:  # a weightless stand-in (export without the base model): nothing to change
        return
    wide = torch.float32 if w.device.type == "mps" else torch.float64
    delta = adapter.scaling * (b0.to(w.device, wide) @ a0.to(w.device, wide))
    adapter.ops.add_to_weight(adapter.base_layer, adapter.ops.to_weight_layout(delta, adapter.base_layer), sign)
