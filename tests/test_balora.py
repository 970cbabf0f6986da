"""BaLoRA: the `balanced` manifold keeps BA and balances the pair (BᵀB = AAᵀ, both factors
conditioned √cond(BA)); never balances a rank-deficient product; the `balora` recipe."""

from __future__ import annotations

import copy
import logging
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import geopeft
from geopeft.geometry import max_violation
from geopeft.kernels import balance, balanced_tangent, default_rank_rtol, push_through_basis_change
from geopeft.recipes import from_json

from helpers import TinyNet, mse, train

BALANCED = geopeft.registry.get_registry().get("manifold", "balanced")


def _matrix(rows: int, cols: int, cond: float, scale: float, gen: torch.Generator) -> torch.Tensor:
    """A float64 (rows, cols) matrix with singular values geometrically from scale to scale/cond."""
    k = min(rows, cols)
    q1, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))
    sv = scale * torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return q1 @ torch.diag(sv) @ q2.T


def _pairs(g, m, n, r, scale_b, scale_a, cond_b, cond_a, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    b = torch.stack([_matrix(m, r, cond_b, scale_b, gen) for _ in range(g)]).to(dtype)
    a = torch.stack([_matrix(r, n, cond_a, scale_a, gen) for _ in range(g)]).to(dtype)
    return b, a


def _cond(x: torch.Tensor, k: int) -> torch.Tensor:
    """σ_1 / σ_k of each member, in float64."""
    s = torch.linalg.svdvals(x.double())
    return s[..., 0] / s[..., k - 1]


def _rel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.double(), y.double()
    return torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y)


# fp32 resolves singular values to ~ε·σ_1, so σ_r/σ_1 is accurate to ~1e-3 relative only up
# to cond(BA) ≈ 1e4 (cond(B)·cond(A) ≤ 1e4 here); float64 stacks take cond(BA) up to 1e10.
PRECISIONS = {"float32": (torch.float32, 2.0), "float64": (torch.float64, 5.0)}


