"""`export_peft`: a geopeft adapter as a PEFT LoRA directory (adapter_config.json +
adapter_model.safetensors), loadable by `peft.PeftModel.from_pretrained`.

Any adapter exports exactly through its `to_lora()` two-factor form
(scaling·B·A = ΔW); an adapter whose initializer shifted the base weight (W − s·B₀A₀)
exports as the LoRA of the original base, [B, −B₀]·[A; A₀] (rank r + r₀). Per-layer ranks and scalings go to PEFT's `rank_pattern` and
`alpha_pattern`; `trainable` modules go to `modules_to_save`, with the head PEFT's task
model expects (`classifier`/`score`, `qa_outputs`). An HF model's `task_type` and
`base_model_name_or_path` are filled in (`base_model.describe`). Writing the files
needs neither peft nor pickle.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from geopeft.kernels import full

from .atomic import write_directory
from .base_model import describe
from .errors import CheckpointError, GeopeftError
from .model import (
    DEFAULT,
    AdaptState,
    adapted_layers,
    adapter_dir,
    adapters,
    check_adapter_name,
    find_root,
    known_adapter,
    require_state,
    trainable_params,
    trained_params,
)
from .shift import base_shift, lora_of_original_base

PREFIX = "base_model.model."
#: the head modules PEFT's task models keep with every adapter: `PeftModelFor<task>` adds
#: them to modules_to_save, and its loader expects their weights in the adapter file
PEFT_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}
log = logging.getLogger("geopeft")


def export_peft(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write the adapted `model`'s adapters as a PEFT LoRA adapter directory; an HF model's
    `task_type` and `base_model_name_or_path` are filled in (`base_model.describe`), so
    `peft.AutoPeftModelFor<task>.from_pretrained(path)` rebuilds the adapted model. Several
    adapters go in PEFT's layout ("default" in `path`, each other in `path/<name>`, as
    `save_pretrained` writes them); `adapter_name` exports only that one, in its place."""
    return _write_peft(model, path, None, adapter_name)


def _write_peft(model: nn.Module, path: str | os.PathLike, base: dict[str, Any] | None,
                adapter_name: str | None = None) -> Path:
    """`export_peft`, with the base model's description `base` (None: read off `model`)."""
    state = require_state(model, "nothing to export")
    root = find_root(model)
    base = describe(root) if base is None else base
    if any(layer.merged for _, layer in adapted_layers(root)):
        raise GeopeftError("the model is merged; call geopeft.unmerge(model) before export_peft")
    names = list(state.by_name) if adapter_name is None else [known_adapter(state, adapter_name)]
    files = {name: _peft_files(root, state, name, base) for name in names}
    for name, content in files.items():
        write_directory(adapter_dir(path, name), content)
    return Path(path)


def _peft_files(root: nn.Module, state: AdaptState, adapter_name: str,
                base: dict[str, Any]) -> dict[str, bytes]:
    """{file name: bytes} of adapter `adapter_name` as a PEFT LoRA directory."""
    pairs = adapters(root, adapter_name)
    trainable = state.by_name[adapter_name].trainable
    tensors = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    fan_in_fan_out = False
    for name, adapter in pairs:
        # a shifted base (PiSSA, LoRA-GA, CG-LoRA shift) exports as the exact LoRA of the
        # original base: rank r + r0, [B, -B0]·[A; A0]
        b, a = (full(t).detach().contiguous().cpu() for t in lora_of_original_base(adapter))
        kind = adapter.ops.kind
        if kind == "embedding":
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = a
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = b
        else:
            if kind == "conv2d":
                w = adapter.base_layer.weight
                a = a.reshape(a.shape[0], *w.shape[1:])
                b = b.reshape(*b.shape, 1, 1)
            fan_in_fan_out |= kind == "conv1d"
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
        rank = a.shape[0]
        ranks[name] = rank
        alphas[name] = adapter.scaling * rank  # PEFT's scaling is lora_alpha / r
    shifted = [name for name, adapter in pairs if base_shift(adapter) is not None]
    if shifted:
        log.info("export_peft: %d layer(s) (%s%s) have a base weight shifted by their initializer "
                 "(W - s*B0*A0); PEFT applies an adapter to the base weights it is given, so they are "
                 "written as the exact LoRA of the original base, [B, -B0]*[A; A0] of rank r + r0",
                 len(shifted), ", ".join(shifted[:3]), ", ..." if len(shifted) > 3 else "")
    heads = [h for h in PEFT_HEADS.get(base.get("task_type"), ()) if trainable_params(root, [h])]
    extra = [h for h in heads if h not in trainable]  # the base head (another adapter's: its base values)
    to_save = list(trainable) + extra
    for pname, p in [*trained_params(root, state, adapter_name),
                     *[(n, state.originals.get(n, p)) for n, p in trainable_params(root, extra)]]:
        tensors[f"{PREFIX}{pname}"] = full(p).detach().contiguous().cpu()
    r0 = ranks[pairs[0][0]]
    alpha0 = alphas[pairs[0][0]]
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": base.get("task_type"),
        "base_model_name_or_path": base.get("name_or_path"),
        "r": r0,
        "lora_alpha": alpha0,
        "target_modules": "(" + "|".join(re.escape(n) for n, _ in pairs) + ")",
        "rank_pattern": {f"^{re.escape(n)}$": r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {f"^{re.escape(n)}$": al for n, al in alphas.items() if al != alpha0},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": to_save or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return {"adapter_model.safetensors": save_safetensors(tensors, metadata={"format": "pt"}),
            "adapter_config.json": (json.dumps(config, indent=2) + "\n").encode()}


