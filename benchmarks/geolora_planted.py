"""GeoLoRA on planted ranks: where the ranks settle, per period, optimizer and budget.

Problem (deterministic, `--seed`): three bias-free 32×32 linear layers, each regressed onto
W_l + Δ_l with Δ_l of rank 2, 4 and 6 (orthonormal factors, singular values 1 … 0.5);
fresh Gaussian inputs (64 × 32) every step, loss = mean squared error of all three outputs.
Adapters: the `geolora` recipe, rank 4 to start, r_max 12, τ 0.1, scale 1; the paper's
variant (`train_bases=False`: U and V move only by augmentation and truncation) unless the
row says "bases trained" (the recipe's default). Each row of the table is one run of
`--steps` steps; it prints the ranks after the last truncation, the
total, and the final loss relative to the first. A run needs a second or two.

    .venv/bin/python benchmarks/geolora_planted.py
"""

from __future__ import annotations

import argparse

import torch
from report import environment, write_report
from torch import nn

import geopeft

PLANTED = (2, 4, 6)
PAPER = {"train_bases": False}  # the paper's GeoLoRA: U and V move only by augmentation and truncation
RUNS = {  # label -> (optimizer class, lr, adapt options)
    "AdamW, period 10": (torch.optim.AdamW, 1e-2, {"period": 10, **PAPER}),
    "AdamW, period 1": (torch.optim.AdamW, 1e-2, {"period": 1, **PAPER}),
    "SGD, period 1 (Algorithm 1)": (torch.optim.SGD, 0.5, {"period": 1, **PAPER}),
    "SGD, period 10": (torch.optim.SGD, 0.5, {"period": 10, **PAPER}),
    "AdamW, period 10, budget 9": (torch.optim.AdamW, 1e-2, {"period": 10, "budget": 9, **PAPER}),
    "AdamW, period 3": (torch.optim.AdamW, 1e-2, {"period": 3, **PAPER}),
    "AdamW, period 10, bases trained": (torch.optim.AdamW, 1e-2, {"period": 10}),
    "AdamW, period 3, bases trained (the recipe's defaults)": (torch.optim.AdamW, 1e-2, {}),
}


def run(opt_cls, lr: float, options: dict, steps: int, seed: int, d: int = 32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in PLANTED)
    deltas = []
    for k in PLANTED:
        u, v = (torch.linalg.qr(torch.randn(d, k, generator=gen)).Q for _ in range(2))
        deltas.append(u @ torch.diag(torch.linspace(1.0, 0.5, k)) @ v.T)
    geopeft.adapt(model, "geolora", targets=[str(i) for i in range(len(PLANTED))], rank=4, alpha=4,
                  r_max=12, tau=0.1, **options)
    opt = geopeft.optimizer(model, opt_cls, lr=lr)
    losses = []
    for _ in range(steps):
        x = torch.randn(64, d, generator=gen)
        loss = sum((layer(x) - layer.base_layer(x).detach() - x @ delta.T).pow(2).mean()
                   for layer, delta in zip(model, deltas))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    ranks = opt.rank_controller.rank_history[-1]["ranks"]
    return {"ranks": [ranks[str(i)] for i in range(len(PLANTED))], "relative_loss": losses[-1] / losses[0]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    print(f"planted ranks {PLANTED}; {args.steps} steps; ranks after the last truncation")
    print(f"{'run':<55} {'ranks':>12} {'total':>6} {'final/first loss':>17}")
    results = {}
    for label, (opt_cls, lr, options) in RUNS.items():
        r = run(opt_cls, lr, options, args.steps, args.seed)
        results[label] = r
        print(f"{label:<55} {str(r['ranks']):>12} {sum(r['ranks']):>6} {r['relative_loss']:17.1e}")
    write_report({"benchmark": "geolora_planted", "config": vars(args), "environment": environment(),
                  "results": results}, args.json)
    return results


if __name__ == "__main__":
    main()
