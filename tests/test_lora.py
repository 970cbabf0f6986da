"""LoRA adapter: forward equals the dense formula on every layer kind; merge/unmerge; init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import geopeft
from geopeft.model import AdaptedLayer

DTYPES = {"float32": (torch.float32, 1e-5), "float64": (torch.float64, 1e-12), "bfloat16": (torch.bfloat16, 2e-2)}


def _layer(kind: str, m: int, n: int, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """A base layer of `kind` and an input for it."""
    if kind == "linear":
        return nn.Linear(n, m).to(dtype), torch.randn(3, 5, n, dtype=dtype)
    if kind == "conv1d":
        layer = Conv1D(m, n).to(dtype)
        nn.init.normal_(layer.weight)
        return layer, torch.randn(3, 5, n, dtype=dtype)
    if kind == "conv2d":
        return nn.Conv2d(n, m, 3, stride=2, padding=1).to(dtype), torch.randn(2, n, 9, 7, dtype=dtype)
    if kind == "embedding":
        return nn.Embedding(n, m, padding_idx=0).to(dtype), torch.randint(0, n, (3, 6))
    raise ValueError(kind)


def _dense(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The base layer's function with `weight` in place of its own."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    if isinstance(layer, Conv1D):
        return x @ weight + layer.bias
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)
    return F.embedding(x, weight, padding_idx=layer.padding_idx)


class Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@given(kind=st.sampled_from(["linear", "conv1d", "conv2d", "embedding"]),
       m=st.integers(2, 24), n=st.integers(2, 24), rank=st.integers(1, 8),
       dtype=st.sampled_from(list(DTYPES)), rslora=st.booleans(), seed=st.integers(0, 2**16))
def test_forward_equals_dense_formula(kind, m, n, rank, dtype, rslora, seed):
    torch.manual_seed(seed)
    dt, tol = DTYPES[dtype]
    layer, x = _layer(kind, m, n, dt)
    model = Holder(layer)
    rank = min(rank, m, n * (9 if kind == "conv2d" else 1))
    geopeft.adapt(model, "lora", targets=["layer"], rank=rank, alpha=2.0 * rank + 1, rslora=rslora)
    (_, adapter), = geopeft.adapters(model)
    with torch.no_grad():
        adapter.A.normal_()
        adapter.B.normal_()
    s = (2.0 * rank + 1) / (rank ** 0.5 if rslora else rank)
    assert adapter.scaling == pytest.approx(s)
    # the dense reference: base weight plus s·B·A in the layer's own layout, in float64
    B, A = adapter.B.double(), adapter.A.double()
    delta = s * (B @ A)
    w = layer.weight.double()
    if kind == "linear":
        dense_w = w + delta
    elif kind == "conv1d":
        dense_w = w + delta.T
    elif kind == "conv2d":
        dense_w = w + delta.reshape(w.shape)
    else:
        dense_w = w + delta.T
    ref_layer = _clone_double(layer)
    expected = _dense(ref_layer, dense_w, x.double() if x.is_floating_point() else x)
    with torch.no_grad():
        got = model(x)
    assert got.dtype == dt
    err = (got.double() - expected).norm() / expected.norm().clamp_min(1e-12)
    assert err <= tol
    # delta_weight is the same update in the base layout, and to_lora reproduces it
    with torch.no_grad():
        assert torch.allclose(adapter.delta_weight().double(), (dense_w - w).to(dt).double(),
                              rtol=tol * 10, atol=tol * 10 * float(delta.abs().max()))
    b, a = adapter.to_lora()
    assert torch.allclose(adapter.scaling * (b.double() @ a.double()), delta, rtol=1e-6, atol=1e-9)


def _clone_double(layer: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(layer).double()


@given(kind=st.sampled_from(["linear", "conv1d", "conv2d", "embedding"]),
       m=st.integers(2, 32), n=st.integers(2, 32), rank=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_merge_then_unmerge_restores_base_weight(kind, m, n, rank, seed):
    torch.manual_seed(seed)
    layer, x = _layer(kind, m, n, torch.float32)
    model = Holder(layer)
    w0 = layer.weight.detach().clone()
    geopeft.adapt(model, "lora", targets=["layer"], rank=min(rank, m, n), alpha=4)
    (_, adapter), = geopeft.adapters(model)
    with torch.no_grad():
        adapter.A.normal_()
        adapter.B.normal_()
        # a trained adapter's update is of the order of the base weight, not far larger
        adapter.B.mul_(w0.norm() / adapter.delta_weight().norm())
        unmerged = model(x)
        geopeft.merge(model)
        assert model.layer.merged
        merged = model(x)
        assert (merged - unmerged).norm() <= 1e-5 * unmerged.norm() + 1e-6
        geopeft.unmerge(model)
        assert not model.layer.merged
        assert (layer.weight - w0).norm() <= 1e-6 * w0.norm()
        assert (model(x) - unmerged).norm() <= 1e-5 * unmerged.norm()


def test_merge_is_idempotent_and_unmerge_without_merge_is_noop(tiny):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=4)
    w0 = tiny.query.weight.detach().clone()
    with torch.no_grad():
        tiny.query.adapter.B.normal_()
    geopeft.unmerge(tiny)
    assert torch.equal(tiny.query.weight, w0)
    geopeft.merge(tiny)
    w1 = tiny.query.weight.detach().clone()
    geopeft.merge(tiny)
    assert torch.equal(tiny.query.weight, w1)


def test_peft_init_zero_delta_and_frozen_base(tiny):
    ids = torch.randint(0, 50, (4, 7))
    before = tiny(ids)
    geopeft.adapt(tiny, "lora", targets="all-linear", rank=4, trainable=["classifier"])
    names = [n for n, _ in geopeft.adapters(tiny)]
    assert names == ["query", "value", "ffn.0", "ffn.2"]  # output head left alone by the preset
    assert torch.equal(tiny(ids), before)  # B = 0: the adapted model is the base model
    for _, a in geopeft.adapters(tiny):
        assert torch.count_nonzero(a.B) == 0 and torch.count_nonzero(a.A) > 0
        bound = (1 / a.shape[1]) ** 0.5  # kaiming_uniform(a=√5) bound is 1/√fan_in
        assert float(a.A.detach().abs().max()) <= bound + 1e-6
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.adapter.{f}" for n in names for f in "AB"} | {
        "classifier.weight", "classifier.bias"}


def test_targets_by_suffix_regex_and_preset(tiny):
    import copy

    m1 = geopeft.adapt(copy.deepcopy(tiny), "lora", targets=["query", "ffn.2", "embed"], rank=2)
    assert [n for n, _ in geopeft.adapters(m1)] == ["embed", "query", "ffn.2"]
    m2 = geopeft.adapt(copy.deepcopy(tiny), "lora", targets=r"ffn\.\d", rank=2)
    assert [n for n, _ in geopeft.adapters(m2)] == ["ffn.0", "ffn.2"]
    m3 = geopeft.adapt(copy.deepcopy(tiny), "lora", targets="attention-qv", rank=2)
    assert [n for n, _ in geopeft.adapters(m3)] == ["query", "value"]
    m4 = geopeft.adapt(copy.deepcopy(tiny), "lora", targets="all-linear", exclude=["ffn.0"], rank=2)
    assert [n for n, _ in geopeft.adapters(m4)] == ["query", "value", "ffn.2"]


def test_adapted_layer_exposes_base_attributes(tiny):
    geopeft.adapt(tiny, "lora", targets=["query", "embed"], rank=2)
    assert isinstance(tiny.query, AdaptedLayer)
    assert tiny.query.in_features == 16 and tiny.query.weight is tiny.query.base_layer.weight
    assert tiny.embed.num_embeddings == 50
    # the adapter references the base layer without registering it twice
    assert not any(n.startswith("query.adapter.base") for n, _ in tiny.named_parameters())


def test_dropout_only_in_training(tiny):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=4, dropout=0.5)
    with torch.no_grad():
        tiny.query.adapter.B.normal_()
    ids = torch.randint(0, 50, (4, 7))
    tiny.eval()
    assert torch.equal(tiny(ids), tiny(ids))
    tiny.train()
    assert not torch.equal(tiny(ids), tiny(ids))


def test_rslora_recipe_scaling(tiny):
    geopeft.adapt(tiny, "rslora", targets=["query"], rank=4, alpha=8)
    assert tiny.query.adapter.scaling == pytest.approx(8 / 2)


def test_disable_adapters_gives_base_outputs(tiny):
    ids = torch.randint(0, 50, (4, 7))
    base = tiny(ids)
    geopeft.adapt(tiny, "lora", targets="all-linear", rank=4)
    with torch.no_grad():
        for _, a in geopeft.adapters(tiny):
            a.B.normal_()
    adapted = tiny(ids)
    assert not torch.allclose(adapted, base)
    with geopeft.disable_adapters(tiny):
        assert torch.equal(tiny(ids), base)
    assert torch.equal(tiny(ids), adapted)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding"])
def test_base_weight_is_the_matrix_view_that_delta_layout_inverts(kind):
    """Initialisers (SVD of W) read base_weight() as (m, n); to_weight_layout maps back."""
    torch.manual_seed(0)
    layer, _ = _layer(kind, 6, 5, torch.float32)
    model = Holder(layer)
    geopeft.adapt(model, "lora", targets=["layer"], rank=2)
    (_, adapter), = geopeft.adapters(model)
    w = adapter.base_weight()
    assert tuple(w.shape) == adapter.shape == (adapter.B.shape[0], adapter.A.shape[1])
    assert torch.equal(adapter.ops.to_weight_layout(w, layer), layer.weight)
