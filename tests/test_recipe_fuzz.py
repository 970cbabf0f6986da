"""Fuzzed recipes: hypothesis draws an adapter, manifolds (per factor and coupled), gradient
transforms, a rank controller, an initializer and the recipe's knobs from whatever the
registry holds, and a base optimizer. A combination geopeft accepts trains a tiny model
for 5 steps (6 when projecting every 2 or 3) with finite losses and every constrained
factor a fixed point of its manifold's projection (on M, or where the manifold leaves it
by design); one it refuses raises a geopeft error (`geopeft.errors.GeopeftError`) at
`adapt` or `geopeft.optimizer` — never an exception from inside torch, and never during
the steps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import geopeft
from geopeft.errors import GeopeftError
from geopeft.geometry import factor_groups
from geopeft.registry import get_registry

from helpers import TinyNet, tiny_regression, train

TARGETS = ["query", "value", "ffn.0", "ffn.2", "embed"]
OPTIMIZERS = {"sgd": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
              "adamw": (torch.optim.AdamW, {"lr": 1e-2})}


def _initializers() -> list[str]:
    reg = get_registry()
    # a data-driven initializer (needs_data) needs calibration batches and a loss, which a
    # registry-wide draw cannot supply meaningfully: adapt refuses it without them, and its
    # own tests give it data. Every data-free one is drawn.
    return [n for n in geopeft.components()["initializer"] if not reg.get("initializer", n).needs_data]


#: how often a draw keeps to what the components declare (`Recipe.adapter`, `coupled`,
#: `requires`) — the rest is drawn from everything, mostly invalid, to exercise refusals
COMPATIBLE = 0.85


def _fitting(draw, names, ok):
    """A name from `names`: one with ok(name) most of the time (if any), else any."""
    good = [n for n in names if ok(n)]
    if good and draw(st.floats(0, 1)) < COMPATIBLE:
        return draw(st.sampled_from(good))
    return draw(st.sampled_from(names))


@st.composite
def recipes(draw):
    comps = geopeft.components()
    reg = get_registry()
    method = draw(st.sampled_from(comps["method"]))
    adapter = _fitting(draw, comps["adapter"], lambda n: n == reg.get("method", method).adapter)
    factors = list(reg.get("adapter", adapter).factor_names)

    def pick(kind, ok=lambda cls: True):
        return _fitting(draw, comps[kind], lambda n: ok(reg.get(kind, n)))

    def needs_factors(cls):
        return getattr(cls, "requires", frozenset()) <= set(factors)

    manifold = {}
    for f in factors:
        if draw(st.booleans()):
            manifold[f] = pick("manifold", lambda cls: not cls.coupled)
    if len(factors) > 1 and draw(st.booleans()):
        key = draw(st.permutations(factors))[:draw(st.integers(2, len(factors)))]
        if draw(st.floats(0, 1)) < COMPATIBLE:  # else a factor gets two manifolds: refused
            manifold = {f: m for f, m in manifold.items() if f not in key}
        manifold[",".join(key)] = pick("manifold", lambda cls: cls.coupled)
    transforms: list[str] = []
    for _ in range(draw(st.integers(0, 2))):
        families = {reg.get("gradient_transform", t).exclusive for t in transforms} - {""}
        name = pick("gradient_transform",
                    lambda cls, used=families: needs_factors(cls) and cls.exclusive not in used)
        if name not in transforms:
            transforms.append(name)
    overrides = {
        "manifold": manifold,
        "transforms": transforms,
        "rank_controller": pick("rank_controller", needs_factors),
        "initializer": _fitting(draw, _initializers(), lambda n: needs_factors(reg.get("initializer", n))),
        "moments": draw(st.sampled_from(["keep", "transport"])),
        "project_every": draw(st.integers(1, 3)),
        "riemannian_grad": draw(st.booleans()),
    }
    targets = draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=3, unique=True))
    return ({"method": method, "adapter": adapter, "targets": targets, "rank": draw(st.integers(1, 4)),
             **overrides}, draw(st.sampled_from(sorted(OPTIMIZERS))))


@given(drawn=recipes(), seed=st.integers(0, 2**16))
def test_fuzzed_recipe_trains_or_is_refused_with_a_geopeft_error(drawn, seed):
    kwargs, optimizer = drawn
    torch.manual_seed(seed)
    model = TinyNet()
    cls, opts = OPTIMIZERS[optimizer]
    try:
        geopeft.adapt(model, **kwargs)
        opt = geopeft.optimizer(model, cls, **opts)
    except GeopeftError:
        return  # refused, with a geopeft error: the contract for a bad combination
    every = kwargs["project_every"]  # end on a projection step: coupled factors are on M there
    losses = train(model, opt, tiny_regression(), every * math.ceil(5 / every))
    assert all(math.isfinite(v) for v in losses), losses
    # every constrained factor is a fixed point of its manifold's projection: on M, or where
    # the manifold leaves it by design (a balanced pair whose BA is still rank-deficient —
    # after SGD steps from LoRA's B = 0 — is kept as it is by the rank guard)
    for group in factor_groups([a for _, a in geopeft.adapters(model)]):
        if not group.manifold.is_euclidean:
            x = group.stacked()
            for p, q in zip(*(t if isinstance(t, tuple) else (t,) for t in (group.manifold.project(x), x))):
                assert float((p - q).norm() / q.norm().clamp_min(1e-30)) <= 1e-4, group.manifold


def test_a_factor_on_two_manifolds_is_refused():
    """Found by the fuzzer: {"B": "oblique", "B,A": "balanced"} put B on both, and the
    balancing undid the oblique retraction at every step."""
    with pytest.raises(geopeft.IncompatibleComponentsError,
                       match="factor 'B' is given two manifolds, 'oblique' on 'B' and 'balanced' on 'B,A'"):
        geopeft.adapt(TinyNet(), "lora", targets=["query"], rank=2,
                      manifold={"B": "oblique", "B,A": "balanced"})


def test_two_gram_preconditioners_are_not_chained():
    """Found by the fuzzer: lorapro then scaled_gd divides the gradients by BᵀB twice, and
    from LoRA's B = 0 the loss went 1.5 → 1e9 in two SGD steps at any lr (1e-2 … 1e-3)."""
    with pytest.raises(geopeft.IncompatibleComponentsError,
                       match="'lorapro' and 'scaled_gd' are both 'gram_preconditioner' transforms"):
        geopeft.adapt(TinyNet(), "lora", targets=["query"], rank=2, transforms=["lorapro", "scaled_gd"])


