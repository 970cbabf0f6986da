"""GeoLoRA and AdaLoRA against LoRA on a real task, several seeds: accuracy, held-out loss,
ranks and step time on the pretrained MiniLM.

Setup: all-MiniLM-L6-v2 (its first `--blocks` blocks; 6 = the whole encoder) with a
mean-pooled linear head (2 classes, trained too), adapters on every encoder Linear
(query, key, value, the three dense: 6 per block), rank 8, alpha 16, AdamW (weight decay
0) at `--lr`, no warm-up, constant lr, `--steps` steps of batch `--batch` snippets of
Rotten Tomatoes (`geopeft.jobs.data`, critics' snippets, fresh / rotten) at up to
`--max-length` tokens, in a seeded order (`--lr recipe`, the default: each recipe's
recommended lr, `Recipe.lr`); the validation loss and accuracy on the first
`--val` validation snippets every `--eval-every` steps. Every method of a seed starts from
the same head and sees the same batches. `geolora` and `adalora` run at their defaults
(their total_steps = `--steps`, as the `train` job sets it); the variants named `geolora-...` change
options (and lr) as their names say. The paired 95% interval of Δacc is `geopeft.jobs.stats.interval`
over seeds × validation snippets.

    .venv/bin/python benchmarks/geolora_minilm.py --seed 0,1,2 --json geolora_minilm.json
    .venv/bin/python benchmarks/geolora_minilm.py --seed 0,1,2 --batch 16 --max-length 32 --steps 80 --eval-every 40
    .venv/bin/python benchmarks/geolora_minilm.py --methods lora,geolora --lr 1e-3,3e-3 --seed 0,1,2
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from cglora_minilm import ce_loss, mean_loss, rotten_tomatoes_batches  # noqa: E402
from init_cost import text_classifier  # noqa: E402
from report import environment, write_report  # noqa: E402

import geopeft  # noqa: E402
from geopeft.jobs.stats import interval  # noqa: E402
from geopeft.registry import get_registry  # noqa: E402

TARGETS = r"encoder\.encoder\..*\.(query|key|value|dense)"
METHODS = {  # name: (recipe, adapt options, rank-controller attributes); "lr" in the options pins it
    "lora": ("lora", {}, {}),
    "geolora": ("geolora", {}, {}),
    "geolora-paper": ("geolora", {"train_bases": False}, {}),  # U, V moved only by augmentation
    "adalora": ("adalora", {}, {}),
    "adalora-r8-t8": ("adalora", {"target_rank": 8}, {}),  # the earlier default: rank 8 = target, no pruning
    # why the ranks grew, one cause at a time (period 10, the earlier default): no bound but τ,
    # no budget, new second moments at 0
    "geolora-period10": ("geolora", {"period": 10}, {}),
    "geolora-unbounded": ("geolora", {"period": 10, "r_max": 10 ** 6, "budget": None}, {}),
    "geolora-unbounded-zero-moments": ("geolora", {"period": 10, "r_max": 10 ** 6, "budget": None},
                                       {"seed_moments": False}),
    "geolora-nobudget": ("geolora", {"period": 10, "budget": None}, {}),
    "geolora-zero-moments": ("geolora", {"period": 10}, {"seed_moments": False}),
    # the period × lr sweep behind the defaults (period 3, lr 6e-3); the earlier: period 10, lr 3e-3
    **{f"geolora-period{p}-lr{lr}": ("geolora", {"period": p, "lr": float(lr)}, {})
       for p, lr in [(10, "3e-3"), (5, "3e-3"), (3, "3e-3"), (2, "3e-3"), (10, "6e-3"), (5, "6e-3"),
                     (3, "6e-3"), (3, "1e-2")]},
}


@torch.no_grad()
def correct(model, batches) -> list[int]:
    """1 for each validation snippet the model classifies right, else 0."""
    training = model.training
    model.eval()
    right = [int(x) for b in batches for x in (model(*b[0]).argmax(-1) == b[1])]
    model.train(training)
    return right


def run_method(name: str, base, train, val, args) -> dict:
    method, extra, attrs = METHODS[name]
    extra = dict(extra)
    own_lr = extra.pop("lr", None)
    if method in ("adalora", "geolora"):  # as the train / compare jobs: the run's length
        extra = {"total_steps": args.steps, **extra}
    model = geopeft.adapt(copy.deepcopy(base), method, targets=TARGETS, rank=args.rank, alpha=2 * args.rank,
                          trainable=["classifier"], **extra)
    lr = get_registry().get("method", method).lr if args.lr == "recipe" else args.lr
    lr = own_lr if own_lr is not None and args.lr == "recipe" else lr
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0)
    for key, value in attrs.items():
        setattr(opt.rank_controller, key, value)
    model.train()
    evals, times, losses = [], [], []

    def record(step):
        ranks = [a.rank for _, a in geopeft.adapters(model)]
        right = correct(model, val)
        evals.append({"step": step, "val_loss": mean_loss(model, val), "val_acc": sum(right) / len(right),
                      "total_rank": sum(ranks), "max_rank": max(ranks)})
        return right

    right = record(0)
    for step, batch in enumerate(train, start=1):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = ce_loss(model, batch)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == len(train):
            right = record(step)
    return {"evals": evals, "train_loss": losses, "step_time": statistics.median(times[3:] or times),
            "val_correct": right}


def run(seed: int, lr: float, names: list[str], args) -> dict:
    torch.manual_seed(seed)
    base = text_classifier(seed)
    base.encoder.encoder.layer = base.encoder.encoder.layer[:args.blocks]
    train = rotten_tomatoes_batches("train", 0, args.steps, args.batch, args.max_length, seed)
    val = rotten_tomatoes_batches("val", 0, args.val // 64, 64, args.max_length, 0)
    results = {}
    print(f"seed {seed}, lr {lr}: step val_loss val_acc total_rank max_rank")
    for name in names:
        torch.manual_seed(seed)
        results[name] = r = run_method(name, base, train, val, argparse.Namespace(**{**vars(args), "lr": lr}))
        trace = "  ".join(f"{e['step']}:{e['val_loss']:.3f}/{100 * e['val_acc']:.1f}%/{e['total_rank']}/"
                          f"{e['max_rank']}" for e in r["evals"])
        print(f"  {name:18s} {1000 * r['step_time']:5.0f} ms  {trace}", flush=True)
    return results


def summarize(runs: dict[float, dict[int, dict]], names: list[str]) -> dict:
    """Per lr and method: mean ± standard error over seeds of the final validation accuracy
    and loss, and the paired difference in accuracy to lora (mean ± standard error over
    seeds, and the 95% interval of `geopeft.jobs.stats.interval`, paired by seed and snippet)."""
    out: dict[str, dict] = {}
    print("\nfinal validation accuracy / loss: mean ± standard error over seeds; Δacc: paired, vs lora")
    for lr, by_seed in runs.items():
        for name in names:
            acc = [r[name]["evals"][-1]["val_acc"] for r in by_seed.values()]
            loss = [r[name]["evals"][-1]["val_loss"] for r in by_seed.values()]
            rank = [r[name]["evals"][-1]["total_rank"] for r in by_seed.values()]
            ratio = [r[name]["step_time"] / r["lora"]["step_time"] for r in by_seed.values()] if "lora" in names \
                else [float("nan")]
            diff = [r[name]["evals"][-1]["val_acc"] - r["lora"]["evals"][-1]["val_acc"] for r in by_seed.values()] \
                if "lora" in names else [float("nan")]

            def se(xs):
                return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")

            ci = [float("nan")] * 2
            if "lora" in names and len(by_seed) > 1 and all("val_correct" in r[n] for r in by_seed.values()
                                                            for n in (name, "lora")):
                x = np.array([r[name]["val_correct"] for r in by_seed.values()], dtype=np.float64) - \
                    np.array([r["lora"]["val_correct"] for r in by_seed.values()], dtype=np.float64)
                ci = list(interval(x)[1:]) if name != "lora" else [0.0, 0.0]

            out.setdefault(str(lr), {})[name] = {
                "val_acc": statistics.fmean(acc), "val_acc_se": se(acc), "val_loss": statistics.fmean(loss),
                "val_loss_se": se(loss), "delta_acc_vs_lora": statistics.fmean(diff), "delta_acc_se": se(diff),
                "delta_acc_ci95": ci,
                "total_rank": statistics.fmean(rank), "step_time_vs_lora": statistics.median(ratio)}
            s = out[str(lr)][name]
            print(f"lr {lr!s:<7} {name:18s} acc {100 * s['val_acc']:.2f} ± {100 * s['val_acc_se']:.2f}  "
                  f"loss {s['val_loss']:.4f} ± {s['val_loss_se']:.4f}  Δacc {100 * s['delta_acc_vs_lora']:+.2f} "
                  f"± {100 * s['delta_acc_se']:.2f} [95%: {100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]  total rank {s['total_rank']:.0f}  "
                  f"time {s['step_time_vs_lora']:.2f}×")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora,geolora,adalora")
    parser.add_argument("--lr", default="recipe",
                        help="a learning rate, or several: 1e-3,3e-3; 'recipe': each recipe's recommended lr")
    parser.add_argument("--seed", default="0", help="a seed, or several: 0,1,2")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--val", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--json", default=None)
    parser.add_argument("--merge", default=None,
                        help="no training: summarise the --json reports a.json,b.json,... (e.g. one per seed)")
    args = parser.parse_args(argv)
    if args.merge:
        import json

        runs: dict = {}
        for path in args.merge.split(","):
            with open(path) as f:
                for lr, by_seed in json.load(f)["results"].items():
                    for k, v in by_seed.items():  # files may hold other methods of the same seeds
                        runs.setdefault(lr, {}).setdefault(int(k), {}).update(v)
        per_seed = [list(r) for by_seed in runs.values() for r in by_seed.values()]
        names = [n for n in per_seed[0] if all(n in p for p in per_seed)]  # those every seed ran
        names = ["lora"] + [n for n in names if n != "lora"] if "lora" in names else names
        return {"summary": summarize(runs, names)}
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    lrs = ["recipe"] if args.lr == "recipe" else [float(x) for x in str(args.lr).split(",")]
    seeds = [int(x) for x in str(args.seed).split(",")]
    runs = {lr: {seed: run(seed, lr, names, args) for seed in seeds} for lr in lrs}
    report = {"benchmark": "geolora_minilm", "args": vars(args), "environment": environment(),
              "results": {str(lr): {str(seed): r for seed, r in by.items()} for lr, by in runs.items()},
              "summary": summarize(runs, names)}
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
