"""pluggy hook specifications, in callback style (as in `llm` and tox).

A plugin implements any of these with `@geopeft.hookimpl` and calls
`register(name, component)` once per component it provides:

    @geopeft.hookimpl
    def register_manifolds(register):
        register("oblique", ObliqueManifold)

There is one hook per component kind (`kinds.KINDS`): `register_adapters`,
`register_manifolds`, `register_gradient_transforms`, `register_rank_controllers`,
`register_initializers`, `register_methods`, `register_target_presets`,
`register_quantizations`. Components are classes (instantiated with options by the
recipe), except methods, target presets and quantizations, which are `Recipe`,
`TargetPreset` and `Quantization` instances.
"""

from __future__ import annotations

import pluggy

from .kinds import KINDS, ComponentKind

PROJECT = "geopeft"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def _spec(kind: ComponentKind):
    def spec(register):
        pass

    spec.__name__ = spec.__qualname__ = kind.hook
    spec.__doc__ = f"Register {kind.label}s, each {kind.expected}: register(name, obj)."
    return hookspec(spec)


# one hookspec per kind, generated from the table so the two cannot drift apart
for _kind in KINDS.values():
    globals()[_kind.hook] = _spec(_kind)
del _kind
