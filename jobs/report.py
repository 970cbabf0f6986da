"""The compare report: summary rows, the Markdown table, the curves and ranks figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .train import FULL

COLUMNS = [  # (key, header)
    ("method", "method"), ("lr", "lr"), ("test_acc", "test acc"), ("gap_to_full", "gap to full"),
    ("val_acc", "val acc"), ("step_time_vs_lora", "step time vs LoRA"),
    ("total_rank", "total rank"), ("trainable_params", "trainable params"),
    ("optimizer_state_bytes", "optimizer state"),
    ("violation", "invariant violation"),
]


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: accuracy, gap to full fine-tuning (points), step time / LoRA's, sizes."""
    by = {r["method"]: r for r in results}
    full_acc = by[FULL]["test_acc"] if FULL in by else None
    lora_time = by["lora"]["step_time"] if "lora" in by else None
    rows = []
    for r in results:
        rows.append({
            "method": r["method"], "lr": r["lr"], "test_acc": r["test_acc"], "val_acc": r["val_acc"],
            "gap_to_full": None if full_acc is None else 100.0 * (r["test_acc"] - full_acc),
            "step_time": r["step_time"],
            "step_time_vs_lora": r["step_time"] / lora_time if lora_time else None,
            "total_rank": sum(r["ranks"].values()) if r.get("ranks") else None,
            "trainable_params": r["trainable_params"],
            "optimizer_state_bytes": r["optimizer_state_bytes"], "violation": r["violation"],
        })
    return rows


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key in ("test_acc", "val_acc"):
        return f"{100 * value:.2f}%"
    if key == "gap_to_full":
        return f"{value:+.2f} pt"
    if key == "step_time_vs_lora":
        return f"{value:.2f}×"
    if key == "trainable_params":
        return f"{value:,}"
    if key == "optimizer_state_bytes":
        return _bytes(value)
    if key == "violation":
        return f"{value:.1e}"
    if key == "lr":
        return f"{value:g}"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |",
             "|" + "|".join(" --- " if k == "method" else " ---: " for k, _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(k, r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def sweep_table(results: list[dict[str, Any]]) -> str:
    """Validation (test) accuracy of every lr tried, one row per swept run."""
    swept = [r for r in results if r.get("sweep")]
    if not swept:
        return ""
    lrs = sorted({t["lr"] for r in swept for t in r["sweep"]})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "| --- |" + " ---: |" * len(lrs)]
    for r in swept:
        got = {t["lr"]: t for t in r["sweep"]}
        cells = [f"{100 * got[lr]['val_acc']:.2f} ({100 * got[lr]['test_acc']:.2f})" if lr in got else "—"
                 for lr in lrs]
        cells = [f"**{c}**" if lr == r["lr"] else c for c, lr in zip(cells, lrs)]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return ("\n\n## lr sweep\n\nvalidation accuracy % (test accuracy %) at each lr tried; bold: "
            "the lr kept (best validation accuracy)\n\n" + "\n".join(lines) + "\n")


def markdown(cfg, rows: list[dict[str, Any]], lr_sweep: bool, results: list[dict[str, Any]] = ()) -> str:
    lr_note = ("each recipe's lr chosen from its grid by validation accuracy" if lr_sweep
               else "lr: train.lr, else the recipe's recommended lr, else train.default_lr; "
                    "full fine-tuning: train.full_lr")
    head = (f"# geopeft compare: {cfg.run}\n\n"
            f"model `{cfg.model.kind}{':' + cfg.model.name if cfg.model.name else ''}`, data "
            f"`{cfg.data.name}` (split seed {cfg.data.split_seed}), targets "
            f"{', '.join(cfg.adapt.targets)}, rank {cfg.adapt.rank}; {cfg.train.steps} steps of "
            f"batch {cfg.train.batch_size}, {cfg.train.optimizer} with {cfg.train.schedule} schedule, "
            f"seed {cfg.train.seed}; {lr_note}.\n\n")
    notes = ("\n\ntest acc: accuracy on the test split"
             + (f" (first {cfg.data.max_eval} examples)" if cfg.data.max_eval else "")
             + "; gap to full: test acc minus full fine-tuning's, in points; val acc: the "
               "validation split at the last step; step time vs LoRA: median time of one training "
               "step (forward, backward, optimizer) over LoRA's; total rank: the adapters' ranks summed at the "
               "end (rank-adaptive recipes change it); optimizer state: bytes of every "
               "tensor the optimizer keeps; invariant violation: the largest distance of a factor "
               "from its manifold at the end (— for Euclidean factors only). See docs/compare.md.\n")
    return head + table(rows) + notes + sweep_table(list(results))


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    """2×2: training loss and validation accuracy against steps and against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    for r in results:
        losses = r["losses"]
        steps = list(range(1, len(losses) + 1))
        times, total = [], 0.0
        for dt in _step_times(r):
            total += dt
            times.append(total)
        smooth = _smooth(losses, max(1, len(losses) // 25))
        style = {"color": "black", "linestyle": "--"} if r["method"] == FULL else {}
        label = f"{r['method']} (lr {r['lr']:g})"
        axes[0, 0].plot(steps, smooth, label=label, **style)
        axes[0, 1].plot(times, smooth, label=label, **style)
        ev = r["evals"]
        axes[1, 0].plot([e["step"] for e in ev], [100 * e["val_acc"] for e in ev], marker="o", label=label, **style)
        axes[1, 1].plot([e["time"] for e in ev], [100 * e["val_acc"] for e in ev], marker="o", label=label, **style)
    for ax, (x, y) in zip(axes.flat, [("step", "training loss (moving mean)"), ("training time [s]", "training loss (moving mean)"),
                                     ("step", "validation accuracy [%]"), ("training time [s]", "validation accuracy [%]")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _step_times(r: dict[str, Any]) -> list[float]:
    return r.get("step_times") or [r["train_time"] / max(1, len(r["losses"]))] * len(r["losses"])


def plot_ranks(results: list[dict[str, Any]], path: Path) -> None:
    """Rank-adaptive recipes: the rank of every adapted layer at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adaptive = [r for r in results if r["rank_adaptive"]]
    fig, axes = plt.subplots(len(adaptive), 1, figsize=(11, 3.2 * len(adaptive)), squeeze=False,
                             constrained_layout=True)
    for ax, r in zip(axes[:, 0], adaptive):
        layers = list(r["ranks"])
        for e in r["evals"]:
            ax.plot(range(len(layers)), [e["ranks"].get(n, 0) for n in layers], marker=".",
                    alpha=0.3 + 0.7 * e["step"] / r["steps"], label=f"step {e['step']}")
        ax.set_title(f"{r['method']}: rank per layer")
        ax.set_xticks(range(len(layers)), [n.replace("encoder.", "") for n in layers], rotation=90, fontsize=6)
        ax.set_ylabel("rank")
        ax.legend(fontsize=7, ncol=4)
    fig.savefig(path, dpi=90)
    plt.close(fig)
