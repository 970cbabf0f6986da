"""Several named adapters on one model (PEFT's add / set / delete_adapter).

`geopeft.adapt(model, ..., adapter_name="b")` and `geopeft.load(model, dir,
adapter_name="b")` add adapters beside the first ("default"); these functions list,
switch and delete them. Switching is exact: the active adapters' outputs are those
of a model that has them alone (bit for bit), since an inactive adapter is skipped and
its `trainable=` modules hold the base values meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from .errors import GeopeftError
from .model import (
    activate,
    adapted_layers,
    deactivate,
    find_root,
    known_adapter,
    replace_module,
    require_state,
    sync_layers,
)
from .originals import exchange, frozen_entries

log = logging.getLogger("geopeft")


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapter names, in the order they were added."""
    return list(require_state(model).by_name)


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters the model runs (and `geopeft.optimizer` trains)."""
    return list(require_state(model).active)


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make adapter `names` (one name, or several whose updates add up) the active ones:
    the forward runs them, `geopeft.optimizer` trains them (their factors and `trainable=`
    modules require grad; the others' do not). The others are left untouched. In place."""
    state = require_state(model)
    wanted = [names] if isinstance(names, str) else list(names)
    if not wanted:
        raise GeopeftError("set_adapter needs at least one adapter name; geopeft.disable_adapters("
                           "model) runs the base model")
    for name in wanted:
        known_adapter(state, name)
    if len(set(wanted)) != len(wanted):
        raise GeopeftError(f"set_adapter got a name twice: {wanted}")
    _refuse_merged(model, "switching adapters")
    root = find_root(model)
    for name in state.active:
        if name not in wanted:
            deactivate(root, state, name)
    for name in wanted:
        if name not in state.active:
            activate(root, state, name)
    state.active = tuple(wanted)
    sync_layers(root, state)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name` (its factors, and its trained `trainable=` modules: they hold
    the base values again); the others are left untouched. Deleting an active adapter
    leaves the other active ones, or else the first remaining adapter, active. The last
    adapter is removed by `geopeft.unload`. In place."""
    state = require_state(model)
    known_adapter(state, name)
    if len(state.by_name) == 1:
        raise GeopeftError(f"{name!r} is the model's only adapter; geopeft.unload(model, merge=False) "
                           "removes it and gives the base model back")
    _refuse_merged(model, "deleting an adapter")
    root = find_root(model)
    entry = state.by_name[name]
    if name in state.active:
        exchange(root, frozen_entries(root, entry.originals))  # the base values back
        state.active = tuple(n for n in state.active if n != name)
        if not state.active:
            first = next(n for n in state.by_name if n != name)
            activate(root, state, first)
            state.active = (first,)
            log.info("geopeft: deleted the active adapter %r; %r is active now", name, first)
    del state.by_name[name]
    for lname, layer in adapted_layers(root):
        if name in layer.adapter_names:
            layer.remove(name)
            if not layer.adapter_names:
                replace_module(root, lname, layer.base_layer)
    sync_layers(root, state)
    return model


def _refuse_merged(model: nn.Module, doing: str) -> None:
    merged = [n for n, layer in adapted_layers(model) if layer.merged]
    if merged:
        raise GeopeftError(f"the model is merged (e.g. {merged[0]!r}): its base weights hold the active "
                           f"adapters' ΔW; call geopeft.unmerge(model) before {doing}")


