"""Per-layer balance of a saved adapter: which pairs are balanced, and which the rank guard left.

Reads a directory written by `geopeft.save` (e.g. `results/minilm/balora/adapter` after
`geopeft compare configs/minilm.yaml`) without the base model and prints, for each adapted
layer, the balance violation ‖BᵀB − AAᵀ‖_F / ‖BᵀB‖_F, the conditioning σ_r/σ_1 of B·A, and
whether σ_r/σ_1 is under the rank guard's default tolerance max(m, n)·ε (float32) — the
pairs `balance` leaves alone by design. Worst layers first.

    .venv/bin/python benchmarks/balance_report.py results/minilm/balora/adapter
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from geopeft.kernels import balance_violation, default_rank_rtol


def report(directory: Path, top: int) -> list[dict]:
    tensors = load_file(str(directory / "adapter.safetensors"))
    layers = sorted({k[len("adapters."):].rsplit(".", 1)[0] for k in tensors if k.startswith("adapters.")})
    rows = []
    for layer in layers:
        B, A = tensors[f"adapters.{layer}.B"].double(), tensors[f"adapters.{layer}.A"].double()
        (m, r), n = B.shape, A.shape[1]
        sigma = torch.linalg.svdvals(B @ A)[:r]
        tol = default_rank_rtol(m, n, torch.float32)
        rows.append({"layer": layer, "violation": float(balance_violation(B, A)),
                     "cond": float(sigma[-1] / sigma[0]), "guarded": bool(sigma[-1] <= tol * sigma[0]),
                     "tol": tol})
    rows.sort(key=lambda row: -row["violation"])
    print(f"{'layer':48s} {'violation':>10s} {'σ_r/σ_1':>9s} {'guard tol':>9s}  left by the guard")
    for row in rows[:top]:
        print(f"{row['layer']:48s} {row['violation']:10.2e} {row['cond']:9.2e} {row['tol']:9.2e}  "
              f"{'yes' if row['guarded'] else 'no'}")
    print(f"{len(rows)} layers: {sum(r['violation'] < 1e-4 for r in rows)} balanced to 1e-4, "
          f"{sum(r['guarded'] for r in rows)} left alone by the rank guard")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", type=Path)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = report(args.directory, args.top)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
