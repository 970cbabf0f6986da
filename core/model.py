"""Attaching adapters to a model: `adapt`, `adapters`, `merge`, `unmerge`, `unload`."""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data_parallel import mark_ignored_by_ddp, unmark_ignored_by_ddp
from .errors import ConfigError, GeopeftError, ShapeError, TargetError
from .geometry import check_initial_points
from .interfaces import Adapter, Recipe, check_alpha, check_rank, factor_names_of
from .layers import drop_premerge, layer_ops
from .originals import exchange, frozen_entries, snapshot, swapped_in, trainable_modules
from .recipes import Resolved, resolve
from .save_guard import guard_save_pretrained, release_save_pretrained
from .shift import add_shift_output, base_shift, unshift_base
from .targets import find_targets, name_matches

STATE_ATTR = "geopeft_state"
logger = logging.getLogger("geopeft")


DEFAULT = "default"
#: the name that, in a mixed batch (`adapter_names=`), runs an example through the base model
BASE = "__base__"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


def is_adapter_name(name: Any) -> bool:
    """Letters, digits, `_` and `-` (it names a submodule and a folder), and not BASE."""
    return isinstance(name, str) and _ADAPTER_NAME.fullmatch(name) is not None and name != BASE


def check_adapter_name(name: Any) -> str:
    """`name` if it can name an adapter (`is_adapter_name`), else ConfigError."""
    if not is_adapter_name(name):
        raise ConfigError(f"adapter_name={name!r} is not a valid adapter name: use letters, digits, "
                          f"'_' and '-' (it names a submodule and a folder), not {BASE!r}")
    return name


def adapter_dir(path: str | os.PathLike, name: str) -> Path:
    """Where adapter `name` lives in a saved directory `path` (PEFT's layout: "default" in
    `path`, the others in subfolders named after them)."""
    return Path(path) if name == DEFAULT else Path(path) / name


def slot(name: str) -> str:
    """The submodule name of adapter `name` in its AdaptedLayer: `adapter` for the default one
    (so a model adapted once keeps its state_dict keys `<layer>.adapter.<factor>`),
    `adapter_<name>` for the others."""
    return "adapter" if name == DEFAULT else f"adapter_{name}"


