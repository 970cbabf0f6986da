"""`save` and `load`: adapter.safetensors + geopeft.json. Never unpickles.

adapter.safetensors holds `adapters.<layer>.<factor>` for every factor,
`trainable.<parameter>` for the parameters of `trainable` modules and, for a layer
whose base weight an initializer shifted, `shifts.<layer>.B` / `.A` (its
`shift_rank` is in geopeft.json; `load` replays W ← W − s·B₀·A₀ bit for bit).
geopeft.json holds the format version, the versions of geopeft and torch, the
resolved recipe (every component's name and options) and, per layer, its
rank, kind, matrix shape and factor dtype — everything `load` needs to rebuild
the same adapters on a fresh base model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from geopeft.kernels import full

from .errors import CheckpointError, GeopeftError
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
from .shift import base_shift, shift_base, unshift_base

WEIGHTS = "adapter.safetensors"
CONFIG = "geopeft.json"
FORMAT = "geopeft-adapter"
FORMAT_VERSION = 1


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's adapters (and `trainable` modules) to directory `path`. Every
    component is recorded by its registered name; one that is not registered (a class from
    user code: `geopeft.register` it) is refused before anything is written."""
    state = _state_or_error(model)
    described = state.to_json()  # refuses an unregistered component before anything is written
    model = find_root(model)  # names relative to the adapted model, not to a DDP wrapper
    out = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, adapter in adapters(model):
        for fname, p in adapter.factors().items():
            tensors[f"adapters.{name}.{fname}"] = full(p).detach().contiguous().cpu()
        layers[name] = {"rank": adapter.rank, "kind": adapter.ops.kind, "shape": list(adapter.shape),
                        "weight_shape": list(adapter.base_layer.weight.shape),
                        "dtype": str(adapter.factor_dtype).removeprefix("torch.")}
        shift = base_shift(adapter)
        if shift is not None:  # the initializer's W ← W − s·B0·A0, replayed by load
            tensors[f"shifts.{name}.B"] = full(shift[0]).detach().contiguous().cpu()
            tensors[f"shifts.{name}.A"] = full(shift[1]).detach().contiguous().cpu()
            layers[name]["shift_rank"] = int(shift[0].shape[1])
    for pname, p in trainable_params(model, state.trainable):
        tensors[f"trainable.{pname}"] = full(p).detach().contiguous().cpu()
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": {"geopeft": _version(), "torch": torch.__version__},
        **described,
        "layers": layers,
    }
    out.mkdir(parents=True, exist_ok=True)
    # weights first, config last: a directory with a config has complete weights
    save_file(tensors, str(out / WEIGHTS), metadata={"format": FORMAT})
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    return out


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the saved adapters on a fresh `model` in place and return it; outputs equal
    those of the saved model exactly (same base weights, same dtypes)."""
    if find_state(model) is not None:
        raise GeopeftError("this model already has geopeft adapters; load into a fresh base model")
    directory = Path(path)
    config = read_config(directory)
    resolved = from_json(config["recipe"])
    layers: dict[str, Any] = config["layers"]
    modules = dict(model.named_modules())
    found = []
    for name, info in layers.items():
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"{directory}: layer {name!r} has a saved adapter but is not in this "
                                  "model; load it onto the base model it was trained on")
        ops = layer_ops(module)
        if ops is None or [ops.m, ops.n] != list(info["shape"]) or ops.kind != info["kind"]:
            got = f"{ops.kind} {ops.m}x{ops.n}" if ops else type(module).__name__
            raise CheckpointError(f"{directory}: layer {name!r} was saved as {info['kind']} "
                                  f"{info['shape'][0]}x{info['shape'][1]} but this model has {got}; "
                                  "load it onto the base model it was trained on")
        found.append((name, module))
    tensors = _read_weights(directory)
    ranks = {n: int(i["rank"]) for n, i in layers.items()}
    dtypes = {n: _dtype(i["dtype"], directory) for n, i in layers.items()}
    built = build_adapters(resolved, found, ranks, int(config["rank"]), dtypes)
    trainable = list(config.get("trainable", []))
    state = AdaptState(resolved, int(config["rank"]), config.get("alpha"), trainable,
                       snapshot(model, trainable))  # the base values, before the saved ones
    expected = {f"adapters.{n}.{f}": p for n, _, a in built for f, p in a.factors().items()}
    expected.update({f"trainable.{n}": p for n, p in trainable_params(model, state.trainable)})
    shifts = _expected_shifts(directory, built, layers)
    expected.update(shifts)
    _check_tensors(directory, expected, tensors)  # every check before the model changes
    with torch.no_grad():
        for key, p in expected.items():
            p.copy_(tensors[key])
    with installed(model, built, trainable):
        for name, _, adapter in built:
            if f"shifts.{name}.B" in shifts:
                shift_base(adapter, shifts[f"shifts.{name}.B"], shifts[f"shifts.{name}.A"])
    setattr(model, STATE_ATTR, state)
    return model


def restore(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the adapters and `trainable` modules saved in `path` back into `model`, which
    already carries adapters of the same layers and recipe (a training run resuming from
    a checkpoint): adapters whose saved rank differs are resized first. In place."""
    state = _state_or_error(model)
    root = find_root(model)
    directory = Path(path)
    config = read_config(directory)
    if config["recipe"] != json.loads(json.dumps(state.resolved.to_json())):
        raise CheckpointError(f"{directory} was saved with recipe {config['recipe'].get('method')!r} "
                              f"and other components or options than this model's "
                              f"({state.resolved.recipe.name!r}); restore into the model it was "
                              "trained as, or geopeft.load it onto a fresh base model")
    current = dict(adapters(root))
    if set(config["layers"]) != set(current):
        raise CheckpointError(f"{directory} holds adapters for other layers than this model's; "
                              "restore into the model it was trained as")
    tensors = _read_weights(directory)
    for name, info in config["layers"].items():
        if current[name].rank != int(info["rank"]):
            current[name].resize(int(info["rank"]))
    expected = {f"adapters.{n}.{f}": p for n, a in current.items() for f, p in a.factors().items()}
    expected.update({f"trainable.{n}": p for n, p in trainable_params(root, state.trainable)})
    saved_shifts = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("shifts.")]}
    _check_tensors(directory, expected, tensors)
    with torch.no_grad():
        for key, p in expected.items():
            p.copy_(tensors[key])
        for name, adapter in current.items():
            _restore_shift(adapter, saved_shifts.get(f"shifts.{name}.B"), saved_shifts.get(f"shifts.{name}.A"))
    return model


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


