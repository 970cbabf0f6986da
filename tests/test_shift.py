"""Base-weight shifts (geopeft.shift): an initializer that subtracts s·B₀A₀ from W keeps the
model's function at step 0, and save/load, merge/unmerge, disable_adapters and
export_peft stay exact."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import geopeft
from geopeft.export import export_saved
from geopeft.shift import base_shift

from helpers import TinyNet

TARGETS = ["embed", "query", "value", "ffn.0", "ffn.2"]
INITS = [("cglora", {"shift": True}), ("lora-ga", {}), ("pissa", {})]


def _data(seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 50, (4, 7), generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(k)]


def ce(model, batch):
    ids, y = batch
    return F.cross_entropy(model(ids), y)


def _adapted(method, extra):
    torch.manual_seed(0)
    base = TinyNet()
    model = copy.deepcopy(base)
    data = _data()
    geopeft.adapt(model, method, targets=TARGETS, rank=2, trainable=["classifier"],
                  init_batches=data, loss_fn=ce, **extra)
    return base, model, data


@pytest.mark.parametrize(("method", "extra"), INITS, ids=[m for m, _ in INITS])
def test_shifted_base_is_exact_through_save_load_merge_disable_and_export(method, extra, tmp_path, caplog):
    base, model, data = _adapted(method, extra)
    ids = data[0][0]
    base_out = base(ids).detach()
    torch.testing.assert_close(model(ids), base_out, rtol=0, atol=1e-5)  # step 0: base function
    pairs = geopeft.adapters(model)
    assert all(base_shift(a) is not None for _, a in pairs)
    assert all(a.delta_weight().abs().max() > 1e-3 for _, a in pairs)

    opt = geopeft.optimizer(model, torch.optim.SGD, lr=0.5)
    ce(model, data[1]).backward()
    opt.step()
    out = model(ids).detach()
    assert (out - base_out).abs().max() > 1e-4  # the step moved the model

    with geopeft.disable_adapters(model):  # the original base, its untrained classifier too
        torch.testing.assert_close(model(ids), base_out, rtol=0, atol=1e-5)

    geopeft.save(model, tmp_path / "a")
    loaded = geopeft.load(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(loaded(ids), out, rtol=0, atol=0)
    for (_, a), (_, b) in zip(pairs, geopeft.adapters(loaded)):
        assert torch.equal(a.base_layer.weight, b.base_layer.weight)  # the shift replayed bit for bit

    shifted = {n: a.base_layer.weight.detach().clone() for n, a in pairs}
    geopeft.merge(model)
    torch.testing.assert_close(model(ids), out, rtol=0, atol=1e-5)
    geopeft.unmerge(model)
    for n, a in pairs:
        torch.testing.assert_close(a.base_layer.weight, shifted[n], rtol=0, atol=1e-6)

    import peft
    with caplog.at_level(logging.INFO, logger="geopeft"):
        geopeft.export_peft(model, tmp_path / "peft")
    assert f"{len(pairs)} layer(s)" in caplog.text and "exact LoRA of the original base" in caplog.text
    restored = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(restored(ids), out, rtol=0, atol=1e-5)  # a LoRA of the original base
    export_saved(tmp_path / "a", tmp_path / "peft2")
    restored = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft2")
    torch.testing.assert_close(restored(ids), out, rtol=0, atol=1e-5)  # without the base model


def test_a_raising_loss_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = TinyNet()
    model.train()
    model.ffn.eval()
    before = copy.deepcopy(model.state_dict())
    modes = {n: m.training for n, m in model.named_modules()}

    def raising(m, batch):
        ce(m, batch)
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        geopeft.adapt(model, "cglora", targets=TARGETS, rank=2, init_batches=_data(), loss_fn=raising,
                      shift=True)
    assert not geopeft.adapters(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_hooks_gone_and_modes_restored_after_a_data_aware_init():
    torch.manual_seed(0)
    model = TinyNet()
    model.train()
    geopeft.adapt(model, "cglora", targets=TARGETS, rank=2, init_batches=_data(), loss_fn=ce)
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.adapter.{f}" for t in TARGETS for f in ("A", "B")}
