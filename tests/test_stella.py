"""StelLA: the usv adapter, the recipe's step against the paper's algorithm, MiniLM."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import geopeft
from geopeft import kernels as K
from geopeft.geometry import factor_groups, max_violation
from geopeft.layers import Conv1D
from geopeft.registry import get_registry

from helpers import TinyNet, tiny_regression, train

TINY_TARGETS = ["query", "value", "ffn.0", "ffn.2"]


def usv(base: nn.Module, rank: int = 3, **options) -> geopeft.Adapter:
    return get_registry().get("adapter", "usv")(base, rank, **options)


def layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """(layer, an input) for every supported kind, wide and tall."""
    torch.manual_seed(0)
    conv1d = Conv1D(7, 5)
    nn.init.normal_(conv1d.weight)
    return {
        "linear-wide": (nn.Linear(9, 5), torch.randn(4, 9)),
        "linear-tall": (nn.Linear(5, 9), torch.randn(2, 3, 5)),
        "conv1d": (conv1d, torch.randn(3, 5)),
        "conv2d": (nn.Conv2d(3, 6, 3, padding=1), torch.randn(2, 3, 5, 5)),
        "embedding": (nn.Embedding(11, 4), torch.randint(0, 11, (2, 6))),
    }


def with_weight(layer: nn.Module, delta: torch.Tensor) -> nn.Module:
    out = copy.deepcopy(layer)
    with torch.no_grad():
        out.weight += delta
    return out


def usv_with_random_s(layer: nn.Module, diag_s: bool) -> geopeft.Adapter:
    """A rank-3 usv adapter whose S is random (not the identity it starts from)."""
    adapter = usv(layer, rank=3, alpha=5.0, diag_s=diag_s)
    with torch.no_grad():
        adapter.S.copy_(torch.randn_like(adapter.S))
    return adapter


# --------------------------------------------------------------------------- the adapter
@pytest.mark.parametrize("diag_s", [False, True])
@pytest.mark.parametrize("kind", list(layers()))
def test_forward_equals_the_layer_with_delta_w_added(kind, diag_s):
    layer, x = layers()[kind]
    adapter = usv_with_random_s(layer, diag_s)
    expected = with_weight(layer, adapter.delta_weight())(x)
    assert torch.allclose(adapter(x, layer(x)), expected, atol=1e-5)


@pytest.mark.parametrize("diag_s", [False, True])
@pytest.mark.parametrize("kind", list(layers()))
def test_to_lora_is_exact(kind, diag_s):
    layer, _ = layers()[kind]
    adapter = usv_with_random_s(layer, diag_s)
    b, a = adapter.to_lora()
    m, n = adapter.shape
    assert b.shape == (m, 3) and a.shape == (3, n)
    ops = adapter.ops
    assert torch.allclose(ops.to_weight_layout(adapter.scaling * b @ a, layer), adapter.delta_weight(),
                          atol=1e-6)


def test_a_new_adapter_is_on_the_manifold_with_s_identity():
    adapter = usv(nn.Linear(40, 30), rank=6)
    assert float(K.gram_violation(adapter.U.detach())) <= 1e-5
    assert float(K.gram_violation(adapter.V.detach())) <= 1e-5
    assert torch.equal(adapter.S, torch.eye(6))
    assert tuple(usv(nn.Linear(40, 30), rank=6, diag_s=True).S.shape) == (6,)


@pytest.mark.parametrize("diag_s", [False, True])
def test_growing_the_rank_keeps_u_v_orthonormal_and_the_output(diag_s, tiny):
    geopeft.adapt(tiny, "stella", targets=TINY_TARGETS, rank=3, hidden_size=16, diag_s=diag_s)
    opt = geopeft.optimizer(tiny, torch.optim.AdamW, lr=1e-2)
    ids = torch.randint(0, 50, (4, 7))
    before = tiny(ids)
    opt.resize("ffn.0", 6)
    adapter = dict(geopeft.adapters(tiny))["ffn.0"]
    assert adapter.rank == 6 and max_violation([adapter]) <= 1e-5
    assert torch.allclose(tiny(ids), before, atol=1e-6)
    tiny(ids).pow(2).mean().backward()
    opt.step()  # the resized factors are the optimizer's
    assert max_violation([adapter]) <= 1e-5
    with pytest.raises(geopeft.ShapeError, match="rank <= 16"):
        opt.resize("query", 17)


# --------------------------------------------------------------------------- the recipe
def test_recipe_parts_and_no_weight_decay_on_u_v(tiny):
    geopeft.adapt(tiny, "stella", targets=TINY_TARGETS, rank=4, hidden_size=16)
    resolved = tiny.geopeft_state.resolved
    assert resolved.recipe.adapter == "usv" and resolved.recipe.initializer == "orthonormal"
    assert {k: type(m).name for k, m in resolved.manifolds.items()} == {
        "U": "stiefel", "S": "euclidean", "V": "stiefel"}
    stiefel = resolved.manifolds["U"]
    assert (stiefel.metric, stiefel.retraction, stiefel.reference_size) == ("canonical", "polar", 16.0)
    opt = geopeft.optimizer(tiny, torch.optim.AdamW, lr=1e-3, weight_decay=0.5)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for _, a in geopeft.adapters(tiny):
        assert decay[id(a.U)] == 0.0 and decay[id(a.V)] == 0.0 and decay[id(a.S)] == 0.5


def test_same_shape_factors_share_one_batched_group(tiny):
    """U and V of every layer with the same (rows, r) are retracted in one call."""
    geopeft.adapt(tiny, "stella", targets=TINY_TARGETS, rank=4, hidden_size=16)
    groups = [g for g in factor_groups([a for _, a in geopeft.adapters(tiny)]) if not g.manifold.is_euclidean]
    sizes = sorted((len(g.members), tuple(g.params[0][0].shape)) for g in groups)
    assert sizes == [(2, (24, 4)), (6, (16, 4))]


def paper_step(model: nn.Module, grads: dict[str, torch.Tensor], inner: torch.optim.Optimizer,
               hidden: int) -> None:
    """StelLA's steps 1–3 (docs/methods/stella.md, "Math": Riemannian gradient, the base
    optimizer's step, the step scaled by √(d/n), projected and retracted), written out by
    hand, for U and V of every adapter; S is a plain Euclidean parameter."""
    stiefel = {n: p for n, p in model.named_parameters() if n.endswith((".U", ".V"))}
    old = {n: p.detach().clone() for n, p in stiefel.items()}
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.grad = grads[n].clone()
    with torch.no_grad():
        for n, p in stiefel.items():  # 1. canonical-metric Riemannian gradient G − X Gᵀ X
            x, g = old[n], p.grad
            p.grad = g - x @ g.T @ x
        inner.step()  # 2. the unmodified optimizer
        for n, p in stiefel.items():  # 3. Δ scaled by √(d/m), projected, polar-retracted from X_old
            x = old[n]
            delta = p - x
            if x.shape[0] != hidden:
                delta = delta * math.sqrt(hidden / x.shape[0])
            xtd = x.T @ delta
            delta = delta - x @ (xtd + xtd.T) / 2
            u, _, vh = torch.linalg.svd(x + delta, full_matrices=False)
            p.copy_(u @ vh)


def test_one_step_equals_the_papers_algorithm():
    torch.manual_seed(0)
    model = TinyNet().double()
    geopeft.adapt(model, "stella", targets=TINY_TARGETS, rank=4, alpha=8, hidden_size=16)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 50, (6, 5))
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=2e-2, weight_decay=0.1)
    named = dict(reference.named_parameters())
    on_manifold = [p for n, p in named.items() if n.endswith((".U", ".V"))]
    free = [p for n, p in named.items() if p.requires_grad and not n.endswith((".U", ".V"))]
    inner = torch.optim.AdamW([{"params": free}, {"params": on_manifold, "weight_decay": 0.0}],
                              lr=2e-2, weight_decay=0.1)
    for _ in range(3):  # three steps: Adam's moments of the Riemannian gradients carry over
        model(ids).pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        paper_step(reference, grads, inner, hidden=16)
        inner.zero_grad()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.allclose(p, q, atol=1e-6, rtol=0), name
    assert max_violation([a for _, a in geopeft.adapters(model)]) <= 1e-12


def test_merge_equals_the_unmerged_forward(tiny):
    geopeft.adapt(tiny, "stella", targets=TINY_TARGETS + ["embed"], rank=4, hidden_size=16)
    opt = geopeft.optimizer(tiny, torch.optim.AdamW, lr=1e-2)
    ids = torch.randint(0, 50, (4, 7))
    for _ in range(3):
        tiny(ids).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        unmerged = tiny(ids)
        geopeft.merge(tiny)
        merged = tiny(ids)
        geopeft.unmerge(tiny)
        again = tiny(ids)
    assert float((merged - unmerged).norm() / unmerged.norm()) <= 1e-5
    assert float((again - unmerged).norm() / unmerged.norm()) <= 1e-5


def test_save_load_and_peft_export_keep_the_outputs(tiny, tmp_path):
    from peft import PeftModel

    base = copy.deepcopy(tiny)
    geopeft.adapt(tiny, "stella", targets=TINY_TARGETS + ["embed"], rank=4, hidden_size=16, diag_s=True)
    opt = geopeft.optimizer(tiny, torch.optim.AdamW, lr=1e-2)
    ids = torch.randint(0, 50, (4, 7))
    tiny(ids).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        expected = tiny(ids)
    geopeft.save(tiny, tmp_path / "saved")
    loaded = geopeft.load(copy.deepcopy(base), tmp_path / "saved")
    assert torch.equal(loaded(ids), expected)
    assert loaded.geopeft_state.resolved.manifolds["U"].options() == tiny.geopeft_state.resolved.manifolds["U"].options()
    geopeft.export_peft(tiny, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(peft_model(ids), expected, atol=1e-5)


# --------------------------------------------------------------------------- options, mix-and-match
def test_hidden_size_comes_from_the_model_or_its_adapted_layers(tiny):
    inferred = geopeft.adapt(copy.deepcopy(tiny), "stella", targets=["query", "ffn.0"])
    assert inferred.geopeft_state.resolved.manifolds["U"].hidden_size == 16  # 16x16, 24x16
    geopeft.adapt(copy.deepcopy(tiny), "stella", targets=["query"], step_scaling=False)
    geopeft.adapt(copy.deepcopy(tiny), "stella", targets=["query"], step_scaling=24.0)
    tiny.config = type("Config", (), {"hidden_size": 16})()
    explicit = geopeft.adapt(copy.deepcopy(tiny), "stella", targets=["query"], hidden_size=20)
    assert explicit.geopeft_state.resolved.manifolds["U"].hidden_size == 20  # an option wins
    geopeft.adapt(tiny, "stella", targets=["query"])
    assert tiny.geopeft_state.resolved.manifolds["U"].hidden_size == 16


def _train(model: nn.Module, steps: int = 5, lr: float = 1e-2) -> list[float]:
    return train(model, geopeft.optimizer(model, torch.optim.AdamW, lr=lr), tiny_regression(), steps)


@pytest.mark.parametrize("overrides", [
    {"retraction": "qr"}, {"retraction": "cayley"}, {"polar_method": "newton_schulz"},
    {"metric": "euclidean"}, {"diag_s": True}, {"initializer": "svd_major"}, {"initializer": "svd_minor"},
])
def test_mix_and_match_options_train_on_the_manifold(tiny, overrides):
    geopeft.adapt(tiny, "stella", targets=TINY_TARGETS, rank=4, hidden_size=16, **overrides)
    losses = _train(tiny, steps=8)
    assert losses[-1] < losses[0]
    assert max_violation([a for _, a in geopeft.adapters(tiny)]) <= 1e-5
    resolved = tiny.geopeft_state.resolved
    for key, value in overrides.items():
        if key in ("retraction", "polar_method", "metric"):
            assert getattr(resolved.manifolds["U"], key) == value


class UnitColumns(geopeft.Manifold):
    """A user's manifold: every column of unit norm."""

    def project_tangent(self, x, u):
        return u - x * (x * u).sum(-2, keepdim=True)

    def retract(self, x, u):
        return self.project(x + u)

    def project(self, x):
        return x / x.norm(dim=-2, keepdim=True)

    def violation(self, x):
        return (x.norm(dim=-2) - 1).abs().amax(-1)

    def random_point(self, shape, generator=None, dtype=torch.float32):
        return self.project(torch.randn(*shape, generator=generator, dtype=dtype))


