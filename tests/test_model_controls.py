"""Model controls users know from PEFT: `disable_adapters` (exact, `trainable=` modules
included), `geopeft.summary`, and the repr of an adapted layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import geopeft

from helpers import TinyNet, tiny_batch, tiny_regression, train


def _trained(method: str = "lora", **kw) -> tuple[nn.Module, nn.Module, geopeft.GeometricOptimizer]:
    """(base copy, adapted model trained 3 AdamW steps with its classifier, optimizer)."""
    torch.manual_seed(0)
    model = TinyNet()
    base = copy.deepcopy(model)
    geopeft.adapt(model, method, targets=["query", "value"], rank=2, trainable=["classifier"], **kw)
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=5e-2)
    with torch.no_grad():
        model.query.adapter.B.normal_()  # a nonzero ΔW from the start
    train(model, opt, tiny_regression(), 3)
    return base, model, opt


def test_disable_adapters_gives_the_base_outputs_exactly_with_trainable_modules():
    base, model, _ = _trained()
    x = tiny_batch(7)
    assert not torch.equal(model.classifier.weight, base.classifier.weight)  # the head trained
    adapted = model(x)
    with geopeft.disable_adapters(model):
        assert torch.equal(model(x), base(x))
        assert not model.classifier.weight.requires_grad
    assert torch.equal(model(x), adapted)  # the trained head and adapters are back
    assert model.classifier.weight.requires_grad
    # after a dtype change the block still gives what the base model would
    model.double()
    with geopeft.disable_adapters(model):
        assert torch.equal(model(x), copy.deepcopy(base).double()(x))


def test_a_graph_recorded_before_the_block_backpropagates_through_the_trained_values():
    """The DPO pattern: policy forward, reference forward with adapters disabled, backward."""
    _, model, _ = _trained()
    twin = copy.deepcopy(model)
    x = tiny_batch(3)
    loss = model(x).pow(2).mean()
    with torch.no_grad(), geopeft.disable_adapters(model):
        model(x)
    loss.backward()
    twin(x).pow(2).mean().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def test_disable_adapters_after_load_uses_the_fresh_base_model_s_head(tmp_path):
    base, model, _ = _trained()
    geopeft.save(model, tmp_path)
    loaded = geopeft.load(copy.deepcopy(base), tmp_path)
    x = tiny_batch(5)
    assert torch.equal(loaded(x), model(x))
    with geopeft.disable_adapters(loaded):
        assert torch.equal(loaded(x), base(x))


def test_disable_adapters_refuses_a_merged_model():
    _, model, _ = _trained()
    geopeft.merge(model)
    with pytest.raises(geopeft.GeopeftError, match="geopeft.unmerge"):
        with geopeft.disable_adapters(model):
            pass
    assert not any(layer.disabled for _, layer in geopeft.model.adapted_layers(model))


def test_summary_counts_parameters_and_lists_layers():
    torch.manual_seed(0)
    model = TinyNet()
    total_before = sum(p.numel() for p in model.parameters())
    geopeft.adapt(model, "stella", targets=["query", "ffn.0"], rank=2, ranks={"ffn.0": 4},
                  trainable=["classifier"])
    s = geopeft.summary(model)
    # U (m, r), S (r, r), V (n, r): 16x16 at r=2 and 24x16 at r=4
    factors = (16 * 2 + 4 + 16 * 2) + (24 * 4 + 16 + 16 * 4)
    head = 16 * 3 + 3
    assert s.adapter_params == factors
    assert s.trainable_params == factors + head == sum(p.numel() for p in model.parameters()
                                                       if p.requires_grad)
    assert s.total_params == total_before + factors
    assert [(layer.name, layer.shape, layer.rank) for layer in s.layers] == [
        ("query", (16, 16), 2), ("ffn.0", (24, 16), 4)]
    assert s.layers[0].manifolds == {"U": "stiefel", "S": "euclidean", "V": "stiefel"}
    assert s.trainable_modules == {"classifier": head}
    text = str(s)
    assert "method 'stella'" in text and "rank 2..4" in text
    assert f"trainable params: {factors + head:,} || all params: {s.total_params:,}" in text
    assert "ffn.0  linear  24x16  4" in text and "classifier (51 params)" in text
    assert s.to_dict()["trainable_fraction"] == pytest.approx((factors + head) / s.total_params)


def test_repr_of_an_adapted_layer_is_one_line_per_part():
    model = geopeft.adapt(nn.Sequential(nn.Linear(16, 16)), "stella", targets=["0"], rank=2)
    text = repr(model[0])
    assert "(base_layer): Linear(in_features=16, out_features=16, bias=True)" in text
    assert "(adapter): USVAdapter(linear 16x16, rank=2, scaling=1, U, V: stiefel; S: euclidean)" in text
    assert "Identity" not in text and len(text.splitlines()) == 4
    lora = geopeft.adapt(nn.Sequential(nn.Linear(8, 4)), "balora", targets=["0"], rank=2, dropout=0.1)
    geopeft.merge(lora)
    assert "LoRAAdapter(linear 4x8, rank=2, scaling=1, dropout=0.1, (B,A): balanced)  [merged]" in repr(lora[0])
