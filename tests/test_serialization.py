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
    factor_dtype = torch.float32 if dtype == torch.bfloat16 else dtype  # fp32 factors on a half base
    for (_, a), (_, b) in zip(geopeft.adapters(model), geopeft.adapters(loaded)):
        assert a.scaling == b.scaling and a.A.dtype == b.A.dtype == factor_dtype
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
                                         "dtype": "float32", "scaling": 4.0}  # 8 / √4
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


# --------------------------------------------------------------------------- atomic files
def _trained(seed: int, **adapt_kw) -> tuple[TinyNet, TinyNet]:
    """(adapted model with factors drawn from `seed`, a fresh copy of its base); the base
    is the same for every seed."""
    torch.manual_seed(0)
    base = TinyNet()
    fresh = copy.deepcopy(base)
    geopeft.adapt(base, "lora", targets=["query", "value"], rank=2, trainable=["classifier"], **adapt_kw)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, a in geopeft.adapters(base):
            a.A.normal_()
            a.B.normal_()
    return base.eval(), fresh


def _out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def _siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_a_save_that_fails_between_its_files_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    """The old code wrote the weights, then the config: a failure in between left new weights
    beside the old config, which loaded silently as neither model."""
    from geopeft import atomic

    old, fresh = _trained(0)
    new, _ = _trained(1)
    out = tmp_path / "ckpt"
    geopeft.save(old, out)
    real = atomic._write_file
    written = []

    def fail_second(path, data):
        if written:
            raise OSError("disk full")
        written.append(path)
        real(path, data)

    monkeypatch.setattr(atomic, "_write_file", fail_second)
    with pytest.raises(OSError, match="disk full"):
        geopeft.save(new, out)
    monkeypatch.undo()
    assert torch.equal(_out(geopeft.load(fresh, out)), _out(old))
    assert _siblings(out) == []  # the partial directory is gone


_CRASH = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from geopeft import atomic
import geopeft
from helpers import TinyNet
torch.manual_seed(1)
model = geopeft.adapt(TinyNet(), "lora", targets=["query", "value"], rank=2, trainable=["classifier"])
real = atomic._write_file
def crash_after_first(path, data):
    real(path, data)
    os._exit(3)  # killed mid-save: no cleanup runs
