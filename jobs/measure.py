"""What the compare table reports about a trained model and its optimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import geopeft
from geopeft.geometry import max_violation


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps (moments, transform and controller state)."""
    sd = opt.state_dict()
    return tensor_bytes(sd.get("state", {})) + tensor_bytes(sd.get("geopeft", {}))


def invariant_violation(model: nn.Module) -> float | None:
    """The largest `Manifold.violation` over every non-Euclidean factor, batched per factor
    group (`geopeft.geometry.max_violation`); None when every factor is Euclidean."""
    adapters = [a for _, a in geopeft.adapters(model)]
    if all(m.is_euclidean for a in adapters for m in a.factor_manifolds().values()):
        return None
    return max_violation(adapters)


def ranks(model: nn.Module) -> dict[str, int]:
    return {name: int(a.rank) for name, a in geopeft.adapters(model)}
