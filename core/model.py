"""Attaching adapters to a model: `adapt`, `adapters`, `merge`, `unmerge`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, GeopeftError, TargetError
from .interfaces import Adapter, Recipe
from .layers import layer_ops
from .recipes import Resolved, resolve
from .targets import find_targets, name_matches

STATE_ATTR = "geopeft_state"


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
        if self.merged or self.disabled:
            return out
        return self.adapter(x, out)

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
        w = self.base_layer.weight
        wide = torch.float32 if w.device.type == "mps" else torch.float64
        w.copy_((w.to(wide) + sign * self.adapter.delta_weight().to(wide)).to(w.dtype))


@dataclass
class AdaptState:
    """What `adapt` did to a model; kept on the model for the optimizer and `save`."""

    resolved: Resolved
    rank: int
    alpha: float | None
    trainable: list[str] = field(default_factory=list)

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
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive int, got {rank!r}")
    if alpha is not None:
        overrides["alpha"] = alpha
    resolved = resolve(method, overrides, context=model_context(model))
    found = find_targets(model, targets, exclude)
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
    pairs = [(name, adapter) for name, _, adapter in built]
    with installed(model, built, trainable):
        with torch.no_grad():
            resolved.initializer.initialize(pairs, model=model, batches=init_batches, loss_fn=loss_fn)
            project_onto_manifolds([a for _, a in pairs])
    setattr(model, STATE_ATTR, AdaptState(resolved, rank, alpha, trainable))
    return model


#: where models declare their hidden size: HF configs (BERT/LLaMA, T5, GPT-2), timm's ViTs
_HIDDEN_SIZE_ATTRS = (("config", "hidden_size"), ("config", "d_model"), ("config", "n_embd"),
                      (None, "embed_dim"))


def model_context(model: nn.Module) -> dict[str, Any]:
    """Facts about `model` that components may take as default options (see
    `recipes.resolve`): `hidden_size` when the model declares it."""
    for holder, attr in _HIDDEN_SIZE_ATTRS:
        obj = getattr(model, holder, None) if holder else model
        value = getattr(obj, attr, None) if obj is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return {"hidden_size": value}
    return {}


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


@contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes its base function (adapters skipped)."""
    layers = _layers_or_error(model)
    before = [layer.disabled for _, layer in layers]
    for _, layer in layers:
        layer.disabled = True
    try:
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
        built.append((name, module, adapter))
    return built


@contextmanager
def installed(model: nn.Module, built: Sequence[tuple[str, nn.Module, Adapter]],
              trainable: Sequence[str]):
    """Freeze the model, wrap each layer with its adapter, unfreeze `trainable`; if the
    body raises, put every layer and `requires_grad` flag back as it was."""
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
        for name, module in reversed(done):
            _replace(model, name, module)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def trainable_params(model: nn.Module, trainable: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    """[(full parameter name, parameter)] of the modules named in `trainable`, their
    submodules' included, each once: what `adapt` unfreezes, `save` and `export_peft` write."""
    found: dict[str, nn.Parameter] = {}
    for mname, module in model.named_modules():
        if any(name_matches(mname, t) for t in trainable):
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
    ops = layer_ops(module)
    if rank > min(ops.m, ops.n):
        raise ConfigError(f"rank {rank} is larger than layer {name!r} allows ({ops.m}x{ops.n}): "
                          f"use rank <= {min(ops.m, ops.n)} or leave that layer out")


def _check_trainable(model: nn.Module, trainable: list[str]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for t in trainable:
        if not any(name_matches(n, t) for n in names):
            raise TargetError(f"trainable={t!r} matches no module of the model")
