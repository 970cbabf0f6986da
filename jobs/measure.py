"""What the compare table reports about a trained model and its optimizer."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

import geopeft
from geopeft.geometry import kept_violation


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


def invariant_violation(model: nn.Module) -> tuple[float | None, int]:
    """(the largest `Manifold.violation` over every non-Euclidean factor its manifold keeps on
    it, how many factors the manifold leaves off by design), batched per factor group
    (`geopeft.geometry.kept_violation`); (None, 0) when every factor is Euclidean."""
    adapters = [a for _, a in geopeft.adapters(model)]
    if all(m.is_euclidean for a in adapters for m in a.factor_manifolds().values()):
        return None, 0
    return kept_violation(adapters)


def ranks(model: nn.Module) -> dict[str, int]:
    return {name: int(a.rank) for name, a in geopeft.adapters(model)}


def one_class_warning(evals: list[dict[str, Any]], test_predicted: list[int] | None,
                      classes: tuple[str, ...] | list[str] = ()) -> str | None:
    """A classifier that predicted one and the same class for every example, at every
    evaluation of the validation split and on the test split, has learned only the class
    prior, whatever its accuracy (which is then that class's share): warn (RuntimeWarning)
    and return the message. `evals`: the run's evaluations, each with "val_predicted"
    (examples per class); `test_predicted`: the test split's. None otherwise."""
    val = [e["val_predicted"] for e in evals if "val_predicted" in e]
    counts = val + ([test_predicted] if test_predicted is not None else [])
    if not counts or len(counts[0]) < 2:
        return None
    winners = set()
    for c in counts:
        if sum(k > 0 for k in c) != 1:
            return None
        winners.add(c.index(max(c)))
    if len(winners) != 1:
        return None
    label = winners.pop()
    name = classes[label] if label < len(classes) else str(label)
    message = (f"the model predicts one class ({name!r}) for every example, at each of {len(val)} validation "
               f"evaluations{' and on the test split' if test_predicted is not None else ''}: it learned "
               "only the class prior, and its accuracy is that class's share. Try another lr "
               "(`--lr-sweep`) or more steps")
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return message


class RankGrowthWatch:
    """The failure a rank-adaptive run meets: its training loss risen back to its start while
    its total rank grew. `update(loss, model)` after every step; warns once (RuntimeWarning,
    with the numbers) when the mean of the last `window` losses is at or above the mean of
    the first `window`, some earlier `window` mean was at least `fall` (relative) below that
    start — a slow start that has not learned yet is no divergence — and the adapters' total
    rank at every one of the last `window` steps is above its value at the start (the
    smallest of them: a controller's cycle that augments, then truncates back within its
    budget, is no growth). `message` holds the warning (None until then)."""

    def __init__(self, model: nn.Module, window: int = 10, fall: float = 0.05):
        self.window, self.fall, self.start_rank = window, fall, sum(ranks(model).values())
        self.losses: list[float] = []
        self.totals: list[int] = []  # the total rank after each of the last `window` steps
        self.lowest = float("inf")  # the lowest mean of `window` consecutive losses so far
        self.message: str | None = None

    def update(self, loss: float, model: nn.Module) -> None:
        self.losses.append(loss)
        w = self.window
        self.totals = (self.totals + [sum(ranks(model).values())])[-w:]
        if len(self.losses) >= w:
            self.lowest = min(self.lowest, sum(self.losses[-w:]) / w)
        if self.message is not None or len(self.losses) < 3 * w:
            return
        first, last = sum(self.losses[:w]) / w, sum(self.losses[-w:]) / w
        if last < first or self.lowest > first - self.fall * abs(first):
            return
        total = min(self.totals)
        if total > self.start_rank:
            self.message = (f"the training loss is back at its start ({last:.4g}, mean of the last {w} steps; "
                            f"{first:.4g} over the first {w}) after {len(self.losses)} steps while the total "
                            f"rank grew from {self.start_rank} to {total}: the rank controller is likely "
                            "diverging (bound its ranks, lower the lr)")
            warnings.warn(self.message, RuntimeWarning, stacklevel=2)
