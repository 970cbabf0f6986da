"""CG-LoRA against LoRA and the data-aware neighbours on a real classification task: loss
curves over the first 50 steps on MiniLM.

Setup: the pretrained all-MiniLM-L6-v2 encoder with a mean-pooled linear head (2 classes,
the head trained too), adapters of rank 8 / alpha 16 on every `query` and `value` layer
(12; `--targets all`: the 36 encoder linears), rotten_tomatoes (`geopeft.jobs.data`: critics' snippets, fresh / rotten) at up to 64
tokens. The calibration set is 8 batches of 16 training snippets; training takes 50 AdamW
steps (same lr for every method, weight decay 0) on the next 800 snippets, batch 16, in
a seeded order; the validation loss is measured on 256 validation snippets at steps 0,
10, 25 and 50. Every method starts from the same head (same seed) and sees the same
batches. Methods: `lora` (the baseline), `cglora` (no shift: the model moves at step 0),
`cglora-shift`, `lora-ga`, `pissa`; on request `cglora-scale1` (the full Newton step,
no scale search) and, for `--targets all` (the 36 encoder linears, 384 and 1536 wide),
`cglora-sketch` / `cglora-diagonal` (the 1536-wide sides' moments as a rank-256
Nyström sketch / as their diagonal).

    .venv/bin/python benchmarks/cglora_minilm.py --json cglora_minilm.json
    .venv/bin/python benchmarks/cglora_minilm.py --seed 0,1,2,3,4 --json cglora_minilm_seeds.json
    .venv/bin/python benchmarks/cglora_minilm.py --methods lora,cglora,lora-ga --lr 2e-4,1e-3 --seed 0,1,2
    .venv/bin/python benchmarks/cglora_minilm.py --targets all --methods lora,cglora,cglora-sketch,cglora-diagonal --seed 0,1,2
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from init_cost import text_classifier  # noqa: E402
from report import environment, write_report  # noqa: E402

import geopeft  # noqa: E402
from geopeft.model import find_state  # noqa: E402

TARGETS = {"qv": ["query", "value"],  # the 12 query/value layers (384 × 384)
           "all": r"encoder\.encoder\..*\.(query|key|value|dense)"}  # the 36 encoder linears (384 and 1536 wide)
METHODS = {
    "lora": ("lora", {}),
    "cglora": ("cglora", {}),
    "cglora-shift": ("cglora", {"shift": True}),
    "cglora-scale1": ("cglora", {"scale": 1.0}),  # the full Newton step, no scale search
    # sides wider than 1024 (the 1536-wide ones of --targets all) sketched / diagonal
    "cglora-sketch": ("cglora", {"dense_limit": 1024, "sketch_size": 256}),
    "cglora-diagonal": ("cglora", {"dense_limit": 1024, "sketch_size": 0}),
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
    geopeft.adapt(model, method, targets=TARGETS[args.targets], rank=args.rank, alpha=2 * args.rank,
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


def run(seed: int, lr: float, names: list[str], args) -> dict:
    """Every method of `names` from the same head and batches of `seed`, at `lr`; prints a table."""
    torch.manual_seed(seed)
    base = text_classifier(seed)
    calib = rotten_tomatoes_batches("train", 0, 8, 16, args.max_length, seed)
    train = rotten_tomatoes_batches("train", 128, args.steps, 16, args.max_length, seed)
    val = rotten_tomatoes_batches("val", 0, 16, 16, args.max_length, seed)
    one = argparse.Namespace(**{**vars(args), "lr": lr, "seed": seed})
    results = {name: run_method(name, base, calib, train, val, one) for name in names}
    print(f"seed {seed}, lr {lr}, {args.steps} steps; validation loss at steps {', '.join(map(str, EVAL_AT))}")
    print(f"{'method':13s} " + " ".join(f"{'val@' + str(s):>8s}" for s in EVAL_AT)
          + f" {'train last10':>12s} {'init s':>7s} {'scale':>6s}")
    for name, r in results.items():
        last = sum(r["train_loss"][-10:]) / len(r["train_loss"][-10:])
        scale = f"{r['chosen_scale']:.4g}" if r["chosen_scale"] else ""
        print(f"{name:13s} " + " ".join(f"{r['val_loss'].get(s, float('nan')):8.4f}" for s in EVAL_AT)
              + f" {last:12.4f} {r['init_s']:7.1f} {scale:>6s}")
    return results


def summarize(runs: dict[float, dict[int, dict]], names: list[str], steps: int) -> dict:
    """Per lr and method: the mean and standard error over seeds of the final validation loss,
    and on how many seeds it is ≤ lora's (when lora ran)."""
    summary: dict[str, dict] = {}
    print(f"\nvalidation loss at step {steps}: mean ± standard error over seeds"
          + ("; seeds at or below lora's" if "lora" in names else ""))
    for lr, by_seed in runs.items():
        for name in names:
            finals = [r[name]["val_loss"][steps] for r in by_seed.values()]
            mean = statistics.fmean(finals)
            se = statistics.stdev(finals) / math.sqrt(len(finals)) if len(finals) > 1 else float("nan")
            wins = sum(r[name]["val_loss"][steps] <= r["lora"]["val_loss"][steps] for r in by_seed.values()) \
                if "lora" in names else None
            summary.setdefault(str(lr), {})[name] = {"mean": mean, "se": se, "seeds": len(finals),
                                                     "at_or_below_lora": wins}
            tail = f"  {wins}/{len(finals)}" if wins is not None and name != "lora" else ""
            print(f"lr {lr:<8g} {name:13s} {mean:.4f} ± {se:.4f}{tail}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora,cglora,cglora-shift,lora-ga,pissa")
    parser.add_argument("--targets", choices=sorted(TARGETS), default="qv")
    parser.add_argument("--lr", default="5e-4", help="a learning rate, or several: 2e-4,5e-4,1e-3")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", default="0", help="a seed, or several: 0,1,2")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.steps not in EVAL_AT:
        parser.error(f"--steps must be one of the evaluation steps {EVAL_AT}")
    lrs = [float(x) for x in str(args.lr).split(",")]
    seeds = [int(x) for x in str(args.seed).split(",")]
    runs = {lr: {seed: run(seed, lr, names, args) for seed in seeds} for lr in lrs}
    report = {"benchmark": "cglora_minilm", "args": vars(args), "environment": environment(),
              "results": {str(lr): {str(seed): r for seed, r in by.items()} for lr, by in runs.items()}}
    if len(lrs) * len(seeds) > 1:
        report["summary"] = summarize(runs, names, args.steps)
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
