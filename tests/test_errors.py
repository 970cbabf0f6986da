"""Every bad-input path produces its message: targets, ranks, options, the optimizer,
non-finite gradients and damaged or foreign checkpoints."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import geopeft

IDS = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(1))


def _requires_grad(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _module_types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.query(x))


class WithGroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, groups=2)
        self.proj = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.proj(self.conv(x))


# --------------------------------------------------------------------------- targets
def test_targets_matching_nothing_lists_similar_and_adaptable_names(tiny):
    before = _requires_grad(tiny)
    with pytest.raises(geopeft.TargetError) as info:
        geopeft.adapt(tiny, "lora", targets=["qurey"])
    msg = str(info.value)
    assert "['qurey'] matched no adaptable layer" in msg
    assert "Similar names: query" in msg
    adaptable = msg.split("Adaptable layer names in this model:", 1)[1]
    for name in ("query", "value", "classifier", "embed"):
        assert name in adaptable
    assert "Presets:" in msg and "all-linear" in msg
    assert geopeft.adapters(tiny) == [] and _requires_grad(tiny) == before


def test_regex_matching_nothing_is_a_target_error(tiny):
    with pytest.raises(geopeft.TargetError, match="matched no adaptable layer"):
        geopeft.adapt(tiny, "lora", targets=r"encoder\..*")


def test_targets_none_mentions_presets(tiny):
    with pytest.raises(geopeft.TargetError) as info:
        geopeft.adapt(tiny, "lora")
    msg = str(info.value)
    assert "targets=" in msg and "preset" in msg
    for preset in ("all-linear", "attention"):
        assert preset in msg


@pytest.mark.parametrize("targets", [["norm"], ["query", "norm"]])
def test_targeting_an_unsupported_layer_says_why(targets):
    model = WithNorm()
    before = _requires_grad(model)
    with pytest.raises(geopeft.TargetError) as info:
        geopeft.adapt(model, "lora", targets=targets, rank=2)
    msg = str(info.value)
    assert "'norm'" in msg and "cannot be adapted" in msg
    assert "LayerNorm is not a supported layer type" in msg
    assert "nn.Linear" in msg  # what is supported
    assert geopeft.adapters(model) == [] and _requires_grad(model) == before


def test_targeting_a_grouped_conv_says_why():
    model = WithGroupedConv()
    with pytest.raises(geopeft.TargetError) as info:
        geopeft.adapt(model, "lora", targets=["conv"], rank=2)
    msg = str(info.value)
    assert "'conv'" in msg and "grouped convolutions (groups=2) are not supported" in msg
    # the ungrouped one is fine
    geopeft.adapt(model, "lora", targets=["proj"], rank=2)
    assert [n for n, _ in geopeft.adapters(model)] == ["proj"]


def test_regex_over_an_unsupported_layer_only_adapts_supported_ones():
    model = WithNorm()
    geopeft.adapt(model, "lora", targets=r"query|norm", rank=2)
    assert [n for n, _ in geopeft.adapters(model)] == ["query"]


# --------------------------------------------------------------------------- rank
@pytest.mark.parametrize("target, rank, shape, max_rank", [
    ("query", 17, "16x16", 16),
    ("classifier", 4, "3x16", 3),
])
def test_rank_larger_than_the_layer_allows(tiny, target, rank, shape, max_rank):
    with pytest.raises(geopeft.ConfigError) as info:
        geopeft.adapt(tiny, "lora", targets=[target], rank=rank)
    msg = str(info.value)
    assert f"rank {rank}" in msg
    assert f"layer {target!r}" in msg
    assert shape in msg
    assert f"rank <= {max_rank}" in msg


def test_rank_error_leaves_the_model_untouched(tiny):
    """`query` (16x16) accepts rank 4 but `classifier` (3x16) does not: the failed adapt
    must not leave `query` wrapped and the base frozen, so that a retry works."""
    before_grad, before_types = _requires_grad(tiny), _module_types(tiny)
    with pytest.raises(geopeft.ConfigError, match="'classifier'"):
        geopeft.adapt(tiny, "lora", targets=["query", "classifier"], rank=4)
    assert geopeft.adapters(tiny) == []
    assert _module_types(tiny) == before_types
    assert _requires_grad(tiny) == before_grad
    geopeft.adapt(tiny, "lora", targets=["query", "classifier"], rank=2)
    assert [n for n, _ in geopeft.adapters(tiny)] == ["query", "classifier"]


@pytest.mark.parametrize("rank", [0, -3, 2.5, "8"])
def test_rank_must_be_a_positive_int(tiny, rank):
    with pytest.raises(geopeft.ConfigError) as info:
        geopeft.adapt(tiny, "lora", targets=["query"], rank=rank)
    assert "rank must be a positive int" in str(info.value)
    assert repr(rank) in str(info.value)
    assert geopeft.adapters(tiny) == []


# --------------------------------------------------------------------------- adapt twice, trainable
def test_adapting_twice_is_an_error(tiny):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=2)
    with pytest.raises(geopeft.GeopeftError) as info:
        geopeft.adapt(tiny, "lora", targets=["value"], rank=2)
    assert "already has geopeft adapters" in str(info.value)
    assert "geopeft.load" in str(info.value)
    assert [n for n, _ in geopeft.adapters(tiny)] == ["query"]


def test_trainable_matching_nothing_is_a_target_error(tiny):
    before = _requires_grad(tiny)
    with pytest.raises(geopeft.TargetError) as info:
        geopeft.adapt(tiny, "lora", targets=["query"], rank=2, trainable=["nope"])
    assert "trainable='nope' matches no module" in str(info.value)
    assert geopeft.adapters(tiny) == [] and _requires_grad(tiny) == before


# --------------------------------------------------------------------------- optimizer
def test_optimizer_on_an_unadapted_model(tiny):
    with pytest.raises(geopeft.GeopeftError) as info:
        geopeft.optimizer(tiny, torch.optim.AdamW, lr=1e-3)
    msg = str(info.value)
    assert "no geopeft adapters" in msg and "geopeft.adapt(model" in msg


def test_optimizer_instance_with_kwargs(tiny):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=2)
    inner = torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(geopeft.ConfigError) as info:
        geopeft.optimizer(tiny, inner, lr=1e-2)
    msg = str(info.value)
    assert "already built" in msg and "lr" in msg
    assert inner.param_groups[0]["lr"] == 1e-3
    opt = geopeft.optimizer(tiny, inner)  # without kwargs it is accepted
    assert opt.optimizer is inner


@pytest.mark.parametrize("bad", ["adamw", object, torch.nn.Linear, lambda params, lr: None])
def test_optimizer_that_is_not_an_optimizer(tiny, bad):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=2)
    with pytest.raises(geopeft.ConfigError) as info:
        geopeft.optimizer(tiny, bad, lr=1e-3)
    assert "torch.optim.Optimizer subclass" in str(info.value)


def test_optimizer_missing_the_factors(tiny):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=2)
    with pytest.raises(geopeft.ConfigError) as info:
        geopeft.optimizer(tiny, torch.optim.SGD, params=[tiny.query.adapter.A], lr=0.1)
    msg = str(info.value)
    assert "'B'" in msg and "'query'" in msg and "none of the optimizer's param groups" in msg


# --------------------------------------------------------------------------- non-finite gradients
def _snapshot(model: nn.Module, opt) -> tuple[dict[str, torch.Tensor], dict]:
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    sd = opt.state_dict()
    state = {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
             for k, v in sd["state"].items()}
    extra = {k: v for k, v in sd["geopeft"].items() if k != "skipped_steps"}
    return params, {"state": state, "geopeft": extra}


def _assert_same(before, after) -> None:
    (p0, s0), (p1, s1) = before, after
    assert p0.keys() == p1.keys()
    for name in p0:
        assert torch.equal(p0[name], p1[name]), f"parameter {name} changed"
    assert s0["state"].keys() == s1["state"].keys()
    for idx, entries in s0["state"].items():
        assert entries.keys() == s1["state"][idx].keys()
        for key, value in entries.items():
            other = s1["state"][idx][key]
            if torch.is_tensor(value):
                assert torch.equal(value, other), f"optimizer state {idx}/{key} changed"
            else:
                assert value == other
    assert s0["geopeft"] == s1["geopeft"]


def _backward(model: nn.Module, opt) -> None:
    opt.zero_grad()
    model(IDS).pow(2).sum().backward()


def _geopeft_warnings(record) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "non-finite" in str(w.message)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_step_changes_nothing_warns_once_and_counts(tiny, bad):
    geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=2, trainable=["classifier"])
    opt = geopeft.optimizer(tiny, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    _backward(tiny, opt)
    opt.step()  # a finite step first, so that there is optimizer state to protect
    assert opt.state and opt.skipped_steps == 0

    # first bad step: nothing changes, one warning
    _backward(tiny, opt)
    tiny.value.adapter.B.grad[0, 0] = bad
    before = _snapshot(tiny, opt)
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        opt.step()
    assert len(_geopeft_warnings(record)) == 1
    _assert_same(before, _snapshot(tiny, opt))
    assert opt.skipped_steps == 1 and opt.step_count == 1
    assert opt.state_dict()["geopeft"]["skipped_steps"] == 1

    # second bad step: nothing changes, no second warning, counted
    _backward(tiny, opt)
    tiny.query.adapter.A.grad[1, 2] = bad
    before = _snapshot(tiny, opt)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt.step()
    assert _geopeft_warnings(record) == []
    _assert_same(before, _snapshot(tiny, opt))
    assert opt.skipped_steps == 2 and opt.step_count == 1

    # a finite step afterwards trains again
    _backward(tiny, opt)
    params_before = {n: p.detach().clone() for n, p in tiny.named_parameters() if p.requires_grad}
    opt.step()
    changed = [n for n, p in tiny.named_parameters() if p.requires_grad and not torch.equal(p, params_before[n])]
    assert "query.adapter.A" in changed and "value.adapter.B" in changed and "classifier.weight" in changed
    assert all(torch.isfinite(p).all() for p in tiny.parameters())
    assert opt.skipped_steps == 2 and opt.step_count == 2


def test_nonfinite_gradient_in_a_trainable_base_module_also_skips(tiny):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=2, trainable=["classifier"])
    opt = geopeft.optimizer(tiny, torch.optim.SGD, lr=0.1, momentum=0.9)
    _backward(tiny, opt)
    opt.step()
    _backward(tiny, opt)
    tiny.classifier.bias.grad[0] = float("nan")
    before = _snapshot(tiny, opt)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    _assert_same(before, _snapshot(tiny, opt))
    assert opt.skipped_steps == 1


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
    before_grad, before_types = _requires_grad(model), _module_types(model)
    with pytest.raises(geopeft.CheckpointError, match="lacks"):
        geopeft.load(model, broken)
    assert geopeft.adapters(model) == []
    assert _module_types(model) == before_types
    assert _requires_grad(model) == before_grad
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


def test_nan_check_handles_mixed_gradient_dtypes(tiny):
    tiny.query.to(torch.bfloat16)

    class Mixed(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.classifier(self.net.query(x.bfloat16()).float())

    model = Mixed(tiny)
    geopeft.adapt(model, "lora", targets=["query"], rank=2, trainable=["classifier"],
                  dtype=torch.bfloat16)
    opt = geopeft.optimizer(model, torch.optim.SGD, lr=0.1)
    assert {p.dtype for g in opt.param_groups for p in g["params"]} == {torch.bfloat16, torch.float32}
    model(torch.randn(4, 16)).sum().backward()
    tiny.classifier.weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        opt.step()
    assert opt.skipped_steps == 1
    opt.zero_grad()
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    assert opt.skipped_steps == 1 and opt.step_count == 1


def test_large_finite_fp16_gradients_are_not_skipped():
    model = nn.Sequential(nn.Linear(64, 64).half())
    geopeft.adapt(model, "lora", targets=["0"], rank=2, dtype=torch.float16)
    opt = geopeft.optimizer(model, torch.optim.SGD, lr=0.0)
    a = model[0].adapter
    a.A.grad = torch.full_like(a.A, 20000.0)  # finite, but its L2 norm overflows fp16
    a.B.grad = torch.zeros_like(a.B)
    assert torch.isinf(a.A.grad.norm())
    opt.step()
    assert opt.skipped_steps == 0 and opt.step_count == 1


def test_trainable_module_may_not_contain_an_adapted_layer(tiny):
    with pytest.raises(geopeft.ConfigError, match=r"trainable='ffn' contains adapted layer\(s\) ffn.0"):
        geopeft.adapt(tiny, "lora", targets="all-linear", rank=2, trainable=["ffn"])
    assert not geopeft.adapters(tiny) and all(p.requires_grad for p in tiny.parameters())


def test_data_initializer_without_batches_is_refused_before_any_change(tiny, plugin):
    import types

    class FromData(geopeft.Initializer):
        needs_data = True

        def initialize(self, adapters, model=None, batches=None, loss_fn=None):
            raise AssertionError("must not run without data")

    plugin(types.SimpleNamespace(register_initializers=geopeft.hookimpl(
        lambda register: register("from_data", FromData))), "data-init")
    with pytest.raises(geopeft.ConfigError, match="initializer 'from_data' computes the factors from "
                                                   "data: pass init_batches="):
        geopeft.adapt(tiny, "lora", targets=["query"], rank=2, initializer="from_data")
    assert not geopeft.adapters(tiny)


# --------------------------------------------------------------------------- strict inputs
@pytest.mark.parametrize("alpha", [0, -2.0, float("nan"), float("inf"), True, "16"])
def test_alpha_must_be_positive_and_finite(tiny, alpha):
    before = _module_types(tiny)
    with pytest.raises(geopeft.ConfigError, match="alpha must be a positive finite number"):
        geopeft.adapt(tiny, "lora", targets=["query"], rank=2, alpha=alpha)
    assert _module_types(tiny) == before


@pytest.mark.parametrize("method", ["lora", "stella"])
def test_alpha_as_a_recipe_option_is_checked_by_the_adapter(tiny, method):
    with pytest.raises(geopeft.ConfigError, match="alpha must be a positive finite number"):
        geopeft.adapt(tiny, method, targets=["query"], rank=2, **{"alpha": float("nan")})


@pytest.mark.parametrize("rank", [True, 2.0, "8", None])
def test_non_int_ranks_are_refused_with_a_message(tiny, rank):
    with pytest.raises(geopeft.ConfigError, match="rank must be a positive int"):
        geopeft.adapt(tiny, "lora", targets=["query"], rank=rank)
    with pytest.raises(geopeft.ConfigError, match="rank of layer 'query' must be a positive int"):
        geopeft.adapt(tiny, "lora", targets=["query"], rank=2, ranks={"query": rank})
    assert geopeft.adapters(tiny) == []


@pytest.mark.parametrize("field", ["targets", "exclude"])
def test_an_invalid_regex_is_a_config_error_naming_the_pattern(tiny, field):
    kw = {"targets": "query|value"} | {field: "ffn.(0"}
    with pytest.raises(geopeft.ConfigError) as info:
        geopeft.adapt(tiny, "lora", rank=2, **kw)
    assert f"{field}='ffn.(0' is not a valid regular expression" in str(info.value)


@pytest.mark.parametrize("method, manifold, key, shape, need", [
    ("lora", {"A": "stiefel"}, "A", "2x16", "stiefel needs at least as many rows as columns"),
    (geopeft.Recipe("usv-balanced", adapter="usv", initializer="orthonormal"), {"U,V": "balanced"},
     "U,V", "16x2 and 16x2", "balanced pairs a B (m, r) with an A (r, n)"),
])
def test_a_manifold_that_does_not_fit_the_factor_is_refused_at_adapt(tiny, method, manifold, key, shape,
                                                                     need):
    before = _module_types(tiny)
    with pytest.raises(geopeft.ConfigError) as info:
        geopeft.adapt(tiny, method, targets=["query"], rank=2, manifold=manifold)
    msg = str(info.value)
    assert f"does not fit factor {key!r} of the adapter on 'query'" in msg
    assert f"the factor is {shape}" in msg and need in msg
    assert _module_types(tiny) == before


class _WrongShape(geopeft.Manifold):
    """Unit-norm columns whose `project` or `retract` returns a broadcastable wrong shape."""

    name = "wrong_shape"

    def __init__(self, broken: str = "project"):
        self.broken = broken

    def _unit(self, x):
        return x / x.norm(dim=-2, keepdim=True)

    def project_tangent(self, x, u):
        return u - x * (x * u).sum(-2, keepdim=True)

    def retract(self, x, u):
        y = self._unit(x + u)
        return y[:1] if self.broken == "retract" else y  # (1, n, p): would broadcast over G

    def project(self, x):
        return self._unit(x)[..., :1] if self.broken == "project" else self._unit(x)

    def violation(self, x):
        return (x.norm(dim=-2) - 1).abs().amax(-1)

    def random_point(self, shape, generator=None, dtype=torch.float32):
        return self._unit(torch.randn(*shape, generator=generator, dtype=dtype))

    def options(self):
        return {"broken": self.broken}


def test_a_manifold_returning_a_wrong_shape_is_a_shape_error(tiny):
    with pytest.raises(geopeft.ShapeError, match=r"project returned \[\(2, 2, 1\)\] .* \[\(2, 2, 16\)\]"):
        geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=2, manifold={"A": _WrongShape()})
    assert geopeft.adapters(tiny) == []
    torch.manual_seed(0)
    model = geopeft.adapt(type(tiny)(), "lora", targets=["query", "value"], rank=2,
                          manifold={"A": _WrongShape("retract")})
    opt = geopeft.optimizer(model, torch.optim.SGD, lr=0.1)
    model(IDS).sum().backward()
    with pytest.raises(geopeft.ShapeError, match=r"retract_step returned \[\(1, 2, 16\)\]"):
        opt.step()
