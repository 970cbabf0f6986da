"""Convergence: steps to a target loss, LoRA vs BaLoRA, each at its best learning rate.

What it measures: on a matrix-regression problem, the number of optimizer steps each
method needs to bring the relative loss to `--target` (default 1e-3), at the best
learning rate of a small sweep, for LoRA and for BaLoRA (geopeft's "lora" and "balora"
recipes), at each LoRA scale α/r of `--scales`. A large α/r is the ill-conditioned case:
with LoRA's init (A Kaiming-uniform, B = 0) the product s·B·A moves fast through B while
A barely moves, so the pair grows unbalanced; BaLoRA re-balances it after every step.

Problem (deterministic: `--seed` fixes data, truth and inits): a bias-free
nn.Linear(n=64 -> m=48) base layer W0; the truth is W0 + Δ, Δ of rank 4 with singular
values spread over two decades (4, ..., 0.04); inputs X are 512 Gaussian rows, targets
Y = X (W0 + Δ)ᵀ. Loss = ‖X Wᵀ − Y‖² / ‖X W0ᵀ − Y‖² (1 at step 0). Adapter: rank 4 on the
layer, LoRA's init (the same A for both methods), scaling s = α/r. Optimizer:
torch.optim.AdamW(weight_decay=0) wrapped by geopeft.optimizer, full batch, constant lr
from `--lrs`. A run stops when the loss reaches the target, or after `--max-steps`
(not reached), or when it turns NaN/Inf (diverged).

It prints, per scale, a table of steps to target for every (lr, method), the best of each
method, and the ratio LoRA steps / BaLoRA steps (> 1: BaLoRA converges in fewer steps);
then a summary, one line per scale. Step counts do not depend on the machine's load.

Run it from the repository root (about a minute on a 2-core CPU):

    .venv/bin/python benchmarks/convergence.py
    .venv/bin/python benchmarks/convergence.py --scales 1 64 --target 1e-4 --json conv.json
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from report import environment, write_report
from torch import nn

import geopeft

METHODS = ("lora", "balora")
M, N, RANK, SAMPLES = 48, 64, 4, 512


def problem(seed: int) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """The base layer, inputs and targets (truth = W0 + Δ, Δ of rank RANK)."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(N, M, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(M, N, generator=gen) / math.sqrt(N))
    u, _ = torch.linalg.qr(torch.randn(M, RANK, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(N, RANK, generator=gen))
    sv = 4.0 * torch.logspace(0, -2, RANK)
    delta = u @ torch.diag(sv) @ v.T
    x = torch.randn(SAMPLES, N, generator=gen)
    y = x @ (base.weight.detach() + delta).T
    return base, x, y


def run(method: str, scale: float, lr: float, args: argparse.Namespace) -> dict[str, object]:
    """One training run; returns steps to target (None if not reached), final loss, status."""
    base, x, y = problem(args.seed)
    model = nn.Sequential(base)
    torch.manual_seed(args.seed + 1)  # LoRA's init: the same A for both methods
    geopeft.adapt(model, method=method, targets=["0"], rank=RANK, alpha=scale * RANK)
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0)
    with torch.no_grad():
        norm = (model(x) - y).pow(2).sum()
    loss = 1.0
    start = time.perf_counter()
    for step in range(1, args.max_steps + 1):
        value = (model(x) - y).pow(2).sum() / norm
        value.backward()
        opt.step()
        opt.zero_grad()
        loss = value.item()
        if not math.isfinite(loss):
            return {"steps": None, "loss": loss, "status": "diverged",
                    "seconds": time.perf_counter() - start}
        if loss <= args.target:
            # `loss` is measured before step `step`'s update: step - 1 updates reached it
            return {"steps": step - 1, "loss": loss, "status": "reached",
                    "seconds": time.perf_counter() - start}
    return {"steps": None, "loss": loss, "status": "not reached", "seconds": time.perf_counter() - start}


def best(runs: dict[float, dict]) -> tuple[float | None, int | None]:
    """(lr, steps) of the run that reached the target in the fewest steps."""
    reached = [(r["steps"], lr) for lr, r in runs.items() if r["steps"] is not None]
    if not reached:
        return None, None
    steps, lr = min(reached)
    return lr, steps


def fmt(r: dict) -> str:
    if r["status"] == "reached":
        return f"{r['steps']:d}"
    if r["status"] == "diverged":
        return "diverged"
    return f">{r['max']} ({r['loss']:.1e})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 16.0, 64.0, 256.0],
                        help="LoRA scales s = alpha / r to compare at (default: 1 16 64 256)")
    parser.add_argument("--lrs", type=float, nargs="+",
                        default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
                        help="learning rates of the sweep (the same for both methods)")
    parser.add_argument("--target", type=float, default=1e-3, help="relative loss to reach")
    parser.add_argument("--max-steps", type=int, default=1500, help="steps before giving up")
    parser.add_argument("--seed", type=int, default=0, help="data, truth and init seed")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"matrix regression {M}x{N}, truth W0 + rank-{RANK} update (singular values 4 ... 0.04), "
          f"{SAMPLES} samples; adapter rank {RANK}, LoRA init; AdamW (wd 0), full batch; "
          f"target relative loss {args.target:g}, at most {args.max_steps} steps; seed {args.seed}")
    results: dict[str, dict] = {}
    for scale in args.scales:
        runs = {m: {} for m in METHODS}
        for lr in args.lrs:
            for method in METHODS:
                r = run(method, scale, lr, args)
                r["max"] = args.max_steps
                runs[method][lr] = r
        print(f"\nscale alpha/r = {scale:g}: steps to loss <= {args.target:g}")
        print(f"{'lr':>8} " + " ".join(f"{m:>20}" for m in METHODS))
        for lr in args.lrs:
            print(f"{lr:8.0e} " + " ".join(f"{fmt(runs[m][lr]):>20}" for m in METHODS))
        summary = {m: dict(zip(("lr", "steps"), best(runs[m]))) for m in METHODS}
        line = ", ".join(f"{m} {s['steps']} steps at lr {s['lr']:g}" if s["steps"] is not None
                         else f"{m} never reached the target" for m, s in summary.items())
        ratio = None
        if all(summary[m]["steps"] for m in METHODS):
            ratio = summary["lora"]["steps"] / summary["balora"]["steps"]
            line += f"; LoRA / BaLoRA steps = {ratio:.2f}"
        print("best: " + line)
        results[f"{scale:g}"] = {"runs": {m: {f"{lr:g}": r for lr, r in runs[m].items()} for m in METHODS},
                                 "best": summary, "lora_over_balora_steps": ratio}
    print(f"\nsummary: best steps to loss <= {args.target:g} (lr)")
    print(f"{'alpha/r':>8} {'LoRA':>16} {'BaLoRA':>16} {'LoRA/BaLoRA':>12}")
    for scale, res in results.items():
        cells = [f"{b['steps']} ({b['lr']:g})" if b["steps"] is not None else "not reached"
                 for b in (res["best"][m] for m in METHODS)]
        ratio = res["lora_over_balora_steps"]
        print(f"{scale:>8} {cells[0]:>16} {cells[1]:>16} "
              f"{'-' if ratio is None else format(ratio, '.2f'):>12}")
    report = {"benchmark": "convergence", "config": {k: getattr(args, k) for k in
                                                     ("scales", "lrs", "target", "max_steps", "seed")},
              "environment": environment(), "results": results}
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
