"""LoRA-Pro (plugins/lorapro, kernels/lorapro.py): optimality of the adjusted gradients
against brute-force least squares, the Sylvester choice of X, finite results in
degenerate cases, both modes inside geopeft.optimizer, and real MiniLM gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import geopeft
from geopeft import ConfigError, GradientTransform
from geopeft.kernels import equivalent_gradient, lorapro_adjust
from geopeft.plugins.lorapro.transform import LoRAProTransform

from helpers import train

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers
def _single(m: int, n: int, r: int, alpha: float, rslora: bool = False, dtype=F64, mode="efficient"):
    """A one-Linear model (in n, out m) with a lorapro adapter of rank r; (model, adapter)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, m, dtype=dtype))
    geopeft.adapt(model, "lorapro", targets=["0"], rank=r, alpha=alpha, rslora=rslora, mode=mode)
    return model, geopeft.adapters(model)[0][1]


def _full_rank(rows: int, cols: int, gen: torch.Generator, lo: float = 0.3, hi: float = 3.0):
    """A random rows × cols matrix of full rank min(rows, cols), singular values in [lo, hi]."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=F64))
    sigma = lo + (hi - lo) * torch.rand(k, generator=gen, dtype=F64)
    return u @ torch.diag(sigma) @ v.T


def _set(adapter, A, B):
    with torch.no_grad():
        adapter.A.copy_(A)
        adapter.B.copy_(B)


def _adjust(adapter, ga, gb, transform=None):
    transform = transform or LoRAProTransform()
    out = transform.transform_group([adapter], [{"A": ga, "B": gb}], [{}])[0]
    return out["A"], out["B"]


def _brute_force_residual(A, B, g, s) -> float:
    """min over (ĝ_A, ĝ_B) of ‖s(B ĝ_A + ĝ_B A) − g‖_F: least squares on the linear map
    written as a matrix over the row-major vectorised unknowns, in float64."""
    m, r = B.shape
    n = A.shape[1]
    # vec(B ĝ_A) = (B ⊗ I_n) vec(ĝ_A) and vec(ĝ_B A) = (I_m ⊗ Aᵀ) vec(ĝ_B)
    to_ga = s * torch.einsum("ik,jl->ijkl", B, torch.eye(n, dtype=F64)).reshape(m * n, r * n)
    to_gb = s * torch.einsum("ik,jl->ijkl", torch.eye(m, dtype=F64), A.T).reshape(m * n, m * r)
    M = torch.cat([to_ga, to_gb], dim=1)
    sol = torch.linalg.lstsq(M, g.reshape(-1, 1), driver="gelsd").solution
    return float((M @ sol - g.reshape(-1, 1)).norm())


def _residual(A, B, ga, gb, s, g) -> float:
    return float((equivalent_gradient(A[None], B[None], ga[None], gb[None], s)[0].double() - g).norm())


# ----------------------------------------------------------------------------- optimality
@given(r=st.integers(1, 8), m_extra=st.integers(0, 16), n_extra=st.integers(0, 16),
       alpha=st.floats(0.25, 64.0), rslora=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_adjusted_gradients_reach_the_least_squares_optimum(r, m_extra, n_extra, alpha, rslora, seed):
    m, n = r + m_extra, r + n_extra
    model, ad = _single(m, n, r, alpha, rslora)
    s = ad.scaling
    assert s == pytest.approx(alpha / (math.sqrt(r) if rslora else r))
    gen = torch.Generator().manual_seed(seed)
    A, B = _full_rank(r, n, gen), _full_rank(m, r, gen)
    g = torch.randn(m, n, generator=gen, dtype=F64)
    _set(ad, A, B)
    ga, gb = s * B.T @ g, s * g @ A.T  # the factor gradients of the full gradient g
    new_a, new_b = _adjust(ad, ga, gb)
    ours = _residual(A, B, new_a, new_b, s, g)
    best = _brute_force_residual(A, B, g, s)
    gnorm = float(g.norm())
    assert abs(ours - best) <= 1e-5 * max(best, 1e-6 * gnorm), (ours, best)
    assert ours <= _residual(A, B, ga, gb, s, g) + 1e-9 * gnorm  # never worse than LoRA's own
    # X solves the Sylvester equation  BᵀB X + X AAᵀ = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ
    X = lorapro_adjust(A[None], B[None], ga[None], gb[None], s).X[0]
    P, Q = B.T @ B, A @ A.T
    C = -(1 / s**2) * torch.linalg.solve(P, ga) @ A.T
    assert float((P @ X + X @ Q - C).norm()) <= 1e-5 * max(float(C.norm()), 1e-30)


@pytest.mark.parametrize("m,n,r", [(24, 40, 8), (40, 17, 4), (9, 9, 8)])
def test_float32_path_is_optimal_too(m, n, r):
    model, ad = _single(m, n, r, alpha=16.0, dtype=torch.float32)
    gen = torch.Generator().manual_seed(m * n + r)
    A, B = _full_rank(r, n, gen), _full_rank(m, r, gen)
    g = torch.randn(m, n, generator=gen, dtype=F64)
    _set(ad, A, B)
    s = ad.scaling
    A32, B32 = ad.A.detach().double(), ad.B.detach().double()
    new_a, new_b = _adjust(ad, (s * B.T @ g).float(), (s * g @ A.T).float())
    assert new_a.dtype == new_b.dtype == torch.float32
    ours = _residual(A32, B32, new_a.double(), new_b.double(), s, g)
    best = _brute_force_residual(A32, B32, g, s)
    assert abs(ours - best) <= 1e-5 * best


def test_sylvester_x_keeps_the_adjusted_gradients_closest_to_lora_s():
    """X minimises ‖ĝ_A − g_A‖² + ‖ĝ_B − g_B‖² over the r × r freedom: its gradient
    (ĝ_A − g_A)Aᵀ − Bᵀ(ĝ_B − g_B) vanishes, and no other X does better."""
    gen = torch.Generator().manual_seed(3)
    m, n, r, s = 30, 20, 6, 2.0
    A, B = _full_rank(r, n, gen), _full_rank(m, r, gen)
    g = torch.randn(m, n, generator=gen, dtype=F64)
    ga, gb = s * B.T @ g, s * g @ A.T
    out = lorapro_adjust(A[None], B[None], ga[None], gb[None], s)
    da, db = out.grad_A[0] - ga, out.grad_B[0] - gb
    grad_x = da @ A.T - B.T @ db
    assert float(grad_x.norm()) <= 1e-9 * float(ga.norm())
    base = float(da.norm() ** 2 + db.norm() ** 2)
    for _ in range(5):
        E = 1e-2 * torch.randn(r, r, generator=gen, dtype=F64)
        worse = float((da + E @ A).norm() ** 2 + (db - B @ E).norm() ** 2)
        assert worse > base


def test_batched_group_equals_one_adapter_at_a_time():
    gen = torch.Generator().manual_seed(5)
    t = LoRAProTransform()
    ads, grads = [], []
    for _ in range(3):
        _, ad = _single(12, 10, 3, alpha=6.0, dtype=torch.float32)
        _set(ad, _full_rank(3, 10, gen), _full_rank(12, 3, gen))
        ads.append(ad)
        grads.append({"A": torch.randn(3, 10, generator=gen).float(),
                      "B": torch.randn(12, 3, generator=gen).float()})
    together = t.transform_group(ads, grads, [{}, {}, {}])
    for ad, g, out in zip(ads, grads, together):
        alone = t.transform(ad, g, {})
        for f in ("A", "B"):
            torch.testing.assert_close(out[f], alone[f], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- degenerate cases
def test_b_zero_first_step_is_finite_and_optimal():
    m, n, r, s = 20, 16, 4, 2.0
    model, ad = _single(m, n, r, alpha=s * r)
    gen = torch.Generator().manual_seed(1)
    A, B = _full_rank(r, n, gen), torch.zeros(m, r, dtype=F64)
    _set(ad, A, B)
    g = torch.randn(m, n, generator=gen, dtype=F64)
    ga, gb = s * B.T @ g, s * g @ A.T
    new_a, new_b = _adjust(ad, ga, gb)
    assert torch.equal(new_a, torch.zeros_like(new_a))
    torch.testing.assert_close(new_b, gb @ torch.linalg.inv(A @ A.T) / s**2)
    assert _residual(A, B, new_a, new_b, s, g) == pytest.approx(_brute_force_residual(A, B, g, s), rel=1e-9)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_rank_one_b_is_finite_and_still_optimal(dtype):
    """The truncated pseudo-inverse keeps B P⁺ Bᵀ the exact projector onto range(B)."""
    m, n, r, s = 18, 14, 4, 1.5
    model, ad = _single(m, n, r, alpha=s * r, dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    A = _full_rank(r, n, gen)
    B = torch.randn(m, 1, generator=gen, dtype=F64) @ torch.randn(1, r, generator=gen, dtype=F64)
    _set(ad, A, B)  # in float32 B is rank 1 up to rounding: the cutoff δ drops the noise
    g = torch.randn(m, n, generator=gen, dtype=F64)
    new_a, new_b = _adjust(ad, (s * B.T @ g).to(dtype), (s * g @ A.T).to(dtype))
    assert new_a.isfinite().all() and new_b.isfinite().all()
    ours = _residual(A, B, new_a.double(), new_b.double(), s, g)
    assert ours == pytest.approx(_brute_force_residual(A, B, g, s), rel=1e-5)
    assert ours <= _residual(A, B, s * B.T @ g, s * g @ A.T, s, g)


@pytest.mark.parametrize("scale", [1e-8, 1e-3, 1e3, 1e8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["full-rank", "B=0", "rank-1 B", "A=B=0", "tiny B"])
def test_degenerate_factors_and_extreme_scales_give_finite_gradients(scale, dtype, case):
    m, n, r = 16, 12, 4
    model, ad = _single(m, n, r, alpha=scale * r, dtype=dtype)
    assert ad.scaling == pytest.approx(scale)
    gen = torch.Generator().manual_seed(4)
    A, B = _full_rank(r, n, gen), _full_rank(m, r, gen)
    if case == "B=0":
        B = torch.zeros_like(B)
    elif case == "rank-1 B":
        B = B[:, :1] @ torch.ones(1, r, dtype=F64)
    elif case == "A=B=0":
        A, B = torch.zeros_like(A), torch.zeros_like(B)
    elif case == "tiny B":
        B = B * 1e-20
    _set(ad, A, B)
    g = torch.randn(m, n, generator=gen, dtype=F64) / max(scale, 1.0)  # finite factor gradients
    ga, gb = (scale * ad.B.detach().double().T @ g).to(dtype), (scale * g @ ad.A.detach().double().T).to(dtype)
    assert ga.isfinite().all() and gb.isfinite().all()
    new_a, new_b = _adjust(ad, ga, gb)
    assert new_a.dtype == new_b.dtype == dtype
    assert new_a.isfinite().all() and new_b.isfinite().all(), case


# ----------------------------------------------------------------------------- in the optimizer
def _reference_adjust(A, B, ga, gb, s):
    """LoRA-Pro's formulas with explicit inverses and a Kronecker Sylvester solve (float64)."""
    A, B, ga, gb = (t.double() for t in (A, B, ga, gb))
    m, r = B.shape
    P_inv, Q_inv = torch.linalg.inv(B.T @ B), torch.linalg.inv(A @ A.T)
    C = -(1 / s**2) * P_inv @ ga @ A.T
    # column-major vec: vec(P X + X Q) = (I ⊗ P + Qᵀ ⊗ I) vec(X)
    eye = torch.eye(r, dtype=F64)
    K = (torch.einsum("ik,jl->ijkl", eye, B.T @ B) + torch.einsum("ik,jl->ijkl", (A @ A.T).T, eye)
         ).reshape(r * r, r * r)
    X = torch.linalg.solve(K, C.T.reshape(-1)).reshape(r, r).T
    new_a = (1 / s**2) * P_inv @ ga + X @ A
    new_b = (1 / s**2) * (torch.eye(m, dtype=F64) - B @ P_inv @ B.T) @ gb @ Q_inv - B @ X
    return new_a, new_b


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 14), nn.Tanh(), nn.Linear(14, 14), nn.Tanh(), nn.Linear(14, 6))


