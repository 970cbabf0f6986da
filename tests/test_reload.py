"""Reloads that compute exactly like the trained model: factor layouts (every factor is
contiguous, however it was made), scalings after rank changes, frozen loads."""

from __future__ import annotations

import json

import peft
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


def _adapt_rank_changing(method: str, rank: int, alpha: float) -> nn.Module:
    torch.manual_seed(0)
    options = {"total_steps": 10, "target_rank": 1} if method == "adalora" else {"r_max": rank}
    model = geopeft.adapt(TinyNet(), method, targets=TARGETS, rank=rank, alpha=alpha, **options)
    with torch.no_grad():
        for _, a in geopeft.adapters(model):
            a.S.normal_()  # a trained core (zero_core starts it at 0)
    return model


@pytest.mark.parametrize("method, rank, alpha", [("geolora", 8, 8.0), ("adalora", 4, 16.0)])
def test_a_rank_changed_adapter_with_explicit_alpha_reloads_as_the_same_function(method, rank, alpha,
                                                                                tmp_path):
    """Training keeps the scaling alpha / initial rank through rank changes; `load` rebuilds
    each layer at its saved rank and must keep that scaling, not take alpha / saved rank.
    PEFT's export carries the same function."""
    model = _adapt_rank_changing(method, rank, alpha)
    opt = geopeft.optimizer(model, torch.optim.SGD, lr=0.1)
    opt.resize_many([RankChange(n, r) for n, r in zip(TARGETS, (3, 2, rank))])  # forced rank changes
    ids = tiny_batch(2, 4)
    geopeft.save(model, tmp_path / "saved")
    torch.manual_seed(0)
    loaded = geopeft.load(TinyNet(), tmp_path / "saved")
    assert {n: a.scaling for n, a in geopeft.adapters(loaded)} == {n: alpha / rank for n in TARGETS}
    assert torch.equal(loaded(ids), model(ids))
    geopeft.export_peft(loaded, tmp_path / "peft")
    torch.manual_seed(0)
    via_peft = peft.PeftModel.from_pretrained(TinyNet(), str(tmp_path / "peft"))
    torch.testing.assert_close(via_peft(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_a_file_without_scalings_loads_where_unambiguous_and_is_refused_where_not(tmp_path):
    """Files written before scalings were recorded: a fixed-rank method's rebuilt scaling is
    the trained one; a rank-changing method with an explicit alpha cannot be told apart."""
    def strip_scalings(directory):
        cfg = json.loads((directory / "geopeft.json").read_text())
        for info in cfg["layers"].values():
            del info["scaling"]
        (directory / "geopeft.json").write_text(json.dumps(cfg))

    torch.manual_seed(0)
    lora = geopeft.adapt(TinyNet(), "lora", targets=TARGETS, rank=4, alpha=16.0)
    geopeft.save(lora, tmp_path / "lora")
    strip_scalings(tmp_path / "lora")
    torch.manual_seed(0)
    assert torch.equal(geopeft.load(TinyNet(), tmp_path / "lora")(tiny_batch(2, 4)), lora(tiny_batch(2, 4)))
    model = _adapt_rank_changing("geolora", 8, 8.0)
    geopeft.optimizer(model, torch.optim.SGD, lr=0.1).resize("query", 3)
    geopeft.save(model, tmp_path / "geolora")
    strip_scalings(tmp_path / "geolora")
    fresh = TinyNet()
    with pytest.raises(geopeft.CheckpointError, match=r"layer 'query' lacks the 'scaling' entry.*8 -> 3"):
        geopeft.load(fresh, tmp_path / "geolora")
    assert geopeft.model.find_state(fresh) is None  # the model is untouched


def test_load_for_inference_freezes_factors_and_trainable_modules(tmp_path):
    """`trainable=False`, as PEFT's is_trainable=False: nothing requires grad, eval mode,
    the same outputs; the optimizer then says why it has nothing to train."""
    torch.manual_seed(0)
    model = geopeft.adapt(TinyNet(), "stella", targets=TARGETS, rank=2, trainable=["classifier"])
    geopeft.save(model, tmp_path)
    torch.manual_seed(0)
    frozen = geopeft.load(TinyNet(), tmp_path, trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    assert torch.equal(frozen(tiny_batch(3, 4)), model.eval()(tiny_batch(3, 4)))
    with pytest.raises(geopeft.GeopeftError, match=r"trainable=False"):
        geopeft.optimizer(frozen, torch.optim.AdamW, lr=1e-3)
    torch.manual_seed(0)
    trainable = geopeft.load(TinyNet(), tmp_path)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad} != set()
