"""The manifold contract, checked on every registered manifold (geoopt's
test_manifold_basic.py is the model): built-ins, the example plugin's `oblique` and any
third-party manifold installed, found through the registry — nothing here names them,
except a few extra option sets of `stiefel` whose code paths differ.

Shapes come from the registered adapters' real factors (every adapter built on an
nn.Linear(n → m) at rank r; a single factor, or an ordered tuple of factors for a coupled
manifold) and are kept where `Manifold.shape_problem` says the factor fits; hypothesis
draws the adapter, m, n, r, the factor key, a batch prefix, the dtype and the seed.

Tolerances: float64 to 1e-8 (1e-6 relative for idempotence, the bar of the reliability
work), float32 to 1e-4 (its ε is 1.2e-7; polar factors, QRs and the balanced pair's SVDs
of the drawn shapes lose up to a few hundred ε).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import Tensor, nn

import geopeft
from geopeft.errors import GeopeftError
from geopeft.registry import get_registry

from helpers import TinyNet

REG = get_registry()
#: extra options for manifolds whose options switch code paths (the default options are
#: always tested; names not registered are ignored)
VARIANTS = {"stiefel": [{"retraction": "qr"}, {"retraction": "cayley"}, {"metric": "euclidean"},
                        {"polar_method": "svd"}, {"polar_method": "newton_schulz"}]}
CASES = [(name, opts) for name in geopeft.components()["manifold"]
         for opts in [{}] + VARIANTS.get(name, [])]
IDS = [name + "".join(f"-{v}" for v in opts.values()) for name, opts in CASES]
TOL = {torch.float32: 1e-4, torch.float64: 1e-8}
IDEMPOTENT = {torch.float32: 1e-4, torch.float64: 1e-6}


def _build(name: str, opts: dict):
    try:
        return REG.get("manifold", name)(**opts)
    except TypeError as exc:  # a contract: every registered manifold builds from its defaults
        raise AssertionError(f"manifold {name!r} must be constructible with default options "
                             f"(the recipes and these tests build it so): {exc}") from exc


def _adapter_factor_shapes(m: int, n: int, r: int) -> list[dict[str, tuple[int, ...]]]:
    """Factor shapes of every registered adapter on an nn.Linear(n → m) at rank r."""
    found = []
    for name in geopeft.components()["adapter"]:
        try:
            adapter = REG.get("adapter", name)(nn.Linear(n, m, bias=False), rank=r)
        except (GeopeftError, ValueError):  # an adapter that refuses this layer or rank
            continue
        found.append({f: tuple(p.shape) for f, p in adapter.factors().items()})
    return found


def _keys(manifold, factors: dict[str, tuple[int, ...]]) -> list[tuple[str, ...]]:
    names = list(factors)
    if manifold.coupled:
        return [k for size in range(2, len(names) + 1) for k in itertools.permutations(names, size)]
    return [(f,) for f in names]


@st.composite
def points(draw, manifold):
    """(shape, dtype, generator): a shape (or tuple of shapes) that fits `manifold`."""
    m, n = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    r = draw(st.integers(1, min(m, n, 4)))
    fitting = []
    for factors in _adapter_factor_shapes(m, n, r):
        for key in _keys(manifold, factors):
            shapes = tuple(factors[f] for f in key)
            if all(len(s) == 2 for s in shapes) and manifold.shape_problem(shapes if manifold.coupled
                                                                          else shapes[0]) is None:
                fitting.append(shapes)
    assume(fitting)
    shapes = draw(st.sampled_from(fitting))
    batch = draw(st.sampled_from([(), (1,), (3,), (2, 2)]))
    shapes = tuple(batch + s for s in shapes)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return (shapes if manifold.coupled else shapes[0]), dtype, gen


# ----------------------------------------------------------------------------- tuple helpers
def _parts(x) -> tuple[Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def _like(x, parts):
    return tuple(parts) if isinstance(x, tuple) else parts[0]


def _map(fn: Callable, *xs):
    return _like(xs[0], [fn(*ps) for ps in zip(*map(_parts, xs))])


def _randn(shape, gen, dtype):
    if isinstance(shape[0], tuple):
        return tuple(torch.randn(*s, generator=gen, dtype=dtype) for s in shape)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _sqnorm(x) -> Tensor:
    """Squared Frobenius norm per batch member, summed over a tuple's parts."""
    return sum(p.pow(2).sum((-2, -1)) for p in _parts(x))


def _inner(x, y) -> Tensor:
    return sum((p * q).sum((-2, -1)) for p, q in zip(_parts(x), _parts(y)))


def _rel(x, y, ref=None) -> float:
    """max over batch members of ‖x − y‖ / ‖ref‖, ref = y by default (0 when both are 0)."""
    gap = _sqnorm(_map(torch.sub, x, y)).sqrt()
    ref = _sqnorm(y if ref is None else ref).sqrt()
    return float(torch.where(gap == 0, 0.0, gap / ref.clamp_min(torch.finfo(ref.dtype).tiny)).max())


def _scaled(u, x, size: float):
    """u rescaled per batch member to norm size·‖x‖ (0 stays 0)."""
    factor = size * _sqnorm(x).sqrt() / _sqnorm(u).sqrt().clamp_min(torch.finfo(_parts(x)[0].dtype).tiny)
    return _map(lambda p: p * factor[..., None, None], u)


def _chain(x) -> Tensor:
    out = x[0]
    for p in x[1:]:
        out = out @ p
    return out


