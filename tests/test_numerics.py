"""Half-precision models, failing geometric stages and endless non-finite steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import geopeft
from geopeft.geometry import max_violation

from helpers import TinyNet, tiny_batch


class _MatmulDtypes(TorchFunctionMode):
    """Records the dtypes of every matmul-like call."""

    OPS = {torch.nn.functional.linear, torch.addmm, torch.matmul, torch.Tensor.__matmul__, torch.mm}

    def __init__(self):
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.seen |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_bases_get_float32_factors_and_the_forward_runs_in_the_input_dtype(dtype):
    layer = nn.Linear(16, 12).to(dtype)
    model = geopeft.adapt(nn.Sequential(layer), "lora", targets=["0"], rank=4)
    adapter = model[0].adapter
    assert adapter.A.dtype == adapter.B.dtype == torch.float32
    with torch.no_grad():
        adapter.B.normal_()
    x = torch.randn(5, 16).to(dtype)
    with _MatmulDtypes() as mode:
        out = model(x)
    assert out.dtype == dtype and mode.seen == {dtype}  # no float32 matmul over the tokens
    ref = layer(x) + adapter.scaling * (x @ adapter.A.to(dtype).T @ adapter.B.to(dtype).T)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert adapter.A.grad.dtype == torch.float32 and adapter.A.grad.abs().sum() > 0
    explicit = geopeft.adapt(nn.Sequential(nn.Linear(16, 12).to(dtype)), "lora", targets=["0"], rank=4,
                             dtype=dtype)
    assert explicit[0].adapter.A.dtype == dtype  # an explicit dtype wins


def _every_method() -> list[str]:
    return geopeft.components()["method"]


def _train_half(method: str, base_dtype: torch.dtype, **adapt_kw) -> tuple[list[float], list, object]:
    """50 AdamW steps of `method` on a `base_dtype` TinyNet (a square, a wide and a tall layer)."""
    torch.manual_seed(0)
    model = TinyNet(vocab=20, dim=8, hidden=12).to(base_dtype)
    model.embed_dim = 8  # the hidden size, as timm models declare it
    ids, labels = tiny_batch(0, 6) % 20, torch.arange(6) % 3

    def loss_fn(m, batch):
        x, y = batch
        return nn.functional.cross_entropy(m(x).float(), y)

    geopeft.adapt(model, method, targets=["query", "ffn.0", "ffn.2"], rank=2, init_batches=[(ids, labels)],
                  loss_fn=loss_fn, **adapt_kw)
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2)
    losses = []
    for _ in range(50):
        loss = loss_fn(model, (ids, labels))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, [a for _, a in geopeft.adapters(model)], opt


#: options a method cannot run without (the length of the run, for a budget schedule)
RUN_OPTIONS = {"adalora": {"total_steps": 50, "target_rank": 1}}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("method", _every_method())
def test_every_recipe_trains_a_half_precision_model(method, dtype):
    """Every registered method on a float16 / bfloat16 model: float32 factors, no step
    skipped, finite and falling loss, factors on their manifolds to float32 accuracy."""
    losses, adapters, opt = _train_half(method, dtype, **RUN_OPTIONS.get(method, {}))
    assert all(p.dtype == torch.float32 for a in adapters for p in a.factors().values())
    assert opt.skipped_steps == 0 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert max_violation(adapters) < 1e-5


@pytest.mark.parametrize("method", ["stella", "balora"])
def test_bfloat16_factors_stay_on_their_manifolds_to_bfloat16_accuracy(method):
    losses, adapters, _ = _train_half(method, torch.bfloat16, dtype=torch.bfloat16)
    assert all(a.factor_dtype == torch.bfloat16 for a in adapters)
    assert losses[-1] < losses[0] and max_violation(adapters) < 1e-2  # bfloat16's ε is 7.8e-3


def test_float16_factors_under_an_eps_that_underflows_are_refused():
    """AdamW's eps=1e-8 is 0 in float16: the first step divides 0 by 0 wherever a gradient is
    0 (all of A at LoRA's init), and the factors become NaN."""
    model = geopeft.adapt(nn.Sequential(nn.Linear(8, 8).half()), "lora", targets=["0"], rank=2,
                          dtype=torch.float16)
    with pytest.raises(geopeft.ConfigError, match=r"factor 'A' of the adapter on '0' is float16.*eps=1e-08"):
        geopeft.optimizer(model, torch.optim.AdamW, lr=1e-3)
    geopeft.optimizer(model, torch.optim.AdamW, lr=1e-3, eps=1e-4)  # representable: accepted
    geopeft.optimizer(model, torch.optim.SGD, lr=1e-3)


# --------------------------------------------------------------------------- failing stages
def _stella(seed: int = 0):
    torch.manual_seed(seed)
    model = geopeft.adapt(TinyNet(), "stella", targets=["query", "ffn.0", "ffn.2"], rank=2,
                          moments="transport", hidden_size=16)
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2)
    return model, opt


