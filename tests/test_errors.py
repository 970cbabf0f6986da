"""Every bad-input path produces its message: targets, ranks, options, the optimizer and
non-finite gradients (damaged or foreign checkpoints: test_serialization.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import geopeft

from helpers import module_types, requires_grad_map

IDS = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(1))


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
    before = requires_grad_map(tiny)
    with pytest.raises(geopeft.TargetError) as info:
        geopeft.adapt(tiny, "lora", targets=["qurey"])
    msg = str(info.value)
    assert "['qurey'] matched no adaptable layer" in msg
    assert "Similar names: query" in msg
    adaptable = msg.split("Adaptable layer names in this model:", 1)[1]
    for name in ("query", "value", "classifier", "embed"):
        assert name in adaptable
    assert "Presets:" in msg and "all-linear" in msg
    assert geopeft.adapters(tiny) == [] and requires_grad_map(tiny) == before


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
    before = requires_grad_map(model)
    with pytest.raises(geopeft.TargetError) as info:
        geopeft.adapt(model, "lora", targets=targets, rank=2)
    msg = str(info.value)
    assert "'norm'" in msg and "cannot be adapted" in msg
    assert "LayerNorm is not a supported layer type" in msg
    assert "nn.Linear" in msg  # what is supported
    assert geopeft.adapters(model) == [] and requires_grad_map(model) == before


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
    before_grad, before_types = requires_grad_map(tiny), module_types(tiny)
    with pytest.raises(geopeft.ConfigError, match="'classifier'"):
        geopeft.adapt(tiny, "lora", targets=["query", "classifier"], rank=4)
    assert geopeft.adapters(tiny) == []
    assert module_types(tiny) == before_types
    assert requires_grad_map(tiny) == before_grad
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
    before = requires_grad_map(tiny)
    with pytest.raises(geopeft.TargetError) as info:
        geopeft.adapt(tiny, "lora", targets=["query"], rank=2, trainable=["nope"])
    assert "trainable='nope' matches no module" in str(info.value)
    assert geopeft.adapters(tiny) == [] and requires_grad_map(tiny) == before


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
    extra = {k: v for k, v in sd["geopeft"].items() if k not in ("skipped_steps", "consecutive_skips")}
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
    before = module_types(tiny)
    with pytest.raises(geopeft.ConfigError, match="alpha must be a positive finite number"):
        geopeft.adapt(tiny, "lora", targets=["query"], rank=2, alpha=alpha)
    assert module_types(tiny) == before


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
    before = module_types(tiny)
    with pytest.raises(geopeft.ConfigError) as info:
        geopeft.adapt(tiny, method, targets=["query"], rank=2, manifold=manifold)
    msg = str(info.value)
    assert f"does not fit factor {key!r} of the adapter on 'query'" in msg
    assert f"the factor is {shape}" in msg and need in msg
    assert module_types(tiny) == before


class _WrongShape(geopeft.Manifold):
    """Unit-norm columns whose `project` or `retract` returns a broadcastable wrong shape."""

    name = "wrong_shape"

    def __init__(self, broken: str = "project"):
        self.broken = broken

    def _unit(self, x):
        return x / x.norm(dim=-2, keepdim=True)

    def project_tangent(self, x, u):
        return u - x * (x * u).sum(-2, keepdim=True)

    def egrad_to_rgrad(self, x, g):
        g = self.project_tangent(x, g)
        return g[..., :1, :] if self.broken == "egrad_to_rgrad" else g

    def transport(self, x, y, v):
        v = self.project_tangent(y, v)
        return v.sum(0) if self.broken == "transport" else v

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
    for broken, got in [("egrad_to_rgrad", r"\(2, 1, 16\)"), ("transport", r"\(2, 16\)")]:
        torch.manual_seed(0)
        model = geopeft.adapt(type(tiny)(), "lora", targets=["query", "value"], rank=2,
                              manifold={"A": _WrongShape(broken)}, moments="transport")
        opt = geopeft.optimizer(model, torch.optim.SGD, lr=0.1, momentum=0.9)
        before = [a.A.detach().clone() for _, a in geopeft.adapters(model)]
        model(IDS).sum().backward()
        with pytest.raises(geopeft.ShapeError, match=rf"{broken} returned \[{got}\]"):
            opt.step()
        # nothing of the step's geometry was written: the factors are where they were
        assert all(torch.equal(b, a.A) for b, (_, a) in zip(before, geopeft.adapters(model)))


class _UnitColumns(_WrongShape):
    """Unit-norm columns (`project` divides by the column norms: 0/0 for a zero column)."""

    name = "unit_columns"

    def __init__(self):
        super().__init__(broken="")


def test_a_factor_that_starts_off_its_manifold_is_refused_at_adapt(tiny):
    """LoRA's initializer sets B to 0, which has no unit-norm columns: training from there
    goes NaN at the first step. `adapt` refuses, naming factor, initializer and manifold."""
    before = module_types(tiny)
    with pytest.raises(geopeft.ConfigError, match=r"factor 'B' of the adapter on 'query' starts off its "
                       r"manifold 'unit_columns': after initializer 'lora' .* violation is nan"):
        geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=2, manifold={"B": _UnitColumns()})
    assert module_types(tiny) == before and geopeft.adapters(tiny) == []
    geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=2, manifold={"A": _UnitColumns()})


def test_save_refuses_non_finite_weights_and_changes_nothing_on_disk(tiny, tmp_path):
    model = geopeft.adapt(tiny, "lora", targets=["query"], rank=2, trainable=["classifier"])
    geopeft.save(model, tmp_path / "ckpt")
    on_disk = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    for target in (tmp_path / "ckpt", tmp_path / "new"):
        with pytest.raises(geopeft.GeopeftError, match=r"'trainable.classifier.weight' holds 1 NaN or Inf "
                           r"value\(s\): nothing was saved"):
            geopeft.save(model, target)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == on_disk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_unsupported_layer_is_named_by_its_qualified_class():
    """A dynamically quantized Linear is not "Linear" (that reads as nn.Linear, supported)."""
    with warnings.catch_warnings():  # torch deprecates its quantized tensors
        warnings.simplefilter("ignore", UserWarning)
        model = nn.Sequential(torch.ao.nn.quantized.dynamic.Linear(8, 8))
    with pytest.raises(geopeft.TargetError, match=r"torch\.ao\.nn\.quantized\.dynamic\.Linear is not a "
                       r"supported layer type"):
        geopeft.adapt(model, "lora", targets=["0"], rank=2)
    with pytest.raises(geopeft.TargetError, match=r"torch\.nn\.LayerNorm is not a supported layer type"):
        geopeft.adapt(WithNorm(), "lora", targets=["norm"], rank=2)