class AdaptedLayer(nn.Module):
    """A base layer plus its named adapters (each a submodule, see `slot`), of which those in
    `active` run. Attribute lookups fall through to the base layer (`.weight`,
    `.in_features`, …) so code that inspects layers keeps working; `.adapter` is the adapter
    named "default"."""

    is_adapted_layer = True  # `targets` sees through it to the base layer

    def __init__(self, base_layer: nn.Module, adapter: Adapter, name: str = DEFAULT):
        super().__init__()
        self.base_layer = base_layer
        self.adapter_names: list[str] = []
        self.active: tuple[str, ...] = (name,)
        self.merged_names: tuple[str, ...] = ()
        self.disabled = False
        #: one adapter name per example while a mixed batch runs (`model(..., adapter_names=)`)
        self.batch_names: list[str] | None = None
        self.add(name, adapter)

    # -- the adapters
    def add(self, name: str, adapter: Adapter) -> None:
        self.add_module(slot(name), adapter)
        self.adapter_names.append(name)

    def remove(self, name: str) -> Adapter:
        adapter = self._modules.pop(slot(name))
        self.adapter_names.remove(name)
        self.active = tuple(n for n in self.active if n != name)
        return adapter

    def get(self, name: str) -> Adapter:
        return self._modules[slot(name)]

    @property
    def adapters(self) -> dict[str, Adapter]:
        """{name: adapter}, in the order they were added."""
        return {n: self._modules[slot(n)] for n in self.adapter_names}

    @property
    def merged(self) -> bool:
        return bool(self.merged_names)

    # -- the function
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.batch_names is not None and not (self.merged or self.disabled):
            return self._mixed_forward(x, self.batch_names, *args, **kwargs)
        if len(self.active) == 1 and not (self.merged or self.disabled or args or kwargs):
            fused = self.get(self.active[0]).fused_forward(x)
            if fused is not None:
                return fused
        out = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return out
        return self._add_updates(x, out, () if self.disabled else self.active)

    def _add_updates(self, x: Tensor, out: Tensor, names: Sequence[str]) -> Tensor:
        """`out` (the base layer's output for x) plus the updates of adapters `names`; with
        none, the base function: a base weight an initializer shifted gets s·B₀A₀·x back."""
        if not names:
            for adapter in self.adapters.values():
                if base_shift(adapter) is not None:
                    out = add_shift_output(adapter, x, out)
            return out
        for name in names:
            out = self.get(name)(x, out)
        return out

    def _mixed_forward(self, x: Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> Tensor:
        """Example i through adapter names[i] (BASE, or an adapter this layer lacks: the base
        function): one base call for the batch, each adapter's update on its examples."""
        if x.shape[0] != len(names):
            raise ShapeError(f"adapter_names= has {len(names)} names but the batch reaching this "
                             f"layer has {x.shape[0]} examples (dim 0); give one name per example")
        out = self.base_layer(x, *args, **kwargs)
        result = out
        for name in dict.fromkeys(names):
            index = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            chosen = (name,) if name in self.adapter_names else ()
            result = result.index_put((index,), self._add_updates(x[index], out[index], chosen))
        return result

    def __repr__(self) -> str:
        """The base layer, and each adapter on one line (its own submodules, e.g. dropout,
        are in its options)."""
        flags = [f for f in ("merged", "disabled") if getattr(self, f)]
        state = f"  [{', '.join(flags)}]" if flags else ""
        several = self.adapter_names != [DEFAULT]
        lines = [f"  ({slot(n)}): {type(a).__name__}({a.extra_repr()})"
                 + (f"  [{'active' if n in self.active else 'inactive'}]" if several else "")
                 for n, a in self.adapters.items()]
        return (f"{type(self).__name__}(\n  (base_layer): {self.base_layer!r}\n"
                + "\n".join(lines) + f"{state}\n)")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapter") or name.startswith("adapter_"):
                raise
            return getattr(self.base_layer, name)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + ΔW of the active adapters, correctly rounded to W's dtype (the sum is
        formed in float64)."""
        if not self.merged and self.active:
            self._add_delta(+1, self.active)
            self.merged_names = self.active

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − ΔW: the inverse of `merge`, exact up to one rounding in W's dtype."""
        if self.merged:
            self._add_delta(-1, self.merged_names)
            self.merged_names = ()

    def _add_delta(self, sign: int, names: Sequence[str]) -> None:
        # a quantized weight is requantised (unmerge puts the pre-merge one back): LayerOps
        adapters_ = [self.get(n) for n in names]
        delta = (adapters_[0].delta_weight() if len(adapters_) == 1
                 else sum(a.delta_weight().double() for a in adapters_))
        adapters_[0].ops.add_to_weight(self.base_layer, delta, sign, merging=True)


@dataclass
class AdapterState:
    """What `adapt` (or `load`) did for one named adapter."""

    resolved: Resolved
    rank: int
    alpha: float | None
    trainable: list[str] = field(default_factory=list)
    #: the base model's values of the `trainable` modules (`originals.snapshot`), which
    #: `disable_adapters` puts back for its block, and which stand in the model while this
    #: adapter is inactive
    originals: dict[str, Tensor] = field(default_factory=dict, repr=False)
    #: while the adapter is inactive: its trained `trainable` parameters, out of the model
    stashed: dict[str, Tensor] = field(default_factory=dict, repr=False)
    #: loaded for inference (`load(..., trainable=False)`): `set_adapter` leaves it frozen
    frozen: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "recipe": self.resolved.to_json(),
                "trainable": list(self.trainable)}


class AdaptState:
    """The named adapters of a model (`AdapterState` each, in the order added) and which are
    active; kept on the model (`model.geopeft_state`) for the optimizer and `save`. With one
    active adapter, `resolved`, `rank`, `alpha`, `trainable` and `originals` are its own."""

    def __init__(self, name: str, first: AdapterState):
        self.by_name: dict[str, AdapterState] = {name: first}
        self.active: tuple[str, ...] = (name,)

    @property
    def current(self) -> AdapterState:
        """The active adapter's state; GeopeftError when several are active."""
        if len(self.active) != 1:
            raise GeopeftError(f"adapters {', '.join(map(repr, self.active))} are active together; "
                               "this needs one: geopeft.set_adapter(model, name) first")
        return self.by_name[self.active[0]]

    resolved = property(lambda self: self.current.resolved)
    rank = property(lambda self: self.current.rank)
    alpha = property(lambda self: self.current.alpha)
    trainable = property(lambda self: self.current.trainable)

    @property
    def originals(self) -> dict[str, Tensor]:
        """The base values of every active adapter's `trainable` modules."""
        return {k: v for n in self.active for k, v in self.by_name[n].originals.items()}

    def __repr__(self) -> str:
        return f"AdaptState(adapters={list(self.by_name)}, active={list(self.active)})"