@pytest.mark.parametrize("precision", PRECISIONS)
@given(g=st.integers(1, 3), r=st.integers(1, 6), extra_m=st.integers(0, 20), extra_n=st.integers(0, 20),
       log_scale_b=st.floats(-3, 3), log_scale_a=st.floats(-3, 3), cond_frac_b=st.floats(0, 1),
       cond_frac_a=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_project_keeps_ba_balances_and_splits_conditioning(precision, g, r, extra_m, extra_n,
                                                           log_scale_b, log_scale_a, cond_frac_b,
                                                           cond_frac_a, seed):
    dtype, max_log_cond = PRECISIONS[precision]
    m, n = r + extra_m, r + extra_n
    b, a = _pairs(g, m, n, r, 10.0 ** log_scale_b, 10.0 ** log_scale_a, 10.0 ** (cond_frac_b * max_log_cond),
                  10.0 ** (cond_frac_a * max_log_cond), seed, dtype)
    nb, na = BALANCED().project((b, a))
    assert nb.dtype == na.dtype == dtype and nb.shape == b.shape and na.shape == a.shape
    assert _rel(nb @ na, b @ a).max() <= 1e-5
    assert BALANCED().violation((nb, na)).max() <= 1e-5
    target = _cond(b.double() @ a.double(), r).sqrt()
    assert ((_cond(nb, r) / target - 1).abs().max()) <= 0.01
    assert ((_cond(na, r) / target - 1).abs().max()) <= 0.01


def test_violation_is_the_relative_gram_gap():
    b, a = torch.randn(2, 7, 3), torch.randn(2, 3, 5)
    want = torch.linalg.matrix_norm(b.mT @ b - a @ a.mT) / torch.linalg.matrix_norm(b.mT @ b)
    assert torch.allclose(BALANCED().violation((b, a)), want)
    assert BALANCED().violation((torch.zeros(7, 3), torch.zeros(3, 5))) == 0
    assert BALANCED().violation((torch.zeros(7, 3), a[0])) == float("inf")  # B = 0, A ≠ 0: off it


def _polar_route(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's route (github.com/vcastin/balora; docs/methods/balora.md), one pair at a time: polar
    decompositions A = S_A P_A (S_A = (AAᵀ)^½ r×r, P_A orthonormal rows) and
    B = P_B S_B (S_B = (BᵀB)^½), SVD of the r×r product S_B S_A = UΣVᵀ, then
    A ← √Σ Vᵀ P_A and B ← P_B U √Σ."""
    ua, da, vha = torch.linalg.svd(a, full_matrices=False)
    s_a, p_a = (ua * da) @ ua.T, ua @ vha
    ub, db, vhb = torch.linalg.svd(b, full_matrices=False)
    s_b, p_b = (vhb.T * db) @ vhb, ub @ vhb
    u, sigma, vh = torch.linalg.svd(s_b @ s_a)
    root = sigma.sqrt()
    return p_b @ (u * root), (root[:, None] * vh) @ p_a


def _singular_basis_route(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """geopeft's earlier projection (the official one up to column signs, batched): thin QRs,
    SVD of the r×r core R_B R_Aᵀ = UΣVᵀ, B ← Q_B U √Σ, A ← √Σ Vᵀ Q_Aᵀ — the balanced pair in
    the singular basis of BA, whatever the pair's own basis (column signs from the SVD)."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.mT)
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT)
    return q_b @ (u * s.sqrt().unsqueeze(-2)), (s.sqrt().unsqueeze(-1) * vh) @ q_a.mT


def _basis_change(b: torch.Tensor, new_b: torch.Tensor) -> torch.Tensor:
    """R⁻¹ with new_b = B R⁻¹ (B of full column rank), in float64."""
    return torch.linalg.pinv(b.double()) @ new_b.double()


@given(r=st.integers(1, 5), extra_m=st.integers(0, 12), extra_n=st.integers(0, 12),
       seed=st.integers(0, 2**16))
def test_on_the_orbit_of_the_official_route_with_a_symmetric_basis_change(r, extra_m, extra_n, seed):
    """Ours and the official code's pair have the same product and differ by an orthogonal O
    (both are balanced: the balanced pairs with a given product are (B₀O, OᵀA₀)); ours is
    reached from (B, A) by a symmetric positive-definite R, which makes it the balanced pair
    whose change of basis is nearest the identity (‖R − I‖_F < ‖O R − I‖_F for O ≠ I)."""
    gen = torch.Generator().manual_seed(seed)
    m, n = r + extra_m, r + extra_n
    b = torch.randn(3, m, r, generator=gen, dtype=torch.float64)
    a = torch.randn(3, r, n, generator=gen, dtype=torch.float64) * 0.1
    ours_b, ours_a = BALANCED().project((b, a))
    eye = torch.eye(r, dtype=torch.float64)
    for i in range(3):
        ref_b, ref_a = _polar_route(b[i], a[i])
        assert _rel(ours_b[i] @ ours_a[i], ref_b @ ref_a) <= 1e-12
        turn = _basis_change(ref_b, ours_b[i])               # ours = ref · O
        assert torch.allclose(turn.T @ turn, eye, atol=1e-10)
        assert torch.allclose(turn.T @ ref_a, ours_a[i], atol=1e-10 * ref_a.abs().max())
        inv = _basis_change(b[i], ours_b[i])                 # R⁻¹: symmetric positive definite
        assert torch.allclose(inv, inv.T, atol=1e-10 * inv.abs().max())
        assert torch.linalg.eigvalsh(inv).min() > 0
        basis = torch.linalg.inv(inv)
        for _ in range(3):
            other, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
            if torch.dist(other, eye) > 1e-3:
                assert torch.dist(basis, eye) < torch.dist(other @ basis, eye)


@pytest.mark.parametrize("precision", PRECISIONS)
@given(g=st.integers(1, 3), r=st.integers(1, 6), extra_m=st.integers(0, 20), extra_n=st.integers(0, 20),
       log_scale=st.floats(-3, 3), cond_frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_identity_on_balanced_pairs_and_idempotent(precision, g, r, extra_m, extra_n, log_scale,
                                                   cond_frac, seed):
    """A balanced pair in any basis (B₀O, OᵀA₀), O a random rotation, is left where it is —
    the singular-basis route moved such pairs by O(1) — so project∘project = project."""
    dtype, max_log_cond = PRECISIONS[precision]
    tol = {torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    m, n = r + extra_m, r + extra_n
    gen = torch.Generator().manual_seed(seed)
    product = torch.stack([_matrix(m, n, 10.0 ** (cond_frac * max_log_cond), 10.0 ** log_scale, gen)
                           for _ in range(g)])
    u, s, vh = torch.linalg.svd(product)
    turn, _ = torch.linalg.qr(torch.randn(g, r, r, generator=gen, dtype=torch.float64))
    b = ((u[..., :r] * s[..., None, :r].sqrt()) @ turn).to(dtype)
    a = (turn.mT @ (s[..., :r, None].sqrt() * vh[..., :r, :])).to(dtype)
    nb, na = BALANCED().project((b, a))
    assert _rel(nb, b).max() <= tol and _rel(na, a).max() <= tol
    again = BALANCED().project((nb, na))
    assert _rel(again[0], nb).max() <= tol and _rel(again[1], na).max() <= tol
    # the earlier route moves the same pair by O(1) where BA's singular values are distinct
    # (then its singular basis is unique up to signs, and O is almost surely not one of them)
    if r > 1 and cond_frac > 0.2:
        old_b, _ = _singular_basis_route(b.double(), a.double())
        assert _rel(old_b, b.double()).max() > 1e-2


def test_continuous_no_sign_flips_over_a_training_run(plugin):
    """300 AdamW steps on a 24 × 32 layer at r = 4, balanced after each step: with the
    nearest balanced pair no column of B ever points against where it pointed one step
    before; the singular-basis route flips columns (its SVD picks signs and order afresh)."""
    plugin(types.SimpleNamespace(register_manifolds=geopeft.hookimpl(
        lambda register: register("singular_basis_balanced", _SingularBasisBalanced))), "singular-basis")

    def flips(manifold: str) -> tuple[int, float]:
        model, x, y = _regression(m=24, n=32, true_rank=4)
        torch.manual_seed(1)
        geopeft.adapt(model, "balora", targets=["0"], rank=4, manifold={"B,A": manifold})
        adapter = geopeft.adapters(model)[0][1]
        opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2)
        count, prev = 0, None
        for _ in range(120):
            _fit(model, x, y, 1, opt)
            b = adapter.B.detach().clone()
            if prev is not None and torch.linalg.matrix_rank(b) == 4:
                count += int(((b * prev).sum(0) < 0).sum())
            prev = b
        return count, max_violation([adapter])

    ours, gap = flips("balanced")
    assert ours == 0 and gap <= 1e-5
    assert flips("singular_basis_balanced")[0] > 0


class _SingularBasisBalanced(BALANCED):
    """geopeft's earlier projection (with the rank guard), for comparison."""

    def project(self, x):
        b, a = x
        new_b, new_a = _singular_basis_route(b, a)
        keep = balance(b, a).full_rank[..., None, None]
        return torch.where(keep, new_b, b), torch.where(keep, new_a, a)


# ----------------------------------------------------------------------------- rank guard
def test_rank_deficient_products_are_left_alone_and_logged(caplog):
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(4, 12, 3, generator=gen)
    a = torch.randn(4, 3, 10, generator=gen)
    b[0] = 0                                   # LoRA's init: BA = 0
    b[1, :, 2] = b[1, :, 0] + b[1, :, 1]        # rank 2 < r = 3
    a[2, 2] = 1e-9 * a[2, 0] + a[2, 1]          # σ_3/σ_1 ~ 1e-9: numerically rank 2 in fp32
    with caplog.at_level(logging.DEBUG, logger="geopeft.plugins.balora"):
        nb, na = BALANCED().project((b, a))
    assert torch.equal(balance(b, a).full_rank, torch.tensor([False, False, False, True]))
    for i in range(3):
        assert torch.equal(nb[i], b[i]) and torch.equal(na[i], a[i])
    assert BALANCED().violation((nb[3:], na[3:])).item() <= 1e-5
    assert _rel(nb[3] @ na[3], b[3] @ a[3]) <= 1e-5
    assert "3 of 4 pairs" in caplog.text and "numerical rank < 3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="geopeft.plugins.balora"):
        BALANCED().project((b[3:], a[3:]))
    assert caplog.text == ""  # nothing skipped, nothing said


def test_rank_tolerance_is_documented_default_and_an_option():
    assert default_rank_rtol(12, 10, torch.float32) == 12 * torch.finfo(torch.float32).eps
    b = torch.randn(1, 12, 2, generator=torch.Generator().manual_seed(1))
    a = torch.tensor([[[1.0] + [0.0] * 9, [0.0, 1e-4] + [0.0] * 8]])  # σ_2/σ_1 ~ 1e-4 · cond(B)
    assert bool(balance(b, a).full_rank.all())                     # above 12·ε
    assert not bool(balance(b, a, rtol=1e-2).full_rank.any())      # below a user tolerance
    model = geopeft.adapt(TinyNet(), "balora", targets=["query"], rank=2, rank_rtol=1e-2)
    (_, adapter), = geopeft.adapters(model)
    assert adapter.factor_manifolds()["B,A"].rank_rtol == 1e-2
    with pytest.raises(geopeft.ConfigError, match="rank_rtol must be in"):
        geopeft.adapt(TinyNet(), "balora", targets=["query"], rank_rtol=2.0)


def test_rank_above_a_side_never_balances():
    b, a = torch.randn(2, 3, 5), torch.randn(2, 5, 8)  # r = 5 > m = 3: BA has rank ≤ 3
    nb, na = BALANCED().project((b, a))
    assert torch.equal(nb, b) and torch.equal(na, a)


def test_a_swapped_key_is_a_clear_error():
    with pytest.raises(ValueError, match="is the manifold key 'B,A'"):
        BALANCED().project((torch.randn(3, 5), torch.randn(7, 3)))


# ----------------------------------------------------------------------------- geometry
def test_tangent_projection_retraction_and_transport():
    gen = torch.Generator().manual_seed(3)
    manifold = BALANCED()
    x = manifold.random_point(((4, 9, 3), (4, 3, 7)), generator=gen, dtype=torch.float64)
    assert manifold.violation(x).max() <= 1e-12
    u = (torch.randn(4, 9, 3, generator=gen, dtype=torch.float64),
         torch.randn(4, 3, 7, generator=gen, dtype=torch.float64))
    t = manifold.project_tangent(x, u)
    c = x[0].mT @ t[0] - t[1] @ x[1].mT  # tangent: sym(Bᵀξ_B − ξ_A Aᵀ) = 0
    assert torch.linalg.matrix_norm(c + c.mT).max() <= 1e-10
    again = manifold.project_tangent(x, t)
    assert all(torch.allclose(p, q, atol=1e-10) for p, q in zip(again, t))
    # the removed part is normal: (BΛ, −ΛA) is orthogonal to every tangent vector
    normal = (u[0] - t[0], u[1] - t[1])
    inner = (normal[0] * t[0]).sum((-2, -1)) + (normal[1] * t[1]).sum((-2, -1))
    assert inner.abs().max() <= 1e-10
    y = manifold.retract(x, (0.1 * t[0], 0.1 * t[1]))
    assert manifold.violation(y).max() <= 1e-12
    assert _rel(y[0] @ y[1], (x[0] + 0.1 * t[0]) @ (x[1] + 0.1 * t[1])).max() <= 1e-12


@given(seed=st.integers(0, 2**16), r=st.integers(1, 4))
def test_transport_pushes_gradients_through_the_basis_change_exactly(seed, r):
    """Gradients of L(BA) at (B, A) are (G Aᵀ, BᵀG); at the balanced pair (B R⁻¹, R A) they
    are (G A'ᵀ, B'ᵀ G). `transport` maps the former to the latter."""
    gen = torch.Generator().manual_seed(seed)
    b, a = _pairs(2, r + 5, r + 3, r, 3.0, 0.1, 30.0, 10.0, seed, torch.float64)
    grad = torch.randn(2, r + 5, r + 3, generator=gen, dtype=torch.float64)
    nb, na = BALANCED().project((b, a))
    gb, ga = BALANCED().transport((b, a), (nb, na), (grad @ a.mT, b.mT @ grad))
    assert torch.allclose(gb, grad @ na.mT, atol=1e-9 * gb.abs().max())
    assert torch.allclose(ga, nb.mT @ grad, atol=1e-9 * ga.abs().max())


def test_transport_keeps_moments_of_pairs_that_did_not_move():
    b, a = torch.randn(2, 6, 2), torch.randn(2, 2, 5)
    b[0] = 0
    nb, na = BALANCED().project((b, a))
    vb, va = torch.randn(2, 6, 2), torch.randn(2, 2, 5)
    tb, ta = push_through_basis_change(b, a, nb, na, vb, va)
    assert torch.equal(tb[0], vb[0]) and torch.equal(ta[0], va[0])
    assert torch.isfinite(tb).all() and torch.isfinite(ta).all() and not torch.equal(tb[1], vb[1])


# ----------------------------------------------------------------------------- recipe
def test_recipe_replaces_both_euclidean_factors_and_round_trips():
    model = geopeft.adapt(TinyNet(), "balora", targets="all-linear", rank=3)
    shared = None
    for _, adapter in geopeft.adapters(model):
        manifolds = adapter.factor_manifolds()
        assert list(manifolds) == ["B,A"] and isinstance(manifolds["B,A"], BALANCED)
        shared = shared or manifolds["B,A"]
        assert manifolds["B,A"] is shared  # one instance: batched per shape
    saved = model.geopeft_state.resolved.to_json()
    assert saved["manifolds"] == {"B,A": {"name": "balanced", "options": {"rank_rtol": None}}}
    assert saved["project_every"] == 1 and saved["moments"] == "keep"
    rebuilt = from_json(saved)
    assert list(rebuilt.manifolds) == ["B,A"] and rebuilt.recipe.project_every == 1
    # the same geometry on plain LoRA by override
    other = geopeft.adapt(TinyNet(), "lora", targets=["query"], rank=3, manifold={"B,A": "balanced"})
    assert list(geopeft.adapters(other)[0][1].factor_manifolds()) == ["B,A"]


def _regression(seed: int = 0, m: int = 12, n: int = 16, true_rank: int = 4):
    """A Linear layer and data whose truth differs from it by a rank-`true_rank` update."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = nn.Linear(n, m)
    delta = torch.randn(m, true_rank, generator=gen) @ torch.randn(true_rank, n, generator=gen) * 0.5
    x = torch.randn(128, n, generator=gen)
    y = (base(x) + x @ delta.T).detach()
    return nn.Sequential(base), x, y


def _fit(model, x, y, steps, opt):
    return train(model, opt, mse(x, y), steps)


def test_project_every_k_steps():
    model, x, y = _regression()
    geopeft.adapt(model, "balora", targets=["0"], rank=3, project_every=3)
    assert model.geopeft_state.resolved.recipe.project_every == 3
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=3e-2)
    adapter = geopeft.adapters(model)[0][1]
    gaps = []
    for _ in range(6):
        _fit(model, x, y, 1, opt)
        gaps.append(float(BALANCED().violation((adapter.B.detach(), adapter.A.detach()))))
    assert gaps[2] <= 1e-5 and gaps[5] <= 1e-5  # projected after steps 3 and 6
    assert gaps[3] > 1e-3 and gaps[4] > 1e-3    # plain steps unbalance the pair


def test_from_zero_b_training_reaches_full_rank_balanced_products():
    model, x, y = _regression()
    geopeft.adapt(model, "balora", targets=["0"], rank=4)
    adapter = geopeft.adapters(model)[0][1]
    assert torch.count_nonzero(adapter.B) == 0  # LoRA's init, kept by adapt's projection
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=3e-2)
    losses = _fit(model, x, y, 200, opt)
    b, a = adapter.B.detach(), adapter.A.detach()
    s = torch.linalg.svdvals(b.double() @ a.double())
    assert s[3] / s[0] > 0.05, s  # rank 4 of 4: no direction died at B = 0
    assert max_violation([adapter]) <= 1e-5
    assert losses[-1] <= losses[0] / 100, (losses[0], losses[-1])


class _Unguarded(BALANCED):
    """The balancing without the rank guard: what BaLoRA must not do at B = 0."""

    def project(self, x):
        b, a = x
        q_b, r_b = torch.linalg.qr(b)
        q_a, r_a = torch.linalg.qr(a.mT)
        u, s, vh = torch.linalg.svd(r_b @ r_a.mT)
        return q_b @ (u * s.sqrt().unsqueeze(-2)), (s.sqrt().unsqueeze(-1) * vh) @ q_a.mT


def test_without_the_guard_zero_b_kills_every_direction(plugin):
    """Why the guard exists: balancing B = 0 zeroes A too, a saddle gradients never leave."""
    plugin(types.SimpleNamespace(register_manifolds=geopeft.hookimpl(
        lambda register: register("unguarded_balanced", _Unguarded))), "unguarded")
    model, x, y = _regression()
    geopeft.adapt(model, "balora", targets=["0"], rank=4, manifold={"B,A": "unguarded_balanced"})
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=3e-2)
    _fit(model, x, y, 20, opt)
    adapter = geopeft.adapters(model)[0][1]
    assert torch.count_nonzero(adapter.B) == 0 and torch.count_nonzero(adapter.A) == 0


def _initializers():
    comps = geopeft.components()["initializer"]
    reg = geopeft.registry.get_registry()
    return [name for name in comps
            if not reg.get("initializer", name).needs_data
            and reg.get("initializer", name).requires <= {"A", "B"}]


@pytest.mark.parametrize("init", _initializers())
def test_after_every_data_free_initializer(init):
    """adapt keeps the initializer's product (it only balances), and training keeps pairs balanced."""
    torch.manual_seed(0)
    lora = geopeft.adapt(TinyNet(), "lora", targets="all-linear", rank=3, initializer=init)
    torch.manual_seed(0)
    bal = geopeft.adapt(TinyNet(), "balora", targets="all-linear", rank=3, initializer=init)
    with torch.no_grad():
        for (_, p), (_, q) in zip(geopeft.adapters(lora), geopeft.adapters(bal)):
            assert torch.allclose(q.delta_weight(), p.delta_weight(), rtol=1e-5,
                                  atol=1e-6 * max(1.0, float(p.delta_weight().abs().max())))
    opt = geopeft.optimizer(bal, torch.optim.AdamW, lr=1e-2)
    for i in range(3):
        ids = torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(i))
        bal(ids).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    adapters = [a for _, a in geopeft.adapters(bal)]
    for a in adapters:
        s = torch.linalg.svdvals(a.B.detach().double() @ a.A.detach().double())
        # full numerical rank r: no direction died. (Where the first step left σ_r/σ_1 barely
        # above the guard's tolerance, ~3e-6 here, the balanced pair starts that direction at
        # √σ_r in both factors and it grows from there, ~3x a step.)
        assert torch.isfinite(s).all() and s[a.rank - 1] / s[0] > default_rank_rtol(*a.shape, torch.float32)
    assert max_violation(adapters) <= 1e-5


# ----------------------------------------------------------------------------- moments
def test_moments_transport_pushes_first_moments_only():
    """First moments are pushed through the change of basis and projected onto the tangent
    space at the balanced pair; second moments and the points are as without transport."""
    model, x, y = _regression()
    twin = copy.deepcopy(model)
    geopeft.adapt(model, "balora", targets=["0"], rank=3, moments="transport")
    geopeft.adapt(twin, "balora", targets=["0"], rank=3)
    a_m, a_t = geopeft.adapters(model)[0][1], geopeft.adapters(twin)[0][1]
    with torch.no_grad():  # the same full-rank start for both
        for ad in (a_m, a_t):
            ad.B.copy_(torch.randn(12, 3, generator=torch.Generator().manual_seed(5)))
            ad.A.copy_(torch.randn(3, 16, generator=torch.Generator().manual_seed(6)))
    opt_m = geopeft.optimizer(model, torch.optim.Adam, lr=1e-2)
    opt_t = geopeft.optimizer(twin, torch.optim.Adam, lr=1e-2)
    b0, a0 = a_m.B.detach().clone(), a_m.A.detach().clone()
    _fit(model, x, y, 1, opt_m)
    _fit(twin, x, y, 1, opt_t)
    st_m, st_t = opt_m.state, opt_t.state
    # the base step and the projection are the same; only the first moments differ
    assert torch.equal(a_m.B, a_t.B) and torch.equal(a_m.A, a_t.A)
    assert torch.equal(st_m[a_m.B]["exp_avg_sq"], st_t[a_t.B]["exp_avg_sq"])
    assert torch.equal(st_m[a_m.A]["exp_avg_sq"], st_t[a_t.A]["exp_avg_sq"])
    # the pre-projection point: Adam's first step moves each entry by -lr·sign(g)
    mb, ma = st_t[a_t.B]["exp_avg"], st_t[a_t.A]["exp_avg"]
    vb, va = st_t[a_t.B]["exp_avg_sq"], st_t[a_t.A]["exp_avg_sq"]
    pre_b = b0 - 1e-2 * (mb / 0.1) / ((vb / 0.001).sqrt() + 1e-8)
    pre_a = a0 - 1e-2 * (ma / 0.1) / ((va / 0.001).sqrt() + 1e-8)
    new_b, new_a = a_t.B.detach(), a_t.A.detach()
    want_b, want_a = balanced_tangent(new_b, new_a,
                                      *push_through_basis_change(pre_b, pre_a, new_b, new_a, mb, ma))
    assert torch.allclose(st_m[a_m.B]["exp_avg"], want_b, rtol=1e-4, atol=1e-7)
    assert torch.allclose(st_m[a_m.A]["exp_avg"], want_a, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(st_m[a_m.B]["exp_avg"], mb, rtol=1e-3)
    # and training goes on
    losses = _fit(model, x, y, 60, opt_m)
    assert losses[-1] < losses[0] and max_violation([a_m]) <= 1e-5


def test_state_dict_round_trip_continues_identically():
    model, x, y = _regression()
    geopeft.adapt(model, "balora", targets=["0"], rank=3, project_every=2, moments="transport")
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2)
    _fit(model, x, y, 3, opt)
    twin = copy.deepcopy(model)
    twin_opt = geopeft.optimizer(twin, torch.optim.AdamW, lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _fit(model, x, y, 3, opt)
    _fit(twin, x, y, 3, twin_opt)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_bfloat16_factors_get_fp32_geometry():
    model, x, y = _regression()
    geopeft.adapt(model, "balora", targets=["0"], rank=3, dtype=torch.bfloat16)
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2)
    _fit(model, x, y, 5, opt)
    adapter = geopeft.adapters(model)[0][1]
    assert adapter.B.dtype == torch.bfloat16
    # balanced in fp32, then rounded to bf16 (8 bits of mantissa)
    assert max_violation([adapter]) <= 3e-2


def test_combines_with_a_gradient_transform_and_other_layer_kinds():
    """Transforms rewrite gradients before the step, balancing follows it: they compose.
    Embedding adapters start with A = 0 (left alone until full rank), Linear ones with B = 0."""
    torch.manual_seed(0)
    model = geopeft.adapt(TinyNet(), "balora", targets=["embed", "query", "value", "ffn.0"], rank=3,
                          transforms=["scaled_gd"], delta=1e-3)
    assert model.geopeft_state.resolved.recipe.transforms == ["scaled_gd"]
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2)
    for i in range(4):
        ids = torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(i))
        model(ids).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    adapters = [a for _, a in geopeft.adapters(model)]
    assert max_violation(adapters) <= 1e-5
    for a in adapters:
        s = torch.linalg.svdvals(a.B.detach().double() @ a.A.detach().double())
        assert s[a.rank - 1] / s[0] > 1e-3  # rank r: no direction died


