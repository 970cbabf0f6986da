"""`import_peft`: a PEFT LoRA adapter directory (adapter_config.json +
adapter_model.safetensors) onto a base model, as the adapters of any geopeft recipe.

The layers, and their ranks, are those the weights file holds; each layer's PEFT
scaling is `lora_alpha / r` (`/ √r` with `use_rslora`), `alpha_pattern` and
`rank_pattern` included. ΔW is kept exactly:
- a two-factor adapter (B, A: `lora`, `rslora`, `lorapro`, `balora`) takes PEFT's
  factors as they are — B multiplied by the ratio of the two scalings when they differ
  (a per-layer `alpha_pattern` entry) — then the recipe's manifolds project them
  (`balanced` changes the basis of (B, A) and keeps B·A);
- a three-factor adapter (U, S, V: `stella`) takes the thin SVD of PEFT's s·B·A,
  computed in float64 from QR factors of B and Aᵀ (no m×n matrix).
`modules_to_save` become `trainable` modules with PEFT's weights. A recipe whose
initializer shifts the base weight (W − s·B₀A₀) gets W back bit for bit: PEFT's factors
are an update of the original base. Reading needs neither peft nor pickle.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError
from .interfaces import Adapter, Recipe
from .layers import layer_ops
from .model import adapt, adapters, project_onto_manifolds, trainable_params
from .shift import base_shift, forget_shift

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_FACTOR_KEYS = {".lora_A.weight": "A", ".lora_B.weight": "B",
                ".lora_embedding_A": "A", ".lora_embedding_B": "B"}
#: config entries that change the function in ways a LoRA recipe cannot express
_UNSUPPORTED = {"use_dora": "DoRA's magnitude vector", "lora_bias": "a trained bias on lora_B",
                "target_parameters": "LoRA on nn.Parameters", "use_qalora": "QA-LoRA",
                "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication"}


def import_peft(model: nn.Module, path: str | os.PathLike, method: str | Recipe = "lora",
                **overrides: Any) -> nn.Module:
    """Attach the PEFT LoRA adapter in directory `path` to the base `model` as `method`'s
    adapters, in place; returns `model`, whose outputs equal the PEFT model's.
    `overrides` go to `geopeft.adapt` (recipe parts, component options)."""
    directory = Path(path)
    config = _read_config(directory)
    tensors = _read_weights(directory)
    layers, rest = _split(tensors, directory)
    modules = dict(model.named_modules())
    for name, factors in layers.items():
        _check_layer(directory, name, modules.get(name), factors)
    rslora = bool(config.get("use_rslora"))
    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    ranks = {name: int(f["A"].shape[0]) for name, f in layers.items()}
    peft_scaling = {name: _alpha(config, name, alpha0) / (math.sqrt(r) if rslora else r)
                    for name, r in ranks.items()}
    trainable = list(config.get("modules_to_save") or [])
    if rslora:
        overrides.setdefault("rslora", True)
    if float(config.get("lora_dropout") or 0.0) > 0:
        overrides.setdefault("dropout", float(config["lora_dropout"]))
    targets = "(" + "|".join(re.escape(n) for n in layers) + ")"
    _check_trainable(directory, model, trainable, rest)  # every check before the model changes
    weights = {name: layer_ops(modules[name]).snapshot_weight(modules[name]) for name in layers}
    adapt(model, method, targets=targets, rank=r0, alpha=alpha0, ranks=ranks,
          trainable=trainable, **overrides)
    with torch.no_grad():
        pairs = adapters(model)
        for name, adapter in pairs:
            if base_shift(adapter) is not None:  # PEFT's base is the unshifted one: W exactly
                adapter.ops.restore_weight(adapter.base_layer, weights[name])
                forget_shift(adapter)
            f = layers[name]
            b, a = f["B"].reshape(f["B"].shape[0], -1), f["A"].reshape(f["A"].shape[0], -1)
            fill_from_lora(adapter, name, b, a, peft_scaling[name] / adapter.scaling)
        project_onto_manifolds([a for _, a in pairs])
        for pname, p in trainable_params(model, trainable):
            p.copy_(rest[pname])
    return model


def fill_from_lora(adapter: Adapter, name: str, b: Tensor, a: Tensor, ratio: float) -> None:
    """Write PEFT's (B, A) into the adapter so that its ΔW is ratio·(its scaling)·B·A."""
    names = set(adapter.factor_names)
    if names == {"A", "B"}:
        adapter.A.copy_(a)
        adapter.B.copy_(b if ratio == 1.0 else b.double() * ratio)
    elif names == {"U", "S", "V"}:
        u, s, v = thin_svd_of_product(b, a)
        s = s * ratio
        adapter.U.copy_(u)
        adapter.V.copy_(v)
        adapter.S.copy_(s if adapter.S.dim() == 1 else torch.diag(s))
    else:
        raise ConfigError(f"import_peft fills adapters with factors (A, B) or (U, S, V); the "
                          f"{type(adapter).__name__} on {name!r} has {', '.join(adapter.factor_names)}: "
                          "import into a recipe whose adapter is 'lora' or 'usv'")


