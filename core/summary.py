"""`geopeft.summary(model)`: what is trained — parameter counts, the method's parts, and
each adapted layer's kind, shape, rank, scaling and manifolds; with several active adapters,
that per adapter (`AdaptersSummary`)."""

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


class _Fraction:
    """`trainable_fraction` and `to_dict()` (JSON) of a summary with parameter counts."""

    trainable_params: int
    total_params: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trainable_fraction": self.trainable_fraction}


@dataclass
class ModelSummary(_Fraction):
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

    def __str__(self) -> str:
        lines = [self.method_line(), _counts_line(self)]
        return "\n".join(lines + self.table_lines())

    __repr__ = __str__

    def method_line(self) -> str:
        ranks = sorted({layer.rank for layer in self.layers})
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
        return (f"method {self.method!r}: adapter {self.adapter}, transforms "
                f"{', '.join(self.transforms) or '-'}, rank controller {self.rank_controller}, "
                f"initializer {self.initializer}; {len(self.layers)} adapted layers, rank {rank_text}")

    def table_lines(self) -> list[str]:
        """The layer table and the modules trained in full."""
        lines = []
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
        return lines


@dataclass
class AdaptersSummary(_Fraction):
    """Several active adapters (their updates add up, one optimizer trains them): each
    one's `ModelSummary` (the counts in each are the model's), printable."""

    adapters: dict[str, ModelSummary]
    trainable_params: int
    total_params: int
    adapter_params: int

    @property
    def layers(self) -> list[LayerSummary]:
        return [layer for s in self.adapters.values() for layer in s.layers]

    def __str__(self) -> str:
        lines = [f"adapters {', '.join(map(repr, self.adapters))} active (their updates add up)",
                 _counts_line(self)]
        for name, s in self.adapters.items():
            lines += [f"adapter {name!r}: {s.method_line()}", *s.table_lines()]
        return "\n".join(lines)

    __repr__ = __str__


def _counts_line(s: ModelSummary | AdaptersSummary) -> str:
    return (f"trainable params: {s.trainable_params:,} || all params: {s.total_params:,} || "
            f"trainable%: {100 * s.trainable_fraction:.4f} (adapters {s.adapter_params:,})")


def summary(model: nn.Module) -> ModelSummary | AdaptersSummary:
    """Trainable and total parameter counts, the method's components, and per adapted
    layer its kind, (out, in) shape, rank, scaling, factor parameters and manifolds — of
    the active adapter, or of each active adapter (`AdaptersSummary`)."""
    state = require_state(model)
    root = find_root(model)
    params = list({id(p): p for p in root.parameters()}.values())
    # a quantized weight's storage (4-bit: two codes a byte) counts as the (m, n) it stands for
    packed = sum(layer.adapter.ops.m * layer.adapter.ops.n - layer.base_layer.weight.numel()
                 for _, layer in adapted_layers(root) if layer.adapter.ops.quantization is not None)
    counts = {"trainable_params": sum(p.numel() for p in params if p.requires_grad),
              "total_params": sum(p.numel() for p in params) + packed}
    each = {name: _adapter_summary(root, state, name, counts) for name in state.active}
    if len(each) == 1:
        return next(iter(each.values()))
    return AdaptersSummary(each, **counts, adapter_params=sum(s.adapter_params for s in each.values()))


def _adapter_summary(root: nn.Module, state, name: str, counts: dict[str, int]) -> ModelSummary:
    """Adapter `name`'s recipe, layers and modules trained in full, with the model's `counts`."""
    reg = get_registry()
    entry = state.by_name[name]
    recipe = entry.resolved.recipe
    layers = []
    for lname, layer in adapted_layers(root):
        if name not in layer.active:
            continue
        adapter = layer.get(name)
        manifolds = {key: reg.name_of("manifold", type(m)) or type(m).__name__
                     for key, m in adapter.factor_manifolds().items()}
        ops = adapter.ops
        kind = ops.kind if ops.quantization is None else f"{ops.kind} ({ops.quantization.name})"
        layers.append(LayerSummary(lname, kind, adapter.shape, adapter.rank, adapter.scaling,
                                   sum(p.numel() for p in adapter.factors().values()), manifolds,
                                   layer.merged))
    matched = [n for n, _ in trainable_modules(root, entry.trainable)]
    outer = [n for n in matched if not any(n.startswith(f"{o}.") for o in matched)]
    modules = {n: sum(p.numel() for p in root.get_submodule(n).parameters()) for n in outer}
    return ModelSummary(
        method=recipe.name, adapter=recipe.adapter, transforms=list(recipe.transforms),
        rank_controller=recipe.rank_controller, initializer=recipe.initializer, **counts,
        adapter_params=sum(layer.params for layer in layers), layers=layers, trainable_modules=modules)
