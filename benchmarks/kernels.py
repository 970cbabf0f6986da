"""geopeft's kernels, each against its torch reference and a per-layer loop, with the
fraction of the physical floor reached.

What it measures, in one process, contenders taking turns (the order flips every
repeat), median wall time over `--repeats` (device synchronised around each call):

Stiefel step (`polar_retract_step`: Δ = new − x projected to T_x, polar retraction) for
G factors of n × p, float32:
    loop-svd       per-layer loop: projection, then the polar factor of x + Δ by SVD (the
                   baseline: what a per-parameter Riemannian optimizer does)
    loop-torch     per-layer loop of geopeft's fused step, torch kernels
    torch          one batched call, torch kernels (GEOPEFT_KERNELS=torch)
    triton         one batched call, Triton kernels (GEOPEFT_KERNELS=triton; CUDA only)
  floor: max(bytes / copy bandwidth, FLOPs / matmul rate) with bytes = read x and new,
  write the result (3·G·n·p·4) and FLOPs = three p×p Grams and two products (10·G·n·p²).

LoRA-Pro's adjusted gradients (`lorapro_adjust`) for G adapters of m × n at rank r:
    loop-torch     per-adapter loop, torch kernels (the baseline)
    torch          one batched call, torch kernels
    triton         one batched call, Triton pair_grams / two_products (CUDA only)
  floor: bytes = read A, B and their gradients, write the two results (6·G·(m+n)·r·4).

Fused LoRA linear, forward + backward of one layer (T tokens, n → m, rank r; W frozen,
x requires grad), in the input dtype:
    base           the frozen base layer alone (F.linear: the forward and the dx GEMM)
    unfused        base layer, then the adapter's addmm update (the unfused LoRA path)
    fused-torch    `geopeft.kernels.lora_linear`, torch kernels
    fused-triton   the same with the Triton shrink / expand (CUDA only)
  ratio to base: the goal on a GPU is ≤ 1.10; floor: the base's two GEMMs' FLOPs over
  the matmul rate. (No per-layer loop here: one layer is the unit.)

The dispatched ops alone (GEOPEFT_KERNELS=torch vs triton): `pair_grams` (as the
Stiefel step calls it), `two_products`, `shrink`, `expand_`.

Each Triton result is checked against torch before timing (relative error ≤ 1e-4 for
float32, 1e-2 for bf16). The last lines say, per dispatched op, whether Triton was
faster: the values for `geopeft.kernels.dispatch.FASTER_ON_CUDA`.

    .venv/bin/python benchmarks/kernels.py                       # CPU rows
    .venv/bin/python benchmarks/kernels.py --device cuda --json kernels_cuda.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from report import environment, write_report
from torch import Tensor

from geopeft.kernels import (
    dispatch,
    lora_linear,
    lorapro_adjust,
    polar,
    random_stiefel,
    tangent_project,
)
from geopeft.kernels.lora import expand_, shrink
from geopeft.kernels.products import two_products
from geopeft.kernels.stiefel import polar_retract_step, stiefel_step_grams

STIEFEL_CASES = {"cpu": [(72, 384, 8), (24, 1536, 32)], "cuda": [(224, 4096, 32), (64, 14336, 32)]}
LORAPRO_CASES = {"cpu": [(36, 384, 384, 8)], "cuda": [(224, 4096, 4096, 16)]}
LORA_CASES = {"cpu": [(2048, 384, 384, 8, "float32")],
              "cuda": [(8192, 4096, 4096, 16, "bfloat16"), (8192, 4096, 4096, 16, "float32")]}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def with_kernels(mode: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with GEOPEFT_KERNELS=mode."""
    def run():
        old = os.environ.get(dispatch.ENV)
        os.environ[dispatch.ENV] = mode
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(dispatch.ENV)
            else:
                os.environ[dispatch.ENV] = old
    return run


def timed(ways: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, list[float]]:
    for fn in ways.values():  # warm-up: compilation, caches, handles
        fn()
    times: dict[str, list[float]] = {w: [] for w in ways}
    for r in range(repeats):
        for way in (list(ways) if r % 2 == 0 else list(reversed(ways))):
            sync(device)
            start = time.perf_counter()
            ways[way]()
            sync(device)
            times[way].append(time.perf_counter() - start)
    return times


