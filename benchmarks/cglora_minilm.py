"""CG-LoRA against LoRA and the data-aware neighbours on a real classification task: loss
curves over the first 50 steps on MiniLM.

Setup: the pretrained all-MiniLM-L6-v2 encoder with a mean-pooled linear head (2 classes,
the head trained too), adapters of rank 8 / alpha 16 on every `query` and `value` layer
(12), rotten_tomatoes (`geopeft.jobs.data`: critics' snippets, fresh / rotten) at up to 64
tokens. The calibration set is 8 batches of 16 training snippets; training takes 50 AdamW
steps (same lr for every method, weight decay 0) on the next 800 snippets, batch 16, in
a seeded order; the validation loss is measured on 256 validation snippets at steps 0,
10, 25 and 50. Every method starts from the same head (same seed) and sees the same
batches. Methods: `lora` (the baseline), `cglora` (no shift: the model moves at step 0),
`cglora-shift`, `lora-ga`, `pissa`; on request `cglora-scale1` (the full Newton step,
no scale search).

    .venv/bin/python benchmarks/cglora_minilm.py --json cglora_minilm.json
    .venv/bin/python benchmarks/cglora_minilm.py --methods lora,cglora --lr 1e-3
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import copy  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from init_cost import text_classifier  # noqa: E402
from report import environment, write_report  # noqa: E402

import geopeft  # noqa: E402
from geopeft.model import find_state  # noqa: E402

TARGETS = ["query", "value"]
METHODS = {
    "lora": ("lora", {}),
    "cglora": ("cglora", {}),
    "cglora-shift": ("cglora", {"shift": True}),
    "cglora-scale1": ("cglora", {"scale": 1.0}),  # the full Newton step, no scale search
    "lora-ga": ("lora-ga", {}),
    "pissa": ("pissa", {}),
}
EVAL_AT = (0, 10, 25, 50)


def rotten_tomatoes_batches(split: str, start: int, count: int, batch: int, max_length: int, seed: int):
    """`count` batches ((input_ids, attention_mask), labels) of `batch` snippets of `split`, taken
    from position `start` of a seeded permutation; each batch trimmed to its longest snippet."""
    from geopeft.jobs.data import load_dataset
    from geopeft.jobs.models import build_tokenizer

    data = getattr(load_dataset("rotten_tomatoes"), split)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    tok = build_tokenizer(None)
    out = []
    for i in range(count):
        idx = order[start + i * batch:start + (i + 1) * batch]
        enc = tok([data.inputs[j] for j in idx], padding="longest", truncation=True,
                  max_length=max_length, return_tensors="pt")
        out.append(((enc["input_ids"], enc["attention_mask"]),
                    torch.as_tensor(data.labels[idx], dtype=torch.long)))
    return out


def ce_loss(model, batch):
    (ids, mask), labels = batch
    return F.cross_entropy(model(ids, mask), labels)


@torch.no_grad()
def mean_loss(model, batches) -> float:
    training = model.training
    model.eval()
    total = sum(float(ce_loss(model, b)) * len(b[1]) for b in batches) / sum(len(b[1]) for b in batches)
    model.train(training)
    return total


def run_method(name: str, base, calib, train, val, args) -> dict:
    method, extra = METHODS[name]
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    geopeft.adapt(model, method, targets=TARGETS, rank=args.rank, alpha=2 * args.rank,
                  trainable=["classifier"], init_batches=calib, loss_fn=ce_loss, **extra)
    init_s = time.perf_counter() - t0
    chosen = getattr(find_state(model).resolved.initializer, "chosen_scale", None)
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=args.lr, weight_decay=0.0)
    model.train()
    curve, val_curve = [], {0: mean_loss(model, val)}
    for step, batch in enumerate(train[:args.steps], start=1):
        opt.zero_grad()
        loss = ce_loss(model, batch)
        loss.backward()
        opt.step()
        curve.append(loss.item())
        if step in EVAL_AT:
            val_curve[step] = mean_loss(model, val)
    return {"train_loss": curve, "val_loss": val_curve, "init_s": init_s, "chosen_scale": chosen}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m != "cglora-scale1"))
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    torch.manual_seed(args.seed)
    base = text_classifier(args.seed)
    calib = rotten_tomatoes_batches("train", 0, 8, 16, args.max_length, args.seed)
    train = rotten_tomatoes_batches("train", 128, args.steps, 16, args.max_length, args.seed)
    val = rotten_tomatoes_batches("val", 0, 16, 16, args.max_length, args.seed)
    results = {name: run_method(name, base, calib, train, val, args) for name in names}
    print(f"lr {args.lr}, {args.steps} steps; validation loss at steps {', '.join(map(str, EVAL_AT))}")
    print(f"{'method':13s} " + " ".join(f"{'val@' + str(s):>8s}" for s in EVAL_AT)
          + f" {'train last10':>12s} {'init s':>7s} {'scale':>6s}")
    for name, r in results.items():
        last = sum(r["train_loss"][-10:]) / len(r["train_loss"][-10:])
        print(f"{name:13s} " + " ".join(f"{r['val_loss'].get(s, float('nan')):8.4f}" for s in EVAL_AT)
              + f" {last:12.4f} {r['init_s']:7.1f} {r['chosen_scale'] or '':>6}")
    report = {"benchmark": "cglora_minilm", "args": vars(args), "environment": environment(),
              "results": results}
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
