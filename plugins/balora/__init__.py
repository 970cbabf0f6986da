"""BaLoRA — Castin, Nadjahi, Ablin, Peyré, "Balanced LoRA: Removing Parameter Invariance
to Accelerate Convergence", ICML 2026, arXiv 2605.31484 (official code: github.com/vcastin/balora).

(B R⁻¹, R A) has the same product BA for every invertible R; the balanced pair
(BᵀB = AAᵀ) gives both factors the condition number √cond(BA). BaLoRA trains plain
LoRA and, after every k-th optimizer step, replaces each pair by the nearest balanced pair
with the same product ((B R⁻¹, R A) with R symmetric positive definite).

Registers manifold `balanced` (coupled, on the key "B,A") and the recipe `balora`:
adapter `lora`, manifolds {"B,A": "balanced"}, initializer `lora`, projection every
`project_every` steps (default 1). See docs/methods/balora.md.
"""

from geopeft import Recipe, hookimpl

from .manifold import BalancedManifold


@hookimpl
def register_manifolds(register):
    register("balanced", BalancedManifold)


@hookimpl
def register_methods(register):
    register("balora", Recipe(
        name="balora", adapter="lora", manifolds={"B,A": "balanced"}, initializer="lora",
        project_every=1,
        # the best of {3e-4, 1e-3, 3e-3} by validation accuracy over three seeds on each of two
        # tasks (docs/benchmarks.md, the lr sweep); 3e-3 ended two Rotten Tomatoes seeds near
        # the majority class
        lr=1e-3,
        description="BaLoRA: LoRA whose pairs (B, A) are balanced (BᵀB = AAᵀ, same BA) "
                    "after every project_every-th step"))