def ceilings(device: str, repeats: int) -> tuple[float, float]:
    """(copy bandwidth bytes/s counting read + write, float32 matmul FLOP/s), measured."""
    big = torch.randn(64 * 2**20 // 4 * (8 if device == "cuda" else 1), device=device)
    dst = torch.empty_like(big)
    n = 4096 if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    t = timed({"copy": lambda: dst.copy_(big), "mm": lambda: a @ b}, repeats, device)
    return 2 * big.numel() * 4 / min(t["copy"]), 2 * n**3 / min(t["mm"])


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def stiefel_rows(count: int, n: int, p: int, device: str, repeats: int, floors: tuple[float, float],
                 triton: bool) -> tuple[list[tuple], dict]:
    gen = torch.Generator().manual_seed(0)
    x = random_stiefel((count, n, p), generator=gen)
    new = (x + 1e-3 * torch.randn(x.shape, generator=gen)).to(device)
    x = x.to(device)
    ways = {
        "loop-svd": lambda: torch.stack([polar(xi + tangent_project(xi, ni - xi), "svd")
                                         for xi, ni in zip(x, new)]),
        "loop-torch": with_kernels("torch", lambda: torch.stack([polar_retract_step(xi, ni)
                                                                  for xi, ni in zip(x, new)])),
        "torch": with_kernels("torch", lambda: polar_retract_step(x, new)),
    }
    ma, mb = (torch.randn(count, p, p, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    tile = count * n * p * 4
    ops = {"pair_grams": (lambda: stiefel_step_grams(x, new, 1.0), 2 * tile),  # (fn, bytes)
           "two_products": (lambda: two_products(x, ma, new, mb), 3 * tile)}
    if triton:
        ways["triton"] = with_kernels("triton", lambda: polar_retract_step(x, new))
        err = rel(ways["triton"](), ways["torch"]())
        assert err < 1e-4, f"triton Stiefel step disagrees with torch: {err:.2e}"
    times = timed(ways, repeats, device)
    bandwidth, rate = floors
    floor = max(3 * count * n * p * 4 / bandwidth, 10 * count * n * p * p / rate)
    base = statistics.median(times["loop-svd"])
    rows = [(f"stiefel {count}x{n}x{p}", way, statistics.median(ts), base / statistics.median(ts),
             floor / statistics.median(ts)) for way, ts in times.items()]
    faster = {}
    if triton:
        for op, (fn, nbytes) in ops.items():
            more, faster[op] = triton_vs_torch(f"{op} {count}x{n}x{p}", fn, nbytes / bandwidth, repeats, device)
            rows += more
    return rows, faster


def lorapro_rows(count: int, m: int, n: int, r: int, device: str, repeats: int,
                 floors: tuple[float, float], triton: bool) -> tuple[list[tuple], dict]:
    gen = torch.Generator().manual_seed(2)
    A, ga = (torch.randn(count, r, n, generator=gen).to(device) for _ in range(2))
    B, gb = (torch.randn(count, m, r, generator=gen).to(device) for _ in range(2))
    ways = {"loop-torch": with_kernels("torch", lambda: [lorapro_adjust(A[i:i + 1], B[i:i + 1], ga[i:i + 1],
                                                                        gb[i:i + 1], 2.0) for i in range(count)]),
            "torch": with_kernels("torch", lambda: lorapro_adjust(A, B, ga, gb, 2.0))}
    if triton:
        ways["triton"] = with_kernels("triton", lambda: lorapro_adjust(A, B, ga, gb, 2.0))
        err = max(rel(g, t) for g, t in zip(ways["triton"](), ways["torch"]()))
        assert err < 1e-4, f"triton LoRA-Pro disagrees with torch: {err:.2e}"
    times = timed(ways, repeats, device)
    floor = 6 * count * (m + n) * r * 4 / floors[0]
    base = statistics.median(times["loop-torch"])
    return [(f"lorapro {count}x{m}x{n} r{r}", way, statistics.median(ts), base / statistics.median(ts),
             floor / statistics.median(ts)) for way, ts in times.items()], {}


def triton_vs_torch(label: str, fn: Callable[[], object], floor: float, repeats: int,
                    device: str) -> tuple[list[tuple], bool]:
    """Rows for one dispatched op under both kernel modes, and whether Triton was faster."""
    t = timed({"torch": with_kernels("torch", fn), "triton": with_kernels("triton", fn)}, repeats, device)
    mt, mk = statistics.median(t["torch"]), statistics.median(t["triton"])
    return [(label, "torch", mt, 1.0, floor / mt), (label, "triton", mk, mt / mk, floor / mk)], mk < mt


def lora_rows(tokens: int, n: int, m: int, r: int, dtype_name: str, device: str, repeats: int,
              floors: tuple[float, float], triton: bool) -> tuple[list[tuple], dict]:
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(1)
    make = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    weight, bias = make(m, n) / n**0.5, make(m)
    a, b = (make(r, n) / n**0.5).requires_grad_(), make(m, r).requires_grad_()
    x, dy = make(tokens, n).requires_grad_(), make(tokens, m)
    s = 2.0

    def step(forward):
        def run():
            out = forward()
            out.backward(dy)
            x.grad = a.grad = b.grad = None
        return run

    def unfused():
        y = F.linear(x, weight, bias)
        return torch.addmm(y, F.linear(x, a), b.mT, alpha=s)

    ways = {"base": step(lambda: F.linear(x, weight, bias)), "unfused": step(unfused),
            "fused-torch": with_kernels("torch", step(lambda: lora_linear(x, weight, bias, a, b, s)))}
    if triton:
        ways["fused-triton"] = with_kernels("triton", step(lambda: lora_linear(x, weight, bias, a, b, s)))
        with torch.no_grad():
            got = with_kernels("triton", lambda: lora_linear(x, weight, bias, a, b, s))()
            err = rel(got, unfused())
        assert err < (1e-4 if dtype == torch.float32 else 1e-2), f"fused-triton disagrees: {err:.2e}"
    times = timed(ways, repeats, device)
    _, rate = floors
    floor = 2 * 2 * tokens * m * n / rate  # the base's forward and dx GEMMs (float32 rate)
    base = statistics.median(times["base"])
    label = f"lora {tokens}x{n}->{m} r{r} {dtype_name}"
    rows = [(label, way, statistics.median(ts), statistics.median(ts) / base, floor / statistics.median(ts))
            for way, ts in times.items()]
    faster = {}
    if triton:
        h, y0 = make(tokens, r), make(tokens, m)
        size = dtype.itemsize if hasattr(dtype, "itemsize") else torch.finfo(dtype).bits // 8
        ops = {"lora_shrink": (lambda: shrink(x.detach(), a.detach()), tokens * (n + r) * size),
               "lora_expand": (lambda: expand_(y0, h, b.detach(), s), tokens * (2 * m + r) * size)}
        for op, (fn, nbytes) in ops.items():
            more, faster[op] = triton_vs_torch(f"{op} {label}", fn, nbytes / floors[0], repeats, device)
            rows += more
    return rows, faster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    triton = device == "cuda" and dispatch.triton_status()[0]
    floors = ceilings(device, args.repeats)
    print(f"# {device}{' ' + torch.cuda.get_device_name() if device == 'cuda' else ''}, torch {torch.__version__}, "
          f"triton {dispatch.triton_status()[1] if triton else 'not used'}, {torch.get_num_threads()} threads; "
          f"copy {floors[0] / 1e9:.1f} GB/s, fp32 matmul {floors[1] / 1e9:.1f} GFLOP/s; median of {args.repeats}")
    rows, faster = [], {}
    for case in STIEFEL_CASES[device]:
        more, fast = stiefel_rows(*case, device, args.repeats, floors, triton)
        rows += more
        faster.update(fast)
    for case in LORAPRO_CASES[device]:
        rows += lorapro_rows(*case, device, args.repeats, floors, triton)[0]
    for case in LORA_CASES[device]:
        more, fast = lora_rows(*case, device, args.repeats, floors, triton)
        rows += more
        faster.update({k: faster.get(k, True) and v for k, v in fast.items()})
    print(f"\n{'case':<34}{'way':<18}{'median ms':>11}{'ratio':>9}{'of floor':>10}")
    for case, way, med, ratio, frac in rows:
        print(f"{case:<34}{way:<18}{med * 1e3:>11.3f}{ratio:>9.2f}{frac:>10.2f}")
    print("\nratio: stiefel rows = loop-svd time / this (> 1: faster); lorapro rows = loop-torch time / this; lora rows = this / base (goal <= 1.10);"
          " single-op rows = torch time / this. of floor: floor time / this (1 = at the floor)")
    if triton:
        print("FASTER_ON_CUDA = " + repr({op: faster.get(op, False) for op in dispatch.FASTER_ON_CUDA}))
    else:
        print("Triton rows not measured (no CUDA device): FASTER_ON_CUDA stays as it is")
    write_report({"benchmark": "kernels", "device": device, "environment": environment(),
                  "ceilings": {"copy_bytes_per_s": floors[0], "matmul_flops_per_s": floors[1]},
                  "rows": [dict(zip(("case", "way", "median_s", "ratio", "of_floor"), r)) for r in rows],
                  "faster_on_cuda": faster}, args.json)


if __name__ == "__main__":
    main()
