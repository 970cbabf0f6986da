"""pluggy hook specifications, in callback style (as in `llm` and tox).

A plugin implements any of these with `@geopeft.hookimpl` and calls
`register(name, component)` once per component it provides:

    @geopeft.hookimpl
    def register_manifolds(register):
        register("oblique", ObliqueManifold)

Components are classes (instantiated with options by the recipe), except
methods, which are `Recipe` instances, and target presets, `TargetPreset` instances.
"""

from __future__ import annotations

import pluggy

PROJECT = "geopeft"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_adapters(register):
    """Register Adapter subclasses: register(name, cls)."""


@hookspec
def register_manifolds(register):
    """Register Manifold subclasses: register(name, cls)."""


@hookspec
def register_gradient_transforms(register):
    """Register GradientTransform subclasses: register(name, cls)."""


@hookspec
def register_rank_controllers(register):
    """Register RankController subclasses: register(name, cls)."""


@hookspec
def register_initializers(register):
    """Register Initializer subclasses: register(name, cls)."""


@hookspec
def register_methods(register):
    """Register method recipes: register(name, Recipe(...))."""


@hookspec
def register_target_presets(register):
    """Register default targets for families of models: register(name, TargetPreset(...)).
    `adapt` uses the first preset that matches a model when `targets` is omitted."""


#: component kind -> the hook that registers it
KIND_HOOKS = {
    "adapter": "register_adapters",
    "manifold": "register_manifolds",
    "gradient_transform": "register_gradient_transforms",
    "rank_controller": "register_rank_controllers",
    "initializer": "register_initializers",
    "method": "register_methods",
    "target_preset": "register_target_presets",
}
