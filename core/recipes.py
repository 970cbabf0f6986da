"""Turning `method="..."` plus overrides into component instances.

Overrides whose key is a recipe field (`adapter`, `manifolds` or `manifold`,
`transforms`, `rank_controller`, `initializer`, `riemannian_grad`,
`project_every`, `moments`) replace that part, by registered name or by
instance. Any other keyword is an *option*: it goes to every component whose
constructor accepts it (e.g. `rslora` and `dropout` to the adapter,
`retraction` to a manifold). An option nobody accepts is an error that lists
the accepted ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from .errors import ConfigError, IncompatibleComponentsError, did_you_mean
from .interfaces import (
    Adapter,
    FactorKey,
    GradientTransform,
    Initializer,
    Manifold,
    RankController,
    Recipe,
    factor_names_of,
)
from .registry import Registry, get_registry

# arguments adapt() gives every adapter itself
_ADAPTER_RESERVED = {"self", "base", "rank"}
_ALIASES = {"manifold": "manifolds", "transform": "transforms", "method": None}


@dataclass
class Resolved:
    """A recipe with its overrides applied and its components instantiated."""

    recipe: Recipe
    adapter_cls: type[Adapter]
    adapter_options: dict[str, Any]
    manifolds: dict[FactorKey, Manifold]
    transforms: list[GradientTransform]
    rank_controller: RankController
    initializer: Initializer

    def to_json(self) -> dict[str, Any]:
        """What geopeft.json records: names and options of every part (options as JSON
        values, see `options_to_json`; ConfigError for one that JSON cannot hold)."""
        def part(kind: str, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
            return {"name": name, "options": options_to_json(options, f"{kind} {name!r}")}

        recipe = self.recipe
        return {
            "method": recipe.name,
            "adapter": part("adapter", recipe.adapter, self.adapter_options),
            "manifolds": {key: part("manifold", recipe.manifolds[key], m.options())
                          for key, m in self.manifolds.items()},
            "transforms": [part("gradient transform", n, t.options())
                           for n, t in zip(recipe.transforms, self.transforms)],
            "rank_controller": part("rank controller", recipe.rank_controller,
                                    self.rank_controller.options()),
            "initializer": part("initializer", recipe.initializer, self.initializer.options()),
            "riemannian_grad": self.recipe.riemannian_grad,
            "project_every": self.recipe.project_every,
            "moments": self.recipe.moments,
        }


def resolve(method: str | Recipe, overrides: Mapping[str, Any] | None = None,
            registry: Registry | None = None, context: Mapping[str, Any] | None = None) -> Resolved:
    """Expand `method` with `overrides` into components, checking they fit together.

    `context` holds facts about the model (e.g. `hidden_size`, see `model.model_context`):
    each goes, as a default option, to the components whose constructor takes it and
    nowhere else (no error when no component wants it)."""
    reg = registry or get_registry()
    recipe = method if isinstance(method, Recipe) else reg.get("method", method)
    recipe = replace(recipe, manifolds=dict(recipe.manifolds), transforms=list(recipe.transforms),
                     options=dict(recipe.options))
    parts: dict[str, Any] = {}
    options = dict(recipe.options)
    for key, value in (overrides or {}).items():
        key = _ALIASES.get(key, key)
        if key is None:
            raise ConfigError("pass the method as adapt(model, method=...), not as an override")
        if key in ("adapter", "manifolds", "transforms", "rank_controller", "initializer"):
            parts[key] = value
        elif key in ("riemannian_grad", "project_every", "moments"):
            setattr(recipe, key, value)
        elif key in ("name", "description", "options"):
            raise ConfigError(f"{key!r} cannot be overridden")
        elif key == "lr":
            raise ConfigError("lr is the optimizer's: pass it to geopeft.optimizer(model, ..., lr=...), "
                              "not to adapt")
        else:
            options[key] = value
    _check_recipe_values(recipe)

    adapter_name, adapter_cls = _adapter(parts.get("adapter", recipe.adapter), reg)
    recipe.adapter = adapter_name
    spec = manifold_spec(adapter_cls, recipe.manifolds, parts.get("manifolds"))
    # names and classes of the other parts first, so options can be routed
    manifold_named = {key: _named("manifold", v, Manifold, reg) for key, v in spec.items()}
    transforms_named = [_named("gradient_transform", v, GradientTransform, reg)
                        for v in _as_list(parts.get("transforms", recipe.transforms))]
    controller_named = _named("rank_controller", parts.get("rank_controller", recipe.rank_controller),
                              RankController, reg)
    init_named = _named("initializer", parts.get("initializer", recipe.initializer), Initializer, reg)

    routed = _route_options(options, adapter_name, adapter_cls, manifold_named, transforms_named,
                            controller_named, init_named, context or {})
    # one instance per distinct manifold name, so same-geometry factors batch together
    shared: dict[str, Manifold] = {}
    manifolds: dict[FactorKey, Manifold] = {}
    for key, (name, obj) in manifold_named.items():
        if name not in shared or isinstance(obj, Manifold):
            shared[name] = _instantiate((name, obj), routed.get(("manifold", name), {}))
        manifolds[key] = shared[name]
    transforms = [_instantiate(n, routed.get(("gradient_transform", n[0]), {}))
                  for n in transforms_named]
    controller = _instantiate(controller_named, routed.get(("rank_controller", controller_named[0]), {}))
    initializer = _instantiate(init_named, routed.get(("initializer", init_named[0]), {}))

    recipe.manifolds = {k: n for k, (n, _) in manifold_named.items()}
    recipe.transforms = [n for n, _ in transforms_named]
    recipe.rank_controller = controller_named[0]
    recipe.initializer = init_named[0]
    recipe.options = options
    resolved = Resolved(
        recipe=recipe, adapter_cls=adapter_cls, adapter_options=routed.get(("adapter", adapter_name), {}),
        manifolds=manifolds, transforms=transforms, rank_controller=controller, initializer=initializer,
    )
    check_compatible(resolved)
    return resolved


def check_compatible(resolved: Resolved) -> None:
    """Refuse parts that cannot work together, with a sentence naming both."""
    recipe = resolved.recipe
    adapter = recipe.adapter
    have = set(resolved.adapter_cls.factor_names)
    have_text = ", ".join(resolved.adapter_cls.factor_names)
    for key, manifold in resolved.manifolds.items():
        names = factor_names_of(key)
        missing = [n for n in names if n not in have]
        if missing:
            raise IncompatibleComponentsError(
                f"manifold {recipe.manifolds[key]!r} is set for factor {key!r}, but adapter "
                f"{adapter!r} has factors {have_text}")
        if manifold.post_step not in Manifold.POST_STEPS:
            raise IncompatibleComponentsError(
                f"manifold {recipe.manifolds[key]!r} has post_step={manifold.post_step!r}; the "
                f"optimizer knows {', '.join(map(repr, Manifold.POST_STEPS))}: fix the manifold class")
        if manifold.coupled != (len(names) > 1):
            kind = "couples several factors" if manifold.coupled else "takes one factor"
            raise IncompatibleComponentsError(
                f"manifold {recipe.manifolds[key]!r} {kind}, but adapter {adapter!r} "
                f"assigns it to {key!r}")
    parts = [("gradient transform", n, t) for n, t in zip(recipe.transforms, resolved.transforms)]
    parts.append(("initializer", recipe.initializer, resolved.initializer))
    parts.append(("rank controller", recipe.rank_controller, resolved.rank_controller))
    for label, name, part in parts:
        missing = sorted(set(part.requires) - have)
        if missing:
            raise IncompatibleComponentsError(
                f"{label} {name!r} requires factors {', '.join(sorted(part.requires))}, but adapter "
                f"{adapter!r} has factors {have_text}")


# ---------------------------------------------------------------------------- helpers
def _check_recipe_values(recipe: Recipe) -> None:
    if recipe.moments not in Recipe.MOMENTS:
        raise ConfigError(f"moments={recipe.moments!r} is not one of {', '.join(Recipe.MOMENTS)}")
    if not isinstance(recipe.project_every, int) or recipe.project_every < 1:
        raise ConfigError(f"project_every must be a positive int, got {recipe.project_every!r}")
    if not isinstance(recipe.riemannian_grad, bool):
        raise ConfigError(f"riemannian_grad must be True or False, got {recipe.riemannian_grad!r}")


def _adapter(value: Any, reg: Registry) -> tuple[str, type[Adapter]]:
    if isinstance(value, type) and issubclass(value, Adapter):
        return _name_of("adapter", value, reg), value
    if isinstance(value, str):
        return value, reg.get("adapter", value)
    raise ConfigError(f"adapter must be a registered name or an Adapter subclass, got {value!r}")


def manifold_spec(adapter_cls: type[Adapter], recipe_manifolds: Mapping[str, Any],
                  override: Any) -> dict[FactorKey, Any]:
    """Which manifold (name or instance) each factor key gets: the adapter's defaults, the
    recipe's entries, then the user's `manifold=` override."""
    spec: dict[FactorKey, Any] = dict(adapter_cls.default_manifolds)
    _merge_manifolds(spec, recipe_manifolds)  # a recipe's "B,A" replaces the adapter's "A", "B"
    if override is None:
        return spec
    if isinstance(override, (str, Manifold)):  # one manifold for every single factor
        return {name: override for name in adapter_cls.factor_names}
    if not isinstance(override, Mapping):
        raise ConfigError("manifold= takes a name, a Manifold, or a dict {factor: name or Manifold}, "
                          f"got {type(override).__name__}")
    _merge_manifolds(spec, override)
    # a factor left without an entry (a coupled key split by a single-factor one) gets its default
    covered = {n for key in spec for n in factor_names_of(key)}
    for key, name in adapter_cls.default_manifolds.items():
        if not covered & set(factor_names_of(key)):
            spec[key] = name
    return spec


def _merge_manifolds(spec: dict[FactorKey, Any], new: Mapping[FactorKey, Any]) -> None:
    """spec.update(new), where a coupled key replaces the single-factor entries it covers,
    and vice versa."""
    for key in new:
        names = set(factor_names_of(key))
        for old in [k for k in spec if k != key and names & set(factor_names_of(k))]:
            del spec[old]
    spec.update(new)


def _named(kind: str, value: Any, base: type, reg: Registry) -> tuple[str, Any]:
    """(registered name, class or instance) for a name, class or instance."""
    if isinstance(value, str):
        return value, reg.get(kind, value)
    if isinstance(value, base):
        return _name_of(kind, type(value), reg), value
    if isinstance(value, type) and issubclass(value, base):
        return _name_of(kind, value, reg), value
    label = kind.replace("_", " ")
    raise ConfigError(f"a {label} must be a registered name or a {base.__name__}, got {value!r}")


def _name_of(kind: str, cls: type, reg: Registry) -> str:
    for name in reg.names(kind):
        if reg.get(kind, name) is cls:
            return name
    return f"{cls.__module__}:{cls.__qualname__}"


def _instantiate(named: tuple[str, Any], options: dict[str, Any]) -> Any:
    name, obj = named
    if not isinstance(obj, type):
        return obj  # an instance given by the user: its options are its own
    try:
        return obj(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"could not build {name!r} with options {options}: {exc}") from exc


def _accepted(cls: Any, reserved: set[str] = frozenset()) -> set[str]:
    if not isinstance(cls, type):
        return set()
    params = inspect.signature(cls.__init__).parameters
    return {p for p, v in params.items()
            if p not in reserved and p != "self" and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)}


def _route_options(options, adapter_name, adapter_cls, manifold_named, transforms_named,
                   controller_named, init_named, context) -> dict[tuple[str, str], dict[str, Any]]:
    targets: list[tuple[tuple[str, str], set[str]]] = [
        (("adapter", adapter_name), _accepted(adapter_cls, _ADAPTER_RESERVED))]
    targets += [(("manifold", n), _accepted(obj)) for n, obj in manifold_named.values()]
    targets += [(("gradient_transform", n), _accepted(obj)) for n, obj in transforms_named]
    targets.append((("rank_controller", controller_named[0]), _accepted(controller_named[1])))
    targets.append((("initializer", init_named[0]), _accepted(init_named[1])))
    routed: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in options.items():
        takers = [t for t, accepted in targets if key in accepted]
        if not takers:
            listing = "; ".join(f"{kind.replace('_', ' ')} {name!r}: {', '.join(sorted(acc)) or '(none)'}"
                                for (kind, name), acc in targets)
            every = set().union(*(acc for _, acc in targets))
            raise ConfigError(f"unknown option {key!r}{did_you_mean(key, every)} options accepted by "
                              f"this method's components: {listing}")
        for taker in takers:
            routed.setdefault(taker, {})[key] = value
    for key, value in context.items():  # model facts: defaults, for whoever takes them
        for taker, accepted in targets:
            if key in accepted:
                routed.setdefault(taker, {}).setdefault(key, value)
    return routed


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, GradientTransform)) or isinstance(value, type):
        return [value]
    return list(value)


#: how geopeft.json holds a torch.dtype option: {"torch.dtype": "float32"}
_DTYPE_TAG = "torch.dtype"


def options_to_json(options: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """`options` as JSON values: a torch.dtype becomes {"torch.dtype": "float32"}, tuples
    lists; anything else JSON cannot hold (a tensor, a function, NaN) is a ConfigError
    naming `owner` and the option."""
    return {key: _json_value(value, f"option {key!r} of {owner}") for key, value in options.items()}


def options_from_json(options: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `options_to_json`."""
    return {key: _from_json_value(value) for key, value in options.items()}


