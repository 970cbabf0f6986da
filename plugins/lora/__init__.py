"""Plain LoRA (Hu et al., 2021, arXiv 2106.09685): the baseline every method is measured against.

Registers adapter `lora` and the recipes `lora` and `rslora` (α/√r scaling,
Kalajdzievski 2023, arXiv 2312.03732). The recipes' other parts — manifold
`euclidean`, rank controller `fixed`, initializer `lora` — are core's own
(`geopeft.builtins`).
"""

from geopeft import Recipe, hookimpl

from .adapter import LoRAAdapter


@hookimpl
def register_adapters(register):
    register("lora", LoRAAdapter)


@hookimpl
def register_methods(register):
    # lr: the best of {3e-4, 1e-3, 3e-3} by validation accuracy over three seeds on each of two
    # tasks (docs/benchmarks.md, the lr sweep)
    register("lora", Recipe(name="lora", lr=1e-3, description="LoRA: ΔW = (α/r)·B·A, Kaiming A, zero B"))
    register("rslora", Recipe(name="rslora", options={"rslora": True},
                              description="rank-stabilised LoRA: scaling α/√r"))
