"""Every Triton kernel against its torch reference, in Triton's CPU interpreter.

Run by `tests/test_kernels_triton.py` in a subprocess with TRITON_INTERPRET=1 and
GEOPEFT_KERNELS=triton (Triton reads TRITON_INTERPRET when triton is first imported, so
it cannot be switched on inside the main test process, and must not leak into it).
Outputs are poisoned (NaN) before each call, so an element a kernel fails to write fails
the comparison. Shapes are small and not multiples of the block sizes.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import geopeft
from geopeft.kernels import (
    balance,
    dispatch,
    lora_linear,
    lorapro_adjust,
    polar,
    random_stiefel,
    tangent_project,
)
from geopeft.kernels import stiefel as stiefel_ops

#: whether anything imported triton before a Triton kernel was chosen (conftest, pytest's
#: plugins, `import geopeft`): it must not have
TRITON_IMPORTED_BY_GEOPEFT = "triton" in sys.modules

assert os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get(dispatch.ENV) == "triton", \
    "run through tests/test_kernels_triton.py (it sets TRITON_INTERPRET=1, GEOPEFT_KERNELS=triton)"

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = list(TOL)


@pytest.fixture(scope="module")
def tk():
    return SimpleNamespace(**{m: importlib.import_module(f"geopeft.kernels.triton.{m}")
                              for m in ("common", "products", "lora")})


@pytest.fixture
def poisoned(tk, monkeypatch):
    """Every launcher's output buffer starts as NaN; returns the list of buffers made."""
    made = []

    def alloc(shape, dtype, device):
        made.append(torch.full(shape, float("nan"), dtype=dtype, device=device))
        return made[-1]

    monkeypatch.setattr(tk.common, "alloc", alloc)
    return made


@pytest.fixture
def torch_mode(monkeypatch):
    """A context that runs the torch references (GEOPEFT_KERNELS=torch) inside it."""
    class Ctx:
        def __enter__(self):
            monkeypatch.setenv(dispatch.ENV, "torch")

        def __exit__(self, *exc):
            monkeypatch.setenv(dispatch.ENV, "triton")
    return Ctx()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "an output element is NaN or Inf (unwritten?)"
    return float((a - b).norm() / b.norm())


def test_import_geopeft_did_not_import_triton():
    assert not TRITON_IMPORTED_BY_GEOPEFT


def _pair(count, n, p, dtype, gen):
    x = random_stiefel((count, n, p), generator=gen)
    new = x + 0.05 * torch.randn(x.shape, generator=gen)
    return x.to(dtype), new.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37, 5), (2, 70, 33)])  # one split; two splits, p > 32
@pytest.mark.parametrize("difference", [True, False])
def test_pair_grams_kernel(tk, poisoned, dtype, shape, difference):
    gen = torch.Generator().manual_seed(shape[2])
    x, new = _pair(*shape, dtype, gen)
    got = tk.products.pair_grams(x, new, 0.7, difference)
    xd = x.double()
    dd = 0.7 * (new.double() - xd if difference else new.double())
    for g, ref in zip(got, (xd.mT @ xd, xd.mT @ dd, dd.mT @ dd)):
        assert g.shape == ref.shape and rel(g, ref) < 1e-5  # float32 math whatever the input
    assert poisoned and (poisoned[0].shape[2] > 1) == (shape[1] == 70)  # split-n reduction used


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_products_kernel(tk, poisoned, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, 150, generator=gen).mT.to(dtype)  # (3, 150, 9), not contiguous
    y = torch.randn(3, 150, 9, generator=gen).to(dtype)
    ma, mb = (torch.randn(3, 9, 9, generator=gen, dtype=torch.float64) for _ in range(2))
    got = tk.products.two_products(x, ma, y, mb)
    ref = x.double() @ ma + y.double() @ mb
    assert got.dtype == dtype and rel(got, ref) < TOL[dtype]
    alone = tk.products.two_products(x, ma)            # one product: y is None
    assert rel(alone, x.double() @ ma) < TOL[dtype]