def adapt(model: nn.Module, method: str | Recipe = "lora", targets: str | Sequence[str] | None = None,
          rank: int = 8, alpha: float | None = None, *, exclude: str | Sequence[str] | None = None,
          trainable: Sequence[str] | None = None, init_batches: Iterable[Any] | None = None,
          loss_fn: Any = None, ranks: dict[str, int] | None = None, adapter_name: str = DEFAULT,
          **overrides: Any) -> nn.Module:
    """Attach `method`'s adapters to the `targets` of `model`, in place; returns `model`.

    All base parameters are frozen except the modules named in `trainable`
    (e.g. ["classifier"]; saved with the adapter, like PEFT's modules_to_save).
    `alpha` defaults to `rank` (scaling 1). `ranks` gives per-module ranks
    (used by `load`). `overrides` replace recipe parts or set component options.
    On a model that already has adapters, `adapter_name` names the new one, added
    inactive beside them (PEFT's `add_adapter`): `geopeft.set_adapter` switches.
    """
    check_adapter_name(adapter_name)
    state = find_state(model)
    if state is not None:
        check_can_add(model, adapter_name)
        model = find_root(model)
    try:
        check_rank(rank)
        check_alpha(alpha)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if alpha is not None:
        overrides["alpha"] = alpha
    found = find_targets(model, targets, exclude)
    on_meta = [name for name, module in found if module.weight.is_meta]
    if on_meta:
        raise ConfigError(f"layer(s) {', '.join(on_meta[:3])} are on the meta device (no weights): "
                          "adapt initialises factors from real values; materialise the model first "
                          "(model.to_empty(device=...) and load its weights), then adapt — or, to "
                          "restore a saved adapter, geopeft.load it onto the materialised model")
    resolved = resolve(method, overrides, context=model_context(model, found))
    _log_inferred_facts(model, resolved, found)
    trainable = list(trainable or [])
    _check_trainable(model, trainable)

    unknown = sorted(set(ranks or {}) - {name for name, _ in found})
    if unknown:
        raise ConfigError(f"ranks= names layers that targets= does not select: {', '.join(unknown)}")
    if resolved.initializer.needs_data and (init_batches is None or loss_fn is None):
        raise ConfigError(f"initializer {resolved.recipe.initializer!r} computes the factors from data: "
                          "pass init_batches= (a few calibration batches) and loss_fn=")
    for t in trainable:
        inside = [name for name, _ in found if name_matches(name, t) or f".{t}." in f".{name}"]
        if inside:
            raise ConfigError(f"trainable={t!r} contains adapted layer(s) {', '.join(inside[:3])}: a "
                              "module is either adapted or fully trained; narrow targets= or trainable=")
    if state is not None:
        check_apart(model, adapter_name, [n for n, _ in found], trainable)
    rank = resolved.rank_controller.initial_rank(rank)  # AdaLoRA's default starts above it
    built = build_adapters(resolved, found, ranks or {}, rank)  # nothing changed yet
    originals = snapshot(model, trainable)
    pairs = [(name, adapter) for name, _, adapter in built]
    with installed(model, built, trainable, adapter_name):
        with torch.no_grad(), alone(model, adapter_name):  # a new adapter starts from the base
            resolved.initializer.initialize(pairs, model=model, batches=init_batches, loss_fn=loss_fn)
            project_onto_manifolds([a for _, a in pairs])
        check_initial_points(pairs, resolved.recipe.initializer)
        if state is not None and any(base_shift(a) is not None for _, a in pairs):
            raise ConfigError(f"initializer {resolved.recipe.initializer!r} shifts the base weights "
                              "(W − s·B₀A₀), which the model's other adapters would then run on; add "
                              "it with an initializer that leaves the base alone, or adapt a fresh model")
    register(model, adapter_name, AdapterState(resolved, rank, alpha, trainable, originals))
    mark_ignored_by_ddp(model)
    guard_save_pretrained(model)
    return model


