"""unload: the plain base architecture back, ΔW merged in (or dropped), no geopeft wrappers."""

from __future__ import annotations

import copy

import pytest
import torch

import geopeft
from geopeft.model import find_state, project_onto_manifolds

from helpers import TinyNet


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Move every factor off its initial value (then back onto its manifold): ΔW ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    pairs = geopeft.adapters(model)
    with torch.no_grad():
        for _, a in pairs:
            for p in a.factors().values():
                p.add_(scale * torch.randn(p.shape, generator=g))
    project_onto_manifolds([a for _, a in pairs])


@pytest.mark.parametrize("method", ["lora", "stella", "balora"])
def test_minilm_unload_save_pretrained_from_pretrained(minilm, tmp_path, method):
    from transformers import AutoModel

    tok, base = minilm
    model = geopeft.adapt(copy.deepcopy(base), method, targets=["query", "value"], rank=4).eval()
    perturb(model)
    batch = tok(["unload gives the plain model back", "with the update merged"],
                return_tensors="pt", padding=True)
    with torch.no_grad():
        adapted = model(**batch).last_hidden_state
        plain = base(**batch).last_hidden_state
        assert (adapted - plain).abs().max() > 1e-3  # the update changes the function
        geopeft.unload(model, merge=True)
        merged = model(**batch).last_hidden_state
        assert type(model.encoder.layer[0].attention.self.query) is torch.nn.Linear
        assert model.state_dict().keys() == base.state_dict().keys()
        model.save_pretrained(tmp_path)
        reloaded = AutoModel.from_pretrained(tmp_path).eval()
        out = reloaded(**batch).last_hidden_state
    assert torch.equal(out, merged)  # save_pretrained → from_pretrained is exact
    # merging rounds W + ΔW to fp32 once; MiniLM amplifies that ulp to ~3e-5 of outputs up to 6
    assert (out - adapted).norm() <= 1e-5 * adapted.norm()


def test_unload_without_merge_is_the_base_model(tiny):
    base = copy.deepcopy(tiny)
    model = geopeft.adapt(tiny, "lora", targets="all-linear", rank=3, trainable=["classifier"])
    perturb(model)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)  # a trained head stays trained
    ids = torch.randint(0, 50, (3, 5))
    geopeft.unload(model, merge=False)
    assert find_state(model) is None and not geopeft.adapters(model)
    assert model.state_dict().keys() == base.state_dict().keys()
    fresh = TinyNet()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        base.classifier.bias.add_(1.0)
        assert torch.equal(fresh(ids), base(ids))
    with pytest.raises(geopeft.GeopeftError, match="no geopeft adapters"):
        geopeft.unload(model)


def test_unload_without_merge_undoes_a_base_shift(tiny):
    """PiSSA's initializer shifts W (W − s·B₀A₀); unload(merge=False) gives the original back."""
    base = copy.deepcopy(tiny)
    model = geopeft.adapt(tiny, "pissa", targets=["query", "value"], rank=2)
    assert not torch.equal(model.query.base_layer.weight, base.query.weight)
    geopeft.unload(model, merge=False)
    assert torch.allclose(model.query.weight, base.query.weight, atol=1e-6)


def test_unload_of_a_merged_model_keeps_the_merge_once(tiny):
    model = geopeft.adapt(tiny, "lora", targets=["query", "value"], rank=2)
    perturb(model)
    ids = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        expected = model(ids)
        geopeft.merge(model)
        geopeft.unload(model, merge=True)  # already merged: not added twice
        assert torch.allclose(model(ids), expected, atol=1e-6)
