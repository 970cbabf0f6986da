"""How far each trained adapter moved its layers: ‖ΔW‖_F per layer kind and the largest
singular value of ΔW, for the adapters a `geopeft compare` (or `train`) run saved.

Each run's model is rebuilt from the `config.yaml` the job wrote beside it (the nearest one
up the folder tree), its saved adapter loaded (`geopeft.load`), and ΔW taken from each
adapter's own `delta_weight()` (for StelLA the initial s·U₀·S₀·V₀ᵀ is part of it: compare
LoRA with zero-started recipes). Layers are grouped by the last two parts of their name
(`self.query`, `intermediate.dense`, ...); the norm of a group is the root of the summed squares.

    .venv/bin/python benchmarks/adapter_norms.py results/minilm/seed0/lora results/minilm/seed0/geolora
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from report import environment, write_report  # noqa: E402
from safetensors import safe_open  # noqa: E402

import geopeft  # noqa: E402
from geopeft.jobs.config import load_config  # noqa: E402
from geopeft.jobs.models import build_model  # noqa: E402


def updates(run: Path) -> dict[str, torch.Tensor]:
    """{layer: ΔW} of the adapter saved in `run`/adapter, on the model its job config builds."""
    config = next(d / "config.yaml" for d in (run, *run.parents) if (d / "config.yaml").is_file())
    cfg = load_config(config)
    with safe_open(str(run / "adapter" / "adapter.safetensors"), "pt") as f:
        head = [k for k in f.keys() if k.endswith("classifier.weight")]
        num_labels = f.get_slice(head[0]).get_shape()[0] if head else 2
    model = geopeft.load(build_model(cfg.model, num_labels, seed=0, task=cfg.task), run / "adapter")
    with torch.no_grad():
        return {name: a.delta_weight().double() for name, a in geopeft.adapters(model)}


def summary(run: Path) -> dict[str, dict[str, float]]:
    groups: dict[str, list[torch.Tensor]] = defaultdict(list)
    for layer, dw in updates(run).items():
        groups[".".join(layer.split(".")[-2:])].append(dw)
    table = {kind: {"norm": float(sum(float(d.norm() ** 2) for d in ds) ** 0.5),
                    "top_singular_value_mean": float(sum(float(torch.linalg.matrix_norm(d, 2)) for d in ds) / len(ds)),
                    "layers": len(ds)} for kind, ds in sorted(groups.items())}
    table["all"] = {"norm": float(sum(v["norm"] ** 2 for v in table.values()) ** 0.5),
                    "top_singular_value_mean": None, "layers": sum(v["layers"] for v in table.values())}
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders holding adapter/ (e.g. results/minilm/lora)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = {run: summary(Path(run)) for run in args.runs}
    kinds = list(next(iter(results.values())))
    print("‖ΔW‖_F per layer kind (mean largest singular value in brackets)")
    labels = ["/".join(Path(r).parts[-3:]) for r in args.runs]
    width = max(22, *(len(x) + 2 for x in labels))
    print(f"{'kind':<22}" + "".join(f"{x:>{width}}" for x in labels))
    for kind in kinds:
        cells = []
        for r in args.runs:
            v = results[r].get(kind)
            top = v and v["top_singular_value_mean"]
            cells.append("—" if v is None else f"{v['norm']:.2f}" + (f" ({top:.2f})" if top is not None else ""))
        print(f"{kind:<22}" + "".join(f"{c:>{width}}" for c in cells))
    write_report({"benchmark": "adapter_norms", "config": vars(args), "environment": environment(),
                  "results": results}, args.json)
    return results


if __name__ == "__main__":
    main()