#: where models declare their hidden size: HF configs (BERT/LLaMA, T5, GPT-2), timm's ViTs
_HIDDEN_SIZE_ATTRS = (("config", "hidden_size"), ("config", "d_model"), ("config", "n_embd"),
                      (None, "embed_dim"))


def model_context(model: nn.Module, layers: Sequence[tuple[str, nn.Module]] = ()) -> dict[str, Any]:
    """Facts about `model` that components may take as default options (see
    `recipes.resolve`): `hidden_size`, as the model declares it or, when it declares none,
    inferred from the layers to adapt (`infer_hidden_size`)."""
    declared = declared_hidden_size(model)
    inferred = declared or infer_hidden_size(layers)
    return {"hidden_size": inferred} if inferred else {}


def declared_hidden_size(model: nn.Module) -> int | None:
    """config.hidden_size / d_model / n_embd, or timm's embed_dim; None if none is declared."""
    for holder, attr in _HIDDEN_SIZE_ATTRS:
        obj = getattr(model, holder, None) if holder else model
        value = getattr(obj, attr, None) if obj is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def infer_hidden_size(layers: Sequence[tuple[str, nn.Module]]) -> int | None:
    """The most common dimension among the layers' (out, in) matrix shapes (ties: the
    larger): in a transformer the d × d attention projections outvote the MLP's 4d."""
    counts: Counter[int] = Counter()
    for _, module in layers:
        ops = layer_ops(module)
        if ops is not None:
            counts.update((ops.m, ops.n))
    if not counts:
        return None
    return max(counts, key=lambda d: (counts[d], d))


def _log_inferred_facts(model: nn.Module, resolved: Resolved, found) -> None:
    d = resolved.model_facts.get("hidden_size")
    if d is not None and declared_hidden_size(model) is None:
        logger.info("geopeft: the model declares no hidden size (config.hidden_size); using "
                    "hidden_size=%d, the most common dimension among the %d adapted layers. Pass "
                    "hidden_size=<d> to geopeft.adapt to set it.", d, len(found))


def adapters(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, Adapter]]:
    """[(module name, adapter)] of the active adapter(s), or of adapter `adapter_name`, in
    model order. Names are those of the adapted base layers in the model `adapt` was
    called on, also when `model` wraps it (DDP)."""
    found = []
    for lname, layer in adapted_layers(model):
        names = layer.active if adapter_name is None else (adapter_name,)
        found += [(lname, layer.get(n)) for n in names if n in layer.adapter_names]
    return found


def adapted_layers(model: nn.Module) -> list[tuple[str, AdaptedLayer]]:
    root = find_root(model) or model
    return [(n, m) for n, m in root.named_modules() if isinstance(m, AdaptedLayer)]


def find_root(model: nn.Module) -> nn.Module | None:
    """The module `adapt` was called on: `model` itself or the model inside a wrapper
    (DDP's `.module`, accelerate's, torch.compile's); None if not adapted."""
    for module in model.modules():
        if module.__dict__.get(STATE_ATTR) is not None:
            return module
    return None


def find_state(model: nn.Module) -> AdaptState | None:
    """The AdaptState of `model` or of a wrapped inner model."""
    root = find_root(model)
    return None if root is None else root.__dict__[STATE_ATTR]


