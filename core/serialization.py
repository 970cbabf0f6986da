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
    DEFAULT,
    AdaptedLayer,
    AdapterState,
    AdaptState,
    adapter_dir,
    adapters,
    build_adapters,
    check_adapter_name,
    check_apart,
    check_can_add,
    find_root,
    find_state,
    installed,
    known_adapter,
    register,
    require_state,
    trainable_params,
    trained_params,
    unload,
)
from .named import delete_adapter, set_adapter
from .originals import snapshot
from .recipes import from_json
from .save_guard import guard_save_pretrained
from .saved_config import check_config
from .shift import base_shift, shift_base, unshift_base

WEIGHTS = "adapter.safetensors"
CONFIG = "geopeft.json"
FORMAT = "geopeft-adapter"
FORMAT_VERSION = 1


def save(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write the model's adapters (and `trainable` modules) to directory `path`, atomically:
    a reader of `path` finds the previous checkpoint or this one, never a mix of the two
    (see `geopeft.atomic`); other files already in the directory are kept. Every component
    is recorded by its registered name; one that is not registered (a class from user code:
    `geopeft.register` it) is refused before anything is written, and so is a NaN or Inf
    weight.

    Several adapters are written in PEFT's layout: "default" in `path`, each other one in
    `path/<name>` (the default's geopeft.json lists them); `adapter_name` writes only that
    one, in its place of the layout."""
    state = require_state(model, "nothing to save")
    model = find_root(model)  # names relative to the adapted model, not to a DDP wrapper
    names = list(state.by_name) if adapter_name is None else [known_adapter(state, adapter_name)]
    others = [n for n in names if n != DEFAULT] if adapter_name is None else []
    # every adapter is serialised before the first byte is written
    files = {n: _serialize(model, state, n, others if n == DEFAULT else [], adapter_dir(path, n))
             for n in names}
    for name in sorted(files, key=lambda n: n == DEFAULT):  # the listing default last
        write_directory(adapter_dir(path, name), files[name])
    return Path(path)


def _serialize(model: nn.Module, state: AdaptState, name: str, others: list[str],
               directory: Path) -> dict[str, bytes]:
    """{file name: bytes} of adapter `name`, bound for `directory`; `others`: the adapters
    saved in subfolders."""
    entry = state.by_name[name]
    described = entry.to_json()  # refuses an unregistered component before anything is written
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for lname, adapter in adapters(model, name):
        for fname, p in adapter.factors().items():
            tensors[f"adapters.{lname}.{fname}"] = full(p).detach().contiguous().cpu()
        layers[lname] = {"rank": adapter.rank, "kind": adapter.ops.kind, "shape": list(adapter.shape),
                         "weight_shape": adapter.ops.weight_shape(adapter.base_layer),
                         "dtype": str(adapter.factor_dtype).removeprefix("torch."),
                         "scaling": adapter.scaling}  # set at adapt: a later rank change keeps it
        shift = base_shift(adapter)
        if shift is not None:  # the initializer's W ← W − s·B0·A0, replayed by load
            tensors[f"shifts.{lname}.B"] = full(shift[0]).detach().contiguous().cpu()
            tensors[f"shifts.{lname}.A"] = full(shift[1]).detach().contiguous().cpu()
            layers[lname]["shift_rank"] = int(shift[0].shape[1])
    for pname, p in trained_params(model, state, name):
        tensors[f"trainable.{pname}"] = full(p).detach().contiguous().cpu()
    _refuse_non_finite(tensors, directory)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": {"geopeft": _version(), "torch": torch.__version__},
        **described,
        "base_model": describe(model),  # where the base came from and its task (for export_saved)
        "layers": layers,
    }
    if others:
        config["adapters"] = others
        config["active"] = list(state.active)  # `load` makes them the active ones again
    text = json.dumps(config, indent=2, sort_keys=False, allow_nan=False) + "\n"
    weights = save_safetensors(tensors, metadata={"format": FORMAT})
    return {WEIGHTS: weights, CONFIG: text.encode()}


def _refuse_non_finite(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """GeopeftError, before anything is written, if a tensor to save holds NaN or Inf:
    `load` would refuse it, and the checkpoint it replaced would be gone."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise GeopeftError(f"the model's {key!r} holds {bad} NaN or Inf value(s): nothing was saved "
                               f"({path} is unchanged); save a model whose weights are finite (an "
                               "earlier checkpoint, or the model before the step that diverged)")


def load(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
         trainable: bool = True) -> nn.Module:
    """Rebuild the saved adapters on `model` in place and return it; outputs equal those of
    the saved model exactly (same base weights, same dtypes). Every field and tensor is
    checked before the model changes. `trainable=False` loads for inference only (PEFT's
    `is_trainable=False`): the factors and the saved `trainable` modules are frozen too
    (`set_adapter` keeps them so), and the model is put in eval mode.

    Without `adapter_name`: the adapter in `path` as "default", and the others its
    geopeft.json lists from their subfolders (the layout `save` writes), the ones it lists
    as active (`"active"`) active. With it: that adapter, from `path/<adapter_name>` if
    that holds one, else from `path`. Into a model that has adapters already, the loaded
    ones are added inactive (`geopeft.set_adapter`)."""
    directory = Path(path)
    name = DEFAULT if adapter_name is None else check_adapter_name(adapter_name)
    if adapter_name is not None and (directory / name / CONFIG).is_file():
        directory = directory / name
    fresh = find_state(model) is None
    if not fresh:
        check_can_add(model, name)
    config, tensors = read_checkpoint(directory)
    todo = [(name, directory, config, tensors)]
    for other in (config.get("adapters", []) if adapter_name is None else []):
        if not fresh:
            check_can_add(model, other)
        todo.append((other, directory / other, *read_checkpoint(directory / other)))
    done: list[str] = []
    try:
        for n, d, c, t in todo:
            install(model, d, c, t, adapter_name=n)
            done.append(n)
    except BaseException:
        if done:  # the adapters installed before the one that failed go again
            if fresh:
                unload(model, merge=False)
            else:
                for n in done:
                    delete_adapter(model, n)
        raise
    if fresh and "active" in config and adapter_name is None:
        set_adapter(model, config["active"])
    if not trainable:
        _freeze(model, done)
    return model


def _freeze(model: nn.Module, names: list[str]) -> None:
    """No gradient for adapters `names`' factors and `trainable` modules, now or after a
    `set_adapter`; eval mode."""
    state, root = find_state(model), find_root(model)
    for name in names:
        state.by_name[name].frozen = True
        for _, adapter in adapters(root, name):
            for p in adapter.factors().values():
                p.requires_grad_(False)
        for _, p in trained_params(root, state, name):
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
            tensors: dict[str, torch.Tensor], materialize: torch.device | str | None = None,
            adapter_name: str = DEFAULT) -> nn.Module:
    """Install the checkpoint (`config`, `tensors`, read from `directory`) on `model` as
    adapter `adapter_name`. Target layers on the meta device are refused, unless
    `materialize` names the device their factors go to (`export_saved` rebuilds adapters on
    weightless stand-ins so)."""
    adding = find_state(model) is not None
    model = find_root(model) or model
    cfg = directory / CONFIG
    try:
        resolved = from_json(config["recipe"])
        if "dtype" in resolved.adapter_options:
            factor_dtype_for(torch.float32, resolved.adapter_options["dtype"])
    except (ConfigError, IncompatibleComponentsError, ValueError) as exc:
        raise CheckpointError(f"{cfg}: field 'recipe' does not describe a method this geopeft "
                              f"can build: {exc}") from exc
    layers: dict[str, Any] = config["layers"]
    modules = {n: m.base_layer if isinstance(m, AdaptedLayer) else m for n, m in model.named_modules()}
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
    shifts = _expected_shifts(built, layers)
    if adding:
        try:
            check_apart(model, adapter_name, list(layers), trainable)
        except ConfigError as exc:
            raise CheckpointError(f"{directory}: {exc}") from exc
        if shifts:
            raise CheckpointError(f"{directory}: its adapter shifted base weights (W − s·B₀A₀), which the "
                                  "model's other adapters would then run on; load it onto a fresh base")
    entry = AdapterState(resolved, config["rank"], config.get("alpha"), trainable,
                         snapshot(model, trainable))  # the base values, before the saved ones
    expected = _described([(n, a) for n, _, a in built], trainable_params(model, entry.trainable))
    expected.update(shifts)
    _check_tensors(directory, expected, tensors)  # every check before the model changes
    with torch.no_grad():
        for key, (p, _) in expected.items():
            p.copy_(tensors[key])
    with installed(model, built, trainable, adapter_name):
        for name, _, adapter in built:
            if f"shifts.{name}.B" in shifts:
                shift_base(adapter, shifts[f"shifts.{name}.B"][0], shifts[f"shifts.{name}.A"][0])
    register(model, adapter_name, entry)
    mark_ignored_by_ddp(model)
    guard_save_pretrained(model)
    return model