# ----------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
@given(data=st.data())
def test_points_project_and_violation(name, opts, data):
    """random_point lies on M (violation 0); project is the identity on M and idempotent;
    violation is > 0 at points that project moves; a coupled manifold's project keeps the
    product of its factors."""
    manifold = _build(name, opts)
    shape, dtype, gen = data.draw(points(manifold))
    tol = TOL[dtype]
    x = manifold.random_point(shape, generator=gen, dtype=dtype)
    assert all(p.dtype == dtype for p in _parts(x))
    assert [tuple(p.shape) for p in _parts(x)] == [tuple(s) for s in (shape if manifold.coupled else [shape])]
    assert float(manifold.violation(x).max()) <= tol
    assert _rel(manifold.project(x), x) <= tol
    z = _randn(shape, gen, dtype)
    y = manifold.project(z)
    assert float(manifold.violation(y).max()) <= tol
    assert _rel(manifold.project(y), y) <= IDEMPOTENT[dtype]
    if _rel(z, y) > 1e-2:  # z is off M
        assert float(manifold.violation(z).max()) > tol
    if manifold.coupled:
        assert _rel(_chain(y), _chain(z)) <= tol


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
@given(data=st.data())
def test_tangent_projection_and_riemannian_gradient(name, opts, data):
    """project_tangent is an idempotent orthogonal projection onto vectors along which M
    is left only to second order; egrad_to_rgrad gives a tangent ascent direction: a small
    retraction along −rgrad decreases the linear function ⟨g, x⟩."""
    manifold = _build(name, opts)
    shape, dtype, gen = data.draw(points(manifold))
    tol = TOL[dtype]
    x = manifold.random_point(shape, generator=gen, dtype=dtype)
    u = _randn(shape, gen, dtype)
    t = manifold.project_tangent(x, u)
    # relative to the ambient vector: t may be small after cancellation (a 2 × 2 Stiefel
    # factor has a one-dimensional tangent space)
    assert _rel(manifold.project_tangent(x, t), t, u) <= tol
    assert float((_inner(_map(torch.sub, u, t), t).abs() / _sqnorm(u)).max()) <= tol
    g = _randn(shape, gen, dtype)
    rg = manifold.egrad_to_rgrad(x, g)
    assert _rel(manifold.project_tangent(x, rg), rg, g) <= tol
    scale = (_sqnorm(g) * _sqnorm(rg)).sqrt()
    assert float((_inner(g, rg) / scale.clamp_min(1e-30)).min()) >= -tol
    if dtype == torch.float64:
        eps = 1e-4  # M is left to second order along tangents: violation ~ ε², not ~ ε
        assert float(manifold.violation(_map(torch.add, x, _scaled(t, x, eps))).max()) <= 1e2 * eps**2
        # a step −c·rg with c = 1e-3·‖x‖/‖g‖: its first-order drop c⟨g, rg⟩ dominates the
        # retraction's second-order term ~ c²‖rg‖²‖g‖/‖x‖ wherever ⟨g, rg⟩ is not ~0
        moving = _inner(g, rg) > 1e-8 * _sqnorm(g)
        c = 1e-3 * (_sqnorm(x) / _sqnorm(g)).sqrt()
        y = manifold.retract(x, _map(lambda p: -c[..., None, None] * p, rg))
        drop = _inner(g, _map(torch.sub, y, x))
        assert bool((drop[moving] < 0).all())


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
@given(data=st.data())
def test_retraction_and_transport(name, opts, data):
    """retract(x, 0) = x; retractions (and the optimizer's retract_step) land on M;
    transport gives tangent vectors at the target."""
    manifold = _build(name, opts)
    shape, dtype, gen = data.draw(points(manifold))
    tol = TOL[dtype]
    x = manifold.random_point(shape, generator=gen, dtype=dtype)
    assert _rel(manifold.retract(x, _map(torch.zeros_like, x)), x) <= tol
    t = _scaled(manifold.project_tangent(x, _randn(shape, gen, dtype)), x, 0.3)
    y = manifold.retract(x, t)
    assert float(manifold.violation(y).max()) <= tol
    stepped = manifold.retract_step(x, _map(torch.add, x, _scaled(_randn(shape, gen, dtype), x, 0.1)))
    assert float(manifold.violation(stepped).max()) <= tol
    w = manifold.transport(x, y, t)
    assert _rel(manifold.project_tangent(y, w), w) <= tol


# ----------------------------------------------------------------------------- adapt's check
def test_a_factor_the_manifold_cannot_hold_is_refused_at_adapt():
    """Found by the fuzzer: usv's diagonal S is a vector, and stiefel's shape check unpacked
    it inside torch; a swapped coupled key on a square layer (A, B) chained but could never
    be balanced. Both are refused before the model changes. (Stiefel on LoRA's wide A and
    balanced on U,V: test_errors.py.)"""
    model = TinyNet()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(geopeft.ConfigError, match=r"factor 'S' .* the factor is 4, but a manifold acts on "
                                                  r"\(n, p\) matrices"):
        geopeft.adapt(model, "lora", adapter="usv", targets=["query"], rank=4, diag_s=True,
                      initializer="orthonormal", manifold={"S": "stiefel"})
    with pytest.raises(geopeft.ConfigError, match=r"factor 'A,B' .* the factor is 4x16 and 16x4, but "
                                                  r"balanced pairs .*r <= min\(m, n\)"):
        geopeft.adapt(model, "lora", targets=["query"], rank=4, manifold={"A,B": "balanced"})
    assert {n: type(m) for n, m in model.named_modules()} == before
