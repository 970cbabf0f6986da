"""`save` and `load`: adapter.safetensors + geopeft.json. Never unpickles.

adapter.safetensors holds `adapters.<layer>.<factor>` for every factor,
`trainable.<parameter>` for the parameters of `trainable` modules and, for a layer
whose base weight an initializer shifted, `shifts.<layer>.B` / `.A` (its
`shift_rank` is in geopeft.json; `load` replays W ← W − s·B₀·A₀ bit for bit).
geopeft.json holds the format version, the versions of geopeft and torch, the
resolved recipe (every component's name and options) and, per layer, its
rank, kind, matrix shape, factor dtype and scaling (fixed when the adapter was made:
a rank controller that changes the rank keeps it) — everything `load` needs to rebuild
the same adapters on a fresh base model — and the base model (`base_model`: its
`config._name_or_path` and PEFT task type, for `export_saved`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from geopeft.kernels import full

from .atomic import read_files, write_directory
from .base_model import describe
from .data_parallel import mark_ignored_by_ddp
from .errors import CheckpointError, ConfigError, GeopeftError, IncompatibleComponentsError
from .interfaces import factor_dtype_for
from .layers import layer_ops
from .model import (
    STATE_ATTR,
    AdaptState,
    adapters,
    build_adapters,
    find_root,
    find_state,
    installed,
    trainable_params,
)
from .originals import snapshot
from .recipes import from_json
from .save_guard import guard_save_pretrained
from .saved_config import check_config
from .shift import base_shift, shift_base, unshift_base

WEIGHTS = "adapter.safetensors"
CONFIG = "geopeft.json"
FORMAT = "geopeft-adapter"
FORMAT_VERSION = 1


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's adapters (and `trainable` modules) to directory `path`, atomically:
    a reader of `path` finds the previous checkpoint or this one, never a mix of the two
    (see `geopeft.atomic`); other files already in the directory are kept. Every component
    is recorded by its registered name; one that is not registered (a class from user code:
    `geopeft.register` it) is refused before anything is written, and so is a NaN or Inf
    weight."""
    state = _state_or_error(model)
    described = state.to_json()  # refuses an unregistered component before anything is written
    model = find_root(model)  # names relative to the adapted model, not to a DDP wrapper
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, adapter in adapters(model):
        for fname, p in adapter.factors().items():
            tensors[f"adapters.{name}.{fname}"] = full(p).detach().contiguous().cpu()
        layers[name] = {"rank": adapter.rank, "kind": adapter.ops.kind, "shape": list(adapter.shape),
                        "weight_shape": adapter.ops.weight_shape(adapter.base_layer),
                        "dtype": str(adapter.factor_dtype).removeprefix("torch."),
                        "scaling": adapter.scaling}  # set at adapt: a later rank change keeps it
        shift = base_shift(adapter)
        if shift is not None:  # the initializer's W ← W − s·B0·A0, replayed by load
            tensors[f"shifts.{name}.B"] = full(shift[0]).detach().contiguous().cpu()
            tensors[f"shifts.{name}.A"] = full(shift[1]).detach().contiguous().cpu()
            layers[name]["shift_rank"] = int(shift[0].shape[1])
    for pname, p in trainable_params(model, state.trainable):
        tensors[f"trainable.{pname}"] = full(p).detach().contiguous().cpu()
    _refuse_non_finite(tensors, path)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": {"geopeft": _version(), "torch": torch.__version__},
        **described,
        "base_model": describe(model),  # where the base came from and its task (for export_saved)
        "layers": layers,
    }
    # everything is serialised before the first byte is written
    text = json.dumps(config, indent=2, sort_keys=False, allow_nan=False) + "\n"
    weights = save_safetensors(tensors, metadata={"format": FORMAT})
    return write_directory(path, {WEIGHTS: weights, CONFIG: text.encode()})


