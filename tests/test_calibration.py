"""Calibration statistics (geopeft.calibrate): the K-FAC moments and gradients equal
their dense definitions, and the model is left exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import geopeft
from geopeft import ConfigError


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.up = nn.Linear(6, 9)
        self.drop = nn.Dropout(0.5)
        self.down = nn.Linear(9, 4)

    def forward(self, ids):
        return self.down(self.drop(torch.tanh(self.up(self.embed(ids)))))


def _batches(k=3, b=2, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 11, (b, t), generator=g), torch.randn(b, t, 4, generator=g)) for _ in range(k)]


def mse(model, batch):
    ids, y = batch
    return F.mse_loss(model(ids), y)


def _adapted(method="lora"):
    torch.manual_seed(0)
    model = TwoLayer()
    extra = {"step_scaling": False} if method == "stella" else {}
    geopeft.adapt(model, method, targets=["embed", "up", "down"], rank=2, **extra)
    return model


def _reference(model, batches):
    """Dense per-batch definitions: A = mean xxᵀ, G = T·Σ δδᵀ, ∇W; averaged over batches."""
    net = TwoLayer()
    with torch.no_grad():
        for name in ("embed", "up", "down"):
            getattr(net, name).weight.copy_(getattr(model, name).base_layer.weight)
            if name != "embed":
                getattr(net, name).bias.copy_(getattr(model, name).base_layer.bias)
    net.eval()
    sums: dict[str, list[torch.Tensor]] = {}
    for ids, y in batches:
        h0 = net.embed(ids)
        h0.retain_grad()
        h1 = net.up(h0)
        h1.retain_grad()
        out = net.down(torch.tanh(h1))
        out.retain_grad()
        net.zero_grad()
        F.mse_loss(out, y).backward()
        x1, x2 = h0.detach().reshape(-1, 6), torch.tanh(h1).detach().reshape(-1, 9)
        onehot = F.one_hot(ids.reshape(-1), 11).float()
        entries = {
            "up": (x1, h1.grad.reshape(-1, 9), net.up.weight.grad),
            "down": (x2, out.grad.reshape(-1, 4), net.down.weight.grad),
            "embed": (onehot, h0.grad.reshape(-1, 6), net.embed.weight.grad.T),
        }
        for name, (x, d, g) in entries.items():
            t = x.shape[0]
            vals = [x.T @ x / t, t * d.T @ d, g.clone()]
            acc = sums.setdefault(name, [torch.zeros_like(v) for v in vals])
            for a, v in zip(acc, vals):
                a += v
    return {k: [v / len(batches) for v in vals] for k, vals in sums.items()}


def test_moments_and_gradients_equal_their_dense_definitions():
    model = _adapted()
    batches = _batches()
    stats = geopeft.calibrate(model, geopeft.adapters(model), batches, mse)
    ref = _reference(model, batches)
    for name in ("up", "down"):
        a, g, grad = ref[name]
        assert torch.allclose(stats[name].input_moment, a, atol=1e-6)
        assert torch.allclose(stats[name].output_moment, g, atol=1e-6)
        assert torch.allclose(stats[name].grad, grad, atol=1e-6)
        assert stats[name].batches == 3
    a, g, grad = ref["embed"]  # one-hot inputs: the input moment is kept as its diagonal
    assert stats["embed"].input_moment.shape == (11,)
    assert torch.allclose(stats["embed"].input_moment, torch.diagonal(a), atol=1e-6)
    assert torch.allclose(stats["embed"].output_moment, g, atol=1e-6)
    assert torch.allclose(stats["embed"].grad, grad, atol=1e-6)


def test_kronecker_product_is_the_empirical_fisher_for_a_one_row_loss():
    """With one row per batch, A ⊗ G of that batch is vec(∇W) vec(∇W)ᵀ: the rows'
    normalisation T splits between the two factors without changing their product."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    geopeft.adapt(model, "lora", targets=["0"], rank=1)
    x, y = torch.randn(1, 3), torch.randn(1, 2)
    stats = geopeft.calibrate(model, geopeft.adapters(model), [(x, y)],
                              lambda m, b: F.mse_loss(m(b[0]), b[1]))["0"]
    g = stats.grad.reshape(-1)  # row-major vec: (m, n) -> index i·n + j
    assert torch.allclose(torch.kron(stats.output_moment, stats.input_moment), torch.outer(g, g), atol=1e-6)


def test_dense_limit_keeps_diagonals():
    model = _adapted()
    batches = _batches()
    dense = geopeft.calibrate(model, geopeft.adapters(model), batches, mse)
    diag = geopeft.calibrate(model, geopeft.adapters(model), batches, mse, dense_limit=5)
    for name in ("up", "down"):
        m, n = diag[name].grad.shape
        assert diag[name].input_moment.shape == ((n, n) if n <= 5 else (n,))
        assert diag[name].output_moment.shape == ((m, m) if m <= 5 else (m,))
        full_in = dense[name].input_moment
        got_in = diag[name].input_moment
        assert torch.allclose(got_in if got_in.dim() == 1 else torch.diagonal(got_in),
                              torch.diagonal(full_in), atol=1e-6)


