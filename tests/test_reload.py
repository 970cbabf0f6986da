"""Reloads that compute exactly like the trained model: factor layouts (every factor is
contiguous, however it was made), scalings after rank changes, frozen loads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import geopeft
from geopeft.interfaces import RankChange

from helpers import TinyNet, factor_layouts, tiny_batch

TARGETS = ["query", "ffn.0", "ffn.2"]


def _every_method() -> list[str]:
    return geopeft.components()["method"]


def _adapt(method: str) -> nn.Module:
    torch.manual_seed(0)
    ids, labels = tiny_batch(0, 4), torch.arange(4) % 3

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    return geopeft.adapt(TinyNet(), method, targets=TARGETS, rank=2, init_batches=[(ids, labels)],
                         loss_fn=loss_fn, **({"total_steps": 10, "target_rank": 1} if method == "adalora" else {}))


def _assert_contiguous(model: nn.Module, when: str) -> None:
    bad = {k: v for k, v in factor_layouts(model).items()
           if v[1] != torch.empty(v[0]).stride()}
    assert not bad, f"non-contiguous factors {when}: {bad}"


@pytest.mark.parametrize("method", _every_method())
def test_every_methods_factors_are_contiguous_after_adapt_load_and_rank_changes(method, tmp_path):
    """Layouts are equal by construction (a resume is bitwise on any BLAS): fresh factors,
    loaded ones and resized ones (kept indices, a change of basis) are all contiguous, and
    so are the optimizer's moments that follow them."""
    model = _adapt(method)
    _assert_contiguous(model, "after adapt")
    geopeft.save(model, tmp_path)
    torch.manual_seed(1)
    loaded = geopeft.load(TinyNet(), tmp_path)
    _assert_contiguous(loaded, "after load")
    assert factor_layouts(loaded) == factor_layouts(model)
    opt = geopeft.optimizer(loaded, torch.optim.Adam, lr=1e-3)
    loaded(tiny_batch(1, 4)).square().mean().backward()
    opt.step()
    named = geopeft.adapters(loaded)
    grow = [RankChange(n, a.rank + 1) for n, a in named[:2]]
    opt.resize_many(grow)
    _, a = named[2]
    basis = {f: [torch.eye(a.rank, a.rank + 1)] * len(a.rank_dims[f]) for f in a.factor_names}
    opt.resize_many([RankChange(named[2][0], a.rank + 1, basis=basis)])
    _assert_contiguous(loaded, "after rank changes")
    for p in (p for _, a in geopeft.adapters(loaded) for p in a.factors().values()):
        assert all(s.stride() == p.stride() for s in opt.state.get(p, {}).values()
                   if torch.is_tensor(s) and s.shape == p.shape)
