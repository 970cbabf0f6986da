"""Shared batched tensor ops. Pure functions; each has a torch reference
implementation (the spec). Triton kernels (`geopeft.kernels.triton`, imported only
when one runs) take the same arguments; `dispatch` chooses between the two."""

from .balanced import (
    Balanced,
    balance,
    balance_violation,
    balanced_tangent,
    default_rank_rtol,
    push_through_basis_change,
)
from .batched import (
    assign_,
    change_basis,
    full,
    mean_into_new,
    resize_along,
    stack_fp32,
    write_stacked,
)
from .dispatch import report as kernel_report
from .geolora import augment, basis_directions, core_svd, tolerance_ranks
from .lora import LoRALinearFunction, lora_linear
from .lorapro import equivalent_gradient, lorapro_adjust, lorapro_equivalent_gradient
from .products import pair_grams, two_products
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
    stiefel_step_grams,
    sym,
    tangent_project,
)

__all__ = [
    "POLAR_METHODS", "Balanced", "assign_", "augment", "basis_directions", "core_svd",
    "tolerance_ranks", "balance", "balance_violation", "balanced_tangent",
    "canonical_rgrad", "cayley_retract", "change_basis", "default_rank_rtol", "equivalent_gradient", "full",
    "mean_into_new",
    "gram_violation", "inv_sqrt_newton_schulz", "lorapro_adjust", "lorapro_equivalent_gradient", "polar",
    "polar_retract", "polar_retract_step", "push_through_basis_change", "qr_retract", "random_stiefel",
    "resize_along",
    "stack_fp32", "stiefel_step_grams", "sym", "tangent_project", "two_products", "write_stacked",
    "LoRALinearFunction", "kernel_report", "lora_linear", "pair_grams",
]