def test_state_restored_after_calibration_and_after_a_raising_loss():
    model = _adapted("stella")  # U S V adapters: ΔW ≠ 0, so the base function needs them skipped
    model.train()
    model.drop.eval()
    layers = dict(geopeft.adapters(model))
    before_modes = {n: m.training for n, m in model.named_modules()}
    before_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = {n: (dict(m._forward_hooks), dict(m._backward_hooks)) for n, m in model.named_modules()}
    out_before = model(_batches()[0][0])
    seen = []

    def spying_loss(m, batch):
        seen.append((m.training, [a.base_layer.weight.requires_grad for a in layers.values()]))
        return mse(m, batch)

    stats = geopeft.calibrate(model, geopeft.adapters(model), _batches(), spying_loss)
    assert all(not training and not any(flags) for training, flags in seen)  # eval, weights stay frozen
    assert stats["up"].grad.abs().sum() > 0

    calls = []

    def raising_loss(m, batch):
        calls.append(1)
        mse(m, batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        geopeft.calibrate(model, geopeft.adapters(model), _batches(), raising_loss)
    assert calls == [1]
    assert {n: m.training for n, m in model.named_modules()} == before_modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before_flags
    assert all(p.grad is None for p in model.parameters())
    assert {n: (dict(m._forward_hooks), dict(m._backward_hooks)) for n, m in model.named_modules()} == hooks
    assert not any(layer.disabled for _, layer in _layers(model))
    model.drop.p = 0.0
    torch.testing.assert_close(model(_batches()[0][0]), out_before, rtol=0, atol=0)


def _layers(model):
    from geopeft.model import adapted_layers

    return adapted_layers(model)


def test_statistics_are_taken_at_the_base_function():
    """A U S V adapter's ΔW ≠ 0 at construction: calibration must not see it."""
    batches = _batches()
    model = _adapted("stella")
    stats = geopeft.calibrate(model, geopeft.adapters(model), batches, mse)
    ref = _reference(model, batches)
    assert torch.allclose(stats["down"].grad, ref["down"][2], atol=1e-6)


def test_takes_the_first_num_batches_of_any_iterable():
    model = _adapted()
    taken = []

    def stream():
        for i, batch in enumerate(_batches(k=20)):
            taken.append(i)
            yield batch

    stats = geopeft.calibrate(model, geopeft.adapters(model), stream(), mse)
    assert stats["up"].batches == 8 and taken == list(range(8))
    stats = geopeft.calibrate(model, geopeft.adapters(model), stream(), mse, num_batches=2, moments=False)
    assert stats["up"].batches == 2 and stats["up"].input_moment is None


@pytest.mark.parametrize(("batches", "loss_fn", "match"), [
    ([], mse, "yielded no batch"),
    (_batches(), lambda m, b: 3.0, "scalar loss tensor"),
    (_batches(), lambda m, b: m(b[0]), "scalar loss tensor"),
    (_batches(), None, "callable"),
    (None, mse, "init_batches"),
])
def test_bad_calibration_input_is_a_clear_error(batches, loss_fn, match):
    model = _adapted()
    with pytest.raises(ConfigError, match=match):
        geopeft.calibrate(model, geopeft.adapters(model), batches, loss_fn)
    assert not any(a.base_layer.weight.requires_grad for _, a in geopeft.adapters(model))


def test_rows_the_loss_does_not_see_are_left_out():
    """Padding-like rows (δ = 0) change neither ∇W nor the curvature: A and T skip them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    geopeft.adapt(model, "lora", targets=["0"], rank=1)
    x, y = torch.randn(2, 5, 4), torch.randn(2, 3, 3)
    stats = geopeft.calibrate(model, geopeft.adapters(model), [(x, y)],
                              lambda m, b: F.mse_loss(m(b[0])[:, :3], b[1]))["0"]
    seen = x[:, :3].reshape(-1, 4)
    assert torch.allclose(stats.input_moment, seen.T @ seen / 6, atol=1e-6)


def test_conv2d_rows_are_unfolded_patches_matching_the_gradient():
    """For Conv2d the rows are im2col patches: Σ_t δ_t x_tᵀ over them is ∇W (m, c·kh·kw),
    and A is their second moment."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2))
    geopeft.adapt(model, "lora", targets=["0"], rank=1)
    x = torch.randn(2, 2, 5, 5)
    out_ref = model[0].base_layer(x)
    stats = geopeft.calibrate(model, geopeft.adapters(model), [x], lambda m, b: m(b).square().mean())["0"]
    cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)  # (N·L, n)
    delta = (2 * out_ref / out_ref.numel()).movedim(1, -1).reshape(-1, 3)      # (N·L, m)
    assert torch.allclose(stats.grad, delta.T @ cols, atol=1e-6)
    assert torch.allclose(stats.input_moment, cols.T @ cols / cols.shape[0], atol=1e-5)


