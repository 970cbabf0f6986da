"""CG-LoRA — curvature-guided LoRA (Zheng & Proutière, arXiv 2603.29824) and the
data-aware neighbours it is compared with.

Registers initializers `cg` (the best rank-r approximation, in the K-FAC curvature
norm, of the Newton step from a few calibration batches), `lora_ga` (LoRA-GA, gradient
SVD) and `pissa` (PiSSA, principal SVD of W), the gradient transform
`riemannian_precond` (Zhang & Pilanci's scaled GD) and the recipes `cglora`, `lora-ga`,
`pissa` and `lora-riemannian`. Derivation and departures: docs/methods/cglora.md.
"""

from geopeft import Recipe, hookimpl

from .initializers import CurvatureGuidedInit, LoRAGAInit, PiSSAInit
from .transform import RiemannianPrecond


@hookimpl
def register_initializers(register):
    register("cg", CurvatureGuidedInit)
    register("lora_ga", LoRAGAInit)
    register("pissa", PiSSAInit)


@hookimpl
def register_gradient_transforms(register):
    register("riemannian_precond", RiemannianPrecond)


@hookimpl
def register_methods(register):
    register("cglora", Recipe(
        name="cglora", initializer="cg",
        description="CG-LoRA: LoRA started at the best rank-r approximation (K-FAC curvature norm) "
                    "of the Newton step from calibration batches; needs init_batches= and loss_fn="))
    register("lora-ga", Recipe(
        name="lora-ga", initializer="lora_ga",
        description="LoRA-GA: LoRA started from the calibration gradient's SVD, base weight offset"))
    register("pissa", Recipe(
        name="pissa", initializer="pissa",
        description="PiSSA: LoRA on the principal singular part of W, the residual kept in the base"))
    register("lora-riemannian", Recipe(
        name="lora-riemannian", transforms=["riemannian_precond"],
        description="LoRA with Riemannian preconditioned (scaled) gradients, Zhang & Pilanci 2024"))