def require_state(model: nn.Module, fix: str = "call geopeft.adapt(model, ...) first") -> AdaptState:
    """`find_state(model)`, or a GeopeftError saying the model has no adapters and `fix`."""
    state = find_state(model)
    if state is None:
        raise GeopeftError(f"the model has no geopeft adapters; {fix}")
    return state


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters into their base weights; the forward then skips the adapters."""
    for _, layer in _layers_or_error(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`."""
    for _, layer in _layers_or_error(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """The base architecture back, in place: every adapted layer is replaced by its base
    layer, with the active adapters' ΔW merged into the weight (`merge=True`, as `merge` rounds it: a base weight
    an initializer shifted becomes W − s·B₀A₀ + ΔW, the fine-tuned weight) or dropped
    (`merge=False`: the original W, a shift undone up to one rounding), and the geopeft
    state is removed — `state_dict()` keys and `save_pretrained` are the base model's
    again. Trained `trainable` modules keep their weights; `requires_grad` flags stay as
    training left them. Returns `model`."""
    root = find_root(model)
    layers = _layers_or_error(model)
    unmark_ignored_by_ddp(root)
    for name, layer in layers:
        if merge:
            layer.merge()
            drop_premerge(layer.base_layer)
        else:
            layer.unmerge()
            for adapter in layer.adapters.values():
                unshift_base(adapter)
        replace_module(root, name, layer.base_layer)
    delattr(root, STATE_ATTR)
    release_save_pretrained(root)
    remove_hooks(root)
    return model


@contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes its base function exactly: adapters are skipped
    and `trainable=` modules use the base model's values, kept by `adapt` (as PEFT's
    modules_to_save keeps the originals). Refused on a merged model (its base weights hold
    ΔW): `unmerge` it first."""
    layers = _layers_or_error(model)
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise GeopeftError(f"the model is merged (e.g. {merged[0]!r}): its base weights hold ΔW, so "
                           "disabling the adapters would not give the base model; call "
                           "geopeft.unmerge(model) first")
    state = find_state(model)
    before = [layer.disabled for _, layer in layers]
    for _, layer in layers:
        layer.disabled = True
    try:
        with swapped_in(find_root(model), state.originals if state is not None else {}):
            yield model
    finally:
        for (_, layer), flag in zip(layers, before):
            layer.disabled = flag


def project_onto_manifolds(adapters_: Sequence[Adapter]) -> None:
    """Put every factor on a non-Euclidean manifold onto it (batched by shape)."""
    from .geometry import factor_groups

    for group in factor_groups(adapters_):
        if group.manifold.is_euclidean:
            continue
        points = group.stacked()
        group.write(group.manifold.project(points))


def build_adapters(resolved: Resolved, found: Sequence[tuple[str, nn.Module]],
                   ranks: dict[str, int], default_rank: int,
                   dtypes: dict[str, torch.dtype] | None = None) -> list[tuple[str, nn.Module, Adapter]]:
    """A fresh adapter of `resolved` for each found layer. Reads the model, changes nothing:
    a bad rank or option fails here, before the model is touched."""
    built = []
    for name, module in found:
        r = ranks.get(name, default_rank)
        _check_rank(name, module, r)
        options = dict(resolved.adapter_options)
        if dtypes and name in dtypes:
            options["dtype"] = dtypes[name]
        try:
            adapter = resolved.adapter_cls(module, rank=r, **options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"adapter {resolved.recipe.adapter!r} on {name!r} with options "
                              f"{options}: {exc}") from exc
        adapter.set_manifolds(resolved.manifolds)
        _check_manifolds_fit(resolved, name, adapter)
        built.append((name, module, adapter))
    return built


def _check_manifolds_fit(resolved: Resolved, layer: str, adapter: Adapter) -> None:
    """Each factor's shape suits its manifold (`Manifold.shape_problem`), else ConfigError."""
    for key, manifold in adapter.factor_manifolds().items():
        shapes = tuple(tuple(getattr(adapter, n).shape) for n in factor_names_of(key))
        if manifold.is_euclidean:
            continue
        if any(len(s) != 2 for s in shapes):  # e.g. usv's S with diag_s=True: a vector (r,)
            problem = "a manifold acts on (n, p) matrices and this factor is not one"
        else:
            problem = manifold.shape_problem(shapes if manifold.coupled else shapes[0])
        if problem:
            shown = " and ".join("x".join(map(str, s)) for s in shapes)
            raise ConfigError(f"manifold {resolved.recipe.manifolds.get(key, manifold.name)!r} does not "
                              f"fit factor {key!r} of the adapter on {layer!r}: the factor is {shown}, "
                              f"but {problem}; give that factor another manifold (e.g. 'euclidean')")