def _data(i):
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(32, 10, generator=gen), torch.randn(32, 6, generator=gen)


def _data_loss(model, i):
    x, y = _data(i)
    return nn.functional.mse_loss(model(x), y)


def _nonzero_b(model, seed=7):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, ad in geopeft.adapters(model):
            ad.B.copy_(0.3 * torch.randn(ad.B.shape, generator=gen))


@pytest.mark.parametrize("kind", ["sgd-momentum", "adamw-split-reversed"])
def test_efficient_mode_with_any_optimizer_and_group_layout(kind):
    """The adjusted gradients reach any inner optimizer whatever its groups and parameter
    order: geopeft's step equals a plain torch step on hand-adjusted gradients."""
    model = geopeft.adapt(_net(), "lorapro", targets="all-linear", rank=3, alpha=6)
    _nonzero_b(model)
    twin = copy.deepcopy(model)

    def make(m):
        named = geopeft.adapters(m)
        if kind == "sgd-momentum":
            params = [p for p in m.parameters() if p.requires_grad]
            return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
        bs = [a.B for _, a in reversed(named)]
        As = [a.A for _, a in reversed(named)]
        return torch.optim.AdamW([{"params": bs, "lr": 2e-2}, {"params": As, "lr": 1e-2,
                                                              "weight_decay": 0.1}])

    opt = geopeft.optimizer(model, make(model))
    ref_opt = make(twin)
    for i in range(4):
        x, y = _data(i)
        for m in (model, twin):
            nn.functional.mse_loss(m(x), y).backward()
        for _, ad in geopeft.adapters(twin):  # hand-adjusted gradients for the twin
            new_a, new_b = _reference_adjust(ad.A.detach(), ad.B.detach(), ad.A.grad, ad.B.grad, ad.scaling)
            ad.A.grad.copy_(new_a)
            ad.B.grad.copy_(new_b)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), _net().parameters()))