class SharedInplaceConv1D(nn.Module):
    """A Linear called twice per batch (shared), an in-place ReLU on its first output, and
    an HF Conv1D (whose output is a view) at the end."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)
        self.proj = Conv1D(3, 4)  # nf = 3 outputs, nx = 4 inputs

    def forward(self, x):
        return self.proj(self.lin(self.act(self.lin(x))))


def test_shared_layer_inplace_op_and_conv1d_view_match_the_dense_definitions():
    """A layer called twice in a batch counts the rows of both calls in one T (A = Σxxᵀ/T,
    G = T·Σδδᵀ over both); an in-place op on an adapted output still trains through it
    (δ is the gradient before the op); Conv1D's (view) output is tapped like a Linear's."""
    torch.manual_seed(0)
    model = SharedInplaceConv1D()
    ref = copy.deepcopy(model)
    geopeft.adapt(model, "lora", targets=["lin", "proj"], rank=1)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 3, generator=g)) for _ in range(3)]
    stats = geopeft.calibrate(model, geopeft.adapters(model), batches, mse_of_output)

    sums = {"lin": [0, 0, 0], "proj": [0, 0, 0]}
    for x, y in batches:
        h1 = ref.lin(x)
        h1.retain_grad()
        h2 = ref.lin(torch.relu(h1))
        h2.retain_grad()
        out = ref.proj(h2)
        out.retain_grad()
        F.mse_loss(out, y).backward()
        calls = {"lin": [(x, h1.grad), (torch.relu(h1), h2.grad)], "proj": [(h2, out.grad)]}
        for name, seen in calls.items():
            xs = torch.cat([a.detach().reshape(-1, a.shape[-1]) for a, _ in seen])
            ds = torch.cat([d.reshape(-1, d.shape[-1]) for _, d in seen])
            live = (ds != 0).any(1)
            xs, ds, t = xs[live], ds[live], int(live.sum())
            for k, v in enumerate([xs.T @ xs / t, t * ds.T @ ds, ds.T @ xs]):
                sums[name][k] = sums[name][k] + v / len(batches)
    for name, (a, gg, grad) in sums.items():
        torch.testing.assert_close(stats[name].input_moment, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats[name].output_moment, gg, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats[name].grad, grad, rtol=1e-5, atol=1e-6)


def mse_of_output(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def test_sketch_is_the_dense_moment_times_the_test_matrix_and_its_exact_diagonal():
    """Above `dense_limit` with `sketch_size=s`: Y = M·Ω (n, s) and diag(M) of the same M the
    dense path accumulates (also for the G side, and through a shared layer's per-batch
    sums); no (k, k) matrix is kept; the Nyström reconstruction is exact when rank(M) ≤ s."""
    from geopeft.calibration import Sketch

    model = _adapted()
    batches = _batches()
    dense = geopeft.calibrate(model, geopeft.adapters(model), batches, mse)
    sketched = geopeft.calibrate(model, geopeft.adapters(model), batches, mse, dense_limit=5, sketch_size=3)
    for name, side in (("up", "output_moment"), ("down", "input_moment")):  # the 9-wide sides
        full, sk = getattr(dense[name], side), getattr(sketched[name], side)
        assert isinstance(sk, Sketch) and sk.y.shape == (9, 3) and sk.diag.shape == (9,)
        torch.testing.assert_close(sk.y, full @ sk.omega, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sk.diag, torch.diagonal(full), rtol=1e-5, atol=1e-6)
    model = SharedInplaceConv1D()
    geopeft.adapt(model, "lora", targets=["lin"], rank=1)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 3, generator=g)) for _ in range(2)]
    dense = geopeft.calibrate(model, geopeft.adapters(model), data, mse_of_output)["lin"]
    sk = geopeft.calibrate(model, geopeft.adapters(model), data, mse_of_output, dense_limit=3,
                           sketch_size=2)["lin"].input_moment
    torch.testing.assert_close(sk.y, dense.input_moment @ sk.omega, rtol=1e-5, atol=1e-6)

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 3, generator=gen) @ torch.randn(3, 20, generator=gen)  # rank 3
    sketch = Sketch.zeros(20, 4, torch.device("cpu"))
    sketch.add_rows_(rows, 0.5)
    u, lam = sketch.nystrom()
    ref = 0.5 * rows.T.double() @ rows.double()
    torch.testing.assert_close((u * lam) @ u.T, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("size", [-1, 2.5, True])
def test_a_bad_sketch_size_is_a_clear_error(size):
    model = _adapted()
    with pytest.raises(ConfigError, match="sketch_size must be an int >= 0"):
        geopeft.calibrate(model, geopeft.adapters(model), _batches(), mse, sketch_size=size)
