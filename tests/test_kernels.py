"""Kernels on the torch path: the fused LoRA linear (gradcheck, equal to the unfused
adapter, saved bytes ≤ PEFT's), dispatch (modes, errors, lazy triton), torch.compile of
an adapted model trained with geopeft.optimizer (equal to eager)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import geopeft
from geopeft.cli import main as cli_main
from geopeft.errors import ConfigError
from geopeft.kernels import dispatch, lora_linear, polar_retract_step
from geopeft.kernels import lora as lora_module
from geopeft.kernels.lora import fold_backward, fold_forward


def saved_bytes(fn) -> tuple[int, torch.Tensor]:
    """Bytes of every tensor autograd saves while `fn()` runs, and its result."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


@pytest.mark.parametrize("tokens", [3, 9])  # n = 5, m = 6: 3 tokens expand, 9 fold (both ways)
def test_lora_linear_gradcheck_fp64(tokens):
    assert fold_forward(tokens, 6, 5, 2, torch.float64) == fold_backward(tokens, 6, 5, 2, torch.float64) \
        == (tokens == 9)
    g = torch.Generator().manual_seed(tokens)
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in [(tokens, 5), (6, 5), (6,), (2, 5), (6, 2)]]
    assert torch.autograd.gradcheck(lambda *a: lora_linear(*a, 1.5), args)


def _adapted_linear(dtype, n=12, m=10, rank=3, method="lora"):
    layer = nn.Sequential(nn.Linear(n, m)).to(dtype)
    kw = {"hidden_size": n, "dtype": dtype} if method == "stella" else {}
    model = geopeft.adapt(layer, method, targets=["0"], rank=rank, alpha=6, **kw)
    adapter = geopeft.adapters(model)[0][1]
    if method == "lora":
        with torch.no_grad():
            adapter.B.normal_()
    return model, adapter


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens", [4, 40])  # expand and fold
@pytest.mark.parametrize("method", ["lora", "stella"])
def test_fused_path_equals_unfused_adapter(dtype, tol, tokens, method, monkeypatch):
    model, adapter = _adapted_linear(dtype, method=method)
    factors = [getattr(adapter, n) for n in adapter.factor_names]
    layer = model[0]
    calls = []
    apply = lora_module.LoRALinearFunction.apply
    monkeypatch.setattr(lora_module.LoRALinearFunction, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    x = torch.randn(2, tokens // 2, 12, dtype=dtype, requires_grad=True)
    fused = layer(x)
    assert calls, "AdaptedLayer did not take the fused path"
    dy = torch.randn_like(fused)
    grads = torch.autograd.grad(fused, (x, *factors), dy)
    x2 = x.detach().clone().requires_grad_()
    unfused = adapter(x2, layer.base_layer(x2))
    ref_grads = torch.autograd.grad(unfused, (x2, *factors), dy)
    rel = lambda a, b: float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())  # noqa: E731
    assert rel(fused, unfused) < tol
    for got, ref in zip(grads, ref_grads):
        assert rel(got, ref) < tol


@pytest.mark.parametrize("tokens", [4, 40])
def test_saved_bytes_at_most_peft(tokens):
    import peft
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10))
    ours = geopeft.adapt(copy.deepcopy(base), "lora", targets=["0"], rank=3, alpha=6)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    x = torch.randn(tokens, 12, requires_grad=True)
    mine, _ = saved_bytes(lambda: ours(x))
    peft_bytes, _ = saved_bytes(lambda: theirs(x))
    assert 0 < mine <= peft_bytes


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # the fused function, the unfused add_lowered
@pytest.mark.parametrize("shape", [(4, 12), (2, 3, 12)])
def test_an_in_place_op_after_the_layer_works_and_changes_no_gradient(dropout, shape):
    """Linear → ReLU(inplace=True), as in torchvision's VGG and AlexNet classifiers: the
    adapted layer's output is no view (one made in a custom Function raises on in-place
    use), and the gradients equal those through an out-of-place ReLU."""
    def run(inplace):
        torch.manual_seed(0)
        model = geopeft.adapt(nn.Sequential(nn.Linear(12, 10), nn.ReLU(inplace=inplace)), "lora",
                              targets=["0"], rank=3, dropout=dropout)
        adapter = geopeft.adapters(model)[0][1]
        with torch.no_grad():
            adapter.B.normal_()
        out = model(torch.randn(shape))
        out.square().sum().backward()
        assert not out._is_view()
        return out, [adapter.A.grad, adapter.B.grad]

    (out, grads), (ref, ref_grads) = run(True), run(False)
    assert torch.equal(out, ref) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def test_fused_path_falls_back_where_it_does_not_apply():
    model, adapter = _adapted_linear(torch.float32)
    x = torch.randn(4, 12)
    assert adapter.fused_forward(x) is not None
    assert adapter.fused_forward(x.double()) is None           # dtype mismatch
    handle = model[0].base_layer.register_forward_hook(lambda *a: None)
    assert adapter.fused_forward(x) is None                    # a hook on the base layer
    handle.remove()
    dropped = geopeft.adapt(nn.Sequential(nn.Linear(12, 10)), "lora", targets=["0"], rank=3, dropout=0.1)
    a = geopeft.adapters(dropped)[0][1]
    assert a.fused_forward(x) is None                          # dropout while training
    a.eval()
    assert a.fused_forward(x) is not None


