"""Resumable training checkpoints without pickle: every tensor of a nested state (model
parameters, optimizer state_dict, RNG states) goes to `state.safetensors`, the structure
and the other values to `state.json`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from geopeft.atomic import read_files, write_directory
from geopeft.errors import CheckpointError


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able structure with tensors replaced by {"__tensor__": key}; dict keys keep their type."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot checkpoint a value of type {type(obj).__name__}: {obj!r}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `state` to directory `path` atomically (`geopeft.atomic.write_directory`): a
    reader, or a resume after a crash mid-save, sees the previous checkpoint or this one."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, tensors)
    write_directory(path, {"state.safetensors": save(tensors),
                           "state.json": json.dumps(structure).encode()})


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    src = Path(path)
    found = read_files(src, ["state.json", "state.safetensors"]) if src.is_dir() else {}
    if not found or any(v is None for v in found.values()):
        raise CheckpointError(f"no checkpoint in {str(src)!r} (state.json and state.safetensors); "
                              "run without --resume to start from step 0")
    return _unflatten(json.loads(found["state.json"]), load(found["state.safetensors"]))