def test_full_mode_step_equals_the_papers_full_step():
    """From the same state (weights and m × n moments after two steps), one step of
    mode='full' equals a hand-written float64 reference of the paper's full-mode step:
    g̃ from the adjusted gradients, Adam in full space, project back (s·Bᵀd, s·d·Aᵀ),
    adjust again, SGD step."""
    betas, eps, lr = (0.8, 0.95), 1e-8, 0.05
    model = geopeft.adapt(_net(), "lorapro", targets="all-linear", rank=3, alpha=6, mode="full",
                          betas=betas, eps=eps)
    _nonzero_b(model)
    opt = geopeft.optimizer(model, torch.optim.SGD, lr=lr)
    for i in range(3):
        x, y = _data(i)
        nn.functional.mse_loss(model(x), y).backward()
        if i < 2:
            opt.step()
            opt.zero_grad()
    named = geopeft.adapters(model)
    before = {n: (a.A.detach().double().clone(), a.B.detach().double().clone(),
                  a.A.grad.double().clone(), a.B.grad.double().clone(), a.scaling) for n, a in named}
    states = {n: {k: v.double().clone() for k, v in opt.transform_states[n][0].items()} for n, _ in named}
    assert all(st["step"].item() == 2 for st in states.values())
    opt.step()
    for name, ad in named:
        A, B, ga, gb, s = before[name]
        st = states[name]
        ha, hb = _reference_adjust(A, B, ga, gb, s)
        g_eq = s * (B @ ha + hb @ A)
        m1 = betas[0] * st["exp_avg"] + (1 - betas[0]) * g_eq
        m2 = betas[1] * st["exp_avg_sq"] + (1 - betas[1]) * g_eq**2
        t = 3
        d = (m1 / (1 - betas[0] ** t)) / (m2.sqrt() / math.sqrt(1 - betas[1] ** t) + eps)
        ra, rb = _reference_adjust(A, B, s * B.T @ d, s * d @ A.T, s)
        torch.testing.assert_close(ad.A.detach().double(), A - lr * ra, rtol=0, atol=1e-5)
        torch.testing.assert_close(ad.B.detach().double(), B - lr * rb, rtol=0, atol=1e-5)
        new_st = opt.transform_states[name][0]
        torch.testing.assert_close(new_st["exp_avg"].double(), m1, rtol=1e-5, atol=1e-7)
        assert float((ad.A.detach().double() - A).norm()) > 1e-3  # the step did move