def export_saved(src: str | os.PathLike, dst: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """A directory written by `geopeft.save` → a PEFT LoRA directory, without the base
    model: the adapters are rebuilt on weightless (meta) stand-ins of their base layers,
    their factors materialised on the CPU from the saved values. Several adapters (PEFT's
    layout, as `save` writes it) are all converted, into the same layout; `adapter_name`
    converts only that one (from `src/<adapter_name>` if that holds one, else from `src`),
    written in its place of the layout (as `export_peft(..., adapter_name=)`)."""
    from .serialization import CONFIG, install, read_checkpoint

    src = Path(src)
    if adapter_name is None:
        config, tensors = read_checkpoint(src)
        todo = [(DEFAULT, src, config, tensors)]
        todo += [(n, src / n, *read_checkpoint(src / n)) for n in config.get("adapters", [])]
    else:
        name = check_adapter_name(adapter_name)
        directory = src / name if (src / name / CONFIG).is_file() else src
        todo = [(name, directory, *read_checkpoint(directory))]
    stub = nn.Module()
    base = todo[0][2].get("base_model", {})
    for _, directory, config, tensors in todo:
        _stand_ins(stub, directory, config, tensors, base)
    for name, directory, config, tensors in todo:
        install(stub, directory, config, tensors, materialize="cpu", adapter_name=name)
    return _write_peft(stub, dst, base, adapter_name)


def _stand_ins(stub: nn.Module, src: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
               base: dict[str, Any]) -> None:
    """Weightless stand-ins in `stub` for the layers and `trainable` modules of the adapter
    saved in `src` (layers another adapter already placed are kept)."""
    from .layers import stub_layer

    names = {n for n, _ in stub.named_modules()}
    for name, info in config["layers"].items():
        if "weight_shape" not in info:
            raise GeopeftError(f"{src}/geopeft.json predates weight shapes; export with "
                               "geopeft.export_peft(geopeft.load(base_model, src), dst)")
        if name not in names:
            with _named_as(src, f"layer {name!r}"):
                _set_module(stub, name, stub_layer(info["kind"], info["weight_shape"]))
    for key, t in tensors.items():  # trainable modules' parameters, shaped as saved
        if key.startswith("trainable."):
            mname, _, pname = key.removeprefix("trainable.").rpartition(".")
            with _named_as(src, f"tensor {key!r}"):
                _get_or_make(stub, mname).register_parameter(pname, nn.Parameter(torch.empty_like(t)))
    heads = PEFT_HEADS.get(base.get("task_type"), ())
    if heads and not any(k.startswith(f"trainable.{h}.") for h in heads for k in tensors):
        raise GeopeftError(f"{src} was saved from a {base['task_type']} model, whose PEFT model loads its "
                           f"head ({' or '.join(heads)}) from the adapter file, but the checkpoint holds no "
                           "head (it was not trainable=): export with "
                           f"geopeft.export_peft(geopeft.load(base_model, {str(src)!r}), dst)")


@contextmanager
def _named_as(src: Path, what: str):
    """A module name from the file that torch refuses becomes a CheckpointError."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{src}: {what} is not a valid module path ({exc})") from exc


def _get_or_make(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split(".") if dotted else []:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    return module


def _set_module(root: nn.Module, dotted: str, layer: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    _get_or_make(root, parent).add_module(leaf, layer)