def test_a_user_registered_manifold_for_v(tiny, plugin):
    plugin(type("Plugin", (), {"register_manifolds": staticmethod(geopeft.hookimpl(
        lambda register: register("unit_columns", UnitColumns)))}), "unit-columns")
    geopeft.adapt(tiny, "stella", targets=TINY_TARGETS, rank=4, hidden_size=16,
                  manifold={"V": "unit_columns"})
    manifolds = tiny.geopeft_state.resolved.manifolds
    assert isinstance(manifolds["V"], UnitColumns) and type(manifolds["U"]).name == "stiefel"
    losses = _train(tiny, steps=8)
    assert losses[-1] < losses[0]
    for _, a in geopeft.adapters(tiny):
        u, v = a.U.detach(), a.V.detach()
        assert float(K.gram_violation(u)) <= 1e-5
        assert float((v.norm(dim=0) - 1).abs().max()) <= 1e-5
        assert float(K.gram_violation(v)) > 1e-3  # V is free of the Stiefel constraint


@pytest.mark.parametrize("part", ["major", "minor"])
def test_svd_initializers_take_singular_vectors_of_w(tiny, part):
    weight = tiny.ffn[0].weight.detach().clone()
    geopeft.adapt(tiny, "stella", targets=["ffn.0"], rank=3, hidden_size=16, initializer=f"svd_{part}")
    a = dict(geopeft.adapters(tiny))["ffn.0"]
    sigma = torch.linalg.svdvals(weight)
    expected = sigma[:3] if part == "major" else sigma[-3:]
    core = a.U.T @ weight @ a.V  # diagonal with the chosen singular values
    assert torch.allclose(core.abs(), torch.diag(expected), atol=1e-4)
    assert torch.equal(a.S, torch.eye(3))