def _expected_shifts(directory: Path, built, layers: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Empty tensors of the saved base shifts' shapes and dtypes, keyed as in the file."""
    shifts = {}
    for name, _, adapter in built:
        r0 = layers[name].get("shift_rank")
        if r0 is None:
            continue
        if not isinstance(r0, int) or isinstance(r0, bool) or r0 < 1:
            raise CheckpointError(f"{directory}/{CONFIG}: layer {name!r} has shift_rank {r0!r}; "
                                  "expected a positive int (the rank of its base-weight shift)")
        m, n = adapter.shape
        kw = {"dtype": adapter.factor_dtype, "device": adapter.factor_device}
        shifts[f"shifts.{name}.B"] = torch.empty(m, r0, **kw)
        shifts[f"shifts.{name}.A"] = torch.empty(r0, n, **kw)
    return shifts


def read_config(directory: Path) -> dict[str, Any]:
    """geopeft.json of `directory`, checked; CheckpointError names what is wrong."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; geopeft.save(model, dir) writes one")
    cfg = directory / CONFIG
    if not cfg.exists():
        if (directory / "adapter_config.json").exists():
            raise CheckpointError(f"{directory} is a PEFT adapter directory, not a geopeft one; load it "
                                  "with peft.PeftModel.from_pretrained")
        raise CheckpointError(f"{directory} has no {CONFIG}: it is not a geopeft adapter directory "
                              "(geopeft.save writes adapter.safetensors and geopeft.json)")
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg} is not valid JSON ({exc}); the file is damaged or truncated") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{cfg} is not a geopeft adapter config (format is "
                              f"{config.get('format') if isinstance(config, dict) else None!r}, "
                              f"expected {FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{cfg} has format version {version!r}; this geopeft reads up to "
                              f"{FORMAT_VERSION}: upgrade geopeft")
    for key in ("recipe", "layers", "rank"):
        if key not in config:
            raise CheckpointError(f"{cfg} lacks the {key!r} entry; the file is damaged or truncated")
    return config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{path} is missing; geopeft.json alone cannot restore an adapter")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({exc}); save the "
                              "adapter again") from exc


def _check_tensors(directory: Path, expected: dict[str, Any], tensors: dict[str, Any]) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{directory}/{WEIGHTS} lacks {len(missing)} tensor(s) that geopeft.json "
                              f"describes (e.g. {', '.join(missing[:3])}); the file is incomplete")
    if extra:
        raise CheckpointError(f"{directory}/{WEIGHTS} holds {len(extra)} tensor(s) that geopeft.json "
                              f"does not describe (e.g. {', '.join(extra[:3])}); the files do not "
                              "belong together")
    for key, p in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
            raise CheckpointError(f"{directory}/{WEIGHTS}: tensor {key!r} is {t.dtype} "
                                  f"{tuple(t.shape)} but geopeft.json describes {p.dtype} "
                                  f"{tuple(p.shape)}; the two files do not belong together")


def _dtype(name: str, directory: Path) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{directory}/{CONFIG}: unknown dtype {name!r}")
    return dtype


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