@contextmanager
def installed(model: nn.Module, built: Sequence[tuple[str, nn.Module, Adapter]],
              trainable: Sequence[str], adapter_name: str = DEFAULT):
    """Freeze the model, wrap each layer with its adapter (named `adapter_name`; beside the
    adapters of a layer already wrapped), unfreeze `trainable`; if the body raises, put
    every layer and `requires_grad` flag back as it was (and every base weight an
    initializer shifted, up to one rounding). A model that has adapters already is not
    frozen again: its adapters keep their flags."""
    adding = find_state(model) is not None
    flags = [(p, p.requires_grad) for p in model.parameters()]
    if not adding:
        for p, _ in flags:
            p.requires_grad_(False)
    done = []
    try:
        for name, module, adapter in built:
            current = model.get_submodule(name)
            if isinstance(current, AdaptedLayer):
                current.add(adapter_name, adapter)
                done.append((name, current))
            else:
                replace_module(model, name, AdaptedLayer(module, adapter, adapter_name))
                done.append((name, module))
        set_trainable(model, trainable)
        yield
    except BaseException:
        for _, _, adapter in built:  # an initializer may have shifted base weights
            unshift_base(adapter)
        for name, previous in reversed(done):
            if isinstance(previous, AdaptedLayer):
                previous.remove(adapter_name)
            else:
                replace_module(model, name, previous)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


# ---------------------------------------------------------------- several adapters
def register(model: nn.Module, name: str, adapter_state: AdapterState) -> None:
    """Record adapter `name`, just installed: the model's first (active), or one more
    (inactive: its factors frozen, its `trainable` modules holding the base values)."""
    state = find_state(model)
    if state is None:
        setattr(model, STATE_ATTR, AdaptState(name, adapter_state))
        model.register_forward_pre_hook(_mixed_batch_pre_hook, with_kwargs=True)  # adapter_names=
        return
    root = find_root(model)
    if len(state.by_name) == 1:
        add_state_hooks(root)  # the stash, from the second adapter on
    state.by_name[name] = adapter_state
    deactivate(root, state, name)
    sync_layers(root, state)


def activate(root: nn.Module, state: AdaptState, name: str) -> None:
    """Adapter `name`'s factors trainable (unless it is `frozen`), its trained `trainable`
    parameters back in the model."""
    for _, adapter in adapters(root, name):
        for p in adapter.factors().values():
            p.requires_grad_(not state.by_name[name].frozen)
    stashed = state.by_name[name].stashed
    with torch.no_grad():  # follow a `.to()` / `.half()` of the model made meanwhile
        for key, value in exchange(root, stashed).items():
            if (value.device, value.dtype) != (stashed[key].device, stashed[key].dtype):
                stashed[key].data = stashed[key].data.to(device=value.device, dtype=value.dtype)
    state.by_name[name].stashed = {}


def deactivate(root: nn.Module, state: AdaptState, name: str) -> None:
    """Adapter `name`'s factors frozen; its `trainable` modules hold the base values (frozen),
    its trained parameters kept aside (`stashed`) until `activate`."""
    for _, adapter in adapters(root, name):
        for p in adapter.factors().values():
            p.requires_grad_(False)
    entry = state.by_name[name]
    entry.stashed = exchange(root, frozen_entries(root, entry.originals))


def sync_layers(root: nn.Module, state: AdaptState) -> None:
    """Each layer runs the model's active adapters that it has."""
    for _, layer in adapted_layers(root):
        layer.active = tuple(n for n in state.active if n in layer.adapter_names)


@contextmanager
def alone(model: nn.Module, name: str):
    """Within the block the model computes as if adapter `name` were its only one: the
    others skipped, their `trainable` modules holding the base values."""
    state = find_state(model)
    if state is None:
        yield
        return
    layers = [layer for _, layer in adapted_layers(model)]
    before = [layer.active for layer in layers]
    for layer in layers:
        layer.active = (name,) if name in layer.adapter_names else ()
    try:
        with swapped_in(find_root(model), state.originals):
            yield
    finally:
        for layer, active in zip(layers, before):
            layer.active = active


def check_can_add(model: nn.Module, name: str) -> None:
    """Adapter `name` may join the adapted `model` (a new name, no merge, no shifted base)."""
    state = find_state(model)
    if name in state.by_name:
        raise GeopeftError(f"this model already has geopeft adapters, one of them named {name!r} "
                           f"(adapters: {', '.join(state.by_name)}); pass adapter_name='<new name>' to "
                           f"add one beside them (adapt or geopeft.load), or delete_adapter(model, "
                           f"{name!r}) first; to restore saved ones, geopeft.load(base_model, dir)")
    merged = [n for n, layer in adapted_layers(model) if layer.merged]
    if merged:
        raise GeopeftError(f"the model is merged (e.g. {merged[0]!r}); call geopeft.unmerge(model) "
                           "before adding an adapter")
    shifted = [n for n, a in adapters(model) if base_shift(a) is not None]
    if shifted:
        raise ConfigError(f"adapter {state.active[0]!r} shifted the base weight of {shifted[0]!r} "
                          "(its initializer's W − s·B₀A₀), which a new adapter would run on: "
                          "several adapters need initializers that leave the base alone")