def test_minilm_balora_trains_saves_and_loads(minilm, tmp_path):
    tok, pretrained = minilm
    base = copy.deepcopy(pretrained)
    fresh = copy.deepcopy(pretrained)
    model = geopeft.adapt(base, "balora", targets=["query", "value"], rank=4, alpha=64)
    batch = tok(["balanced low-rank adapters", "a second sentence"], return_tensors="pt", padding=True)
    target = torch.randn(2, 384, generator=torch.Generator().manual_seed(0))
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-3)
    losses = []
    for _ in range(5):
        loss = (model(**batch).last_hidden_state[:, 0] - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    adapters = [a for _, a in geopeft.adapters(model)]
    assert len(adapters) == 12 and max_violation(adapters) <= 1e-5
    model.eval()
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        geopeft.save(model, tmp_path)
        loaded = geopeft.load(fresh, tmp_path).eval()
        assert torch.equal(loaded(**batch).last_hidden_state, out)
        assert max_violation([a for _, a in geopeft.adapters(loaded)]) <= 1e-5


def test_weight_decay_is_kept_it_does_not_unbalance():
    """The balanced set is a cone: decay shrinks B and A alike, so the optimizer keeps the
    groups' weight decay for BaLoRA (it zeroes it only for manifolds that decay leaves)."""
    model, x, y = _regression()
    geopeft.adapt(model, "balora", targets=["0"], rank=3)
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.5)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5]
    adapter = geopeft.adapters(model)[0][1]
    with torch.no_grad():
        adapter.B.normal_()
    b, a = BALANCED().project((adapter.B.detach(), adapter.A.detach()))
    assert BALANCED().violation(((1 - 5e-3) * b, (1 - 5e-3) * a)) <= 1e-5
    _fit(model, x, y, 3, opt)
    assert max_violation([adapter]) <= 1e-5


