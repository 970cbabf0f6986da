"""Shared batched tensor ops. Pure functions; each has a torch reference
implementation (the spec). Triton versions, used on CUDA when faster, come
with the Kernels issue and are tested against these references."""

from .batched import assign_, full, resize_along, stack_fp32, write_stacked
from .lorapro import equivalent_gradient, lorapro_adjust, lorapro_equivalent_gradient

__all__ = ["assign_", "equivalent_gradient", "full", "lorapro_adjust", "lorapro_equivalent_gradient",
           "resize_along", "stack_fp32", "write_stacked"]
