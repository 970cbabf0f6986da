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
from .batched import assign_, change_basis, full, resize_along, stack_fp32, write_stacked
from .geolora import augment, basis_directions, core_svd, tolerance_ranks
from .lorapro import equivalent_gradient, lorapro_adjust, lorapro_equivalent_gradient
from .stiefel import (
    POLAR_METHODS,
    canonical_rgrad,
    cayley_retract,
    gram_violation,
    inv_sqrt_newton_schulz,
    polar,
    polar_retract,
    polar_retract_step,
    qr_retract,
    random_stiefel,
    sym,
    tangent_project,
)

__all__ = [
    "POLAR_METHODS", "Balanced", "assign_", "augment", "basis_directions", "core_svd",
    "tolerance_ranks", "balance", "balance_violation", "balanced_tangent",
    "canonical_rgrad", "cayley_retract", "change_basis", "default_rank_rtol", "equivalent_gradient", "full",
    "gram_violation", "inv_sqrt_newton_schulz", "lorapro_adjust", "lorapro_equivalent_gradient", "polar",
    "polar_retract", "polar_retract_step", "push_through_basis_change", "qr_retract", "random_stiefel",
    "resize_along",
    "stack_fp32", "sym", "tangent_project", "write_stacked",
]