def check_apart(model: nn.Module, name: str, targets: Sequence[str], trainable: Sequence[str]) -> None:
    """A module trained in full belongs to one adapter and is adapted by none."""
    state = find_state(model)
    mine = [n for n, _ in trainable_modules(model, trainable)]
    for other, entry in state.by_name.items():
        theirs = [n for n, _ in trainable_modules(model, entry.trainable)]
        their_targets = [n for n, _ in adapters(model, other)]
        for a, b, what in ((mine, theirs, "trains it in full too"), (mine, their_targets, "adapts it"),
                           (targets, theirs, "trains it in full")):
            clash = [x for x in a for y in b if x == y or x.startswith(f"{y}.") or y.startswith(f"{x}.")]
            if clash:
                raise ConfigError(f"module {clash[0]!r} of adapter {name!r} clashes with adapter "
                                  f"{other!r}, which {what}: a module trained in full belongs to one "
                                  "adapter; choose other targets= / trainable=")


def add_state_hooks(root: nn.Module) -> None:
    """Hooks on the root of a model with several adapters: `state_dict` / `load_state_dict`
    carry the inactive adapters' stashed `trainable` parameters (keys
    `geopeft_stashed.<adapter>.<parameter>`) and the active names (metadata).

    Every adapted root also has a forward pre-hook (with kwargs, added with its first
    adapter): `root(..., adapter_names=[...])` runs a mixed batch (PEFT's; the pre-hook
    takes the keyword off before the forward; a post-hook, added by the first mixed batch,
    clears the layers' names after it). A call without the keyword costs one dict lookup."""
    root.register_state_dict_post_hook(_stashed_state_dict_hook)
    root.register_load_state_dict_pre_hook(_stashed_load_hook)


_HOOKS = ("_mixed_batch_pre_hook", "_mixed_batch_post_hook", "_stashed_state_dict_hook", "_stashed_load_hook")


def remove_hooks(root: nn.Module) -> None:
    for table in (root._forward_pre_hooks, root._forward_hooks, root._state_dict_hooks,
                  root._load_state_dict_pre_hooks):
        for key in [k for k, f in table.items() if getattr(getattr(f, "hook", f), "__name__", "") in _HOOKS
                    and getattr(getattr(f, "hook", f), "__module__", "") == __name__]:
            del table[key]
            root._forward_pre_hooks_with_kwargs.pop(key, None)
            root._forward_hooks_always_called.pop(key, None)


STASHED = "geopeft_stashed"


def _stashed_state_dict_hook(root: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state = root.__dict__.get(STATE_ATTR)
    if state is None:
        return
    local_metadata["geopeft_active"] = list(state.active)
    for name, entry in state.by_name.items():
        for pname, t in entry.stashed.items():
            state_dict[f"{prefix}{STASHED}.{name}.{pname}"] = t.detach()


def _stashed_load_hook(root: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                       missing: list, unexpected: list, errors: list) -> None:
    """The saved active adapters become the active ones (so every key lands where it was
    read from); stashed entries go into the stash."""
    state = root.__dict__.get(STATE_ATTR)
    if state is None:
        return
    active = local_metadata.get("geopeft_active")
    if active and tuple(active) != state.active and all(n in state.by_name for n in active):
        from .named import set_adapter

        set_adapter(root, active)
    head = f"{prefix}{STASHED}."
    seen = set()
    for key in [k for k in state_dict if k.startswith(head)]:
        value = state_dict.pop(key)
        name, _, pname = key[len(head):].partition(".")
        target = state.by_name[name].stashed.get(pname) if name in state.by_name else None
        if target is None:
            unexpected.append(key)
        elif target.shape != value.shape:
            errors.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                          f"the shape in current model is {tuple(target.shape)}.")
        else:
            with torch.no_grad():
                target.copy_(value)
            seen.add(key)
    missing += [f"{head}{n}.{p}" for n, e in state.by_name.items() for p in e.stashed
                if f"{head}{n}.{p}" not in seen]