atomic._write_file = crash_after_first
geopeft.save(model, {out!r})
"""


def test_a_killed_save_keeps_the_old_checkpoint_and_the_next_save_cleans_up(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    old, fresh = _trained(0)
    out = tmp_path / "ckpt"
    geopeft.save(old, out)
    script = _CRASH.format(tests=str(Path(__file__).parent), out=str(out))
    assert subprocess.run([sys.executable, "-c", script]).returncode == 3
    leftovers = _siblings(out)
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.geopeft-new-")
    assert torch.equal(_out(geopeft.load(copy.deepcopy(fresh), out)), _out(old))
    new, _ = _trained(1)
    geopeft.save(new, out)
    assert _siblings(out) == []
    assert torch.equal(_out(geopeft.load(fresh, out)), _out(new))


def test_a_reader_never_pairs_old_and_new_files(tmp_path, monkeypatch):
    """A save that replaces the directory between the reader's two file reads: the reader
    gets one whole checkpoint (here: the new one), never the old config with new weights."""
    from geopeft import atomic

    old, fresh = _trained(0)
    new, _ = _trained(1)
    new.value.adapter.resize(3)  # a different layout too, so a mix could not even load
    out = tmp_path / "ckpt"
    geopeft.save(old, out)
    real = atomic._read_or_none
    saved = []

    def save_between_reads(name, dir_fd=None):
        data = real(name, dir_fd)
        if not saved:
            saved.append(True)
            geopeft.save(new, out)
        return data

    monkeypatch.setattr(atomic, "_read_or_none", save_between_reads)
    loaded = geopeft.load(fresh, out)
    assert saved and torch.equal(_out(loaded), _out(new))
    assert loaded.value.adapter.rank == 3


def test_saved_files_get_normal_permissions_and_other_files_stay(tmp_path):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    model, _ = _trained(0)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    geopeft.save(model, out)
    geopeft.save(model, out)  # replacing a checkpoint keeps the user's files too
    for name in ("adapter.safetensors", "geopeft.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name
    assert (out / "metrics.json").read_text() == "{}"
    export = geopeft.export_peft(model, tmp_path / "peft")
    assert stat.S_IMODE((export / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~umask


def test_saving_into_a_file_is_refused_and_writes_nothing(tmp_path):
    model, _ = _trained(0)
    target = tmp_path / "model.bin"
    target.write_bytes(b"precious")
    with pytest.raises(geopeft.CheckpointError, match="is a file, not a directory"):
        geopeft.save(model, target)
    assert target.read_bytes() == b"precious" and _siblings(target) == []


@pytest.mark.parametrize("base_dtype, dtype", [(torch.bfloat16, torch.float32),
                                               (torch.float32, torch.float64)])
def test_a_dtype_option_saves_and_loads(tmp_path, base_dtype, dtype):
    """adapt(..., dtype=torch.float32) used to fail in json.dumps, after the weights were written."""
    torch.manual_seed(0)
    base = TinyNet().to(base_dtype)
    fresh = copy.deepcopy(base)
    geopeft.adapt(base, "lora", targets=["query"], rank=2, dtype=dtype)
    with torch.no_grad():
        base.query.adapter.B.normal_()
    geopeft.save(base, tmp_path / "ckpt")
    options = json.loads((tmp_path / "ckpt" / "geopeft.json").read_text())["recipe"]["adapter"]["options"]
    assert options["dtype"] == {"torch.dtype": str(dtype).removeprefix("torch.")}
    loaded = geopeft.load(fresh, tmp_path / "ckpt")
    assert loaded.query.adapter.A.dtype == dtype
    assert loaded.geopeft_state.resolved.adapter_options["dtype"] is dtype
    assert torch.equal(_out(loaded), _out(base))


def test_an_option_json_cannot_hold_is_refused_before_writing(tmp_path):
    from geopeft.recipes import options_to_json

    with pytest.raises(geopeft.ConfigError, match=r"option 'scale' of adapter 'x' is a Tensor"):
        options_to_json({"scale": torch.ones(2)}, "adapter 'x'")
    with pytest.raises(geopeft.ConfigError, match="option 'tol' of .* nan"):
        options_to_json({"tol": float("nan")}, "manifold 'y'")
    model, _ = _trained(0)
    model.geopeft_state.resolved.adapter_options["hook"] = print  # e.g. set by hand
    with pytest.raises(geopeft.ConfigError, match="option 'hook' of adapter 'lora'"):
        geopeft.save(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- hostile files
def _edit(cfg: dict, path: str, value) -> None:
    """cfg at dotted `path` ← value (value `...`: delete it)."""
    *parents, last = path.split(".")
    for key in parents:
        cfg = cfg[int(key)] if isinstance(cfg, list) else cfg[key]
    if value is ...:
        del cfg[last]
    else:
        cfg[last] = value


HOSTILE = [
    ("rank", "8"), ("rank", True), ("rank", 0), ("alpha", -1.0), ("alpha", "16"),
    ("versions", "torch 2"), ("trainable", "classifier"), ("trainable", [3]), ("format_version", True),
    ("format_version", 0), ("layers", []), ("layers", {}), ("layers.query", 5), ("layers.query.rank", 2.5),
    ("layers.query.rank", ...), ("layers.query.kind", "lstm"), ("layers.query.shape", [16]),
    ("layers.query.shape", ["16", 16]), ("layers.query.dtype", "int8"), ("layers.query.dtype", None),
    ("layers.query.weight_shape", [16, 17]), ("layers.query.weight_shape", [16, 16, 1, 1]),
    ("layers.query.scaling", 0.0), ("layers.query.scaling", "2"), ("base_model", "bert"),
    ("base_model.task_type", 5),
    ("recipe", "lora"), ("recipe.method", ...), ("recipe.adapter", "lora"), ("recipe.adapter.name", 5),
    ("recipe.adapter.options", []), ("recipe.manifolds", ["A"]), ("recipe.manifolds.A", "euclidean"),
    ("recipe.manifolds.A.name", ""), ("recipe.transforms", {}), ("recipe.transforms", [7]),
    ("recipe.rank_controller", None), ("recipe.initializer.name", ["lora"]),
    ("recipe.riemannian_grad", "yes"), ("recipe.project_every", 0), ("recipe.moments", "bogus"),
]


def _load_with_field(directory, path: str, value):
    """Save a trained model, set the dotted `path` of its geopeft.json to `value`, and load it
    onto a fresh base, which must raise CheckpointError: (the fresh model, the raises info)."""
    model, fresh = _trained(0)
    geopeft.save(model, directory)
    cfg = json.loads((directory / "geopeft.json").read_text())
    _edit(cfg, path, value)
    (directory / "geopeft.json").write_text(json.dumps(cfg))
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(fresh, directory)
    return fresh, info


@pytest.mark.parametrize("path, value", HOSTILE, ids=[f"{p}={v!r}" for p, v in HOSTILE])
def test_every_malformed_field_is_a_checkpoint_error_naming_file_and_field(tmp_path, path, value):
    fresh, info = _load_with_field(tmp_path, path, value)
    msg = str(info.value)
    assert "geopeft.json" in msg and f"'{path}" in msg and "expected" in msg, msg
    assert geopeft.adapters(fresh) == []


@pytest.mark.parametrize("path, value, fragment", [
    ("recipe.adapter.options.alpha", -3.0, "alpha must be a positive finite number"),
    ("recipe.adapter.options.dropout", 2.0, "dropout must be in [0, 1)"),
    ("recipe.adapter.options.bogus", 1, "bogus"),
    ("recipe.adapter.options.dtype", {"torch.dtype": "qint8"}, "qint8"),
    ("recipe.manifolds.A.options", {"retraction": "polar"}, "retraction"),
    ("layers.query.rank", 99, "rank 99 is larger than layer 'query' allows"),
])
def test_component_options_from_a_file_are_checked_too(tmp_path, path, value, fragment):
    _, info = _load_with_field(tmp_path, path, value)
    assert "geopeft.json" in str(info.value) and fragment in str(info.value)


@pytest.mark.parametrize("text", ['{"format": "geopeft-adapter", "alpha": NaN}', "[" * 100_000])
def test_json_constants_and_deep_nesting_are_refused(tmp_path, text):
    model, fresh = _trained(0)
    geopeft.save(model, tmp_path)
    (tmp_path / "geopeft.json").write_text(text)
    with pytest.raises(geopeft.CheckpointError, match="is not valid JSON"):
        geopeft.load(fresh, tmp_path)


@pytest.mark.parametrize("key", ["adapters.query.B", "trainable.classifier.weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_saved_tensors_are_refused(tmp_path, key, bad):
    model, fresh = _trained(0)
    geopeft.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    tensors[key][0, 1] = bad
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(fresh, tmp_path)
    assert f"{key!r} holds 1 NaN or Inf" in str(info.value)
    assert geopeft.adapters(fresh) == []


def test_a_saved_shape_the_model_lacks_names_saved_and_model_shapes_rightly(tmp_path):
    model, fresh = _trained(0)
    geopeft.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    tensors["adapters.query.A"] = torch.zeros(3, 16)
    tensors["trainable.classifier.weight"] = torch.zeros(4, 16)
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(copy.deepcopy(fresh), tmp_path)
    assert ("the saved tensor 'adapters.query.A' is torch.float32 (3, 16), but factor A of the "
            "adapter on layer 'query' (linear 16x16, rank 2 in geopeft.json) is torch.float32 (2, 16)"
            ) in str(info.value)
    tensors["adapters.query.A"] = torch.zeros(2, 16)
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(fresh, tmp_path)
    assert ("the saved tensor 'trainable.classifier.weight' is torch.float32 (4, 16), but the "
            "model's parameter 'classifier.weight' is torch.float32 (3, 16)") in str(info.value)


def test_a_conv_kernel_of_another_shape_with_the_same_matrix_view_is_refused(tmp_path):
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3))  # matrix view 8 x 36
    geopeft.adapt(conv, "lora", targets=["0"], rank=2)
    geopeft.save(conv, tmp_path)
    other = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 6))  # 8 x 36 too
    with pytest.raises(geopeft.CheckpointError) as info:
        geopeft.load(other, tmp_path)
    assert "(8, 4, 3, 3) but this model's is (8, 1, 6, 6)" in str(info.value)


# --------------------------------------------------------------------------- meta device
def test_models_on_the_meta_device(tmp_path):
    """Factors live where the base weight does (meta too); adapt and load refuse a meta base
    with a message (their factors would hold no values); export without a base model,
    which rebuilds on meta stand-ins, still gets the saved values."""
    from geopeft.layers import stub_layer
    from geopeft.plugins.lora.adapter import LoRAAdapter

    adapter = LoRAAdapter(stub_layer("linear", [16, 8]), rank=2)
    assert adapter.A.is_meta and adapter.B.is_meta
    meta = TinyNet().to("meta")
    with pytest.raises(geopeft.ConfigError, match="on the meta device .* materialise the model first"):
        geopeft.adapt(meta, "lora", targets=["query"], rank=2)
    assert geopeft.adapters(meta) == [] and all(p.requires_grad for p in meta.parameters())
    model, _ = _trained(0)
    geopeft.save(model, tmp_path / "ckpt")
    with pytest.raises(geopeft.CheckpointError, match="layer 'query' of the model is on the meta device"):
        geopeft.load(meta, tmp_path / "ckpt")
    assert geopeft.adapters(meta) == []
    from geopeft.export import export_saved

    export_saved(tmp_path / "ckpt", tmp_path / "peft")
    exported = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert torch.equal(exported["base_model.model.query.lora_B.weight"], model.query.adapter.B)


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