def test_a_rank_controller_refuses_bases_it_cannot_keep_on_their_manifold():
    """Found by the fuzzer: geolora with V on 'oblique' grew the rank and left V's rows off
    the unit sphere (violation 0.75); a controller that changes U's and V's columns keeps
    them orthonormal only, so another manifold on them is refused when the optimizer is built."""
    model = geopeft.adapt(TinyNet(), "geolora", targets=["query"], rank=2, manifold={"V": "oblique"})
    with pytest.raises(geopeft.ConfigError, match="rank controller 'geolora' changes the columns of U "
                                                  "and V.*has V on 'oblique'"):
        geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2)
    # and S on stiefel: the controller's new cores are not orthonormal (NaN losses by step 3)
    model = geopeft.adapt(TinyNet(), "geolora", targets=["ffn.2"], rank=2, manifold={"S": "stiefel"})
    with pytest.raises(geopeft.ConfigError, match="rewrites the core S .* has S on 'stiefel'"):
        geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2)


def test_moment_transport_through_a_basis_change_refuses_preconditioned_steps():
    """Found by the fuzzer: balanced pairs + lorapro + moments="transport" under SGD with
    momentum went 1.35 → inf in three steps: the push (g_B Rᵀ, R⁻ᵀ g_A) is right for
    gradients, but LoRA-Pro's outputs are preconditioned steps, which change as
    (δB R⁻¹, R δA). The combination is refused; moments="keep" trains."""
    kw = {"targets": ["value", "ffn.0"], "rank": 1, "transforms": ["lorapro"], "project_every": 2}
    with pytest.raises(geopeft.IncompatibleComponentsError,
                       match="moments='transport' carries first moments .* 'balanced' on 'B,A' as "
                             "gradients, but after 'lorapro'"):
        geopeft.adapt(TinyNet(), "balora", moments="transport", **kw)
    torch.manual_seed(1)
    model = geopeft.adapt(TinyNet(), "balora", **kw)
    opt = geopeft.optimizer(model, torch.optim.SGD, lr=1e-2, momentum=0.9)
    losses = train(model, opt, tiny_regression(), 6)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