def _mixed_batch_pre_hook(root: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if "adapter_names" not in kwargs:
        return None
    kwargs = dict(kwargs)
    names = kwargs.pop("adapter_names")
    state = root.__dict__[STATE_ATTR]
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"adapter_names= takes one adapter name per example (a list of str), got {names!r}")
    unknown = sorted({n for n in names if n not in state.by_name and n != BASE})
    if unknown:
        raise ConfigError(f"adapter_names= names {', '.join(map(repr, unknown))}, which the model lacks "
                          f"(adapters: {', '.join(state.by_name)}; {BASE!r} runs the base model)")
    for name in dict.fromkeys([*names, *state.active]):
        trained = state.by_name[name].trainable if name != BASE else []
        if trained:
            raise ConfigError(f"adapter {name!r} trains {trained[0]!r} in full, a module the examples "
                              "of a mixed batch would share; run its examples on their own "
                              "(geopeft.set_adapter)")
    layers = [layer for _, layer in adapted_layers(root)]
    if any(layer.merged for layer in layers):
        raise GeopeftError("the model is merged: a mixed batch needs the adapters apart; call "
                           "geopeft.unmerge(model) first")
    for layer in layers:
        layer.batch_names = list(names)
    root.__dict__["_geopeft_mixed"] = layers
    if not any(getattr(h, "__name__", "") == "_mixed_batch_post_hook" for h in root._forward_hooks.values()):
        root.register_forward_hook(_mixed_batch_post_hook, always_call=True)  # seen by this call too
    return args, kwargs


def _mixed_batch_post_hook(root: nn.Module, args: tuple, output: Any) -> None:
    for layer in root.__dict__.pop("_geopeft_mixed", ()):
        layer.batch_names = None


def trainable_params(model: nn.Module, trainable: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    """[(full parameter name, parameter)] of the modules named in `trainable`, their
    submodules' included, each once: what `adapt` unfreezes, `save` and `export_peft` write."""
    found: dict[str, nn.Parameter] = {}
    for mname, module in trainable_modules(model, trainable):
        for pname, p in module.named_parameters():
            found.setdefault(f"{mname}.{pname}", p)
    return list(found.items())


def trained_params(root: nn.Module, state: AdaptState, name: str) -> list[tuple[str, nn.Parameter]]:
    """`trainable_params` of adapter `name`: in the model while it is active, else the
    trained ones kept aside (`AdapterState.stashed`)."""
    entry = state.by_name[name]
    found = trainable_params(root, entry.trainable)
    if name in state.active:
        return found
    return [(pname, entry.stashed[pname]) for pname, _ in found]


def known_adapter(state: AdaptState, name: Any) -> str:
    """`name` if the model has an adapter of that name, else GeopeftError listing them."""
    if not isinstance(name, str) or name not in state.by_name:
        raise GeopeftError(f"the model has no adapter named {name!r}; its adapters: "
                           f"{', '.join(state.by_name)}")
    return name


def set_trainable(model: nn.Module, trainable: Sequence[str]) -> None:
    """Unfreeze the modules named (or name-suffixed) in `trainable`."""
    for _, p in trainable_params(model, trainable):
        p.requires_grad_(True)


# ---------------------------------------------------------------------------- helpers
def _layers_or_error(model: nn.Module) -> list[tuple[str, AdaptedLayer]]:
    layers = adapted_layers(model)
    if not layers:
        raise GeopeftError("the model has no geopeft adapters; call geopeft.adapt(model, ...) first")
    return layers


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_rank(name: str, module: nn.Module, rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"the rank of layer {name!r} must be a positive int, got {rank!r} "
                          f"({type(rank).__name__})")
    ops = layer_ops(module)
    if rank > min(ops.m, ops.n):
        raise ConfigError(f"rank {rank} is larger than layer {name!r} allows ({ops.m}x{ops.n}): "
                          f"use rank <= {min(ops.m, ops.n)} or leave that layer out")


def _check_trainable(model: nn.Module, trainable: list[str]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for t in trainable:
        if not any(name_matches(n, t) for n in names):
            raise TargetError(f"trainable={t!r} matches no module of the model")