def _refuse_non_finite(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """GeopeftError, before anything is written, if a tensor to save holds NaN or Inf:
    `load` would refuse it, and the checkpoint it replaced would be gone."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise GeopeftError(f"the model's {key!r} holds {bad} NaN or Inf value(s): nothing was saved "
                               f"({path} is unchanged); save a model whose weights are finite (an "
                               "earlier checkpoint, or the model before the step that diverged)")


def load(model: nn.Module, path: str | os.PathLike, *, trainable: bool = True) -> nn.Module:
    """Rebuild the saved adapters on a fresh `model` in place and return it; outputs equal
    those of the saved model exactly (same base weights, same dtypes). Every field and
    tensor is checked before the model changes. `trainable=False` loads for inference
    only (PEFT's `is_trainable=False`): the factors and the saved `trainable` modules are
    frozen too, and the model is put in eval mode."""
    if find_state(model) is not None:
        raise GeopeftError("this model already has geopeft adapters; load into a fresh base model")
    directory = Path(path)
    config, tensors = read_checkpoint(directory)
    install(model, directory, config, tensors)
    if not trainable:
        _freeze(model)
    return model


def _freeze(model: nn.Module) -> None:
    """No gradient for the adapters' factors and the `trainable` modules; eval mode."""
    for _, adapter in adapters(model):
        for p in adapter.factors().values():
            p.requires_grad_(False)
    for _, p in trainable_params(model, find_state(model).trainable):
        p.requires_grad_(False)
    model.eval()


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(geopeft.json, tensors) of `directory`, both from one save even if another save
    replaces the directory meanwhile; CheckpointError names what is wrong."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; geopeft.save(model, dir) writes one")
    files = read_files(directory, [CONFIG, WEIGHTS])
    config = _parse_config(directory, files[CONFIG])
    return config, _parse_weights(directory, files[WEIGHTS])


def read_config(directory: Path) -> dict[str, Any]:
    """geopeft.json of `directory`, every field checked; CheckpointError names what is wrong."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; geopeft.save(model, dir) writes one")
    return _parse_config(directory, read_files(directory, [CONFIG])[CONFIG])


def install(model: nn.Module, directory: Path, config: dict[str, Any],
            tensors: dict[str, torch.Tensor], materialize: torch.device | str | None = None) -> nn.Module:
    """Install the checkpoint (`config`, `tensors`, read from `directory`) on `model`.
    Target layers on the meta device are refused, unless `materialize` names the device
    their factors go to (`export_saved` rebuilds adapters on weightless stand-ins so)."""
    cfg = directory / CONFIG
    try:
        resolved = from_json(config["recipe"])
        if "dtype" in resolved.adapter_options:
            factor_dtype_for(torch.float32, resolved.adapter_options["dtype"])
    except (ConfigError, IncompatibleComponentsError, ValueError) as exc:
        raise CheckpointError(f"{cfg}: field 'recipe' does not describe a method this geopeft "
                              f"can build: {exc}") from exc
    layers: dict[str, Any] = config["layers"]
    modules = dict(model.named_modules())
    found = []
    for name, info in layers.items():
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"{directory}: layer {name!r} has a saved adapter but is not in this "
                                  "model; load it onto the base model it was trained on")
        _check_layer(directory, name, info, module)
        if module.weight.is_meta and materialize is None:
            raise CheckpointError(f"layer {name!r} of the model is on the meta device (no weights), so "
                                  "its adapter would have no values either: materialise the base model "
                                  "first (model.to_empty(device=...) and load its weights), then "
                                  "geopeft.load")
        found.append((name, module))
    ranks = {n: i["rank"] for n, i in layers.items()}
    dtypes = {n: getattr(torch, i["dtype"]) for n, i in layers.items()}
    try:
        built = build_adapters(resolved, found, ranks, config["rank"], dtypes)
    except ConfigError as exc:
        raise CheckpointError(f"{cfg}: {exc}") from exc
    for name, _, adapter in built:
        adapter.scaling = _saved_scaling(cfg, config, resolved, name, adapter)
    if materialize is not None:
        for _, _, adapter in built:
            adapter.to_empty(device=materialize)
            adapter.factor_device = torch.device(materialize)
    trainable = list(config.get("trainable", []))
    state = AdaptState(resolved, config["rank"], config.get("alpha"), trainable,
                       snapshot(model, trainable))  # the base values, before the saved ones
    expected = _described([(n, a) for n, _, a in built], trainable_params(model, state.trainable))
    shifts = _expected_shifts(built, layers)
    expected.update(shifts)
    _check_tensors(directory, expected, tensors)  # every check before the model changes
    with torch.no_grad():
        for key, (p, _) in expected.items():
            p.copy_(tensors[key])
    with installed(model, built, trainable):
        for name, _, adapter in built:
            if f"shifts.{name}.B" in shifts:
                shift_base(adapter, shifts[f"shifts.{name}.B"][0], shifts[f"shifts.{name}.A"][0])
    setattr(model, STATE_ATTR, state)
    mark_ignored_by_ddp(model)
    guard_save_pretrained(model)
    return model


def restore(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the adapters and `trainable` modules saved in `path` back into `model`, which
    already carries adapters of the same layers and recipe (a training run resuming from
    a checkpoint): adapters whose saved rank differs are resized first. In place."""
    state = _state_or_error(model)
    root = find_root(model)
    directory = Path(path)
    config, tensors = read_checkpoint(directory)
    if config["recipe"] != json.loads(json.dumps(state.resolved.to_json())):
        raise CheckpointError(f"{directory} was saved with recipe {config['recipe'].get('method')!r} "
                              f"and other components or options than this model's "
                              f"({state.resolved.recipe.name!r}); restore into the model it was "
                              "trained as, or geopeft.load it onto a fresh base model")
    current = dict(adapters(root))
    if set(config["layers"]) != set(current):
        raise CheckpointError(f"{directory} holds adapters for other layers than this model's; "
                              "restore into the model it was trained as")
    for name, info in config["layers"].items():
        if current[name].rank != info["rank"]:
            current[name].resize(info["rank"])
        current[name].scaling = info.get("scaling", current[name].scaling)
    expected = _described(current.items(), trainable_params(root, state.trainable))
    saved_shifts = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("shifts.")]}
    for key, t in saved_shifts.items():
        _check_finite(directory, key, t)
    _check_tensors(directory, expected, tensors)
    with torch.no_grad():
        for key, (p, _) in expected.items():
            p.copy_(tensors[key])
        for name, adapter in current.items():
            _restore_shift(adapter, saved_shifts.get(f"shifts.{name}.B"), saved_shifts.get(f"shifts.{name}.A"))
    return model