def test_dispatch_modes_and_errors(monkeypatch):
    x = torch.randn(3, 4, 2)
    monkeypatch.setenv(dispatch.ENV, "auto")
    assert not dispatch.use_triton("pair_grams", x)      # CPU: torch
    monkeypatch.setenv(dispatch.ENV, "tritn")
    with pytest.raises(ConfigError, match="auto, torch, triton"):
        dispatch.use_triton("pair_grams", x)
    monkeypatch.setenv(dispatch.ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        dispatch.use_triton("pair_grams", x)
    assert not dispatch.use_triton("pair_grams", x, supported=False)
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert not dispatch.use_triton("pair_grams", x)
    # auto on the CPU never looks for triton (so never imports it)
    monkeypatch.setenv(dispatch.ENV, "auto")
    monkeypatch.setattr(dispatch, "triton_status", lambda: pytest.fail("triton looked up"))
    polar_retract_step(torch.eye(5, 2)[None], torch.eye(5, 2)[None] + 0.1)
    _adapted_linear(torch.float32)[0](torch.randn(3, 12)).sum().backward()


def test_report_lists_every_op():
    report = dispatch.report()
    assert report["mode"] in dispatch.MODES and set(report["ops"]) == set(dispatch.FASTER_ON_CUDA)
    assert all(path["cpu"] == "torch" for path in report["ops"].values()) or report["mode"] == "triton"


def test_cli_env_prints_the_kernel_report(capsys, monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert cli_main(["env"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kernels"]["mode"] == "torch"
    assert out["kernels"]["ops"]["pair_grams"] == {"cuda": "torch", "cpu": "torch"}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.value, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.value(torch.tanh(self.query(x)))))


@pytest.mark.parametrize("method", ["lora", "stella"])
def test_compiled_model_trains_like_eager(method):
    """torch.compile(fullgraph=True) fails on any graph break; the compiled copy trained by
    geopeft.optimizer matches the eager copy step by step (outputs, gradients, factors)."""
    torch.manual_seed(0)
    kw = {"hidden_size": 16} if method == "stella" else {}
    eager = geopeft.adapt(_Net(), method, targets=["query", "value"], rank=4, **kw)
    if method == "lora":
        for _, a in geopeft.adapters(eager):
            nn.init.normal_(a.B)
    twin = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    opts = [geopeft.optimizer(m, torch.optim.AdamW, lr=1e-2) for m in (eager, compiled)]
    for _ in range(3):
        x = torch.randn(8, 16)
        outs = []
        for model in (eager, compiled):
            out = model(x)
            out.square().mean().backward()
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
        for (_, a), (_, b) in zip(geopeft.adapters(eager), geopeft.adapters(twin)):
            for name in a.factor_names:
                torch.testing.assert_close(getattr(b, name).grad, getattr(a, name).grad, rtol=1e-5, atol=1e-6)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for (_, a), (_, b) in zip(geopeft.adapters(eager), geopeft.adapters(twin)):
        for name in a.factor_names:
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-6)
