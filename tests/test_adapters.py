"""Several named adapters on one model: each computes and trains exactly as the model that
has it alone; switching, deleting and disabling leave the others untouched; save / load /
export_peft / resume in PEFT's layout; mixed batches; the refusals."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import geopeft
from geopeft.export import export_saved
from geopeft.geometry import max_violation
from geopeft.model import adapted_layers, find_state
from geopeft.optim import GeometricOptimizer, Part
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
    twin = geopeft.load(copy.deepcopy(base), tmp_path / "all")  # both adapters, "b" active as saved
    assert geopeft.adapter_names(twin) == ["default", "b"] and geopeft.active_adapters(twin) == ["b"]
    assert torch.equal(twin(ids), b(ids))
    geopeft.set_adapter(twin, "default")
    assert torch.equal(twin(ids), a(ids))
    geopeft.set_adapter(twin, "b")
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
    geopeft.set_adapter(only_a, "default")
    restore(only_a, tmp_path / "again")  # the active set too ("b", as saved)
    assert geopeft.active_adapters(only_a) == ["b"] and torch.equal(only_a(ids), both(ids))
    # PEFT reads the exported layout: "default" at the top, "b" in its subfolder
    # (written from the model, and converted from its saved directory without the base)
    geopeft.set_adapter(both, "default")
    geopeft.export_peft(both, tmp_path / "peft")
    export_saved(tmp_path / "again", tmp_path / "peft2")
    export_saved(tmp_path / "again", tmp_path / "peft3", adapter_name="b")  # only b, in dir/b
    assert not (tmp_path / "peft3" / "adapter_config.json").exists()
    with torch.no_grad():
        expected = {n: (geopeft.set_adapter(both, n), both(ids))[1] for n in ("default", "b")}
        for out in ("peft", "peft2"):
            model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / out)
            model.load_adapter(tmp_path / out / "b", adapter_name="b")
            for name in ("default", "b"):
                model.set_adapter(name)
                assert torch.allclose(model(ids), expected[name], atol=1e-5)
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft3" / "b")
        assert torch.allclose(model(ids), expected["b"], atol=1e-5)


def test_a_save_without_default_names_its_adapters_when_loaded_whole(base, tmp_path):
    model = add(add(copy.deepcopy(base), "default"), "b")
    geopeft.set_adapter(model, "b")
    geopeft.delete_adapter(model, "default")
    geopeft.save(model, tmp_path / "only_b")  # PEFT's layout: b in its subfolder, nothing on top
    with pytest.raises(geopeft.CheckpointError, match=r"adapters b in subfolders.*load\(model, .*'b'\)"):
        geopeft.load(copy.deepcopy(base), tmp_path / "only_b")
    twin = geopeft.load(copy.deepcopy(base), tmp_path / "only_b", "b")  # the fix the message names
    ids = tiny_batch(5)
    assert geopeft.adapter_names(twin) == ["b"] and torch.equal(twin(ids), model(ids))


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


def test_mixed_batch_on_a_model_with_one_adapter(base):
    model = geopeft.adapt(copy.deepcopy(base), "stella", targets=A_TARGETS, rank=2, hidden_size=16)
    assert not model._forward_hooks  # no post-hook until a mixed batch runs
    ids = tiny_batch(5, n=3)
    with torch.no_grad():
        mixed = model(ids, adapter_names=["__base__", "default", "__base__"])
        adapted = model(ids)
        with geopeft.disable_adapters(model):
            plain = model(ids)
    assert not torch.allclose(adapted, plain, atol=1e-3)
    assert torch.allclose(mixed, torch.stack([plain[0], adapted[1], plain[2]]), atol=1e-6)
    with pytest.raises(geopeft.ConfigError, match="'b'.*adapters: default"):
        model(ids, adapter_names=["b"] * 3)
    assert torch.equal(model(ids), adapted)  # nothing left behind


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
    with pytest.raises(geopeft.GeopeftError, match="optimizer.part"):
        _ = geopeft.optimizer(model, torch.optim.AdamW).rank_controller  # whose? each has its own
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


def three(base):
    """`base` with three active adapters: "default" StelLA (Stiefel U, V), "b" GeoLoRA on
    layers "default" adapts too (ranks move: period 2, within the total initial rank), "c"
    BaLoRA (balanced B, A) training the classifier in full."""
    model = copy.deepcopy(base)
    torch.manual_seed(3)
    geopeft.adapt(model, "stella", targets=A_TARGETS, rank=2, hidden_size=16)
    geopeft.adapt(model, "geolora", targets=["query", "ffn.0"], rank=3, r_max=6, period=2, adapter_name="b")
    geopeft.adapt(model, "balora", targets=["value"], rank=2, trainable=["classifier"], adapter_name="c")
    return geopeft.set_adapter(model, ["default", "b", "c"])


def test_active_adapters_train_together_each_by_its_own_recipe(base, tmp_path):
    """One optimizer over three active adapters steps each exactly as an optimizer built for
    that adapter alone (its transforms, geometry and rank controller, on its factors only)
    stepping the same model on the same gradients; each keeps its invariant; save / load /
    resume with the three active."""
    model, twin = three(base), three(base)
    ids = tiny_batch(5)
    with torch.no_grad():  # the forward adds each active adapter's update
        merged = copy.deepcopy(base)
        for lname, layer in adapted_layers(model):
            merged.get_submodule(lname).weight += sum(layer.get(n).delta_weight() for n in layer.active)
        assert torch.allclose(model(ids), merged(ids), atol=1e-6)
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=2e-2)
    state = find_state(twin)
    alone = [GeometricOptimizer(torch.optim.AdamW([p for _, a in geopeft.adapters(twin, n)
                                                    for p in a.factors().values()]
                                                   + ([twin.classifier.weight, twin.classifier.bias]
                                                      if n == "c" else []), lr=2e-2),
                                [Part(n, geopeft.adapters(twin, n), state.by_name[n].resolved)])
             for n in ("default", "b", "c")]
    loss = tiny_regression()
    for i in range(6):
        loss(model, i).backward()
        loss(twin, i).backward()
        opt.step()
        for o in alone:
            o.step()
        opt.zero_grad()
        twin.zero_grad()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(model(ids), twin(ids))
    ranks = opt.ranks()
    assert ranks["b"] != {"query": 3, "ffn.0": 3} and sum(ranks["b"].values()) <= 6  # GeoLoRA's own
    assert ranks["default"] == dict.fromkeys(A_TARGETS, 2) and ranks["c"] == {"value": 2}
    for n in ("default", "b", "c"):  # Stiefel U, V; GeoLoRA's orthonormal bases; balanced B, A
        assert max_violation([a for _, a in geopeft.adapters(model, n)]) <= 1e-5
    assert list(geopeft.summary(model).adapters) == ["default", "b", "c"]
    # save / load / resume with the three active: the next steps equal the uninterrupted run's
    geopeft.save(model, tmp_path)
    sd = copy.deepcopy(opt.state_dict())
    again = geopeft.load(copy.deepcopy(base), tmp_path)
    assert geopeft.active_adapters(again) == ["default", "b", "c"] and torch.equal(again(ids), model(ids))
    again_opt = geopeft.optimizer(again, torch.optim.AdamW, lr=2e-2)
    again_opt.load_state_dict(sd)
    train(model, opt, loss, 4, start=6)
    train(again, again_opt, loss, 4, start=6)
    assert torch.equal(again(ids), model(ids)) and again_opt.ranks() == opt.ranks()
    geopeft.set_adapter(again, "b")
    with pytest.raises(geopeft.GeopeftError, match="set_adapter"):
        geopeft.optimizer(again, torch.optim.AdamW).load_state_dict(sd)
