"""Shared batched tensor ops. Pure functions; each has a torch reference
implementation (the spec). Triton versions, used on CUDA when faster, come
with the Kernels issue and are tested against these references."""

from .balanced import (
    Balanced,
    balance,
    balance_violation,
    balanced_tangent,
    default_rank_rtol,
    push_through_basis_change,
)
from .batched import assign_, full, resize_along, stack_fp32, write_stacked

__all__ = ["Balanced", "assign_", "balance", "balance_violation", "balanced_tangent",
           "default_rank_rtol", "full", "push_through_basis_change", "resize_along",
           "stack_fp32", "write_stacked"]
