"""Checking every field of a geopeft.json before anything is built from it.

A malformed or hostile file gets a `CheckpointError` that names the file, the field
(as a dotted path: `layers.query.rank`) and what was expected — never a bare
KeyError or TypeError from deep inside `load`. Component options are checked by
the components themselves when `load` builds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .interfaces import Recipe
from .model import is_adapter_name

LAYER_KINDS = ("linear", "conv1d", "conv2d", "embedding")
FACTOR_DTYPES = ("float16", "bfloat16", "float32", "float64")
_WEIGHT_DIMS = {"linear": 2, "conv1d": 2, "conv2d": 4, "embedding": 2}


def check_config(config: dict[str, Any], file: Path) -> None:
    """Raise CheckpointError for the first field of `config` (read from `file`) that is
    missing or malformed. `format`/`format_version` are checked by the caller."""
    c = _Checker(file)
    c.field(config, "rank", "a positive int", _positive_int)
    c.optional(config, "alpha", "a positive finite number or null",
               lambda v: v is None or _positive_number(v))
    c.optional(config, "versions", "an object of version strings",
               lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()))
    c.optional(config, "trainable", "a list of module names (strings)",
               lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v))
    if "base_model" in config:
        base = c.field(config, "base_model", "an object {name_or_path, task_type}", _is_dict)
        for key in ("name_or_path", "task_type"):
            c.optional(base, key, "a string or null", lambda v: v is None or isinstance(v, str), "base_model")
    c.optional(config, "adapters", "a list of distinct adapter names (their subfolders)",
               lambda v: isinstance(v, list) and len(set(v)) == len(v)
               and all(is_adapter_name(x) and x != "default" for x in v))
    listed = ["default", *config.get("adapters", [])]
    c.optional(config, "active", f"a non-empty list of distinct names among the adapters ({', '.join(listed)})",
               lambda v: isinstance(v, list) and bool(v) and len(set(v)) == len(v) and all(x in listed for x in v))
    _check_recipe(c, c.field(config, "recipe", "an object", _is_dict))
    layers = c.field(config, "layers", "an object {layer name: layer entry}, not empty",
                     lambda v: isinstance(v, dict) and bool(v))
    for name, info in layers.items():
        path = f"layers.{name}"
        c.check(path, name, "a non-empty module name", lambda v: isinstance(v, str) and bool(v))
        c.check(path, info, "an object with rank, kind, shape and dtype", _is_dict)
        c.field(info, "rank", "a positive int", _positive_int, path)
        kind = c.field(info, "kind", f"one of {', '.join(LAYER_KINDS)}", lambda v: v in LAYER_KINDS, path)
        shape = c.field(info, "shape", "[m, n]: two positive ints", _shape_of(2), path)
        c.field(info, "dtype", f"one of {', '.join(FACTOR_DTYPES)}", lambda v: v in FACTOR_DTYPES, path)
        c.optional(info, "scaling", "a positive finite number (the adapter's scale)", _positive_number, path)
        c.optional(info, "shift_rank", "a positive int (the rank of its base-weight shift)",
                   _positive_int, path)
        if "weight_shape" in info:
            dims = _WEIGHT_DIMS[kind]
            weight = c.field(info, "weight_shape", f"{dims} positive ints (a {kind} weight)",
                             _shape_of(dims), path)
            if _matrix_of(kind, weight) != shape:
                c.fail(f"{path}.weight_shape", weight,
                       f"a {kind} weight whose matrix view is the layer's shape {shape}")


def _check_recipe(c: _Checker, recipe: dict[str, Any]) -> None:
    c.field(recipe, "method", "a method name (string)", _name, "recipe")
    for part in ("adapter", "rank_controller", "initializer"):
        _check_part(c, c.field(recipe, part, "an object {name, options}", _is_dict, "recipe"),
                    f"recipe.{part}")
    manifolds = c.field(recipe, "manifolds", "an object {factor: {name, options}}", _is_dict, "recipe")
    for key, part in manifolds.items():
        c.check(f"recipe.manifolds.{key}", part, "an object {name, options}", _is_dict)
        _check_part(c, part, f"recipe.manifolds.{key}")
    transforms = c.field(recipe, "transforms", "a list of {name, options}",
                         lambda v: isinstance(v, list), "recipe")
    for i, part in enumerate(transforms):
        c.check(f"recipe.transforms.{i}", part, "an object {name, options}", _is_dict)
        _check_part(c, part, f"recipe.transforms.{i}")
    c.field(recipe, "riemannian_grad", "true or false", lambda v: isinstance(v, bool), "recipe")
    c.field(recipe, "project_every", "a positive int", _positive_int, "recipe")
    c.field(recipe, "moments", f"one of {', '.join(map(repr, Recipe.MOMENTS))}",
            lambda v: v in Recipe.MOMENTS, "recipe")


def _check_part(c: _Checker, part: dict[str, Any], path: str) -> None:
    c.field(part, "name", "a registered component name (string)", _name, path)
    c.optional(part, "options", "an object of options", _is_dict, path)


class _Checker:
    def __init__(self, file: Path):
        self.file = file

    def fail(self, path: str, value: Any, expected: str):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise CheckpointError(f"{self.file}: field {path!r} is {shown}; expected {expected}")

    def check(self, path: str, value: Any, expected: str, ok: Callable[[Any], bool]) -> Any:
        if not ok(value):
            self.fail(path, value, expected)
        return value

    def field(self, obj: dict[str, Any], key: str, expected: str, ok: Callable[[Any], bool],
              parent: str = "") -> Any:
        path = f"{parent}.{key}" if parent else key
        if key not in obj:
            raise CheckpointError(f"{self.file} lacks the {path!r} entry (expected {expected}); the "
                                  "file is damaged or truncated")
        return self.check(path, obj[key], expected, ok)

    def optional(self, obj: dict[str, Any], key: str, expected: str, ok: Callable[[Any], bool],
                 parent: str = "") -> None:
        if key in obj:
            self.field(obj, key, expected, ok, parent)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _name(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _shape_of(dims: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and len(v) == dims and all(_positive_int(x) for x in v)


def _matrix_of(kind: str, weight: list[int]) -> list[int]:
    """The (m, n) matrix view of a `kind` weight of shape `weight` (see layers.layer_ops)."""
    if kind == "linear":
        return list(weight)
    if kind == "conv2d":
        return [weight[0], weight[1] * weight[2] * weight[3]]
    return [weight[1], weight[0]]  # conv1d (in, out) and embedding (num, dim)
