"""What the compare table reports about a trained model and its optimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import geopeft
from geopeft.interfaces import factor_names_of


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps (moments, transform and controller state)."""
    sd = opt.state_dict()
    return _tensor_bytes(sd.get("state", {})) + _tensor_bytes(sd.get("geopeft", {}))


@torch.no_grad()
def invariant_violation(model: nn.Module) -> float | None:
    """The largest `Manifold.violation` over every non-Euclidean factor (None: none has one)."""
    worst: float | None = None
    for _, adapter in geopeft.adapters(model):
        for key, manifold in adapter.factor_manifolds().items():
            if manifold.is_euclidean:
                continue
            xs = tuple(getattr(adapter, n).detach().float() for n in factor_names_of(key))
            v = float(manifold.violation(xs if manifold.coupled else xs[0]).max())
            worst = v if worst is None else max(worst, v)
    return worst


def ranks(model: nn.Module) -> dict[str, int]:
    return {name: int(a.rank) for name, a in geopeft.adapters(model)}