def test_a_single_factor_override_splits_the_coupled_key():
    model = geopeft.adapt(TinyNet(), "balora", targets=["query"], rank=3, manifold={"A": "oblique"})
    manifolds = geopeft.adapters(model)[0][1].factor_manifolds()
    assert sorted(manifolds) == ["A", "B"]
    assert manifolds["A"].name == "oblique" and manifolds["B"].is_euclidean  # B back to its default


class _ScaledPairInit(geopeft.Initializer):
    """Test initializer: a full-rank, badly unbalanced pair (B large, A small), like PiSSA-style
    inits with a large α/r."""

    requires = frozenset({"A", "B"})

    def initialize(self, adapters, model=None, batches=None, loss_fn=None):
        gen = torch.Generator().manual_seed(7)
        for _, a in adapters:
            a.B.copy_(100 * torch.randn(a.B.shape, generator=gen))
            a.A.copy_(0.01 * torch.randn(a.A.shape, generator=gen))


def test_a_full_rank_init_is_balanced_at_adapt_with_its_product_kept(plugin):
    plugin(types.SimpleNamespace(register_initializers=geopeft.hookimpl(
        lambda register: register("scaled_pair", _ScaledPairInit))), "scaled-pair")
    lora = geopeft.adapt(TinyNet(), "lora", targets="all-linear", rank=3, initializer="scaled_pair")
    bal = geopeft.adapt(TinyNet(), "balora", targets="all-linear", rank=3, initializer="scaled_pair")
    for (_, p), (_, q) in zip(geopeft.adapters(lora), geopeft.adapters(bal)):
        assert _rel(q.B.detach() @ q.A.detach(), p.B.detach() @ p.A.detach()) <= 1e-5
        assert BALANCED().violation((q.B.detach(), q.A.detach())) <= 1e-5
        assert BALANCED().violation((p.B.detach(), p.A.detach())) > 0.5  # far from balanced
        ratio = q.B.detach().norm() / q.A.detach().norm()
        assert abs(float(ratio) - 1) <= 1e-3  # same Frobenius norms (traces of Σ)


