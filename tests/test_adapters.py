"""Several named adapters on one model: each computes and trains exactly as the model that
has it alone; switching, deleting and disabling leave the others untouched; save / load /
export_peft / resume in PEFT's layout; mixed batches; the refusals."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import geopeft
from geopeft.geometry import max_violation
from geopeft.serialization import restore

from helpers import TinyNet, tiny_batch, tiny_regression, train

A_TARGETS = ["query", "value", "ffn.0", "ffn.2"]


def alone(base, name):
    """A copy of `base` with adapter "default" (GeoLoRA, ranks that move) or "b" (BaLoRA on
    two layers, the classifier trained in full), each from its own seed."""
    model = copy.deepcopy(base)
    return add(model, name, adapter_name="default")


def add(model, name, adapter_name=None):
    torch.manual_seed({"default": 1, "b": 2}[name])
    if name == "default":
        return geopeft.adapt(model, "geolora", targets=A_TARGETS, rank=4, r_max=8, period=2,
                             adapter_name=adapter_name or name)
    return geopeft.adapt(model, "balora", targets=["query", "ffn.0"], rank=2, trainable=["classifier"],
                         adapter_name=adapter_name or name)


@pytest.fixture
def base():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def trained(base):
    """(both adapters on one model, "default" alone, "b" alone), each adapter trained 5 steps
    on the shared model with the other inactive, and likewise alone."""
    both = add(add(copy.deepcopy(base), "default"), "b")
    a, b = alone(base, "default"), alone(base, "b")
    assert geopeft.adapter_names(both) == ["default", "b"] and geopeft.active_adapters(both) == ["default"]
    loss = tiny_regression()
    for model in (both, a):
        train(model, geopeft.optimizer(model, torch.optim.AdamW, lr=2e-2), loss, 5)
    geopeft.set_adapter(both, "b")
    opts = [geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2) for model in (both, b)]
    for model, opt in zip((both, b), opts):
        train(model, opt, loss, 5)
    return both, a, b, opts[0]


def test_each_adapter_trains_and_computes_as_the_model_that_has_it_alone(base, trained):
    both, a, b, _ = trained
    ids = tiny_batch(5)
    assert torch.equal(both(ids), b(ids))  # b active; trained with "default" inactive
    twin = add(add(copy.deepcopy(base), "default"), "b")  # state_dict: both adapters, b's head
    geopeft.set_adapter(both, "default")
    for (_, x), (_, y) in zip(geopeft.adapters(twin), geopeft.adapters(both)):
        x.resize(y.rank)  # GeoLoRA's ranks moved
    twin.load_state_dict(both.state_dict())
    assert torch.equal(twin(ids), a(ids)) and "geopeft_stashed.b.classifier.weight" in both.state_dict()
    geopeft.set_adapter(both, "b")
    geopeft.set_adapter(twin, "b")
    assert torch.equal(twin(ids), b(ids))
    assert max_violation([x for _, x in geopeft.adapters(both)]) <= 1e-5  # balanced B, A
    geopeft.set_adapter(both, "default")
    assert torch.equal(both(ids), a(ids))  # untouched by b's training, its classifier not b's
    ranks = [x.rank for _, x in geopeft.adapters(both)]
    assert ranks == [x.rank for _, x in geopeft.adapters(a)] and ranks != [4] * 4  # GeoLoRA's own ranks
    assert max_violation([x for _, x in geopeft.adapters(both)]) <= 1e-5  # orthonormal U, V
    with geopeft.disable_adapters(both):
        assert torch.equal(both(ids), base(ids))
    geopeft.set_adapter(both, "b")
    geopeft.delete_adapter(both, "default")
    assert geopeft.adapter_names(both) == ["b"] and torch.equal(both(ids), b(ids))
    assert [k for k in both.state_dict() if "adapter" in k] == \
        [k.replace(".adapter.", ".adapter_b.") for k in b.state_dict() if "adapter" in k]


def test_save_load_resume_and_export_in_peft_layout(base, trained, tmp_path):
    both, a, b, opt = trained
    ids = tiny_batch(5)
    geopeft.save(both, tmp_path / "all")
    assert (tmp_path / "all" / "geopeft.json").is_file() and (tmp_path / "all" / "b" / "geopeft.json").is_file()
    twin = geopeft.load(copy.deepcopy(base), tmp_path / "all")  # both adapters, "default" active
    assert geopeft.adapter_names(twin) == ["default", "b"] and torch.equal(twin(ids), a(ids))
    geopeft.set_adapter(twin, "b")
    assert torch.equal(twin(ids), b(ids))
    frozen = geopeft.load(copy.deepcopy(base), tmp_path / "all", trainable=False)  # inference only
    geopeft.set_adapter(frozen, "b")
    assert torch.equal(frozen(ids), b(ids)) and not any(p.requires_grad for p in frozen.parameters())
    # resume b: the next steps equal those of the uninterrupted run
    twin_opt = geopeft.optimizer(twin, torch.optim.AdamW, lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(both, opt, tiny_regression(), 2, start=5)
    train(twin, twin_opt, tiny_regression(), 2, start=5)
    assert torch.equal(twin(ids), both(ids))
    # one adapter, into a model adapted already: added inactive; then a training checkpoint
    # of both put back into it (as GeoTrainer resumes)
    only_a = geopeft.load(copy.deepcopy(base), tmp_path / "all", adapter_name="default")
    assert geopeft.adapter_names(only_a) == ["default"]
    geopeft.load(only_a, tmp_path / "all", adapter_name="b")
    assert torch.equal(only_a(ids), a(ids))
    geopeft.set_adapter(only_a, "b")
    assert torch.equal(only_a(ids), b(ids))
    geopeft.save(both, tmp_path / "again")
    restore(only_a, tmp_path / "again")
    assert torch.equal(only_a(ids), both(ids))
    # PEFT reads the exported layout: "default" at the top, "b" in its subfolder
    geopeft.set_adapter(both, "default")
    geopeft.export_peft(both, tmp_path / "peft")
    with torch.no_grad():
        expected = {n: (geopeft.set_adapter(both, n), both(ids))[1] for n in ("default", "b")}
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
        model.load_adapter(tmp_path / "peft" / "b", adapter_name="b")
        for name in ("default", "b"):
            model.set_adapter(name)
            assert torch.allclose(model(ids), expected[name], atol=1e-5)


def test_mixed_batch_runs_each_example_through_its_adapter(base):
    model = geopeft.adapt(copy.deepcopy(base), "stella", targets=A_TARGETS, rank=2, hidden_size=16)
    geopeft.adapt(model, "stella", targets=["query", "ffn.0"], rank=3, hidden_size=16, adapter_name="b")
    ids = tiny_batch(5, n=5)
    names = ["b", "default", "__base__", "b", "default"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names)
        rows = {}
        for name in ("default", "b"):
            geopeft.set_adapter(model, name)
            rows[name] = model(ids)
        with geopeft.disable_adapters(model):
            rows["__base__"] = model(ids)
    assert not torch.allclose(rows["default"], rows["b"], atol=1e-3)
    expected = torch.stack([rows[n][i] for i, n in enumerate(names)])
    assert torch.allclose(mixed, expected, atol=1e-6)
    with pytest.raises(geopeft.ConfigError, match="'c'"):
        model(ids, adapter_names=["c"] * 5)
    with pytest.raises(geopeft.ShapeError, match="one name per example"):
        model(ids, adapter_names=["b"] * 4)
    assert torch.equal(model(ids), rows["b"])  # no names left behind by the failed calls
    geopeft.adapt(model, "lora", targets=["value"], trainable=["classifier"], adapter_name="c")
    with pytest.raises(geopeft.ConfigError, match="'c' trains 'classifier' in full"):
        model(ids, adapter_names=["c"] * 5)


def test_refusals_name_the_problem(base):
    model = add(copy.deepcopy(base), "default")
    with pytest.raises(geopeft.GeopeftError, match="already has geopeft adapters"):
        geopeft.adapt(model, "lora", targets=["query"])
    with pytest.raises(geopeft.ConfigError, match="not a valid adapter name"):
        geopeft.adapt(model, "lora", targets=["query"], adapter_name="a.b")
    with pytest.raises(geopeft.ConfigError, match="shifts the base weights"):
        geopeft.adapt(model, "lora", targets=["query"], initializer="pissa", adapter_name="p")
    assert geopeft.adapter_names(model) == ["default"] and not hasattr(model.query, "adapter_p")
    add(model, "b")
    with pytest.raises(geopeft.ConfigError, match="'classifier'.*adapter 'b'"):
        geopeft.adapt(model, "lora", targets=["value"], trainable=["classifier"], adapter_name="c")
    with pytest.raises(geopeft.GeopeftError, match="no adapter named 'c'"):
        geopeft.set_adapter(model, "c")
    geopeft.set_adapter(model, ["default", "b"])
    with pytest.raises(geopeft.GeopeftError, match="active together"):
        geopeft.optimizer(model, torch.optim.AdamW)
    geopeft.delete_adapter(model, "b")
    with pytest.raises(geopeft.GeopeftError, match="only adapter"):
        geopeft.delete_adapter(model, "default")


def test_combine_is_exact_by_concatenation_or_reports_what_its_svd_discards(base, tmp_path):
    model = geopeft.adapt(copy.deepcopy(base), "stella", targets=A_TARGETS, rank=2, hidden_size=16)
    geopeft.adapt(model, "stella", targets=["query", "ffn.0"], rank=3, hidden_size=16, adapter_name="b")
    deltas = {n: {name: a.delta_weight().detach().double() for name, a in geopeft.adapters(model, n)}
              for n in ("default", "b")}
    want = {name: 0.7 * d + (-0.3 * deltas["b"][name] if name in deltas["b"] else 0)
            for name, d in deltas["default"].items()}
    assert geopeft.combine(model, {"default": 0.7, "b": -0.3}, name="ab") == dict.fromkeys(A_TARGETS, 0.0)
    for name, a in geopeft.adapters(model, "ab"):
        assert a.rank == (5 if name in deltas["b"] else 2)
        assert (a.delta_weight().detach().double() - want[name]).norm() <= 1e-6 * want[name].norm()
    lost = geopeft.combine(model, {"default": 0.7, "b": -0.3}, name="ab1", rank=1)
    for name, a in geopeft.adapters(model, "ab1"):
        s = torch.linalg.svdvals(want[name])
        assert lost[name] == pytest.approx(float(s[1:].pow(2).sum() / s.pow(2).sum()), rel=1e-6)
        assert (a.delta_weight().detach().double() - want[name]).norm() == pytest.approx(float(s[1:].norm()), rel=1e-5)
    geopeft.save(model, tmp_path, adapter_name="ab")  # a plain LoRA, saved and loaded as any
    twin = geopeft.load(copy.deepcopy(base), tmp_path, adapter_name="ab")
    geopeft.set_adapter(model, "ab")
    ids = tiny_batch(3)
    assert torch.equal(twin(ids), model(ids))
    geopeft.adapt(model, "lora", targets=["value"], trainable=["classifier"], adapter_name="c")
    with pytest.raises(geopeft.ConfigError, match="trains 'classifier' in full.*no exact meaning"):
        geopeft.combine(model, {"default": 1.0, "c": 1.0}, name="x")
    with pytest.raises(geopeft.GeopeftError, match="no adapter named 'd'"):
        geopeft.combine(model, {"d": 1.0}, name="x")
    with pytest.raises(geopeft.GeopeftError, match="already has geopeft adapters, one of them named 'ab'"):
        geopeft.combine(model, {"default": 1.0}, name="ab")
