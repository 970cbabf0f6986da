"""StelLA — Stiefel LoRA (Li, Sajadmanesh, Li, Lyu; NeurIPS 2025, arXiv 2510.01938).

ΔW = s·U·S·Vᵀ with U and V on the Stiefel manifold, S free. Any Euclidean
optimizer becomes Riemannian: the gradients of U and V are made Riemannian
before the step, the optimizer steps, and the step Δ (scaled by √(d/n)) is
projected to the tangent space and retracted from the old point — all done by
`geopeft.optimizer`'s geometric stages, batched by shape.

Registers adapter `usv`, manifold `stiefel`, initializers `orthonormal`,
`svd_major`, `svd_minor` and the recipe `stella`.
"""

from geopeft import Recipe, hookimpl

from .adapter import USVAdapter
from .initializers import OrthonormalInit, SVDMajorInit, SVDMinorInit
from .manifold import StiefelManifold


@hookimpl
def register_adapters(register):
    register("usv", USVAdapter)


@hookimpl
def register_manifolds(register):
    register("stiefel", StiefelManifold)


@hookimpl
def register_initializers(register):
    register("orthonormal", OrthonormalInit)
    register("svd_major", SVDMajorInit)
    register("svd_minor", SVDMinorInit)


@hookimpl
def register_methods(register):
    register("stella", Recipe(
        name="stella", adapter="usv", initializer="orthonormal", riemannian_grad=True, moments="keep",
        options={"step_scaling": True},
        # the best of {3e-4, 1e-3, 3e-3} by validation accuracy over three seeds on each of two
        # tasks (docs/benchmarks.md, the lr sweep); 3e-3 learned only the class prior on a drug-review seed
        lr=1e-3,
        description="StelLA: ΔW = s·U·S·Vᵀ, U and V on the Stiefel manifold (canonical-metric "
                    "gradient, polar retraction, steps scaled by √(d/n)), S = I at init"))