def _json_value(value: Any, where: str) -> Any:
    if isinstance(value, torch.dtype):
        return {_DTYPE_TAG: str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where} is {value}, which geopeft.json cannot hold; use a finite number")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v, where) for k, v in value.items()}
    raise ConfigError(f"{where} is a {type(value).__name__}, which geopeft.json cannot hold: pass "
                      "a string, number, bool, list, dict or torch.dtype, or register a component "
                      "whose options are such values")


def _from_json_value(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_DTYPE_TAG}:
            dtype = getattr(torch, str(value[_DTYPE_TAG]), None)
            if not isinstance(dtype, torch.dtype):
                raise ConfigError(f"unknown torch dtype {value[_DTYPE_TAG]!r}")
            return dtype
        return {k: _from_json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json_value(v) for v in value]
    return value


def from_json(saved: Mapping[str, Any], registry: Registry | None = None) -> Resolved:
    """Rebuild a Resolved from `Resolved.to_json()`, each part with its own saved options."""
    reg = registry or get_registry()

    def build(kind: str, part: Mapping[str, Any]) -> Any:
        return _instantiate((part["name"], reg.get(kind, part["name"])),
                            options_from_json(part.get("options", {})))

    adapter_name = saved["adapter"]["name"]
    adapter_cls = reg.get("adapter", adapter_name)
    manifolds: dict[FactorKey, Manifold] = {}
    shared: dict[tuple[str, str], Manifold] = {}
    for key, part in saved["manifolds"].items():
        sig = (part["name"], repr(sorted(part.get("options", {}).items())))
        manifolds[key] = shared.setdefault(sig, build("manifold", part))
    transforms = [build("gradient_transform", t) for t in saved["transforms"]]
    recipe = Recipe(
        name=saved["method"], adapter=adapter_name,
        manifolds={k: v["name"] for k, v in saved["manifolds"].items()},
        transforms=[t["name"] for t in saved["transforms"]],
        rank_controller=saved["rank_controller"]["name"], initializer=saved["initializer"]["name"],
        riemannian_grad=saved["riemannian_grad"], project_every=saved["project_every"],
        moments=saved["moments"],
    )
    resolved = Resolved(
        recipe=recipe, adapter_cls=adapter_cls,
        adapter_options=options_from_json(saved["adapter"].get("options", {})),
        manifolds=manifolds, transforms=transforms,
        rank_controller=build("rank_controller", saved["rank_controller"]),
        initializer=build("initializer", saved["initializer"]),
    )
    check_compatible(resolved)
    return resolved