def restore(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the adapters and `trainable` modules saved in `path` back into `model`, which
    already carries adapters of the same names, layers and recipes (a training run resuming
    from a checkpoint): the adapters saved as active are made the active ones, adapters
    whose saved rank differs are resized first. In place."""
    state = require_state(model, "nothing to save")
    root = find_root(model)
    saved = [(name, *read_checkpoint(adapter_dir(path, name))) for name in state.by_name]
    listed = saved[0][1].get("adapters") if saved[0][0] == DEFAULT else None
    if listed is not None and set(listed) != set(state.by_name) - {DEFAULT}:
        raise CheckpointError(f"{path} holds adapters {', '.join([DEFAULT, *listed])}, this model "
                              f"{', '.join(state.by_name)}; restore into the model it was trained as")
    if listed is not None and "active" in saved[0][1]:
        set_adapter(root, saved[0][1]["active"])
    for name, config, tensors in saved:
        _restore_one(root, state, name, adapter_dir(path, name), config, tensors)
    return model


def _restore_one(root: nn.Module, state: AdaptState, name: str, directory: Path,
                 config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    entry = state.by_name[name]
    if config["recipe"] != json.loads(json.dumps(entry.resolved.to_json())):
        raise CheckpointError(f"{directory} was saved with recipe {config['recipe'].get('method')!r} "
                              f"and other components or options than this model's "
                              f"({entry.resolved.recipe.name!r}); restore into the model it was "
                              "trained as, or geopeft.load it onto a fresh base model")
    current = dict(adapters(root, name))
    if set(config["layers"]) != set(current):
        raise CheckpointError(f"{directory} holds adapters for other layers than this model's; "
                              "restore into the model it was trained as")
    for lname, info in config["layers"].items():
        if current[lname].rank != info["rank"]:
            current[lname].resize(info["rank"])
        current[lname].scaling = info.get("scaling", current[lname].scaling)
    expected = _described(current.items(), trained_params(root, state, name))
    saved_shifts = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("shifts.")]}
    for key, t in saved_shifts.items():
        _check_finite(directory, key, t)
    _check_tensors(directory, expected, tensors)
    with torch.no_grad():
        for key, (p, _) in expected.items():
            p.copy_(tensors[key])
        for lname, adapter in current.items():
            _restore_shift(adapter, saved_shifts.get(f"shifts.{lname}.B"),
                           saved_shifts.get(f"shifts.{lname}.A"))


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
        inside = sorted(d.name for d in directory.iterdir() if (d / CONFIG).is_file())  # callers checked is_dir
        if inside:  # saved without a "default": each adapter in its own subfolder, no listing
            calls = ", ".join(f"geopeft.load(model, {str(directory)!r}, {n!r})" for n in inside)
            raise CheckpointError(f"{directory} has no {CONFIG} of its own, but holds the geopeft adapters "
                                  f"{', '.join(inside)} in subfolders (saved from a model without a "
                                  f"'default' adapter): load each by name: {calls}")
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




def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("geopeft")
    except PackageNotFoundError:
        return "unknown"
