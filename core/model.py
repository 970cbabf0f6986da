"""Attaching adapters to a model: `adapt`, `adapters`, `merge`, `unmerge`, `unload`."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .data_parallel import mark_ignored_by_ddp, unmark_ignored_by_ddp
from .errors import ConfigError, GeopeftError, TargetError
from .geometry import check_initial_points
from .interfaces import Adapter, Recipe, check_alpha, check_rank, factor_names_of
from .layers import drop_premerge, layer_ops
from .originals import snapshot, swapped_in, trainable_modules
from .recipes import Resolved, resolve
from .save_guard import guard_save_pretrained, release_save_pretrained
from .shift import add_shift_output, base_shift, unshift_base
from .targets import find_targets, name_matches

STATE_ATTR = "geopeft_state"
logger = logging.getLogger("geopeft")


class AdaptedLayer(nn.Module):
    """A base layer plus its adapter. Attribute lookups fall through to the base layer
    (`.weight`, `.in_features`, …) so code that inspects layers keeps working."""

    def __init__(self, base_layer: nn.Module, adapter: Adapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.merged = False
        self.disabled = False

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not (self.merged or self.disabled or args or kwargs):
            fused = self.adapter.fused_forward(x)
            if fused is not None:
                return fused
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled and not self.merged and base_shift(self.adapter) is not None:
            return add_shift_output(self.adapter, x, out)  # the unshifted base function
        if self.merged or self.disabled:
            return out
        return self.adapter(x, out)

    def __repr__(self) -> str:
        """The base layer, and the adapter on one line (its own submodules, e.g. dropout,
        are in its options)."""
        flags = [f for f in ("merged", "disabled") if getattr(self, f)]
        state = f"  [{', '.join(flags)}]" if flags else ""
        return (f"{type(self).__name__}(\n  (base_layer): {self.base_layer!r}\n"
                f"  (adapter): {type(self.adapter).__name__}({self.adapter.extra_repr()}){state}\n)")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapter"):
                raise
            return getattr(self.base_layer, name)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + ΔW, correctly rounded to W's dtype (the sum is formed in float64)."""
        if not self.merged:
            self._add_delta(+1)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − ΔW: the inverse of `merge`, exact up to one rounding in W's dtype."""
        if self.merged:
            self._add_delta(-1)
            self.merged = False

    def _add_delta(self, sign: int) -> None:
        # a quantized weight is requantised (unmerge puts the pre-merge one back): LayerOps
        self.adapter.ops.add_to_weight(self.base_layer, self.adapter.delta_weight(), sign, merging=True)


@dataclass
class AdaptState:
    """What `adapt` did to a model; kept on the model for the optimizer and `save`."""

    resolved: Resolved
    rank: int
    alpha: float | None
    trainable: list[str] = field(default_factory=list)
    #: the base model's values of the `trainable` modules (`originals.snapshot`), which
    #: `disable_adapters` puts back for its block
    originals: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "recipe": self.resolved.to_json(),
                "trainable": list(self.trainable)}


def adapt(model: nn.Module, method: str | Recipe = "lora", targets: str | Sequence[str] | None = None,
          rank: int = 8, alpha: float | None = None, *, exclude: str | Sequence[str] | None = None,
          trainable: Sequence[str] | None = None, init_batches: Iterable[Any] | None = None,
          loss_fn: Any = None, ranks: dict[str, int] | None = None, **overrides: Any) -> nn.Module:
    """Attach `method`'s adapters to the `targets` of `model`, in place; returns `model`.

    All base parameters are frozen except the modules named in `trainable`
    (e.g. ["classifier"]; saved with the adapter, like PEFT's modules_to_save).
    `alpha` defaults to `rank` (scaling 1). `ranks` gives per-module ranks
    (used by `load`). `overrides` replace recipe parts or set component options.
    """
    if find_state(model) is not None:
        raise GeopeftError("this model already has geopeft adapters; adapt a fresh model, or "
                           "geopeft.load(base_model, dir) to restore saved ones")
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
    built = build_adapters(resolved, found, ranks or {}, rank)  # nothing changed yet
    originals = snapshot(model, trainable)
    pairs = [(name, adapter) for name, _, adapter in built]
    with installed(model, built, trainable):
        with torch.no_grad():
            resolved.initializer.initialize(pairs, model=model, batches=init_batches, loss_fn=loss_fn)
            project_onto_manifolds([a for _, a in pairs])
        check_initial_points(pairs, resolved.recipe.initializer)
    setattr(model, STATE_ATTR, AdaptState(resolved, rank, alpha, trainable, originals))
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


def adapters(model: nn.Module) -> list[tuple[str, Adapter]]:
    """[(module name, adapter)] in model order. Names are those of the adapted base
    layers in the model `adapt` was called on, also when `model` wraps it (DDP)."""
    return [(name, layer.adapter) for name, layer in adapted_layers(model)]


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


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; the forward then skips the adapters."""
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
    layer, with ΔW merged into the weight (`merge=True`, as `merge` rounds it: a base weight
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
            unshift_base(layer.adapter)
        _replace(root, name, layer.base_layer)
    delattr(root, STATE_ATTR)
    release_save_pretrained(root)
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
              trainable: Sequence[str]):
    """Freeze the model, wrap each layer with its adapter, unfreeze `trainable`; if the
    body raises, put every layer and `requires_grad` flag back as it was (and every base
    weight an initializer shifted, up to one rounding)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    done = []
    try:
        for name, module, adapter in built:
            _replace(model, name, AdaptedLayer(module, adapter))
            done.append((name, module))
        set_trainable(model, trainable)
        yield
    except BaseException:
        for _, _, adapter in built:  # an initializer may have shifted base weights
            unshift_base(adapter)
        for name, module in reversed(done):
            _replace(model, name, module)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def trainable_params(model: nn.Module, trainable: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    """[(full parameter name, parameter)] of the modules named in `trainable`, their
    submodules' included, each once: what `adapt` unfreezes, `save` and `export_peft` write."""
    found: dict[str, nn.Parameter] = {}
    for mname, module in trainable_modules(model, trainable):
        for pname, p in module.named_parameters():
            found.setdefault(f"{mname}.{pname}", p)
    return list(found.items())


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


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
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