def test_orthonormal_init_subtracts_nothing(tiny):
    weight = tiny.query.weight.detach().clone()
    geopeft.adapt(tiny, "stella", targets=["query"], rank=4, hidden_size=16)
    a = dict(geopeft.adapters(tiny))["query"]
    assert torch.equal(tiny.query.base_layer.weight, weight)
    assert torch.equal(a.S, torch.eye(4)) and max_violation([a]) <= 1e-5
    assert float(a.delta_weight().detach().norm()) > 0.1  # ΔW = s·U·Vᵀ ≠ 0 from the start, as in the paper


# --------------------------------------------------------------------------- MiniLM, real weights
SENTENCES = [
    ("the striker scored twice in the second half", 0), ("the goalkeeper saved a penalty", 0),
    ("the team won the league on the final day", 0), ("fans cheered as the match ended in a draw", 0),
    ("the central bank raised interest rates", 1), ("shares fell after the earnings report", 1),
    ("inflation slowed for the third month", 1), ("the company announced a merger with its rival", 1),
]


@pytest.fixture(scope="module")
def minilm_batch(minilm):
    tok = minilm[0]
    batch = tok([s for s, _ in SENTENCES], return_tensors="pt", padding=True)
    return batch, torch.tensor([label for _, label in SENTENCES])


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_minilm_adamw_steps_keep_u_and_v_orthonormal(minilm, minilm_batch, dtype, bound):
    """Real MiniLM layers (the first two encoder blocks), 40 AdamW steps at a large lr: U and V
    stay orthonormal to the dtype's bound. `benchmarks/long_invariants.py` runs the whole model
    for 500 steps and checks the same bounds."""
    torch.manual_seed(0)
    model = copy.deepcopy(minilm[1]).to(dtype)
    model.encoder.layer = model.encoder.layer[:2]
    # factors in the model's dtype: bf16 factors are the hard case (the default on a bf16
    # model is float32 factors, bounded like the float32 row)
    geopeft.adapt(model, "stella", targets=["query", "value", "intermediate.dense"], rank=8, alpha=16,
                  dtype=dtype)
    stiefel = model.geopeft_state.resolved.manifolds["U"]
    assert stiefel.hidden_size == 384  # from the model's config
    head = torch.randn(384, 2, generator=torch.Generator().manual_seed(0)).to(dtype)
    batch, labels = minilm_batch
    mask = batch["attention_mask"].unsqueeze(-1).to(dtype)

    def loss(m, i):
        hidden = m(**batch).last_hidden_state
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.cross_entropy((pooled @ head).float(), labels)

    losses = train(model, geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2), loss, 40)
    adapters = [a for _, a in geopeft.adapters(model)]
    assert all(a.U.dtype == dtype for a in adapters)
    assert max_violation(adapters) <= bound
    assert losses[-1] < 0.5 * losses[0]