@pytest.mark.parametrize("cond", [1e2, 1e4])
def test_retraction_orthonormal_up_to_cond_1e4(tk, poisoned, torch_mode, cond):
    """x + Δ (Δ tangent) with condition number `cond`: the fused step on Triton kernels
    stays on St(n, p) to 1e-5 in float32 and agrees with the torch path and the SVD polar."""
    gen = torch.Generator().manual_seed(0)
    count, n, p = 2, 90, 12
    x = random_stiefel((count, n, p), generator=gen, dtype=torch.float64)
    d = tangent_project(x, torch.randn(x.shape, generator=gen, dtype=torch.float64))
    q = torch.linalg.qr(d - x @ (x.mT @ d)).Q  # directions orthogonal to x
    sv = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), p, dtype=torch.float64)
    new = x + q * (sv ** 2 - 1).sqrt()        # (x + Δ)ᵀ(x + Δ) = diag(sv²): cond = `cond`
    assert torch.linalg.cond(new).amax() == pytest.approx(cond, rel=1e-6)
    out = stiefel_ops.polar_retract_step(x.float(), new.float())
    assert len(poisoned) == 2  # both kernels ran
    with torch_mode:
        ref = stiefel_ops.polar_retract_step(x.float(), new.float())
    assert stiefel_ops.gram_violation(out).amax() <= 1e-5
    assert stiefel_ops.gram_violation(ref).amax() <= 1e-5
    exact = polar(new, "svd")
    assert (out.double() - exact).abs().amax() < 1e-4 and (out - ref).abs().amax() < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_kernel(tk, poisoned, dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(70, 45, generator=gen).to(dtype)
    b = torch.randn(45, 5, generator=gen).to(dtype)   # shrink by bᵀ's rows: a = b.mT, strided
    got = tk.lora.shrink(x, b.mT, 0.5)
    assert got.shape == (70, 5) and rel(got, 0.5 * x.double() @ b.double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_expand_kernel(tk, dtype):
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(70, 81, generator=gen).to(dtype)
    h = torch.randn(70, 20, generator=gen).to(dtype)
    a = torch.randn(20, 81, generator=gen).to(dtype)   # expand by a's columns: b = a.mT, strided
    ref = y.double() + 0.3 * h.double() @ a.double()
    out = tk.lora.expand_(y, h, a.mT, 0.3)
    assert out is y and rel(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_lora_linear_on_triton_equals_torch(tk, poisoned, torch_mode, dtype):
    """Forward and backward of `lora_linear` with the Triton shrink / expand (forced) equal
    the torch path: 19 tokens, n = 21 (no fold), m = 18, r = 3."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(19, 21), (18, 21), (18,), (3, 21), (18, 3)]
    args = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    dy = torch.randn(19, 18, generator=gen).to(dtype)

    def run():
        out = lora_linear(*args, 2.0)
        return [out, *torch.autograd.grad(out, [args[0], args[3], args[4]], dy)]

    calls = []
    shrink = tk.lora.shrink
    tk.lora.shrink = lambda *a: calls.append(1) or shrink(*a)
    try:
        got = run()
    finally:
        tk.lora.shrink = shrink
    assert len(calls) == 2  # h = x Aᵀ and dh = s·dy B
    with torch_mode:
        ref = run()
    for g, r in zip(got, ref):
        assert rel(g, r) < TOL[dtype]


def test_stella_step_on_triton_equals_torch(tk, poisoned, torch_mode):
    """A StelLA training step with GEOPEFT_KERNELS=triton (interpreted) ends where the
    torch kernels do: the optimizer reaches the kernels through geopeft.kernels only."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 12))
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        models.append(geopeft.adapt(copy.deepcopy(base), "stella", targets=["0", "2"], rank=3, hidden_size=12))
    x = torch.randn(5, 12)
    ends = []
    for i, model in enumerate(models):
        opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2)
        model(x).square().mean().backward()
        if i == 0:
            opt.step()
        else:
            with torch_mode:
                opt.step()
        ends.append({f"{n}.{k}": v.detach() for n, a in geopeft.adapters(model) for k, v in a.factors().items()})
    assert poisoned  # the triton run used the kernels
    for k in ends[0]:
        torch.testing.assert_close(ends[0][k], ends[1][k], rtol=1e-5, atol=1e-6)


def test_lorapro_adjust_on_triton_equals_torch(tk, poisoned, torch_mode):
    """LoRA-Pro's adjusted gradients through the Triton pair_grams / two_products (forced)
    equal the torch path: 3 adapters, m = 40, n = 29, r = 5, per-adapter scalings."""
    gen = torch.Generator().manual_seed(5)
    A, ga = (torch.randn(3, 5, 29, generator=gen) for _ in range(2))
    B, gb = (torch.randn(3, 40, 5, generator=gen) for _ in range(2))
    s = torch.tensor([0.5, 2.0, 1.0])
    got = lorapro_adjust(A, B, ga, gb, s)
    assert len(poisoned) == 4  # two Gram passes, two product passes
    with torch_mode:
        ref = lorapro_adjust(A, B, ga, gb, s)
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-5


def test_balance_on_triton_equals_torch(tk, poisoned, torch_mode):
    """BaLoRA's balancing with its two thin products on Triton (forced) equals the torch
    path: 3 pairs, m = 40, n = 29, r = 5."""
    gen = torch.Generator().manual_seed(6)
    B, A = torch.randn(3, 40, 5, generator=gen), torch.randn(3, 5, 29, generator=gen)
    got = balance(B, A)
    assert len(poisoned) == 2
    with torch_mode:
        ref = balance(B, A)
    assert rel(got.B, ref.B) < 1e-5 and rel(got.A, ref.A) < 1e-5 and bool(got.full_rank.all())