def test_guard_waits_through_a_rank_one_sgd_step(caplog):
    """Plain SGD from B = 0 on one sample: B = −lr·s·G Aᵀ has rank 1 < r, so the pair is left
    alone (balancing would zero r − 1 directions for good); once later steps raise BA to full
    rank, it is balanced."""
    model, x, y = _regression()
    geopeft.adapt(model, "balora", targets=["0"], rank=3)
    adapter = geopeft.adapters(model)[0][1]
    opt = geopeft.optimizer(model, torch.optim.SGD, lr=1e-2)
    a0 = adapter.A.detach().clone()
    with caplog.at_level(logging.DEBUG, logger="geopeft.plugins.balora"):
        _fit(model, x[:1], y[:1], 1, opt)
    assert torch.linalg.matrix_rank(adapter.B.detach()) == 1
    assert torch.equal(adapter.A.detach(), a0)  # g_A = Bᵀ G = 0 at B = 0; not balanced either
    assert "1 of 1 pairs" in caplog.text
    _fit(model, x, y, 3, opt)
    s = torch.linalg.svdvals(adapter.B.detach().double() @ adapter.A.detach().double())
    assert s[2] / s[0] > 1e-3 and max_violation([adapter]) <= 1e-5


def test_combines_with_lorapro(monkeypatch):
    """balora + the lorapro transform: LoRA-Pro adjusts the gradients before every step,
    the pairs are balanced after it; training reaches full-rank balanced products."""
    transform_cls = geopeft.registry.get_registry().get("gradient_transform", "lorapro")
    calls = []
    real = transform_cls.transform_group
    monkeypatch.setattr(transform_cls, "transform_group",
                        lambda self, *args: calls.append(1) or real(self, *args))
    torch.manual_seed(0)
    model = geopeft.adapt(TinyNet(), "balora", targets=["query", "value", "ffn.0", "ffn.2"], rank=3,
                          alpha=12, transforms=["lorapro"])
    recipe = model.geopeft_state.resolved.recipe
    assert recipe.transforms == ["lorapro"] and recipe.manifolds == {"B,A": "balanced"}
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2)
    ids = torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(0))
    target = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(10):
        loss = (model(ids) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert len(calls) >= 10  # every step (one call per shape group)
    assert losses[-1] < losses[0]
    adapters = [a for _, a in geopeft.adapters(model)]
    assert max_violation(adapters) <= 1e-5
    for a in adapters:
        s = torch.linalg.svdvals(a.B.detach().double() @ a.A.detach().double())
        assert s[a.rank - 1] / s[0] > 1e-3


def test_the_kept_violation_leaves_out_pairs_the_projection_leaves_by_design():
    """compare's invariant column: a pair whose product is rank-deficient (here B = 0, A ≠ 0:
    no basis change balances it) is counted as off by design, not as a violation."""
    from geopeft.geometry import kept_violation

    torch.manual_seed(0)
    model = TinyNet()
    geopeft.adapt(model, "balora", targets=["query", "value"], rank=4)
    adapters = dict(geopeft.adapters(model))
    assert kept_violation(adapters.values()) == (0.0, 2)  # LoRA's B = 0 at init: both left
    assert max_violation(adapters.values()) == float("inf")
    balanced = adapters["query"]
    with torch.no_grad():
        b, a = BALANCED().project((torch.randn(16, 4), balanced.A.detach()))
        balanced.B.copy_(b)
        balanced.A.copy_(a)
    worst, off = kept_violation(adapters.values())
    assert worst <= 1e-5 and off == 1  # query balanced, value left as it is by design
    with torch.no_grad():
        balanced.B.mul_(2.0)  # off the manifold, not by design: ‖4BᵀB − BᵀB‖ / ‖4BᵀB‖ = 3/4
    assert kept_violation(adapters.values()) == (pytest.approx(0.75, abs=1e-5), 1)
