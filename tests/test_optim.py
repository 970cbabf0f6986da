"""The staged step: behaves as a torch optimizer; geometry stages keep factors on
their manifolds (tested with the external plugin's `oblique` manifold)."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import geopeft
from geopeft.geometry import max_violation

from helpers import TinyNet, mse, tiny_batch, train

OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.01}),
    "adam": (torch.optim.Adam, {"lr": 1e-2}),
    "sgd-momentum": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3}),
}


def _train(model, opt, steps: int, start: int = 0) -> None:
    train(model, opt, lambda m, i: m(tiny_batch(i)).pow(2).mean(), steps, start)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_low_rank_regression_loss_drops_tenfold():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    target = copy.deepcopy(base)
    with torch.no_grad():  # the truth differs from the base by a rank-2 update
        target.weight.add_(torch.randn(24, 2) @ torch.randn(2, 32) * 0.3)
    model = nn.Sequential(base)
    geopeft.adapt(model, "lora", targets=["0"], rank=4, alpha=4)
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=2e-2, weight_decay=0.0)
    x = torch.randn(256, 32)
    y = target(x).detach()
    losses = train(model, opt, mse(x, y), 300)
    assert losses[-1] <= losses[0] / 10, (losses[0], losses[-1])


@given(name=st.sampled_from(list(OPTIMIZERS)), before=st.integers(1, 4), after=st.integers(1, 3),
       oblique=st.booleans())
def test_state_dict_round_trip_continues_identically(name, before, after, oblique):
    cls, kw = OPTIMIZERS[name]
    torch.manual_seed(0)
    extra = {"manifold": {"A": "oblique"}} if oblique else {}
    model = geopeft.adapt(TinyNet(), "lora", targets="all-linear", rank=3, trainable=["classifier"],
                          **extra)
    opt = geopeft.optimizer(model, cls, **kw)
    _train(model, opt, before)
    twin = copy.deepcopy(model)
    twin_opt = geopeft.optimizer(twin, cls, **kw)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert twin_opt.step_count == opt.step_count == before
    _train(model, opt, after, start=before)
    _train(twin, twin_opt, after, start=before)
    a, b = _params(model), _params(twin)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_is_a_torch_optimizer_with_schedulers_and_grad_scaler(tiny):
    geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=4)
    opt = geopeft.optimizer(tiny, torch.optim.AdamW, lr=1e-2)
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")
    for i in range(4):
        loss = tiny(tiny_batch(i)).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    assert opt.step_count == 4
    assert all(p.grad is None for p in tiny.parameters())


def test_optimizer_from_instance_and_param_groups(tiny):
    geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=4, trainable=["classifier"])
    adapter_params = [p for n, p in tiny.named_parameters() if ".adapter." in n]
    head = list(tiny.classifier.parameters())
    inner = torch.optim.SGD([{"params": adapter_params, "lr": 0.1}, {"params": head, "lr": 0.01}])
    opt = geopeft.optimizer(tiny, inner)
    assert opt.param_groups is inner.param_groups
    _train(tiny, opt, 2)
    assert opt.step_count == 2


# ----------------------------------------------------------------------------- geometry stages
def test_oblique_factor_stays_on_manifold_and_gets_no_weight_decay(tiny):
    geopeft.adapt(tiny, "lora", targets="all-linear", rank=4, manifold={"A": "oblique"})
    assert max_violation([a for _, a in geopeft.adapters(tiny)]) <= 1e-6  # projected at adapt
    opt = geopeft.optimizer(tiny, torch.optim.AdamW, lr=5e-2, weight_decay=0.5)
    a_ids = {id(a.A) for _, a in geopeft.adapters(tiny)}
    for group in opt.param_groups:
        if any(id(p) in a_ids for p in group["params"]):
            assert group["weight_decay"] == 0.0 and all(id(p) in a_ids for p in group["params"])
        else:
            assert group["weight_decay"] == 0.5
    first = _params(tiny)
    _train(tiny, opt, 40)
    for _, a in geopeft.adapters(tiny):
        norms = a.A.detach().norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert any(not torch.equal(first[n], p) for n, p in tiny.named_parameters() if n.endswith(".A"))


def test_one_step_equals_hand_written_riemannian_sgd(tiny):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=4, manifold={"A": "oblique"})
    with torch.no_grad():
        tiny.query.adapter.B.normal_()
    lr = 0.3
    opt = geopeft.optimizer(tiny, torch.optim.SGD, lr=lr)
    x_old = tiny.query.adapter.A.detach().clone()
    b_old = tiny.query.adapter.B.detach().clone()
    tiny(tiny_batch(0)).pow(2).mean().backward()
    g = tiny.query.adapter.A.grad.clone()
    gb = tiny.query.adapter.B.grad.clone()
    opt.step()
    # reference: Riemannian gradient, Euclidean SGD step, tangent projection, retraction
    rgrad = g - x_old * (x_old * g).sum(-1, keepdim=True)
    moved = x_old - lr * rgrad
    delta = moved - x_old
    delta = delta - x_old * (x_old * delta).sum(-1, keepdim=True)
    expected = (x_old + delta) / (x_old + delta).norm(dim=-1, keepdim=True)
    assert torch.allclose(tiny.query.adapter.A, expected, atol=1e-6)
    assert torch.allclose(tiny.query.adapter.B, b_old - lr * gb, atol=1e-7)  # Euclidean factor
    # stage 2 rewrote the gradient in place: it is tangent at the old point
    assert (tiny.query.adapter.A.grad * x_old).sum(-1).abs().max() <= 1e-6


def test_riemannian_grad_can_be_turned_off(tiny):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=4, manifold={"A": "oblique"},
                  riemannian_grad=False)
    opt = geopeft.optimizer(tiny, torch.optim.SGD, lr=0.1)
    tiny(tiny_batch(0)).pow(2).mean().backward()
    g = tiny.query.adapter.A.grad.clone()
    opt.step()
    assert torch.equal(tiny.query.adapter.A.grad, g)
    assert tiny.query.adapter.A.detach().norm(dim=-1).sub(1).abs().max() <= 1e-6


def test_first_moments_transported_to_new_tangent_space(tiny):
    geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=4, manifold={"A": "oblique"},
                  moments="transport")
    opt = geopeft.optimizer(tiny, torch.optim.SGD, lr=0.1, momentum=0.9)
    _train(tiny, opt, 3)
    for _, a in geopeft.adapters(tiny):
        buf = opt.state[a.A]["momentum_buffer"]
        assert (buf * a.A.detach()).sum(-1).abs().max() <= 1e-5


def test_moments_kept_by_default(tiny):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=4, manifold={"A": "oblique"})
    opt = geopeft.optimizer(tiny, torch.optim.SGD, lr=0.1, momentum=0.9)
    tiny(tiny_batch(0)).pow(2).mean().backward()
    opt.step()
    a = tiny.query.adapter.A
    # momentum after one step is the (tangent-at-old-point) gradient, not re-projected
    assert torch.equal(opt.state[a]["momentum_buffer"], a.grad)


def test_external_transform_rewrites_gradients(tiny):
    geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=4, transforms=["scaled_gd"],
                  delta=1e-3)
    with torch.no_grad():
        for _, a in geopeft.adapters(tiny):
            a.B.normal_()
    opt = geopeft.optimizer(tiny, torch.optim.SGD, lr=0.0)
    tiny(tiny_batch(0)).pow(2).mean().backward()
    raw = {n: (a.A.grad.clone(), a.B.grad.clone()) for n, a in geopeft.adapters(tiny)}
    opt.step()
    for n, a in geopeft.adapters(tiny):
        ga, gb = raw[n]
        eye = torch.eye(4)
        want_a = torch.linalg.solve(a.B.T @ a.B + 1e-3 * eye, ga)
        want_b = gb @ torch.linalg.inv(a.A @ a.A.T + 1e-3 * eye)
        assert torch.allclose(a.A.grad, want_a, rtol=1e-4, atol=1e-6)
        assert torch.allclose(a.B.grad, want_b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- ranks and state
class HalveAt(geopeft.RankController):
    """Test controller: at step `at`, halve every rank keeping the largest-norm rows of A."""

    def __init__(self, at: int = 2):
        self.at = at
        self.calls = 0

    def step(self, step, adapters, optimizer):
        self.calls += 1
        if step != self.at:
            return None
        changed = {}
        for name, a in adapters:
            keep = a.A.detach().norm(dim=1).argsort(descending=True)[: a.rank // 2]
            optimizer.resize(name, a.rank // 2, keep.sort().values)
            changed[name] = a.rank
        return changed

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


class CountSteps(geopeft.GradientTransform):
    """Test transform with tensor state: counts its calls; leaves gradients alone."""

    requires = frozenset({"A"})

    def init_state(self, adapter):
        return {"count": torch.zeros(())}

    def transform(self, adapter, grads, state):
        state["count"] += 1
        return grads


@pytest.fixture
def test_components(plugin):
    ns = types.SimpleNamespace(
        register_rank_controllers=geopeft.hookimpl(lambda register: register("halve_at", HalveAt)),
        register_gradient_transforms=geopeft.hookimpl(lambda register: register("count", CountSteps)),
    )
    plugin(ns, "test-components")


def test_rank_controller_resizes_factors_and_optimizer_state(tiny, test_components):
    geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=6, rank_controller="halve_at",
                  transforms=["count"])
    with torch.no_grad():
        for _, a in geopeft.adapters(tiny):
            a.B.normal_()
    opt = geopeft.optimizer(tiny, torch.optim.AdamW, lr=1e-2)
    scales = [a.scaling for _, a in geopeft.adapters(tiny)]
    _train(tiny, opt, 2)
    assert opt.ranks() == {"query": 3, "value": 3}
    assert [a.scaling for _, a in geopeft.adapters(tiny)] == scales  # no silent rescale
    for _, a in geopeft.adapters(tiny):
        assert a.A.shape == (3, 16) and a.B.shape == (16, 3)
        assert opt.state[a.A]["exp_avg"].shape == a.A.shape
        assert opt.state[a.B]["exp_avg_sq"].shape == a.B.shape
    _train(tiny, opt, 2, start=2)  # keeps training at the new rank
    sd = copy.deepcopy(opt.state_dict())
    assert sd["geopeft"]["ranks"] == {"query": 3, "value": 3}
    assert float(sd["geopeft"]["transforms"]["query"][0]["count"]) == 4


def test_state_dict_restores_ranks_transform_and_controller_state(test_components):
    torch.manual_seed(1)
    base = TinyNet()
    model = geopeft.adapt(copy.deepcopy(base), "lora", targets=["query", "value"], rank=6,
                          rank_controller="halve_at", transforms=["count"])
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2)
    _train(model, opt, 3)
    # a new run from the same start: ranks still 6 until the state is loaded
    twin = geopeft.adapt(copy.deepcopy(base), "lora", targets=["query", "value"], rank=6,
                         rank_controller="halve_at", transforms=["count"])
    with torch.no_grad():
        assert all(b.rank == 6 for _, b in geopeft.adapters(twin))  # load_state_dict must resize
    twin_opt = geopeft.optimizer(twin, torch.optim.AdamW, lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert twin_opt.ranks() == opt.ranks() == {"query": 3, "value": 3}
    with torch.no_grad():
        for (_, a), (_, b) in zip(geopeft.adapters(model), geopeft.adapters(twin)):
            b.A.copy_(a.A)
            b.B.copy_(a.B)
    assert twin_opt.rank_controller.calls == 3
    assert float(twin_opt.transform_states["query"][0]["count"]) == 3
    _train(model, opt, 2, start=3)
    _train(twin, twin_opt, 2, start=3)
    for (_, a), (_, b) in zip(geopeft.adapters(model), geopeft.adapters(twin)):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


def test_step_hooks_and_closure(tiny):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=2)
    opt = geopeft.optimizer(tiny, torch.optim.SGD, lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o.step_count)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.step_count)))

    def closure():
        opt.zero_grad()
        loss = tiny(tiny_batch(0)).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and calls == [("pre", 0), ("post", 1)]


def test_resize_checks_keep_and_ranks_must_name_targets(tiny):
    with pytest.raises(geopeft.ConfigError, match="ranks= names layers that targets= does not select: ffn.0"):
        geopeft.adapt(copy.deepcopy(tiny), "lora", targets=["query"], rank=4, ranks={"ffn.0": 2})
    geopeft.adapt(tiny, "lora", targets=["query"], rank=4)
    opt = geopeft.optimizer(tiny, torch.optim.AdamW, lr=1e-2)
    for bad in ([0, 0], [4], [0, 1, 2], [[0, 1]]):
        with pytest.raises(geopeft.ShapeError, match=r"keep must be distinct rank indices in \[0, 4\)"):
            opt.resize("query", 2, torch.tensor(bad))
    assert tiny.query.adapter.rank == 4  # refused resizes changed nothing
    opt.resize("query", 6, torch.tensor([3, 1]))  # grow: kept indices first, then zeros
    assert tiny.query.adapter.A.shape == (6, 16) and torch.count_nonzero(tiny.query.adapter.A[2:]) == 0


def test_resize_by_a_change_of_basis_maps_factors_and_moments(tiny):
    """B ← B·R, A ← Rᵀ·A for a (4, 3) R with orthonormal columns: first moments map as
    their factors, second moments by R∘R; resize_many moves both layers at once."""
    geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=4)
    with torch.no_grad():
        for _, a in geopeft.adapters(tiny):
            a.B.normal_()
    opt = geopeft.optimizer(tiny, torch.optim.AdamW, lr=1e-2)
    _train(tiny, opt, 2)
    rot = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0))).Q[:, :3]
    before = {n: (a.B.detach().clone(), a.A.detach().clone(), opt.state[a.B]["exp_avg"].clone(),
                  opt.state[a.B]["exp_avg_sq"].clone(), opt.state[a.A]["exp_avg"].clone())
              for n, a in geopeft.adapters(tiny)}
    opt.resize_many([geopeft.RankChange(n, 3, basis={"A": (rot,), "B": (rot,)}) for n in before])
    for n, a in geopeft.adapters(tiny):
        b, aa, mb, vb, ma = before[n]
        assert torch.allclose(a.B, b @ rot, atol=1e-6) and torch.allclose(a.A, rot.T @ aa, atol=1e-6)
        assert torch.allclose(opt.state[a.B]["exp_avg"], mb @ rot, atol=1e-7)
        assert torch.allclose(opt.state[a.B]["exp_avg_sq"], vb @ (rot * rot), atol=1e-9)
        assert torch.allclose(opt.state[a.A]["exp_avg"], rot.T @ ma, atol=1e-7)
        assert bool((opt.state[a.A]["exp_avg_sq"] >= 0).all())
    _train(tiny, opt, 1, start=2)  # the new parameters are the optimizer's
    with pytest.raises(geopeft.ShapeError, match=r"basis for factor 'A' must be 1 matri\(ces\) of shape \(3, 2\)"):
        opt.resize("query", 2, basis={"A": (rot,), "B": (rot,)})
    values = {"A": torch.ones(5, 16), "B": torch.zeros(16, 5)}
    opt.resize("query", 5, values=values)
    assert torch.equal(tiny.query.adapter.A, values["A"]) and opt.ranks() == {"query": 5, "value": 3}


def test_new_second_moments_mean_starts_new_coordinates_at_the_old_entries_mean(tiny):
    """`new_second_moments={"B": "mean"}`: after growing 4 → 6 (a basis map with zero columns
    4, 5, or kept indices and padding), the second moments of B's new columns hold the mean
    of its old columns' entries; first moments and the other factor's stay 0 there; an
    unknown policy is refused."""
    geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=4)
    opt = geopeft.optimizer(tiny, torch.optim.AdamW, lr=1e-2, amsgrad=True)
    _train(tiny, opt, 2)
    grow = torch.eye(4, 6)
    before = {n: {k: opt.state[a.B][k].clone() for k in ("exp_avg_sq", "max_exp_avg_sq")}
              for n, a in geopeft.adapters(tiny)}
    opt.resize_many([geopeft.RankChange("query", 6, basis={"A": (grow,), "B": (grow,)},
                                        new_second_moments={"B": "mean"}),
                     geopeft.RankChange("value", 6, keep=torch.tensor([2, 0, 1, 3]),
                                        new_second_moments={"B": "mean"})])
    for n, a in geopeft.adapters(tiny):
        for key, old in before[n].items():
            if n == "value":
                old = old[:, [2, 0, 1, 3]]
            v = opt.state[a.B][key]
            assert torch.equal(v[:, :4], old)
            assert torch.allclose(v[:, 4:], old.mean().expand(16, 2), rtol=1e-6, atol=0)
        assert not opt.state[a.B]["exp_avg"][:, 4:].any() and not opt.state[a.A]["exp_avg_sq"][4:].any()
    _train(tiny, opt, 1, start=2)
    with pytest.raises(geopeft.ConfigError, match="names an unknown policy; use one of zero, mean"):
        geopeft.RankChange("query", 6, new_second_moments={"B": "max"})


def test_factor_without_gradient_stays_put_while_its_group_steps(tiny):
    geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=4, manifold={"A": "oblique"})
    opt = geopeft.optimizer(tiny, torch.optim.SGD, lr=0.3)
    tiny(tiny_batch(0)).pow(2).mean().backward()
    query, value = tiny.query.adapter, tiny.value.adapter
    value.A.grad = None  # same shape and manifold as query.A: one group, one member idle
    q_old, v_old = query.A.detach().clone(), value.A.detach().clone()
    g = query.A.grad.clone()
    opt.step()
    assert torch.allclose(value.A, v_old, rtol=0, atol=1e-6)  # Δ = 0: moved by rounding only
    rgrad = g - q_old * (q_old * g).sum(-1, keepdim=True)
    moved = q_old - 0.3 * rgrad
    assert torch.allclose(query.A, moved / moved.norm(dim=-1, keepdim=True), atol=1e-6)


# ----------------------------------------------------------------------------- a coupled manifold that retracts
class JointSphere(geopeft.Manifold):
    """Pairs (B, A) with ‖B‖²_F + ‖A‖²_F = 1: a coupled manifold with the default
    post_step = "retract". Points and vectors are tuples (B (G, m, r), A (G, r, n))."""

    coupled = True

    @staticmethod
    def _inner(x, u):
        return sum((a * b).sum((-2, -1)) for a, b in zip(x, u))[..., None, None]

    def project_tangent(self, x, u):
        c = self._inner(x, u)
        return tuple(ui - c * xi for xi, ui in zip(x, u))

    def retract(self, x, u):
        return self.project(tuple(xi + ui for xi, ui in zip(x, u)))

    def project(self, x):
        norm = self._inner(x, x).sqrt()
        return tuple(xi / norm for xi in x)

    def violation(self, x):
        return (self._inner(x, x)[..., 0, 0] - 1).abs()

    def random_point(self, shape, generator=None, dtype=torch.float32):
        raise NotImplementedError


def test_coupled_manifold_with_retract_step_keeps_pairs_on_it_and_moments_tangent(tiny):
    geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=3, manifold={"B,A": JointSphere()},
                  moments="transport")
    opt = geopeft.optimizer(tiny, torch.optim.SGD, lr=0.2, momentum=0.9)
    before = {n: (a.B.detach().clone(), a.A.detach().clone()) for n, a in geopeft.adapters(tiny)}
    tiny(tiny_batch(0)).pow(2).mean().backward()
    olds = [(a.B.detach().clone(), a.A.detach().clone()) for _, a in geopeft.adapters(tiny)]
    opt.step()
    # stage 2 made the pair's gradient tangent at the old point: <x, g> over both factors is 0
    for (b, a_), (_, a) in zip(olds, geopeft.adapters(tiny)):
        assert abs(float((b * a.B.grad).sum() + (a_ * a.A.grad).sum())) <= 1e-6
    opt.zero_grad()
    _train(tiny, opt, 3, start=1)
    for name, a in geopeft.adapters(tiny):
        b, a_ = a.B.detach(), a.A.detach()
        assert abs(float(b.pow(2).sum() + a_.pow(2).sum()) - 1) <= 1e-5, name
        assert not torch.equal(b, before[name][0])
        mb, ma = opt.state[a.B]["momentum_buffer"], opt.state[a.A]["momentum_buffer"]
        assert abs(float((b * mb).sum() + (a_ * ma).sum())) <= 1e-5, name  # transported


def test_manifold_with_an_unknown_post_step_is_refused_at_adapt(tiny):
    class Odd(JointSphere):
        post_step = "sometimes"

    with pytest.raises(geopeft.IncompatibleComponentsError, match="post_step='sometimes'"):
        geopeft.adapt(tiny, "lora", targets=["query"], manifold={"B,A": Odd()})
    assert geopeft.adapters(tiny) == []
