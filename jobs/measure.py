"""What the compare table reports about a trained model and its optimizer."""

from __future__ import annotations

import warnings
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


class RankGrowthWatch:
    """The failure a rank-adaptive run meets: its training loss risen back to its start while
    its total rank grew. `update(loss, model)` after every step; warns once (RuntimeWarning,
    with the numbers) when the mean of the last `window` losses is at or above the mean of
    the first `window`, some earlier `window` mean was at least `fall` (relative) below that
    start — a slow start that has not learned yet is no divergence — and the adapters' total
    rank is above its value at the start. `message` holds the warning (None until then)."""

    def __init__(self, model: nn.Module, window: int = 10, fall: float = 0.05):
        self.window, self.fall, self.start_rank = window, fall, sum(ranks(model).values())
        self.losses: list[float] = []
        self.lowest = float("inf")  # the lowest mean of `window` consecutive losses so far
        self.message: str | None = None

    def update(self, loss: float, model: nn.Module) -> None:
        self.losses.append(loss)
        w = self.window
        if len(self.losses) >= w:
            self.lowest = min(self.lowest, sum(self.losses[-w:]) / w)
        if self.message is not None or len(self.losses) < 3 * w:
            return
        first, last = sum(self.losses[:w]) / w, sum(self.losses[-w:]) / w
        if last < first or self.lowest > first - self.fall * abs(first):
            return
        total = sum(ranks(model).values())
        if total > self.start_rank:
            self.message = (f"the training loss is back at its start ({last:.4g}, mean of the last {w} steps; "
                            f"{first:.4g} over the first {w}) after {len(self.losses)} steps while the total "
                            f"rank grew from {self.start_rank} to {total}: the rank controller is likely "
                            "diverging (bound its ranks, lower the lr)")
            warnings.warn(self.message, RuntimeWarning, stacklevel=2)
