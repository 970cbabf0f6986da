"""The component kinds: one table that the hookspecs, the registry, `geopeft.register`
and the tests all read."""

from __future__ import annotations

from dataclasses import dataclass

from .interfaces import (
    Adapter,
    GradientTransform,
    Initializer,
    Manifold,
    RankController,
    Recipe,
    TargetPreset,
)
from .layers import Quantization


@dataclass(frozen=True)
class ComponentKind:
    """One kind of component: its name, the hook that registers it, and what a
    registered object must be — a subclass of `base`, or (methods) an instance of it."""

    name: str
    hook: str
    base: type
    instance: bool = False

    @property
    def label(self) -> str:
        """The kind in prose: 'gradient transform'."""
        return self.name.replace("_", " ")

    @property
    def expected(self) -> str:
        what = "an instance" if self.instance else "a subclass"
        return f"{what} of geopeft.{self.base.__name__}"


#: kind name -> ComponentKind, in the order `geopeft.components()` lists them
KINDS: dict[str, ComponentKind] = {k.name: k for k in (
    ComponentKind("adapter", "register_adapters", Adapter),
    ComponentKind("manifold", "register_manifolds", Manifold),
    ComponentKind("gradient_transform", "register_gradient_transforms", GradientTransform),
    ComponentKind("rank_controller", "register_rank_controllers", RankController),
    ComponentKind("initializer", "register_initializers", Initializer),
    ComponentKind("method", "register_methods", Recipe, instance=True),
    # default `targets` for a model family (integrations register them; see targets.preset_for)
    ComponentKind("target_preset", "register_target_presets", TargetPreset, instance=True),
    # stored formats of quantized Linear weights (integrations register them; see layers.layer_ops)
    ComponentKind("quantization", "register_quantizations", Quantization, instance=True),
)}
