"""import_peft: a PEFT LoRA directory becomes a geopeft recipe with the same function."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

import geopeft
from geopeft.geometry import max_violation
from geopeft.model import find_state, project_onto_manifolds
from geopeft.peft_import import thin_svd_of_product

from helpers import TinyNet

#: TinyNet declares no hidden size; StelLA's step scaling needs one
OPTIONS = {"stella": {"hidden_size": 16}}


def peft_model(seed: int = 0):
    """(fresh base, PEFT model) on TinyNet: an embedding, two linears with per-layer rank and
    alpha, a trained head; nonzero B so that ΔW ≠ 0."""
    torch.manual_seed(seed)
    base = TinyNet()
    fresh = copy.deepcopy(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed", "query", "ffn.2"],
                             modules_to_save=["classifier"], rank_pattern={"ffn.2": 2},
                             alpha_pattern={"query": 3})
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.normal_()
    return fresh, model.eval()


@pytest.mark.parametrize("method", ["lora", "stella", "balora", "pissa"])
def test_peft_directory_imports_with_equal_outputs(tmp_path, method):
    fresh, pm = peft_model()
    pm.save_pretrained(tmp_path)
    base_out = copy.deepcopy(fresh)(torch.zeros(1, 3, dtype=torch.long))
    model = geopeft.import_peft(fresh, tmp_path, method=method, **OPTIONS.get(method, {})).eval()
    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = pm(ids)
        got = model(ids)
    assert not torch.allclose(model(torch.zeros(1, 3, dtype=torch.long)), base_out)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()
    ranks = {n: a.rank for n, a in geopeft.adapters(model)}
    assert ranks == {"embed": 4, "query": 4, "ffn.2": 2}
    assert max_violation([a for _, a in geopeft.adapters(model)]) <= 1e-5  # on the manifolds
    # pissa's initializer shifts W; PEFT's factors update the original W, which comes back exactly
    assert torch.equal(model.query.base_layer.weight, pm.base_model.model.query.base_layer.weight)
    if method == "lora":  # the factors themselves, where the scalings agree
        assert torch.equal(model.embed.adapter.A, pm.base_model.model.embed.lora_embedding_A["default"])
    assert torch.equal(model.classifier.weight,
                       pm.base_model.model.classifier.modules_to_save["default"].weight)
    assert find_state(model).trainable == ["classifier"] and model.classifier.weight.requires_grad


@pytest.mark.parametrize("method", ["lora", "stella"])
def test_geopeft_peft_geopeft_round_trip(tmp_path, method):
    """geopeft → export_peft → PEFT loads it → save_pretrained → import_peft → same outputs."""
    torch.manual_seed(0)
    base = TinyNet()
    fresh, fresh2 = copy.deepcopy(base), copy.deepcopy(base)
    model = geopeft.adapt(base, method, targets=["query", "value", "ffn.0"], rank=3, alpha=6,
                          ranks={"ffn.0": 2}, trainable=["classifier"], **OPTIONS.get(method, {}))
    with torch.no_grad():
        for _, a in geopeft.adapters(model):
            for p in a.factors().values():
                p.add_(torch.randn_like(p))
    project_onto_manifolds([a for _, a in geopeft.adapters(model)])
    geopeft.export_peft(model, tmp_path / "export")
    pm = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "export")).eval()
    pm.save_pretrained(tmp_path / "peft")
    back = geopeft.import_peft(fresh2, tmp_path / "peft", method=method,
                              **OPTIONS.get(method, {})).eval()
    ids = torch.randint(0, 50, (4, 7))
    with torch.no_grad():
        ref = model.eval()(ids)
        assert torch.allclose(pm(ids), ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose(back(ids), ref, rtol=1e-5, atol=1e-5)
    assert {n: a.rank for n, a in geopeft.adapters(back)} == {"query": 3, "value": 3, "ffn.0": 2}


def test_thin_svd_of_product_is_exact_and_orthonormal():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(9, 3, generator=g), torch.randn(3, 7, generator=g)
    u, s, v = thin_svd_of_product(b, a)
    assert torch.allclose(u @ torch.diag(s) @ v.mT, (b @ a).double(), atol=1e-12)
    for q in (u, v):
        assert torch.allclose(q.mT @ q, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.all(s[:-1] >= s[1:])


def test_rslora_and_dropout_are_carried(tmp_path):
    torch.manual_seed(0)
    base = TinyNet()
    fresh = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"],
                                                   use_rslora=True, lora_dropout=0.1))
    pm.save_pretrained(tmp_path)
    model = geopeft.import_peft(fresh, tmp_path)
    adapter = model.query.adapter
    assert adapter.rslora and adapter.scaling == pytest.approx(8 / 2) and adapter.dropout_p == 0.1


def test_refuses_what_no_recipe_expresses(tmp_path):
    fresh, pm = peft_model()
    pm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(geopeft.CheckpointError, match="DoRA"):
        geopeft.import_peft(fresh, tmp_path)
    assert find_state(fresh) is None  # checked before the model changed
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(geopeft.CheckpointError, match="not have"):
        geopeft.import_peft(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path)
    with pytest.raises(geopeft.CheckpointError, match="not a PEFT adapter directory"):
        geopeft.import_peft(fresh, tmp_path / "nowhere")


@pytest.mark.parametrize("method", sorted(geopeft.components()["method"]))
def test_every_method_exports_exactly_and_imports_back(tmp_path, method):
    """For every registered method: geopeft → export_peft → PEFT equal, and → import_peft
    into the same method equal (data-driven initializers get two calibration batches)."""
    from geopeft.recipes import resolve

    torch.manual_seed(0)
    base = TinyNet()
    base.embed_dim = 16  # the hidden size, as timm declares it: context for StelLA-like methods
    fresh, fresh2 = copy.deepcopy(base), copy.deepcopy(base)
    ids = torch.randint(0, 50, (4, 7))
    data = {}
    if resolve(method, context={"hidden_size": 16}).initializer.needs_data:
        data = {"init_batches": [ids, ids.flip(0)], "loss_fn": lambda m, batch: m(batch).pow(2).mean()}
    model = geopeft.adapt(base, method, targets=["query", "value", "ffn.0"], rank=3, **data)
    with torch.no_grad():
        for _, a in geopeft.adapters(model):
            for p in a.factors().values():
                p.add_(0.1 * torch.randn_like(p))
    project_onto_manifolds([a for _, a in geopeft.adapters(model)])
    geopeft.export_peft(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    back = geopeft.import_peft(fresh2, tmp_path, method="lora").eval()
    with torch.no_grad():
        ref = model.eval()(ids)
        assert torch.allclose(pm(ids), ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose(back(ids), ref, rtol=1e-5, atol=1e-5)
