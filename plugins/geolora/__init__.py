"""GeoLoRA (Schotthöfer, Zangrando, Ceruti, Tudisco, Kusch; ICLR 2025, arXiv 2410.18720)
and AdaLoRA's allocation (Zhang et al., ICLR 2023, arXiv 2303.10512) as rank controllers.

ΔW = s·U S Vᵀ on the `stella` plugin's `usv` adapter (named, not imported), U and V on
its `stiefel` manifold. The `geolora` controller augments the bases from the gradients
of the user's one backward pass and truncates the core by a singular-value tolerance
(optionally under a global rank budget); the `adalora` controller prunes triplets by
AdaLoRA's smoothed sensitivity under its cubic budget schedule. Both resize through the
optimizer, which carries the moments into the new bases.

Registers rank controllers `geolora`, `adalora`, gradient transform `orth_reg` (AdaLoRA's
orthogonality regulariser, for Euclidean U, V), initializer `zero_core`, recipes `geolora`
and `adalora`.
"""

from geopeft import Recipe, hookimpl

from .adalora import AdaLoRAController
from .controller import GeoLoRAController
from .initializers import ZeroCoreInit
from .orthogonality import OrthogonalityPenalty


@hookimpl
def register_rank_controllers(register):
    register("geolora", GeoLoRAController)
    register("adalora", AdaLoRAController)


@hookimpl
def register_gradient_transforms(register):
    register("orth_reg", OrthogonalityPenalty)


@hookimpl
def register_initializers(register):
    register("zero_core", ZeroCoreInit)


@hookimpl
def register_methods(register):
    register("geolora", Recipe(
        name="geolora", adapter="usv", rank_controller="geolora", initializer="zero_core",
        riemannian_grad=True, moments="keep", options={"train_bases": True}, lr=6e-3,
        description="GeoLoRA: ΔW = s·U·S·Vᵀ, U and V orthonormal, extended by basis augmentation "
                    "(QR of [U, G_U S⁻ᵀ]) and cut by singular-value truncation of S (tolerance tau, "
                    "total rank budget); the optimizer trains S and takes Riemannian steps on U and V "
                    "(train_bases=False: the paper's, U and V move only by augmentation); one backward "
                    "pass per step"))
    register("adalora", Recipe(
        name="adalora", adapter="usv", rank_controller="adalora", initializer="zero_core",
        options={"diag_s": True}, lr=3e-3,
        description="AdaLoRA's allocation on U·diag(S)·Vᵀ (U, V on stiefel): triplets pruned by "
                    "smoothed sensitivity |p·∇p| under the cubic budget schedule, by resizing"))
