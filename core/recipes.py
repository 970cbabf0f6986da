"""Turning `method="..."` plus overrides into component instances, and back to JSON.

Overrides whose key is a recipe part (`Recipe.parts()`: `adapter`, `manifolds` or
`manifold`, `transforms`, `rank_controller`, `initializer`) replace that part, by
registered name, class or instance; a step setting (`Recipe.settings()`:
`riemannian_grad`, `project_every`, `moments`) replaces the recipe's value. Any
other keyword is an *option*: it goes to every component whose constructor accepts
it (e.g. `rslora` and `dropout` to the adapter, `retraction` to a manifold). A
user's option nobody accepts is an error that lists the accepted ones; a recipe's
own option nobody accepts (its component was replaced) is dropped.

The saved JSON (`Resolved.to_json`, `from_json`) follows the Recipe's fields and
names every component by its registered name: `to_json` refuses a component that
is not registered, `from_json` finds components only through the registry.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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
from .kinds import KINDS
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
    #: model facts (`resolve(context=)`) that a component took as a default option
    model_facts: dict[str, Any] = field(default_factory=dict)

    def components(self) -> dict[str, Any]:
        """{recipe part field: the adapter class, or the instance(s)}, shaped like the field."""
        return {"adapter": self.adapter_cls, "manifolds": self.manifolds, "transforms": self.transforms,
                "rank_controller": self.rank_controller, "initializer": self.initializer}

    def to_json(self, registry: Registry | None = None) -> dict[str, Any]:
        """What geopeft.json records: every part's registered name and options, and the
        step settings. A component that is not registered is refused (ConfigError): `load`
        could not find it again."""
        reg = registry or get_registry()
        unregistered: list[tuple[str, type]] = []

        def entry(kind: str, recorded: str, obj: Any) -> dict[str, Any]:
            cls = obj if isinstance(obj, type) else type(obj)
            name = recorded if _is_registered_as(reg, kind, recorded, cls) else reg.name_of(kind, cls)
            if name is None:
                unregistered.append((kind, cls))
            options = self.adapter_options if kind == "adapter" else obj.options()
            return {"name": name, "options": options_to_json(options, f"{KINDS[kind].label} {name!r}")}

        out: dict[str, Any] = {"method": self.recipe.name}
        instances = self.components()
        for fname, kind in Recipe.parts().items():
            names, objs = getattr(self.recipe, fname), instances[fname]
            if isinstance(objs, Mapping):
                out[fname] = {key: entry(kind, names[key], obj) for key, obj in objs.items()}
            elif isinstance(objs, list):
                out[fname] = [entry(kind, n, obj) for n, obj in zip(names, objs)]
            else:
                out[fname] = entry(kind, names, objs)
        if unregistered:
            raise ConfigError(_unregistered_message(unregistered))
        out.update({fname: getattr(self.recipe, fname) for fname in Recipe.settings()})
        return out


def _is_registered_as(reg: Registry, kind: str, name: str, cls: type) -> bool:
    return name in reg.names(kind) and reg.get(kind, name) is cls


def _unregistered_message(parts: list[tuple[str, type]]) -> str:
    listing = "; ".join(f"{KINDS[k].label} {c.__name__} (defined in {c.__module__})" for k, c in parts)
    kind, cls = parts[0]
    return (f"cannot save: not registered, so geopeft.load could not find it again: {listing}. "
            f"Register each before saving, e.g. geopeft.register({kind!r}, "
            f"'{cls.__name__.lower()}', {cls.__name__}) (and again before loading), or ship it "
            "in a plugin (docs/plugins.md). Nothing was written.")


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
    user_options: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        key = _ALIASES.get(key, key)
        if key is None:
            raise ConfigError("pass the method as adapt(model, method=...), not as an override")
        if key in Recipe.parts():
            parts[key] = value
        elif key in Recipe.settings():
            setattr(recipe, key, value)
        elif key == "lr":
            raise ConfigError("lr is the optimizer's: pass it to geopeft.optimizer(model, ..., lr=...), "
                              "not to adapt")
        elif key in Recipe.field_names():
            raise ConfigError(f"{key!r} cannot be overridden")
        else:
            user_options[key] = value
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

    targets = _option_targets(adapter_name, adapter_cls, manifold_named, transforms_named,
                              controller_named, init_named)
    routed, options, model_facts = _route_options(targets, recipe.options, user_options, context or {})
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
        model_facts=model_facts,
    )
    check_compatible(resolved)
    return resolved


def check_compatible(resolved: Resolved) -> None:
    """Refuse parts that cannot work together, with a sentence naming both."""
    recipe = resolved.recipe
    adapter = recipe.adapter
    have = set(resolved.adapter_cls.factor_names)
    have_text = ", ".join(resolved.adapter_cls.factor_names)
    owner: dict[str, FactorKey] = {}
    for key, manifold in resolved.manifolds.items():
        names = factor_names_of(key)
        for n in names:
            if n in owner:  # e.g. manifold={"B": "oblique", "B,A": "balanced"}
                raise IncompatibleComponentsError(
                    f"factor {n!r} is given two manifolds, {recipe.manifolds.get(owner[n], owner[n])!r} "
                    f"on {owner[n]!r} and {recipe.manifolds.get(key, key)!r} on {key!r}: each factor "
                    f"lives on one manifold; drop one of the two entries")
            owner[n] = key
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
    family: dict[str, str] = {}
    for n, t in zip(recipe.transforms, resolved.transforms):
        if t.exclusive and t.exclusive in family:
            raise IncompatibleComponentsError(
                f"gradient transforms {family[t.exclusive]!r} and {n!r} are both "
                f"{t.exclusive!r} transforms, a family that must not be chained (see "
                f"GradientTransform.exclusive); keep one of them")
        if t.exclusive:
            family[t.exclusive] = n
    _check_moment_transport(resolved)
    parts = [("gradient transform", n, t) for n, t in zip(recipe.transforms, resolved.transforms)]
    parts.append(("initializer", recipe.initializer, resolved.initializer))
    parts.append(("rank controller", recipe.rank_controller, resolved.rank_controller))
    for label, name, part in parts:
        missing = sorted(set(part.requires) - have)
        if missing:
            raise IncompatibleComponentsError(
                f"{label} {name!r} requires factors {', '.join(sorted(part.requires))}, but adapter "
                f"{adapter!r} has factors {have_text}")


def _check_moment_transport(resolved: Resolved) -> None:
    """moments="transport" through a coupled projection (a change of basis among factors,
    e.g. `balanced`) carries first moments as gradients (g_B Rᵀ, R⁻ᵀ g_A); after a
    "gram_preconditioner" transform they are preconditioned steps, which change the other
    way (δB R⁻¹, R δA): pushed as gradients they grow by R² and training blows up."""
    recipe = resolved.recipe
    if recipe.moments != "transport":
        return
    steps = [n for n, t in zip(recipe.transforms, resolved.transforms) if t.exclusive == "gram_preconditioner"]
    bases = [k for k, m in resolved.manifolds.items() if m.coupled and m.post_step == "project"]
    if steps and bases:
        raise IncompatibleComponentsError(
            f"moments='transport' carries first moments through the change of basis of manifold "
            f"{recipe.manifolds.get(bases[0], bases[0])!r} on {bases[0]!r} as gradients, but after "
            f"{steps[0]!r} they are preconditioned steps, which change the other way (pushed as "
            f"gradients they grow until training diverges): use moments='keep' with {steps[0]!r}")


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
    """The registered name of `cls`; for a class from user code that is not registered, a
    placeholder (`to_json`, and so `save`, refuse it with a message on registering it)."""
    name = reg.name_of(kind, cls)
    return name if name is not None else f"<unregistered {cls.__module__}.{cls.__qualname__}>"


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


OptionTargets = list[tuple[tuple[str, str], set[str]]]


def _option_targets(adapter_name, adapter_cls, manifold_named, transforms_named, controller_named,
                    init_named) -> OptionTargets:
    """[((kind, name), the options its constructor accepts)] for every part of the recipe."""
    targets: OptionTargets = [(("adapter", adapter_name), _accepted(adapter_cls, _ADAPTER_RESERVED))]
    targets += [(("manifold", n), _accepted(obj)) for n, obj in manifold_named.values()]
    targets += [(("gradient_transform", n), _accepted(obj)) for n, obj in transforms_named]
    targets.append((("rank_controller", controller_named[0]), _accepted(controller_named[1])))
    targets.append((("initializer", init_named[0]), _accepted(init_named[1])))
    return targets


def _route_options(targets: OptionTargets, recipe_options: Mapping[str, Any],
                   user_options: Mapping[str, Any], context: Mapping[str, Any]):
    """Options to the components that take them: the recipe's own (dropped when no part takes
    them — an override replaced the part that did), then the user's (an error when no part
    takes one), then model facts as defaults. Returns (routed {(kind, name): options}, the
    options that were taken, the model facts that were taken)."""
    routed: dict[tuple[str, str], dict[str, Any]] = {}
    taken: dict[str, Any] = {}
    for strict, options in ((False, recipe_options), (True, user_options)):
        for key, value in options.items():
            takers = [t for t, accepted in targets if key in accepted]
            if not takers and strict:
                listing = "; ".join(f"{kind.replace('_', ' ')} {name!r}: {', '.join(sorted(acc)) or '(none)'}"
                                    for (kind, name), acc in targets)
                every = set().union(*(acc for _, acc in targets))
                raise ConfigError(f"unknown option {key!r}{did_you_mean(key, every)} options accepted by "
                                  f"this method's components: {listing}")
            for taker in takers:
                routed.setdefault(taker, {})[key] = value
            if takers:
                taken[key] = value
    facts: dict[str, Any] = {}
    for key, value in context.items():  # model facts: defaults, for whoever takes them
        for taker, accepted in targets:
            if key in accepted and key not in routed.get(taker, {}):
                routed.setdefault(taker, {})[key] = value
                facts[key] = value
    return routed, taken, facts


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
    """Rebuild a Resolved from `Resolved.to_json()`, each part with its own saved options.
    Components are looked up by name in the registry only (nothing named in the file is
    imported); one manifold instance per distinct (name, options), as `resolve` shares them."""
    reg = registry or get_registry()
    shared: dict[tuple[str, str], Any] = {}

    def build(kind: str, part: Mapping[str, Any]) -> Any:
        cls = reg.get(kind, part["name"])
        if kind == "adapter":
            return cls
        options = dict(part.get("options", {}))
        sig = (part["name"], json.dumps(options, sort_keys=True, default=str))
        if kind == "manifold" and sig in shared:
            return shared[sig]
        obj = _instantiate((part["name"], cls), options_from_json(options))
        if kind == "manifold":
            shared[sig] = obj
        return obj

    names: dict[str, Any] = {}
    built: dict[str, Any] = {}
    for fname, kind in Recipe.parts().items():
        value = saved[fname]
        if isinstance(value, list):
            names[fname] = [v["name"] for v in value]
            built[fname] = [build(kind, v) for v in value]
        elif "name" in value:
            names[fname] = value["name"]
            built[fname] = build(kind, value)
        else:  # {factor key: part}
            names[fname] = {k: v["name"] for k, v in value.items()}
            built[fname] = {k: build(kind, v) for k, v in value.items()}
    settings = {fname: saved[fname] for fname in Recipe.settings() if fname in saved}
    recipe = Recipe(name=saved["method"], **names, **settings)
    _check_recipe_values(recipe)
    resolved = Resolved(
        recipe=recipe, adapter_cls=built["adapter"], adapter_options=options_from_json(saved["adapter"].get("options", {})),
        manifolds=built["manifolds"], transforms=built["transforms"],
        rank_controller=built["rank_controller"], initializer=built["initializer"],
    )
    check_compatible(resolved)
    return resolved