def test_full_mode_state_round_trips():
    model = geopeft.adapt(_net(), "lorapro", targets="all-linear", rank=3, alpha=6, mode="full",
                          weight_decay=0.01)
    _nonzero_b(model)
    opt = geopeft.optimizer(model, torch.optim.SGD, lr=0.02)
    train(model, opt, _data_loss, 2, 0)
    name = geopeft.adapters(model)[0][0]
    st = opt.transform_states[name][0]
    m, n = geopeft.adapters(model)[0][1].shape
    assert st["exp_avg"].shape == st["exp_avg_sq"].shape == (m, n)
    twin = copy.deepcopy(model)
    twin_opt = geopeft.optimizer(twin, torch.optim.SGD, lr=0.02)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, _data_loss, 2, 2)
    train(twin, twin_opt, _data_loss, 2, 2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_full_mode_gives_a_trainable_head_the_users_adamw_and_the_factors_their_own_step():
    """Full mode under AdamW: the head's update is exactly AdamW's on its gradients, the
    factors' is exactly the one plain SGD would apply (p − lr·ĝ), and AdamW keeps no state
    for the factors."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4))
    model = geopeft.adapt(net, "lorapro", targets=["0"], rank=3, mode="full", trainable=["2"])
    _nonzero_b(model)
    sgd_twin = copy.deepcopy(model)
    kw = {"lr": 1e-2, "weight_decay": 0.05}
    opt = geopeft.optimizer(model, torch.optim.AdamW, **kw)
    head_ref = copy.deepcopy(model[2])
    head_opt = torch.optim.AdamW(head_ref.parameters(), **kw)
    sgd_opt = geopeft.optimizer(sgd_twin, torch.optim.SGD, lr=kw["lr"])
    x, y = torch.randn(16, 10), torch.randn(16, 4)
    for step in range(3):
        for m in (model, sgd_twin):
            nn.functional.mse_loss(m(x), y).backward()
        for p, q in zip(head_ref.parameters(), model[2].parameters()):
            p.grad = q.grad.clone()
        opt.step()
        head_opt.step()
        if step == 0:  # same state before the step: the factors move alike under SGD and AdamW
            sgd_opt.step()
            for f in ("A", "B"):
                assert torch.equal(getattr(model[0].adapter, f), getattr(sgd_twin[0].adapter, f))
        for o in (opt, sgd_opt):
            o.zero_grad()
    for p, q in zip(head_ref.parameters(), model[2].parameters()):
        assert torch.equal(p, q)
    assert not opt.state.get(model[0].adapter.A) and not opt.state.get(model[0].adapter.B)
    assert opt.transform_states["0"][0]["step"].item() == 3


def test_options_recipes_and_save_load(tmp_path):
    model = geopeft.adapt(_net(), "rslora-pro", targets="all-linear", rank=4, alpha=8)
    ad = geopeft.adapters(model)[0][1]
    assert ad.scaling == pytest.approx(8 / 2)
    with pytest.raises(ConfigError, match="only apply to mode='full'"):
        geopeft.adapt(_net(), "lorapro", targets="all-linear", rank=4, betas=(0.9, 0.99))
    with pytest.raises(ConfigError, match="mode must be one of"):
        geopeft.adapt(_net(), "lorapro", targets="all-linear", rank=4, mode="fast")
    full = geopeft.adapt(_net(), "lorapro", targets="all-linear", rank=4, mode="full", betas=(0.8, 0.9))
    geopeft.save(full, tmp_path)
    loaded = geopeft.load(_net(), tmp_path)
    t = loaded.geopeft_state.resolved.transforms[0]
    assert (t.mode, t.betas) == ("full", (0.8, 0.9))


def test_transform_is_used_by_the_step_and_trains(tiny):
    geopeft.adapt(tiny, "lorapro", targets="all-linear", rank=4, alpha=8, trainable=["classifier"])
    opt = geopeft.optimizer(tiny, torch.optim.AdamW, lr=1e-2)
    ids = torch.randint(0, 50, (16, 6), generator=torch.Generator().manual_seed(0))
    target = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    losses = train(tiny, opt, lambda m, i: nn.functional.mse_loss(m(ids), target), 30)
    assert losses[-1] < 0.7 * losses[0]
    assert all(math.isfinite(v) for v in losses)


def test_check_optimizer_hook_runs_when_wrapping(tiny, plugin):
    """Core: GradientTransform.check_optimizer is called with the inner optimizer and the
    adapters when geopeft.optimizer wraps, and its error reaches the user."""
    seen = []

    class Picky(GradientTransform):
        name = "picky"

        def transform(self, adapter, grads, state):
            return grads

        def check_optimizer(self, optimizer, adapters):
            seen.append((type(optimizer), len(adapters)))
            if not isinstance(optimizer, torch.optim.SGD):
                raise ConfigError("picky wants SGD")

    class Plugin:
        @staticmethod
        @geopeft.hookimpl
        def register_gradient_transforms(register):
            register("picky", Picky)

    plugin(Plugin, "picky-plugin")
    geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=2, transforms=["picky"])
    with pytest.raises(ConfigError, match="picky wants SGD"):
        geopeft.optimizer(tiny, torch.optim.AdamW, lr=1e-3)
    geopeft.optimizer(tiny, torch.optim.SGD, lr=1e-3)
    assert seen == [(torch.optim.AdamW, 2), (torch.optim.SGD, 2)]


# ----------------------------------------------------------------------------- real model
def test_minilm_equivalent_gradient_is_closer_to_the_full_gradient(minilm):
    """Real gradients of MiniLM layers: the cosine between the equivalent gradient and the
    true full gradient (the base weight's own gradient) is at least LoRA's at every step."""
    tok, pretrained = minilm
    model = copy.deepcopy(pretrained)
    model.encoder.layer = model.encoder.layer[:2]  # the adapted blocks; the rest adds only time
    geopeft.adapt(model, "lorapro", targets=r"encoder\.layer\.[01]\..*(query|value|intermediate\.dense)",
                  rank=8, alpha=16)
    named = geopeft.adapters(model)
    assert len(named) == 6
    for _, ad in named:  # let the base weights collect the full gradient g
        ad.base_layer.weight.requires_grad_(True)
    factors = [p for _, ad in named for p in (ad.A, ad.B)]
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=2e-3, params=factors)
    batch = tok(["geometry-aware fine-tuning of low-rank adapters", "a second, somewhat longer "
                 "sentence for the batch", "gradients of the full weight"], return_tensors="pt",
                padding=True)
    target = torch.randn(3, 384, generator=torch.Generator().manual_seed(0))

    def cos(a, b):
        return float((a * b).sum() / (a.norm() * b.norm()))

    margins = []
    for _ in range(10):
        emb = model(**batch).last_hidden_state[:, 0]
        (emb - target).pow(2).mean().backward()
        before = [(ad.A.detach().clone(), ad.B.detach().clone(), ad.A.grad.clone(), ad.B.grad.clone(),
                   ad.base_layer.weight.grad.clone()) for _, ad in named]
        opt.step()
        for (A, B, ga, gb, g), (_, ad) in zip(before, named):
            s = ad.scaling
            lora = equivalent_gradient(A[None], B[None], ga[None], gb[None], s)[0].double()
            pro = equivalent_gradient(A[None], B[None], ad.A.grad[None], ad.B.grad[None], s)[0].double()
            c_pro, c_lora = cos(pro, g.double()), cos(lora, g.double())
            assert c_pro >= c_lora, (c_pro, c_lora)
            margins.append(c_pro - c_lora)
        opt.zero_grad()
        for _, ad in named:
            ad.base_layer.weight.grad = None
    assert max(margins) > 1e-3  # the adjustment matters, not only ties
