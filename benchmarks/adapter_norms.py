"""How far each trained adapter moved its layers: ‖ΔW‖_F per layer kind and the largest
singular value of ΔW, for the adapters a `geopeft compare` (or `train`) run saved.

ΔW is rebuilt from the saved factors with the adapter's scale: s·B·A (`lora`) or
s·U·S·Vᵀ (`usv`: GeoLoRA, StelLA — for StelLA the initial s·U₀·S₀·V₀ᵀ is folded into the
base weight at adapt time, so this is not its update; compare LoRA with zero-started
recipes). Layers are grouped by the last two parts of their name (`self.query`,
`intermediate.dense`, ...); the norm of a group is the root of the summed squares.

    .venv/bin/python benchmarks/adapter_norms.py results/minilm/seed0/lora results/minilm/seed0/geolora
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from report import environment, write_report
from safetensors.torch import load_file


def updates(run: Path) -> dict[str, torch.Tensor]:
    """{layer: ΔW} of the adapter saved in `run`/adapter (geopeft's layout)."""
    folder = run / "adapter"
    meta = json.loads((folder / "geopeft.json").read_text())
    alpha, rank = float(meta["alpha"]), int(meta["rank"])
    scale = alpha / rank ** 0.5 if meta.get("rslora") else alpha / rank
    tensors = load_file(str(folder / "adapter.safetensors"))
    layers = sorted({k[len("adapters."):].rsplit(".", 1)[0] for k in tensors if k.startswith("adapters.")})
    out = {}
    for layer in layers:
        f = {k.rsplit(".", 1)[1]: v.double() for k, v in tensors.items() if k.startswith(f"adapters.{layer}.")}
        if {"A", "B"} <= f.keys():
            out[layer] = scale * f["B"] @ f["A"]
        elif {"U", "S", "V"} <= f.keys():
            s = f["S"] if f["S"].dim() == 2 else torch.diag(f["S"])
            out[layer] = scale * f["U"] @ s @ f["V"].T
    return out


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
