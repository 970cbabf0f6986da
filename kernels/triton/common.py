"""Shared pieces of the Triton launchers: block sizes, the interpreter flag, stride packing."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: whether the kernels in this process were decorated for Triton's CPU interpreter
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every launcher's output buffer (uninitialised; tests replace this to poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def block(size: int, floor: int = 16) -> int:
    """The power-of-two block covering `size` (≥ `floor`: tl.dot needs 16 on each side)."""
    return max(floor, triton.next_power_of_2(size))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 in the interpreter: small grids)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a·b. UPCAST computes in float32 (the interpreter's bf16 dot multiplies raw
    bits, so interpreted kernels upcast; on the GPU bf16 operands with a float32
    accumulator give the same products)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION)
