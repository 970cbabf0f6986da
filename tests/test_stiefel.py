"""The Stiefel manifold and its batched kernels: the invariants the math promises."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import geopeft
from geopeft import kernels as K
from geopeft.registry import get_registry

RETRACTIONS = [("polar", "gram"), ("polar", "svd"), ("polar", "newton_schulz"), ("qr", "gram"),
               ("cayley", "gram")]
DTYPES = [torch.float32, torch.float64]


def stiefel(**options) -> geopeft.Manifold:
    return get_registry().get("manifold", "stiefel")(**options)


@st.composite
def point_and_tangent(draw, max_p: int = 64):
    """(x on St(n, p) batched, a unit-norm tangent u at x, dtype), n ≥ p, p ≤ 64."""
    p = draw(st.integers(1, max_p))
    n = draw(st.integers(p, max(p, 96)))
    batch = draw(st.sampled_from([(), (3,), (2, 2)]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = K.random_stiefel((*batch, n, p), generator=gen, dtype=torch.float64)
    u = K.tangent_project(x, torch.randn(x.shape, generator=gen, dtype=torch.float64))
    u = u / torch.linalg.matrix_norm(u).clamp_min(1e-30)[..., None, None]
    return x.to(dtype), u.to(dtype), dtype


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-10


@pytest.mark.parametrize("retraction,polar_method", RETRACTIONS)
@given(data=point_and_tangent(), scale=st.floats(1e-3, 1.0))
def test_every_retraction_stays_on_the_manifold(retraction, polar_method, data, scale):
    x, u, dtype = data
    m = stiefel(retraction=retraction, polar_method=polar_method)
    y = m.retract(x, scale * u)
    assert y.dtype == dtype and y.shape == x.shape
    assert float(m.violation(y).max()) <= tol(dtype)


@pytest.mark.parametrize("retraction,polar_method", RETRACTIONS)
@given(data=point_and_tangent())
def test_retracting_zero_returns_the_point(retraction, polar_method, data):
    x, _, dtype = data
    y = stiefel(retraction=retraction, polar_method=polar_method).retract(x, torch.zeros_like(x))
    assert torch.allclose(y, x, atol=tol(dtype) / 4, rtol=0)


@pytest.mark.parametrize("retraction,polar_method", RETRACTIONS)
@given(data=point_and_tangent(max_p=16))
def test_retractions_agree_with_the_step_to_first_order(retraction, polar_method, data):
    """‖R(x, t·u) − (x + t·u)‖ = O(t²) for a tangent u (‖u‖ = 1): checked in float64,
    where rounding does not hide the second-order term."""
    x, u, _ = data
    x = K.polar(x.double(), "svd")  # on the manifold to float64 precision
    u = K.tangent_project(x, u.double())
    m = stiefel(retraction=retraction, polar_method=polar_method)

    def err(t):
        return float(torch.linalg.matrix_norm(m.retract(x, t * u) - (x + t * u)).max())

    for t in (1e-1, 1e-2, 1e-3):
        assert err(t) <= 2.0 * t * t
    big, small = err(1e-2), err(1e-3)
    assert small <= big / 50 or big <= 1e-12  # the error falls like t², not like t


@given(data=point_and_tangent())
def test_tangent_projection_is_idempotent_and_lands_in_the_tangent_space(data):
    x, _, dtype = data
    m = stiefel()
    g = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    u = m.project_tangent(x, g)
    scale = float(torch.linalg.matrix_norm(g).max())
    assert torch.allclose(m.project_tangent(x, u), u, atol=tol(dtype) * scale, rtol=0)
    skew = x.mT @ u + u.mT @ x
    assert float(torch.linalg.matrix_norm(skew).max()) <= tol(dtype) * scale


@pytest.mark.parametrize("metric", ["canonical", "euclidean"])
@given(data=point_and_tangent())
def test_riemannian_gradients_are_tangent_and_descend(metric, data):
    x = K.polar(data[0].double(), "svd")
    g = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rg = stiefel(metric=metric).egrad_to_rgrad(x, g)
    assert float(torch.linalg.matrix_norm(x.mT @ rg + rg.mT @ x).max()) <= 1e-10 * float(g.norm())
    # a descent direction: ⟨g, rg⟩ = ‖rg‖²_metric ≥ 0 for both metrics
    assert float((g * rg).sum((-2, -1)).min()) >= -1e-10
    if metric == "euclidean":
        assert torch.allclose(rg, K.tangent_project(x, g))
    else:
        assert torch.allclose(rg, g - x @ g.mT @ x)


@given(data=point_and_tangent(), scale=st.floats(1e-3, 1.0))
def test_transport_lands_in_the_tangent_space_at_the_new_point(data, scale):
    x, u, dtype = data
    m = stiefel()
    y = m.retract(x, scale * u)
    v = m.transport(x, y, u)
    assert float(torch.linalg.matrix_norm(y.mT @ v + v.mT @ y).max()) <= 10 * tol(dtype)


@given(p=st.integers(1, 32), extra=st.integers(0, 40), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 99))
def test_project_and_random_point_are_on_the_manifold(p, extra, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    m = stiefel()
    assert float(m.violation(m.random_point((2, p + extra, p), gen, dtype)).max()) <= tol(dtype)
    y = torch.randn(2, p + extra, p, generator=gen, dtype=dtype) * 5
    x = m.project(y)
    assert float(m.violation(x).max()) <= tol(dtype)
    # the nearest point: no other orthonormal matrix (here: a random one) is closer
    other = m.random_point((2, p + extra, p), gen, dtype)
    assert bool((torch.linalg.matrix_norm(y - x) <= torch.linalg.matrix_norm(y - other) + 1e-4).all())


def test_polar_methods_agree_on_ill_conditioned_input():
    gen = torch.Generator().manual_seed(3)
    q1 = K.random_stiefel((4, 60, 12), generator=gen, dtype=torch.float64)
    q2 = K.random_stiefel((4, 12, 12), generator=gen, dtype=torch.float64)
    y = q1 @ torch.diag(torch.logspace(0, 2, 12, dtype=torch.float64)) @ q2  # cond 100
    ref = K.polar(y, "svd")
    for method in ("gram", "newton_schulz"):
        assert torch.allclose(K.polar(y, method), ref, atol=1e-9)


def test_cayley_never_solves_an_n_by_n_system(monkeypatch):
    """The low-rank form: the only solve is (2p × 2p), whatever n."""
    sizes = []
    real = torch.linalg.solve
    monkeypatch.setattr(torch.linalg, "solve", lambda a, b: sizes.append(a.shape[-1]) or real(a, b))
    x = K.random_stiefel((2, 500, 4))
    K.cayley_retract(x, 0.1 * K.tangent_project(x, torch.randn_like(x)))
    assert sizes == [8]


def test_cayley_is_the_cayley_transform():
    """Equal to the dense (I − W/2)⁻¹(I + W/2)x with W = ûxᵀ − xûᵀ (small n, float64)."""
    x = K.random_stiefel((30, 5), dtype=torch.float64)
    u = 0.3 * K.tangent_project(x, torch.randn(30, 5, dtype=torch.float64))
    u_hat = u - 0.5 * x @ (x.T @ u)
    w = u_hat @ x.T - x @ u_hat.T
    eye = torch.eye(30, dtype=torch.float64)
    dense = torch.linalg.solve(eye - w / 2, (eye + w / 2) @ x)
    assert torch.allclose(K.cayley_retract(x, u), dense, atol=1e-12)


@pytest.mark.parametrize("retraction", ["polar", "qr"])
def test_step_scaling_multiplies_the_step_by_sqrt_d_over_rows(retraction):
    """retract_step(x, x + Δ) = retract(x, P_x(√(d/n)·Δ)); skipped when n = d or off."""
    x = K.random_stiefel((2, 96, 4), dtype=torch.float64)
    delta = 1e-2 * torch.randn(2, 96, 4, dtype=torch.float64)
    plain = stiefel(retraction=retraction)

    def step(scale):
        return plain.retract(x, plain.project_tangent(x, scale * delta))

    assert torch.allclose(plain.retract_step(x, x + delta), step(1.0))  # off by default
    scaled = stiefel(retraction=retraction, step_scaling=True, hidden_size=384)
    assert torch.allclose(scaled.retract_step(x, x + delta), step(math.sqrt(384 / 96)))
    same = stiefel(retraction=retraction, step_scaling=96.0)  # n = d: skipped
    assert torch.allclose(same.retract_step(x, x + delta), step(1.0))


@pytest.mark.parametrize("options,needle", [
    ({"retraction": "exp"}, "retraction='exp' is not one of polar, qr, cayley"),
    ({"metric": "riemann"}, "metric='riemann'"),
    ({"polar_method": "halley"}, "polar_method='halley'"),
    ({"step_scaling": True}, "pass hidden_size=<d>"),
    ({"step_scaling": -1.0}, "positive number"),
])
def test_bad_options_say_what_is_allowed(options, needle):
    with pytest.raises(ValueError) as info:
        stiefel(**options)
    assert needle in str(info.value)


@pytest.mark.parametrize("polar_method", ["gram", "newton_schulz"])
@given(data=point_and_tangent(), size=st.floats(1e-4, 0.5), scale=st.sampled_from([1.0, 0.5, 2.0]))
def test_the_fused_step_equals_scale_project_retract(polar_method, data, size, scale):
    """retract_step(x, new) of the polar routes == retract(x, P_x(√(d/n)·(new − x))),
    for an ambient (not tangent) step, as the base optimizer takes."""
    x, u, dtype = data
    n = x.shape[-2]
    m = stiefel(polar_method=polar_method, step_scaling=n / scale**2)  # √(d/n) = 1/scale
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    new = x + size * (u + 0.3 * noise / noise.norm())
    fused = m.retract_step(x, new)
    generic = m.retract(x, m.project_tangent(x, (new - x) / scale))
    assert float(m.violation(fused).max()) <= tol(dtype)
    assert torch.allclose(fused, generic, atol=tol(dtype) / 2, rtol=0)


def test_the_fused_step_restores_a_drifted_point():
    """x slightly off the manifold (as bf16 storage leaves it): the result is orthonormal."""
    x = K.random_stiefel((4, 300, 16)).to(torch.bfloat16).float()
    assert float(K.gram_violation(x).max()) > 1e-3
    y = K.polar_retract_step(x, x + 1e-3 * torch.randn_like(x))
    assert float(K.gram_violation(y).max()) <= 1e-5