def _saved_scaling(cfg: Path, config: dict[str, Any], resolved, name: str, adapter) -> float:
    """The scaling layer `name` was trained with: its `scaling` entry. A file written
    before scalings were recorded gives the rebuilt adapter's own (alpha / saved rank),
    which is the trained one unless the method changes ranks and alpha or rslora makes
    the scaling depend on the initial rank: that case is refused, not guessed."""
    info = config["layers"][name]
    if "scaling" in info:
        return float(info["scaling"])
    rank_dependent = resolved.adapter_options.get("alpha") is not None or adapter.rslora
    if rank_dependent and not resolved.rank_controller.static and info["rank"] != config["rank"]:
        raise CheckpointError(
            f"{cfg}: layer {name!r} lacks the 'scaling' entry (the file predates it) and its rank "
            f"moved during training ({config['rank']} -> {info['rank']}, rank controller "
            f"{resolved.recipe.rank_controller!r}); its trained scaling was set from the rank it "
            f"started at, which the file does not hold, so alpha / {info['rank']} could be a different "
            "function: save the trained model again with this geopeft, or add "
            "\"scaling\": <alpha / initial rank> to the layer's entry")
    return adapter.scaling


def _restore_shift(adapter, b0: torch.Tensor | None, a0: torch.Tensor | None) -> None:
    """Make the base weight's shift the saved one: nothing to do when it already is (a
    deterministic initializer), else undo the current shift and apply the saved one
    (W exact up to one rounding)."""
    shift = base_shift(adapter)
    if shift is None and b0 is None:
        return
    if shift is not None and b0 is not None and torch.equal(shift[0], b0) and torch.equal(shift[1], a0):
        return
    unshift_base(adapter)
    if b0 is not None:
        shift_base(adapter, b0, a0)


def _described(named_adapters, trainable) -> dict[str, tuple[torch.Tensor, str]]:
    """{key in adapter.safetensors: (the model's tensor it fills, what that tensor is)}."""
    expected = {f"adapters.{n}.{f}": (p, f"factor {f} of the adapter on layer {n!r} "
                                         f"({a.ops.kind} {a.ops.m}x{a.ops.n}, rank {a.rank} in {CONFIG})")
                for n, a in named_adapters for f, p in a.factors().items()}
    expected.update({f"trainable.{n}": (p, f"the model's parameter {n!r}") for n, p in trainable})
    return expected


