"""Recipes: option routing (the recipe's own options go only where they fit, the user's are
strict), the hidden size a model does not declare, and the JSON that follows the fields."""

from __future__ import annotations

import logging
from dataclasses import fields

import pytest
import torch
from torch import nn

import geopeft
from geopeft.interfaces import Recipe
from geopeft.recipes import from_json, resolve


def test_replacing_stella_s_stiefel_factors_drops_its_step_scaling_option(tiny):
    geopeft.adapt(tiny, "stella", targets=["query"], rank=2, manifold={"U": "oblique", "V": "oblique"})
    manifolds = tiny.query.adapter.factor_manifolds()
    assert {k: type(m).__name__ for k, m in manifolds.items()} == {
        "U": "ObliqueManifold", "S": "EuclideanManifold", "V": "ObliqueManifold"}
    assert "step_scaling" not in tiny.geopeft_state.resolved.recipe.options
    # the same option from the user stays strict: nothing takes it now
    with pytest.raises(geopeft.ConfigError, match="unknown option 'step_scaling'"):
        geopeft.adapt(type(tiny)(), "stella", targets=["query"], rank=2,
                      manifold={"U": "oblique", "V": "oblique"}, step_scaling=False)


def test_user_options_override_the_recipe_s():
    resolved = resolve("stella", {"step_scaling": False})
    assert resolved.manifolds["U"].step_scaling is False
    assert resolved.recipe.options == {"step_scaling": False}


def test_hidden_size_inferred_from_the_adapted_layers_logged_and_explicit_wins(caplog):
    # d = 32: two 32x32 layers and one 32 -> 96 outvote the 96 and the 8
    model = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 96))
    with caplog.at_level(logging.INFO, logger="geopeft"):
        geopeft.adapt(model, "stella", targets=["1", "2", "3"], rank=2)
    assert model[1].adapter.factor_manifolds()["U"].hidden_size == 32
    assert "hidden_size=32" in caplog.text and "3 adapted layers" in caplog.text
    # the step scaling uses it: the 96-row U of layer 3 is scaled by sqrt(32 / 96)
    assert model[3].adapter.factor_manifolds()["U"].reference_size == 32.0
    explicit = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 32))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="geopeft"):
        geopeft.adapt(explicit, "stella", targets=["1"], rank=2, hidden_size=64)
    assert explicit[1].adapter.factor_manifolds()["U"].hidden_size == 64
    assert "hidden_size" not in caplog.text  # nothing inferred, nothing logged
    # plain LoRA takes no hidden size: nothing to infer, nothing logged
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="geopeft"):
        geopeft.adapt(nn.Sequential(nn.Linear(8, 8)), "lora", targets=["0"], rank=2)
    assert caplog.text == ""


def test_recipe_json_follows_the_dataclass_fields(tiny):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=2, manifold={"A": "oblique"},
                  transforms=["scaled_gd"], moments="transport", project_every=3)
    saved = tiny.geopeft_state.resolved.to_json()
    parts, settings = Recipe.parts(), Recipe.settings()
    assert set(parts) == {"adapter", "manifolds", "transforms", "rank_controller", "initializer"}
    assert settings == ["riemannian_grad", "project_every", "moments"]
    # every part and setting field is in the JSON, nothing else but the method name
    assert set(saved) == {"method", *parts, *settings}
    assert {f.name for f in fields(Recipe)} - set(saved) == {"name", "lr", "options", "description"}
    assert saved["moments"] == "transport" and saved["project_every"] == 3
    rebuilt = from_json(saved)
    assert rebuilt.recipe.moments == "transport" and rebuilt.recipe.project_every == 3
    assert rebuilt.recipe.manifolds == {"A": "oblique", "B": "euclidean"}
    assert rebuilt.to_json() == saved
    assert [type(t).__name__ for t in rebuilt.transforms] == ["ScaledGD"]


def test_stella_on_a_sequential_trains_with_the_inferred_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    geopeft.adapt(model, "stella", targets=["0", "2"], rank=2)
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2)
    for _ in range(3):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for layer in (model[0], model[2]):
        u = layer.adapter.U.detach()
        assert torch.allclose(u.T @ u, torch.eye(2), atol=1e-5)