def thin_svd_of_product(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U (m, r), s (r,), V (n, r) with U·diag(s)·Vᵀ = B·A for B (m, r), A (r, n), U and V
    orthonormal; in float64 through B = Q_b R_b, Aᵀ = Q_a R_a and the SVD of R_b R_aᵀ."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().mT)
    p, s, qh = torch.linalg.svd(rb @ ra.mT)
    return qb @ p, s, qa @ qh.mT


def _alpha(config: dict[str, Any], name: str, default: float) -> float:
    """PEFT's rule: the first alpha_pattern key k with `(.*\\.)?(k)$` matching the name."""
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return float(value)
    return default


def _split(tensors: dict[str, Tensor], directory: Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """{layer: {"A": ..., "B": ...}} and the other tensors, keyed by parameter name."""
    layers: dict[str, dict[str, Tensor]] = {}
    rest: dict[str, Tensor] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        for suffix, factor in _FACTOR_KEYS.items():
            if name.endswith(suffix):
                layers.setdefault(name.removesuffix(suffix), {})[factor] = t
                break
        else:
            if "lora_" in name:
                raise CheckpointError(f"{directory}/{WEIGHTS}: tensor {key!r} is a PEFT LoRA part "
                                      "geopeft does not import (only lora_A/lora_B and "
                                      "lora_embedding_A/B are)")
            rest[name] = t
    incomplete = sorted(n for n, f in layers.items() if set(f) != {"A", "B"})
    if incomplete:
        raise CheckpointError(f"{directory}/{WEIGHTS}: layer(s) {', '.join(incomplete[:3])} lack "
                              "lora_A or lora_B; the file is incomplete")
    if not layers:
        raise CheckpointError(f"{directory}/{WEIGHTS} holds no LoRA factors")
    return layers, rest


def _check_layer(directory: Path, name: str, module: nn.Module | None, f: dict[str, Tensor]) -> None:
    if module is None:
        raise CheckpointError(f"{directory}: PEFT adapter for layer {name!r}, which this model does "
                              "not have; import it onto the base model it was trained on")
    ops = layer_ops(module)
    b, a = f["B"], f["A"]
    r = a.shape[0]
    if ops is None or b.shape[:2] != (ops.m, r) or a[0].numel() != ops.n or b[0].numel() != r:
        got = f"{ops.kind} {ops.m}x{ops.n}" if ops else type(module).__name__
        raise CheckpointError(f"{directory}: layer {name!r} has PEFT factors B {tuple(b.shape)}, "
                              f"A {tuple(a.shape)} that do not fit this model's {got}; import it "
                              "onto the base model it was trained on")


def _check_trainable(directory: Path, model: nn.Module, trainable: list[str],
                     rest: dict[str, Tensor]) -> None:
    expected = dict(trainable_params(model, trainable))
    missing = sorted(set(expected) - set(rest))
    extra = sorted(set(rest) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{directory}: modules_to_save {trainable} does not match the saved "
                              f"tensors (missing {missing[:3]}, unexpected {extra[:3]}); the files do "
                              "not belong together or to this model")
    for pname, p in expected.items():
        if tuple(rest[pname].shape) != tuple(p.shape):
            raise CheckpointError(f"{directory}: {pname!r} is {tuple(rest[pname].shape)} in the PEFT "
                                  f"file but {tuple(p.shape)} in this model")


def _read_config(directory: Path) -> dict[str, Any]:
    cfg = directory / CONFIG
    if not cfg.exists():
        hint = (" (it is a geopeft directory: use geopeft.load)" if (directory / "geopeft.json").exists()
                else "")
        raise CheckpointError(f"{directory} has no {CONFIG}: it is not a PEFT adapter directory{hint}")
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg} is a {config.get('peft_type') if isinstance(config, dict) else None!r} "
                              "adapter; import_peft reads LoRA adapters (peft_type 'LORA')")
    used = [what for key, what in _UNSUPPORTED.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        used.append(f"trained biases (bias={config['bias']!r})")
    if used:
        raise CheckpointError(f"{cfg} uses {', '.join(used)}, which geopeft's recipes do not "
                              "express; import a plain LoRA adapter")
    return config


def _read_weights(directory: Path) -> dict[str, Tensor]:
    path = directory / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{path} is missing (a PEFT directory written with safetensors has it; "
                              "geopeft never reads adapter_model.bin, which is a pickle)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({exc})") from exc