def _expected_shifts(built, layers: dict[str, Any]) -> dict[str, tuple[torch.Tensor, str]]:
    """Empty tensors of the saved base shifts' shapes and dtypes, keyed as in the file."""
    shifts = {}
    for name, _, adapter in built:
        r0 = layers[name].get("shift_rank")
        if r0 is None:
            continue
        m, n = adapter.shape
        kw = {"dtype": adapter.factor_dtype, "device": adapter.factor_device}
        what = f"the base-weight shift {{}} of layer {name!r} (shift_rank {r0} in {CONFIG})"
        shifts[f"shifts.{name}.B"] = (torch.empty(m, r0, **kw), what.format("B0"))
        shifts[f"shifts.{name}.A"] = (torch.empty(r0, n, **kw), what.format("A0"))
    return shifts


def _parse_config(directory: Path, data: bytes | None) -> dict[str, Any]:
    cfg = directory / CONFIG
    if data is None:
        if (directory / "adapter_config.json").exists():
            raise CheckpointError(f"{directory} is a PEFT adapter directory, not a geopeft one; load it "
                                  "with peft.PeftModel.from_pretrained")
        raise CheckpointError(f"{directory} has no {CONFIG}: it is not a geopeft adapter directory "
                              "(geopeft.save writes adapter.safetensors and geopeft.json)")
    try:
        config = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{cfg} is not valid JSON ({exc}); the file is damaged or truncated") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{cfg} is not a geopeft adapter config (format is "
                              f"{config.get('format') if isinstance(config, dict) else None!r}, "
                              f"expected {FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{cfg}: field 'format_version' is {version!r}; expected a positive int")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{cfg} has format version {version!r}; this geopeft reads up to "
                              f"{FORMAT_VERSION}: upgrade geopeft")
    check_config(config, cfg)
    return config


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_weights(directory: Path, data: bytes | None) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS
    if data is None:
        raise CheckpointError(f"{path} is missing; geopeft.json alone cannot restore an adapter")
    try:
        return load_safetensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({exc}); save the "
                              "adapter again") from exc


def _check_layer(directory: Path, name: str, info: dict[str, Any], module: nn.Module) -> None:
    """The saved layer entry `info` fits `module` of the model (kind, matrix and weight shape)."""
    ops = layer_ops(module)
    saved = f"{info['kind']} {info['shape'][0]}x{info['shape'][1]}"
    if ops is None or [ops.m, ops.n] != info["shape"] or ops.kind != info["kind"]:
        got = f"{ops.kind} {ops.m}x{ops.n}" if ops else type(module).__name__
        raise CheckpointError(f"{directory}: layer {name!r} was saved as {saved} but this model has "
                              f"{got}; load it onto the base model it was trained on")
    weight = ops.weight_shape(module)
    if "weight_shape" in info and weight != info["weight_shape"]:
        raise CheckpointError(f"{directory}: layer {name!r} was saved with a {info['kind']} weight of "
                              f"shape {tuple(info['weight_shape'])} but this model's is {tuple(weight)}; "
                              "load it onto the base model it was trained on")


def _check_tensors(directory: Path, expected: dict[str, tuple[torch.Tensor, str]],
                   tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor the model needs is in the file, with the model's shape and dtype, finite."""
    file = f"{directory}/{WEIGHTS}"
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{file} lacks {len(missing)} tensor(s) that geopeft.json "
                              f"describes (e.g. {', '.join(missing[:3])}); the file is incomplete")
    if extra:
        raise CheckpointError(f"{file} holds {len(extra)} tensor(s) that geopeft.json "
                              f"does not describe (e.g. {', '.join(extra[:3])}); the files do not "
                              "belong together")
    for key, (p, what) in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
            raise CheckpointError(f"{file}: the saved tensor {key!r} is {t.dtype} {tuple(t.shape)}, but "
                                  f"{what} is {p.dtype} {tuple(p.shape)}; the checkpoint does not belong "
                                  "to this model (or its two files do not belong together)")
        _check_finite(directory, key, t)


def _check_finite(directory: Path, key: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{directory}/{WEIGHTS}: the saved tensor {key!r} holds {bad} NaN or Inf "
                              "value(s); the checkpoint is damaged: save it again from a model "
                              "whose weights are finite")


def _state_or_error(model: nn.Module) -> AdaptState:
    state = find_state(model)
    if state is None:
        raise GeopeftError("the model has no geopeft adapters; nothing to save")
    return state


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("geopeft")
    except PackageNotFoundError:
        return "unknown"
