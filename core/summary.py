"""`geopeft.summary(model)`: what is trained — parameter counts, the method's parts, and
each adapted layer's kind, shape, rank, scaling and manifolds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .model import adapted_layers, find_root, require_state
from .originals import trainable_modules
from .registry import get_registry


@dataclass
class LayerSummary:
    """One adapted layer: `shape` is the base weight's (m, n) = (out, in) matrix view."""

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    scaling: float
    params: int
    manifolds: dict[str, str]
    merged: bool = False


@dataclass
class ModelSummary:
    """Printable (`print(geopeft.summary(model))`); `to_dict()` for JSON."""

    method: str
    adapter: str
    transforms: list[str]
    rank_controller: str
    initializer: str
    trainable_params: int
    total_params: int
    adapter_params: int
    layers: list[LayerSummary] = field(default_factory=list)
    trainable_modules: dict[str, int] = field(default_factory=dict)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trainable_fraction": self.trainable_fraction}

    def __str__(self) -> str:
        ranks = sorted({layer.rank for layer in self.layers})
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
        lines = [
            f"method {self.method!r}: adapter {self.adapter}, transforms "
            f"{', '.join(self.transforms) or '-'}, rank controller {self.rank_controller}, "
            f"initializer {self.initializer}; {len(self.layers)} adapted layers, rank {rank_text}",
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} || "
            f"trainable%: {100 * self.trainable_fraction:.4f} (adapters {self.adapter_params:,})",
        ]
        header = ("layer", "kind", "shape", "rank", "scaling", "params", "manifolds")
        rows = [(layer.name, layer.kind, f"{layer.shape[0]}x{layer.shape[1]}", str(layer.rank),
                 f"{layer.scaling:.4g}", f"{layer.params:,}",
                 " ".join(f"{k}:{v}" for k, v in layer.manifolds.items())
                 + (" (merged)" if layer.merged else "")) for layer in self.layers]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        if self.trainable_modules:
            lines.append("trained in full: " + ", ".join(f"{n} ({p:,} params)"
                                                         for n, p in self.trainable_modules.items()))
        return "\n".join(lines)

    __repr__ = __str__


def summary(model: nn.Module) -> ModelSummary:
    """Trainable and total parameter counts, the method's components, and per adapted
    layer its kind, (out, in) shape, rank, scaling, factor parameters and manifolds."""
    state = require_state(model)
    root = find_root(model)
    reg = get_registry()
    recipe = state.resolved.recipe
    layers = []
    for name, layer in adapted_layers(root):
        if not layer.active:
            continue
        adapter = layer.get(layer.active[0])
        manifolds = {key: reg.name_of("manifold", type(m)) or type(m).__name__
                     for key, m in adapter.factor_manifolds().items()}
        ops = adapter.ops
        kind = ops.kind if ops.quantization is None else f"{ops.kind} ({ops.quantization.name})"
        layers.append(LayerSummary(name, kind, adapter.shape, adapter.rank, adapter.scaling,
                                   sum(p.numel() for p in adapter.factors().values()), manifolds,
                                   layer.merged))
    matched = [n for n, _ in trainable_modules(root, state.trainable)]
    outer = [n for n in matched if not any(n.startswith(f"{o}.") for o in matched)]
    modules = {n: sum(p.numel() for p in root.get_submodule(n).parameters()) for n in outer}
    params = list({id(p): p for p in root.parameters()}.values())
    # a quantized weight's storage (4-bit: two codes a byte) counts as the (m, n) it stands for
    packed = sum(layer.adapter.ops.m * layer.adapter.ops.n - layer.base_layer.weight.numel()
                 for _, layer in adapted_layers(root) if layer.adapter.ops.quantization is not None)
    return ModelSummary(
        method=recipe.name, adapter=recipe.adapter, transforms=list(recipe.transforms),
        rank_controller=recipe.rank_controller, initializer=recipe.initializer,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params) + packed,
        adapter_params=sum(layer.params for layer in layers), layers=layers, trainable_modules=modules)
