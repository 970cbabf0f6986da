"""Checkpoints: save → load reproduces outputs exactly, what is saved is what comes back, and
a damaged, truncated or foreign checkpoint is refused with a message that names the problem."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import geopeft

from helpers import TinyNet, module_types, requires_grad_map

IDS = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(1))


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


# --------------------------------------------------------------------------- checkpoints
def _adapted(model: nn.Module) -> nn.Module:
    geopeft.adapt(model, "lora", targets=["query", "value"], rank=2, trainable=["classifier"])
    with torch.no_grad():  # make the adapters matter for the output
        for _, adapter in geopeft.adapters(model):
            adapter.B.normal_()
    return model


@pytest.fixture
def saved(tiny, tmp_path) -> tuple[Path, torch.Tensor]:
    """A saved adapter directory and the adapted model's output on IDS."""
    model = _adapted(tiny)
    directory = tmp_path / "adapter"
    geopeft.save(model, directory)
    with torch.no_grad():
        return directory, model(IDS)


@pytest.fixture
def fresh(tiny):
    """Build a fresh base model like `tiny` (same class, same seed): fresh(**kwargs)."""
    cls = type(tiny)

    def make(**kwargs) -> nn.Module:
        torch.manual_seed(0)
        return cls(**kwargs)

    return make


def _rewrite_config(directory: Path, **changes) -> None:
    cfg = json.loads((directory / "geopeft.json").read_text())
    cfg.update(changes)
    (directory / "geopeft.json").write_text(json.dumps(cfg))


def test_save_load_round_trip_is_exact(saved, fresh):
    directory, expected = saved
    model = geopeft.load(fresh(), directory)
    assert [n for n, _ in geopeft.adapters(model)] == ["query", "value"]
    with torch.no_grad():
        assert torch.equal(model(IDS), expected)


def test_load_never_unpickles(saved, monkeypatch, fresh):
    directory, expected = saved

    def refuse(*args, **kwargs):
        raise AssertionError("geopeft.load unpickled something")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)
    model = geopeft.load(fresh(), directory)
    with torch.no_grad():
        assert torch.equal(model(IDS), expected)


def test_load_from_a_missing_directory(tmp_path, fresh):
    with pytest.raises(geopeft.CheckpointError, match="is not a directory"):
        geopeft.load(fresh(), tmp_path / "does-not-exist")


def test_load_from_a_directory_without_geopeft_json(tmp_path, fresh):
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(fresh(), tmp_path)
    assert "not a geopeft adapter directory" in str(info.value)
    assert "geopeft.json" in str(info.value)


def test_load_from_a_peft_directory(tmp_path, fresh):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(fresh(), tmp_path)
    msg = str(info.value)
    assert "PEFT adapter directory" in msg and "PeftModel.from_pretrained" in msg


def test_truncated_safetensors(saved, fresh):
    directory, _ = saved
    weights = directory / "adapter.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    model = fresh()
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(model, directory)
    assert "truncated or not a safetensors file" in str(info.value)
    assert "adapter.safetensors" in str(info.value)
    assert geopeft.adapters(model) == []


def test_missing_safetensors(saved, fresh):
    directory, _ = saved
    (directory / "adapter.safetensors").unlink()
    with pytest.raises(geopeft.CheckpointError, match="adapter.safetensors is missing"):
        geopeft.load(fresh(), directory)


def test_foreign_format(saved, fresh):
    directory, _ = saved
    _rewrite_config(directory, format="something-else")
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(fresh(), directory)
    msg = str(info.value)
    assert "not a geopeft adapter config" in msg and "'something-else'" in msg
    assert "'geopeft-adapter'" in msg


def test_newer_format_version(saved, fresh):
    directory, _ = saved
    _rewrite_config(directory, format_version=99)
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(fresh(), directory)
    assert "format version 99" in str(info.value) and "upgrade geopeft" in str(info.value)


@pytest.mark.parametrize("text", ['{"format": "geopeft-adapter", ', "\xff\xfe not json", ""])
def test_invalid_json(saved, text, fresh):
    directory, _ = saved
    (directory / "geopeft.json").write_text(text, encoding="latin-1")
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(fresh(), directory)
    assert "is not valid JSON" in str(info.value)


def test_json_that_is_not_an_object(saved, fresh):
    directory, _ = saved
    (directory / "geopeft.json").write_text("[1, 2, 3]")
    with pytest.raises(geopeft.CheckpointError, match="not a geopeft adapter config"):
        geopeft.load(fresh(), directory)


@pytest.mark.parametrize("key", ["recipe", "layers", "rank"])
def test_config_lacking_an_entry(saved, key, fresh):
    directory, _ = saved
    cfg = json.loads((directory / "geopeft.json").read_text())
    del cfg[key]
    (directory / "geopeft.json").write_text(json.dumps(cfg))
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(fresh(), directory)
    assert f"lacks the {key!r} entry" in str(info.value)


def _resave_weights(directory: Path, change) -> None:
    path = directory / "adapter.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "geopeft-adapter"})


