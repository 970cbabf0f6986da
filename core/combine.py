"""`combine`: a weighted sum of a model's adapters as one new adapter (PEFT's
`add_weighted_adapter`).

Every geopeft adapter has an exact two-factor form s·B·A = ΔW (`Adapter.to_lora`), so on
each layer Σᵢ wᵢ·ΔWᵢ is exactly [w₁s₁B₁ | w₂s₂B₂ | …]·[A₁; A₂; …] (rank Σ rᵢ), and a layer
that an adapter does not adapt gets nothing from it. `rank=k` truncates that sum by its
SVD (computed from the factors: QR of each side, SVD of the small core, float64) and
reports the energy it discards, Σ_{j>k} σⱼ² / Σ σⱼ². The new adapter is a plain LoRA
(scaling 1), added inactive like any other.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .model import (
    AdapterState,
    adapted_layers,
    build_adapters,
    check_adapter_name,
    check_can_add,
    find_root,
    installed,
    known_adapter,
    model_context,
    register,
    require_state,
)
from .peft_import import fill_from_lora, thin_svd_of_product
from .recipes import resolve

log = logging.getLogger("geopeft")


def combine(model: nn.Module, weights: Mapping[str, float], name: str, rank: int | None = None,
            method: str = "lora") -> dict[str, float]:
    """Add adapter `name` whose ΔW is Σ weights[a]·ΔW_a over the model's adapters a, on
    every layer any of them adapts: exact by concatenation (rank Σ r_a; where that exceeds
    the layer's min(m, n), the exact SVD of the sum), or with `rank` the sum's truncated
    SVD. `method` is the new adapter's recipe ("lora"; "stella" gets U, S, V by SVD).
    Returns {layer: fraction of ‖Σ w ΔW‖² discarded} (0 where exact). In place."""
    state = require_state(model)
    root = find_root(model)
    check_adapter_name(name)
    check_can_add(root, name)
    weights = _checked_weights(state, weights)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive int (the truncated SVD's rank) or None (exact "
                          f"concatenation), got {rank!r}")
    sums, found, discarded = {}, [], {}
    for lname, layer in adapted_layers(root):
        parts = [(w, layer.get(a)) for a, w in weights.items() if a in layer.adapter_names]
        if not parts:
            continue
        with torch.no_grad():
            b = torch.cat([w * p.scaling * p.to_lora()[0].double() for w, p in parts], 1)
            a = torch.cat([p.to_lora()[1].double() for _, p in parts], 0)
        limit = min(b.shape[0], a.shape[1])
        keep = min(rank or b.shape[1], limit)
        if keep < b.shape[1]:
            b, a, discarded[lname] = _truncated(b, a, keep)
        else:
            discarded[lname] = 0.0
        sums[lname] = (b, a)
        found.append((lname, layer.base_layer))
        dtypes = {p.factor_dtype for _, p in parts}
        sums[lname] += (dtypes.pop() if len(dtypes) == 1 else torch.float32,)
    resolved = resolve(method, {}, context=model_context(root, found))
    ranks = {lname: int(b.shape[1]) for lname, (b, _, _) in sums.items()}
    built = build_adapters(resolved, found, ranks, max(ranks.values()),
                           {lname: dtype for lname, (_, _, dtype) in sums.items()})
    with installed(root, built, [], name), torch.no_grad():
        for lname, _, adapter in built:
            b, a, _ = sums[lname]
            fill_from_lora(adapter, lname, b, a, 1.0 / adapter.scaling)
    register(root, name, AdapterState(resolved, max(ranks.values()), None))
    worst = max(discarded.values())
    log.info("geopeft: combined %s into %r on %d layers (%s; largest discarded energy %.3g)",
             ", ".join(f"{w:g}·{a}" for a, w in weights.items()), name, len(built),
             "exact" if worst == 0 else f"rank {rank}", worst)
    return discarded


def _checked_weights(state, weights: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError("combine takes {adapter name: weight}, at least one entry, e.g. "
                          "{'default': 0.7, 'b': 0.3}")
    for a, w in weights.items():
        known_adapter(state, a)
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ConfigError(f"the weight of adapter {a!r} must be a finite number, got {w!r}")
        trained = state.by_name[a].trainable
        if trained:
            raise ConfigError(f"adapter {a!r} trains {trained[0]!r} in full: a weighted mix of whole "
                              "modules is no low-rank update (nor, for a nonlinear module, the mix of "
                              "their functions), so it has no exact meaning; combine adapters "
                              "without trainable= modules")
    return {a: float(w) for a, w in weights.items()}


def _truncated(b: Tensor, a: Tensor, k: int) -> tuple[Tensor, Tensor, float]:
    """(B' (m, k), A' (k, n), discarded energy) with B'A' the best rank-k approximation of B·A."""
    u, s, v = thin_svd_of_product(b, a)
    total = float(s.pow(2).sum())
    lost = float(s[k:].pow(2).sum()) / total if total > 0 else 0.0
    return u[:, :k] * s[:k], v[:, :k].mT, lost
