"""Which modules `adapt` attaches adapters to.

`targets` is one of
- a list of names: a module matches a name if its full dotted name equals it
  or ends with '.' + name (PEFT's rule): ["query", "value"];
- a preset name (see PRESETS): "all-linear", "attention";
- any other string: a regular expression, full-matched against dotted names;
- None: the registered `TargetPreset` that matches the model (by HF
  `config.model_type` or class), e.g. query/value for BERT; see `preset_for`.
Only layers geopeft supports are adapted; a list name that matches only an
unsupported layer, or targets that match nothing, are errors that list names
the model does have.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Sequence

from torch import nn

from .errors import ConfigError, TargetError
from .interfaces import TargetPreset
from .layers import layer_ops, why_unsupported

log = logging.getLogger("geopeft")

# Output heads that "all-linear" leaves alone (as PEFT does for the output layer).
OUTPUT_HEADS = {"lm_head", "classifier", "score", "head", "qa_outputs"}
ATTENTION = ["query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj", "out_proj",
             "c_attn", "qkv", "q", "k", "v"]
PRESETS: dict[str, str] = {
    "all-linear": "every nn.Linear / Conv1D except output heads (" + ", ".join(sorted(OUTPUT_HEADS)) + ")",
    "attention": "the attention projections: " + ", ".join(ATTENTION),
    "attention-qv": "query and value projections: query, value, q_proj, v_proj, q, v",
}


def find_targets(model: nn.Module, targets: str | Sequence[str] | None,
                 exclude: str | Sequence[str] | None = None,
                 skip: set[int] | None = None) -> list[tuple[str, nn.Module]]:
    """[(dotted name, module)] to adapt, in model order. `skip`: ids of modules to pass over.
    `targets=None` takes the model's registered preset (`preset_for`) and logs, at INFO,
    which modules it chose."""
    preset = None
    if targets is None:
        preset = preset_for(model)
        if preset is None:
            raise TargetError(_no_preset(model))
        targets = preset.select()
    _check_patterns(targets, "targets")
    if exclude is not None:
        _check_patterns(exclude, "exclude")
    named = [(n, m) for n, m in _walk(model, skip or set())]
    bypassed = _bypassed_layers(model)
    matches = [(n, m) for n, m in named if n and _matches(n, m, targets)]
    if exclude is not None:
        matches = [(n, m) for n, m in matches if not _matches(n, m, exclude)]
    supported = [(n, m) for n, m in matches if _adaptable(m, bypassed)]
    if isinstance(targets, str) and targets in PRESETS:
        pass
    elif not isinstance(targets, str):
        for item in targets:
            hits = [(n, m) for n, m in matches if name_matches(n, item)]
            if hits and not any(_adaptable(m, bypassed) for _, m in hits):
                n, m = hits[0]
                why = (BYPASSED if id(m) in bypassed else why_unsupported(m))
                raise TargetError(f"target {item!r} matches {n!r}, which cannot be adapted: {why}")
    if not supported:
        raise TargetError(_nothing_matched(targets, named))
    if preset is not None:
        log.info("geopeft: no targets given; preset %r (%s) adapts %d modules: %s", preset.name,
                 preset.description or targets, len(supported), ", ".join(n for n, _ in supported))
    return supported


def _check_patterns(value: str | Sequence[str], label: str) -> None:
    """A string `value` that is no preset must be a valid regular expression; a list, strings."""
    if isinstance(value, str):
        if value not in PRESETS:
            try:
                re.compile(value)
            except re.error as exc:
                raise ConfigError(f"{label}={value!r} is not a valid regular expression ({exc}); "
                                  "fix the pattern, or pass a list of module names") from exc
    elif not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{label} must be a string (regular expression or preset) or a list of "
                          f"module names, got {value!r}")


def preset_for(model: nn.Module) -> TargetPreset | None:
    """The first registered target preset (registration order) that matches `model`."""
    from .registry import get_registry

    for _, preset in get_registry().items("target_preset"):
        if preset.matches(model):
            return preset
    return None


BYPASSED = ("nn.MultiheadAttention reads out_proj.weight directly instead of calling out_proj, "
            "so an adapter there would never run")


def _bypassed_layers(model: nn.Module) -> set[int]:
    """ids of layers whose parent uses their weight without calling them."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def _adaptable(module: nn.Module, bypassed: set[int]) -> bool:
    return layer_ops(module) is not None and id(module) not in bypassed


def _no_preset(model: nn.Module) -> str:
    from .registry import get_registry

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = [name for name, _ in get_registry().items("target_preset")]
    return (f"adapt() needs targets= for {type(model).__name__}"
            f"{f' (config.model_type={model_type!r})' if model_type else ''}: no registered target "
            f"preset matches it (presets: {', '.join(names) or '(none)'}). Pass a list of module "
            f"names (e.g. ['query', 'value']), a regular expression, or one of {', '.join(PRESETS)}")


def _walk(model: nn.Module, skip: set[int], prefix: str = ""):
    """(name, module) of every module; a layer geopeft adapted already counts as its base
    layer (another adapter may join it), its adapters as nothing."""
    if getattr(type(model), "is_adapted_layer", False):
        model = model.base_layer
    yield prefix, model
    for name, child in model.named_children():
        if id(child) in skip:
            continue
        yield from _walk(child, skip, f"{prefix}.{name}" if prefix else name)


def name_matches(name: str, item: str) -> bool:
    """PEFT's rule: `name` is `item` or ends with '.' + `item`."""
    return name == item or name.endswith("." + item)


def _matches(name: str, module: nn.Module, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        if targets == "all-linear":
            ops = layer_ops(module)
            return (ops is not None and ops.kind in ("linear", "conv1d")
                    and name.rsplit(".", 1)[-1] not in OUTPUT_HEADS)
        if targets == "attention":
            return any(name_matches(name, t) for t in ATTENTION)
        if targets == "attention-qv":
            return any(name_matches(name, t) for t in ("query", "value", "q_proj", "v_proj", "q", "v"))
        return re.fullmatch(targets, name) is not None
    return any(name_matches(name, t) for t in targets)


def _nothing_matched(targets: str | Sequence[str], named: list[tuple[str, nn.Module]]) -> str:
    adaptable = [n for n, m in named if n and layer_ops(m) is not None]
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in adaptable})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    similar: list[str] = []
    for item in wanted:
        last = item.rsplit(".", 1)[-1]
        similar += difflib.get_close_matches(last, leaf_names, n=3, cutoff=0.5)
        similar += difflib.get_close_matches(item, adaptable, n=3, cutoff=0.6)
    similar = list(dict.fromkeys(similar))
    hint = f" Similar names: {', '.join(similar)}." if similar else ""
    return (f"targets {targets!r} matched no adaptable layer.{hint} Adaptable layer names in this "
            f"model: {', '.join(leaf_names[:30]) or '(none)'}"
            f"{' …' if len(leaf_names) > 30 else ''}. Presets: {', '.join(PRESETS)}.")
