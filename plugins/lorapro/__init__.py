"""LoRA-Pro (Z. Wang, J. Liang, R. He, Z. Wang, T. Tan, "LoRA-Pro: Are Low-Rank Adapters
Properly Optimized?", ICLR 2025, arXiv 2407.18242; official code mrflogs/LoRA-Pro).

LoRA's step equals a full-weight step with the low-rank *equivalent gradient*
g̃ = s(B g_A + g_B A); LoRA-Pro replaces the factor gradients by the ones whose g̃ is
the closest to the full gradient. Registers the gradient transform `lorapro`
(modes `efficient` and `full`) and the recipes `lorapro` and `rslora-pro` (α/√r).
"""

from geopeft import Recipe, hookimpl

from .transform import LoRAProTransform


@hookimpl
def register_gradient_transforms(register):
    register("lorapro", LoRAProTransform)


@hookimpl
def register_methods(register):
    register("lorapro", Recipe(
        name="lorapro", transforms=["lorapro"],
        # the best of {3e-4, 1e-3, 3e-3} by validation accuracy over three seeds on each of two
        # tasks (docs/benchmarks.md, the lr sweep); 3e-3 and 3e-4 each left a drug-review seed at
        # the class prior
        lr=1e-3,
        description="LoRA-Pro: LoRA with factor gradients adjusted toward the full gradient"))
    register("rslora-pro", Recipe(
        name="rslora-pro", transforms=["lorapro"], options={"rslora": True},
        description="LoRA-Pro with rank-stabilised scaling α/√r"))