def _constrained(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{f}": getattr(a, f).detach().clone() for n, a in geopeft.adapters(model) for f in "UV"}


def _step(model, opt):
    model(tiny_batch(0)).pow(2).sum().backward()
    opt.step()


@pytest.mark.parametrize("stage", ["retract_step", "transport"])
def test_a_geometric_stage_failing_part_way_leaves_no_factor_half_moved(monkeypatch, stage):
    """Stages 4-5 run group by group: the old code wrote the first groups' points before a
    later group raised (as `linalg.eigh` does on a float16 factor), leaving some factors
    moved and others not. Now nothing is written and every factor is back on its point."""
    from geopeft.plugins.stella.manifold import StiefelManifold

    model, opt = _stella()
    _step(model, opt)  # a first step, so moments exist for transport
    opt.zero_grad()
    before = _constrained(model)
    real = getattr(StiefelManifold, stage)
    calls = []

    def fail_second(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")
        return real(self, *args)

    monkeypatch.setattr(StiefelManifold, stage, fail_second)
    with pytest.raises(torch.linalg.LinAlgError) as info:
        _step(model, opt)
    assert len(calls) == 2
    after = _constrained(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a factor moved"
    assert "put back" in "".join(getattr(info.value, "__notes__", ["put back"]))
    assert max_violation([a for _, a in geopeft.adapters(model)]) < 1e-5
    monkeypatch.undo()
    opt.zero_grad()
    _step(model, opt)  # training goes on
    assert not all(torch.equal(before[k], v) for k, v in _constrained(model).items())


def test_a_transform_failing_part_way_changes_no_gradient(plugin):
    class FailsOnWide(geopeft.GradientTransform):
        def transform(self, adapter, grads, state):
            if adapter.shape[0] == 24:
                raise RuntimeError("transform failed")
            return {k: 2 * g for k, g in grads.items()}

    class Holder:
        @staticmethod
        @geopeft.hookimpl
        def register_gradient_transforms(register):
            register("fails_on_wide", FailsOnWide)

    plugin(Holder, "fails-on-wide")
    torch.manual_seed(0)
    model = geopeft.adapt(TinyNet(), "lora", targets=["query", "ffn.0"], rank=2, transforms=["fails_on_wide"])
    opt = geopeft.optimizer(model, torch.optim.SGD, lr=0.1)
    model(tiny_batch(0)).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with pytest.raises(RuntimeError, match="transform failed"):
        opt.step()
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters() if p.grad is not None)


# --------------------------------------------------------------------------- endless skips
def test_max_nonfinite_steps_consecutive_skips_raise_with_the_count():
    torch.manual_seed(0)
    model = geopeft.adapt(TinyNet(), "lora", targets=["query"], rank=2)
    opt = geopeft.optimizer(model, torch.optim.SGD, lr=0.1, max_nonfinite_steps=3)
    assert geopeft.optimizer(model, torch.optim.SGD, lr=0.1).max_nonfinite_steps == 100  # the default

    def step(bad: bool):
        opt.zero_grad()
        model(tiny_batch(0)).sum().backward()
        if bad:
            model.query.adapter.A.grad[0, 0] = float("nan")
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        step(True), step(True), step(False)  # a step taken resets the count
        step(True), step(True)
        assert opt.consecutive_skips == 2 and opt.skipped_steps == 4
        restored = geopeft.optimizer(model, torch.optim.SGD, lr=0.1, max_nonfinite_steps=3)
        restored.load_state_dict(opt.state_dict())
        assert restored.consecutive_skips == 2
        with pytest.raises(geopeft.GeopeftError, match=r"3 consecutive steps had non-finite gradients"
                                                        r" .*\(5 in all\).*max_nonfinite_steps=None"):
            step(True)
        endless = geopeft.optimizer(model, torch.optim.SGD, lr=0.1, max_nonfinite_steps=None)
        opt = endless
        for _ in range(5):
            step(True)
        assert endless.consecutive_skips == 5
    for bad in (0, True, 2.5):
        with pytest.raises(geopeft.ConfigError, match="max_nonfinite_steps must be a positive int or None"):
            geopeft.optimizer(model, torch.optim.SGD, lr=0.1, max_nonfinite_steps=bad)
