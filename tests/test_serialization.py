"""save → load reproduces outputs exactly; what is saved is what comes back."""

from __future__ import annotations

import copy
import json

import torch
from hypothesis import given
from hypothesis import strategies as st

import geopeft

from helpers import TinyNet


@given(rank=st.integers(1, 8), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       targets=st.sampled_from([["query", "value"], "all-linear", ["embed", "ffn.0"]]),
       method=st.sampled_from(["lora", "rslora"]), seed=st.integers(0, 2**16))
def test_save_load_gives_identical_outputs(tmp_path_factory, rank, dtype, targets, method, seed):
    torch.manual_seed(seed)
    base = TinyNet().to(dtype)
    fresh = copy.deepcopy(base)
    model = geopeft.adapt(base, method, targets=targets, rank=rank, alpha=3.0,
                          trainable=["classifier"])
    with torch.no_grad():
        for _, a in geopeft.adapters(model):
            a.A.normal_()
            a.B.normal_()
        model.classifier.weight.add_(1.0)  # a trained head is saved too
    ids = torch.randint(0, 50, (5, 9))
    out = tmp_path_factory.mktemp("adapter")
    geopeft.save(model, out)
    loaded = geopeft.load(fresh, out)
    model.eval()
    loaded.eval()
    assert torch.equal(loaded(ids), model(ids))
    assert [(n, a.rank) for n, a in geopeft.adapters(loaded)] == [
        (n, a.rank) for n, a in geopeft.adapters(model)]
    for (_, a), (_, b) in zip(geopeft.adapters(model), geopeft.adapters(loaded)):
        assert a.scaling == b.scaling and a.A.dtype == b.A.dtype == dtype
    # trainability is restored: the loaded model continues training like the saved one
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}


def test_saved_config_records_recipe_ranks_and_versions(tiny, tmp_path):
    geopeft.adapt(tiny, "rslora", targets=["query", "embed"], rank=4, alpha=8, dropout=0.1)
    geopeft.save(tiny, tmp_path)
    config = json.loads((tmp_path / "geopeft.json").read_text())
    assert config["format"] == "geopeft-adapter" and config["format_version"] == 1
    assert config["versions"]["torch"] == torch.__version__
    assert config["recipe"]["method"] == "rslora"
    assert config["recipe"]["adapter"] == {"name": "lora", "options": {
        "alpha": 8, "rslora": True, "dropout": 0.1}}
    assert config["layers"]["query"] == {"rank": 4, "kind": "linear", "shape": [16, 16],
                                         "weight_shape": [16, 16],
                                         "dtype": "float32"}
    assert config["layers"]["embed"]["kind"] == "embedding"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "geopeft.json"]


def test_save_of_merged_model_saves_factors_and_load_is_unmerged(tiny, tmp_path):
    fresh = copy.deepcopy(tiny)
    geopeft.adapt(tiny, "lora", targets=["query"], rank=4)
    with torch.no_grad():
        tiny.query.adapter.B.normal_()
    ids = torch.randint(0, 50, (3, 5))
    expected = tiny(ids)
    geopeft.merge(tiny)
    geopeft.save(tiny, tmp_path)
    loaded = geopeft.load(fresh, tmp_path)
    assert not loaded.query.merged
    assert torch.allclose(loaded(ids), expected, atol=1e-6)
