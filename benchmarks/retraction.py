"""Stiefel retraction of many same-shape factors: batched against a per-layer loop.

What it measures: the wall-clock time of StelLA's post-step geometry for a whole
model's U/V factors of one shape — given the old points X (orthonormal, n × p) and
the optimizer's new values X + Δ, project Δ onto the tangent space at X and retract
(polar retraction) — for two model-sized cases:

    192 factors of 4096 × 32   (e.g. U and V of the q/k/v/o/up/down projections of a 8B model at r=32)
     64 factors of 14336 × 32  (e.g. the MLP factors of a LLaMA-3-8B, r=32)

Six ways, all in float32 (on the CPU unless `--device cuda`):
    loop-svd      a per-layer loop: Δ projected, polar factor of x + Δ by SVD (what a
                  per-parameter Riemannian optimizer does; the baseline)
    batched-svd   the same in one batched call (the official StelLA code's trick)
    loop-gram     a per-layer loop, polar factor from the p×p Gram matrix's eigh
    batched-gram  the same in one batched call
    loop-fused    a per-layer loop of geopeft's fused kernel (`polar_retract_step`:
                  projection and retraction from three p×p reductions, y never formed)
    batched-fused one batched call of the fused kernel: what `geopeft.optimizer` runs
Each is run `--repeats` times, the ways taking turns; the median time and its ratio to
the baseline (loop-svd; > 1 means faster) are printed, and the batched/loop ratio of the
same algorithm.

    .venv/bin/python benchmarks/retraction.py
    .venv/bin/python benchmarks/retraction.py --repeats 5 --json retraction.json
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch
from report import environment, write_report
from torch import Tensor

from geopeft.kernels import polar, polar_retract_step, random_stiefel, tangent_project

CASES = {"192x4096x32": (192, 4096, 32), "64x14336x32": (64, 14336, 32)}


def retract(x: Tensor, new: Tensor, method: str) -> Tensor:
    """StelLA's step 3 without the scaling: Δ projected at x, polar retraction of x + Δ."""
    if method == "fused":
        return polar_retract_step(x, new)
    return polar(x + tangent_project(x, new - x), method)


def batched(method: str) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda x, new: retract(x, new, method)


def looped(method: str) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda x, new: torch.stack([retract(xi, ni, method) for xi, ni in zip(x, new)])


ALGORITHMS = ("svd", "gram", "fused")
WAYS = {f"{how}-{algo}": (looped if how == "loop" else batched)(algo)
        for algo in ALGORITHMS for how in ("loop", "batched")}
BASELINE = "loop-svd"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(count: int, n: int, p: int, repeats: int, device: str = "cpu",
             seed: int = 0) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(seed)
    x = random_stiefel((count, n, p), generator=gen)
    new = x + 1e-3 * torch.randn(x.shape, generator=gen)  # an optimizer step's size
    x, new = x.to(device), new.to(device)
    reference = WAYS[BASELINE](x, new)
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    for way, fn in WAYS.items():  # warm-up and agreement check
        out = fn(x, new)
        assert torch.allclose(out, reference, atol=1e-5), f"{way} disagrees with {BASELINE}"
    for r in range(repeats):
        order = list(WAYS) if r % 2 == 0 else list(reversed(WAYS))
        for way in order:
            sync(device)
            start = time.perf_counter()
            WAYS[way](x, new)
            sync(device)
            times[way].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--json", default=None, help="write the raw times here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {args.device}")
    results = {}
    for name in args.cases:
        count, n, p = CASES[name]
        times = run_case(count, n, p, args.repeats, args.device)
        results[name] = times
        base = statistics.median(times[BASELINE])
        print(f"\n{name}: {count} factors of {n} x {p}, median of {args.repeats}")
        print(f"{'way':<14}{'median s':>10}{'speed-up vs ' + BASELINE:>22}")
        for way, ts in times.items():
            med = statistics.median(ts)
            print(f"{way:<14}{med:>10.4f}{base / med:>21.2f}x")
        for algo in ALGORITHMS:
            ratio = statistics.median(times[f"loop-{algo}"]) / statistics.median(times[f"batched-{algo}"])
            print(f"batched vs loop, same algorithm ({algo}): {ratio:.2f}x")
    write_report({"benchmark": "retraction", "device": args.device, "environment": environment(),
                  "cases": {k: CASES[k] for k in results}, "times": results}, args.json)


if __name__ == "__main__":
    main()
