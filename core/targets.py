"""Which modules `adapt` attaches adapters to.

`targets` is one of
- a list of names: a module matches a name if its full dotted name equals it
  or ends with '.' + name (PEFT's rule): ["query", "value"];
- a preset name (see PRESETS): "all-linear", "attention";
- any other string: a regular expression, full-matched against dotted names.
Only layers geopeft supports are adapted; a list name that matches only an
unsupported layer, or targets that match nothing, are errors that list names
the model does have.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn

from .errors import ConfigError, TargetError
from .layers import layer_ops, why_unsupported

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
    """[(dotted name, module)] to adapt, in model order. `skip`: ids of modules to pass over."""
    if targets is None:
        raise TargetError("adapt() needs targets=: a list of module names (e.g. ['query', 'value']), "
                          f"a regular expression, or a preset ({', '.join(PRESETS)})")
    _check_patterns(targets, "targets")
    if exclude is not None:
        _check_patterns(exclude, "exclude")
    named = [(n, m) for n, m in _walk(model, skip or set())]
    matches = [(n, m) for n, m in named if n and _matches(n, m, targets)]
    if exclude is not None:
        matches = [(n, m) for n, m in matches if not _matches(n, m, exclude)]
    supported = [(n, m) for n, m in matches if layer_ops(m) is not None]
    if isinstance(targets, str) and targets in PRESETS:
        pass
    elif not isinstance(targets, str):
        for item in targets:
            hits = [(n, m) for n, m in matches if name_matches(n, item)]
            if hits and not any(layer_ops(m) is not None for _, m in hits):
                n, m = hits[0]
                raise TargetError(f"target {item!r} matches {n!r}, which cannot be adapted: "
                                  f"{why_unsupported(m)}")
    if not supported:
        raise TargetError(_nothing_matched(targets, named))
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


def _walk(model: nn.Module, skip: set[int], prefix: str = ""):
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