@pytest.mark.parametrize("edit_weights, fragments", [
    (lambda t: t.pop("adapters.value.B"), ["lacks 1 tensor(s)", "adapters.value.B"]),
    (lambda t: t.__setitem__("adapters.ffn.0.A", torch.zeros(2, 16)),
     ["does not describe", "adapters.ffn.0.A"]),
    (lambda t: t.__setitem__("adapters.query.A", torch.zeros(3, 16)),
     ["'adapters.query.A'", "(3, 16)", "(2, 16)"]),
], ids=["missing-tensor", "extra-tensor", "wrong-shape"])
def test_safetensors_that_do_not_match_the_config(saved, fresh, edit_weights, fragments):
    directory, _ = saved
    _resave_weights(directory, edit_weights)
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(fresh(), directory)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_failed_load_leaves_the_model_untouched(saved, fresh):
    """A checkpoint error found after the adapters were built (here: a missing tensor)
    must not leave a half-adapted model behind: a retry with a good directory must work."""
    directory, expected = saved
    broken = directory.parent / "broken"
    broken.mkdir()
    for name in ("geopeft.json", "adapter.safetensors"):
        (broken / name).write_bytes((directory / name).read_bytes())
    _resave_weights(broken, lambda t: t.pop("adapters.value.B"))

    model = fresh()
    before_grad, before_types = requires_grad_map(model), module_types(model)
    with pytest.raises(geopeft.CheckpointError, match="lacks"):
        geopeft.load(model, broken)
    assert geopeft.adapters(model) == []
    assert module_types(model) == before_types
    assert requires_grad_map(model) == before_grad
    geopeft.load(model, directory)
    with torch.no_grad():
        assert torch.equal(model(IDS), expected)


def test_load_onto_a_model_lacking_a_saved_layer(saved):
    directory, _ = saved
    other = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16))
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(other, directory)
    msg = str(info.value)
    assert "layer 'query'" in msg and "not in this model" in msg
    assert geopeft.adapters(other) == []


def test_load_onto_a_model_with_a_different_shape(saved, fresh):
    directory, _ = saved
    other = fresh(dim=8)
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(other, directory)
    msg = str(info.value)
    assert "layer 'query'" in msg and "linear 16x16" in msg and "linear 8x8" in msg
    assert geopeft.adapters(other) == []


def test_load_onto_a_model_with_a_different_layer_kind(saved, fresh):
    directory, _ = saved
    model = fresh()
    model.value = nn.Embedding(16, 16)  # same 16x16 matrix view, different kind
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(model, directory)
    msg = str(info.value)
    assert "layer 'value'" in msg and "saved as linear" in msg and "embedding" in msg


def test_load_onto_an_unsupported_layer(saved, fresh):
    directory, _ = saved
    model = fresh()
    model.query = nn.LayerNorm(16)
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(model, directory)
    assert "layer 'query'" in str(info.value) and "LayerNorm" in str(info.value)


def test_load_into_an_adapted_model(saved, fresh):
    directory, _ = saved
    model = geopeft.adapt(fresh(), "lora", targets=["query"], rank=2)
    with pytest.raises(geopeft.GeopeftError) as info:
        geopeft.load(model, directory)
    assert "already has geopeft adapters" in str(info.value)
    assert [n for n, _ in geopeft.adapters(model)] == ["query"]


def test_load_needing_an_unavailable_component(saved, fresh):
    directory, _ = saved
    cfg = json.loads((directory / "geopeft.json").read_text())
    cfg["recipe"]["manifolds"]["A"]["name"] = "stiefell"
    (directory / "geopeft.json").write_text(json.dumps(cfg))
    with pytest.raises(geopeft.UnknownComponentError, match="unknown manifold 'stiefell'"):
        geopeft.load(fresh(), directory)


def test_save_and_merge_need_adapters(tiny, tmp_path):
    with pytest.raises(geopeft.GeopeftError, match="nothing to save"):
        geopeft.save(tiny, tmp_path / "out")
    assert not (tmp_path / "out" / "geopeft.json").exists()
    with pytest.raises(geopeft.GeopeftError, match="geopeft.adapt"):
        geopeft.merge(tiny)
    with pytest.raises(geopeft.GeopeftError, match="geopeft.adapt"):
        geopeft.unmerge(tiny)


# --------------------------------------------------------------------------- components from user code
def _user_oblique() -> type[geopeft.Manifold]:
    """A manifold class defined in test code (not registered anywhere): unit-norm rows."""
    from geopeft_example_plugin import ObliqueManifold

    class UnitRows(ObliqueManifold):
        pass

    return UnitRows


def test_save_refuses_an_unregistered_component_and_writes_nothing(tiny, tmp_path):
    cls = _user_oblique()
    geopeft.adapt(tiny, "lora", targets=["query"], rank=2, manifold={"A": cls()})
    with pytest.raises(geopeft.ConfigError) as info:
        geopeft.save(tiny, tmp_path / "out")
    msg = str(info.value)
    assert "manifold UnitRows" in msg and "not registered" in msg
    assert "geopeft.register('manifold', 'unitrows', " in msg and "Nothing was written" in msg
    assert not (tmp_path / "out").exists()


def test_registered_user_component_saves_by_name_and_loads_only_through_the_registry(tiny, tmp_path):
    cls = _user_oblique()
    geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=2, manifold={"A": cls})
    x = torch.randint(0, 50, (3, 5))
    expected = tiny(x)
    geopeft.register("manifold", "unit_rows", cls)  # after adapt: save still finds the name
    try:
        geopeft.save(tiny, tmp_path)
        saved = json.loads((tmp_path / "geopeft.json").read_text())["recipe"]["manifolds"]
        assert saved["A"]["name"] == "unit_rows" and saved["B"]["name"] == "euclidean"
        loaded = geopeft.load(_fresh_tiny(), tmp_path)
        assert torch.equal(loaded(x), expected)
        assert type(loaded.query.adapter.factor_manifolds()["A"]) is cls
    finally:
        geopeft.unregister("manifold", "unit_rows")
    # no longer registered: load does not look for the class anywhere else
    with pytest.raises(geopeft.UnknownComponentError, match="unknown manifold 'unit_rows'"):
        geopeft.load(_fresh_tiny(), tmp_path)


def _fresh_tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()
