"""The compare report: summary rows, the Markdown table, the curves and ranks figures."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from . import stats
from .train import FULL

COLUMNS = [  # (key, header)
    ("method", "method"), ("lr", "lr"), ("test_acc", "test acc"), ("gap_to_full", "gap to full"),
    ("val_acc", "val acc"), ("step_time_vs_lora", "step time vs LoRA"), ("cpu_time", "CPU-s per run"),
    ("total_rank", "total rank"), ("trainable_params", "trainable params"),
    ("optimizer_state_bytes", "optimizer state"),
    ("violation", "invariant violation"),
]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _mean_or_none(values: list[float | None]) -> float | None:
    """The mean, or None when a value is missing (a causal LM without answers has no accuracy)."""
    return None if any(v is None for v in values) else _mean(values)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per recipe (`compare.choose`'s results): accuracy as the mean over seeds,
    with a 95% interval and a paired verdict against LoRA from two seeds on; gap to full
    fine-tuning (points), step time / LoRA's, CPU-seconds per run [lowest, highest], sizes;
    the lr range within 1 point of the best for a swept recipe."""
    by = {r["method"]: r for r in results}
    lora = by.get("lora")
    lora_time = statistics.median(m["step_time"] for m in lora["runs"]) if lora else None
    full_acc = _mean_or_none([m["test_acc"] for m in by[FULL]["runs"]]) if FULL in by else None
    rows = []
    for r in results:
        runs = r["runs"]
        acc = _mean_or_none([m["test_acc"] for m in runs])
        several = len(runs) > 1 and acc is not None
        ci = list(stats.interval(stats.correct_matrix(runs))[1:]) if several else None
        paired = several and lora is not None and r["method"] != "lora"
        lm = {k: _mean_or_none([m.get(k) for m in runs]) for k in ("test_loss", "test_ppl")}
        step_time = statistics.median(m["step_time"] for m in runs)
        violations = [m["violation"] for m in runs if m["violation"] is not None]
        cpu = [m["cpu_time"] for m in runs if m.get("cpu_time") is not None]
        ranks = [sum(m["ranks"].values()) for m in runs if m.get("ranks")]
        sweep = r.get("sweep")
        rows.append({
            "method": r["method"], "lr": r["lr"], "seeds": [m["seed"] for m in runs],
            "test_acc": acc, "test_acc_mean": acc, "test_acc_ci95": ci,
            "vs_lora": stats.vs_reference(runs, lora["runs"]) if paired else None,
            "val_acc": _mean_or_none([m["val_acc"] for m in runs]),
            "gap_to_full": None if full_acc is None or acc is None else 100.0 * (acc - full_acc),
            **(lm if lm["test_ppl"] is not None else {}),
            "step_time": step_time, "step_time_vs_lora": step_time / lora_time if lora_time else None,
            "cpu_time": [min(cpu), max(cpu)] if cpu else None,
            "total_rank": round(_mean(ranks)) if ranks else None,
            "trainable_params": runs[0]["trainable_params"],
            "optimizer_state_bytes": max(m["optimizer_state_bytes"] for m in runs),
            "violation": max(violations) if violations else None,
            "off_by_design": max((m.get("off_by_design") or 0 for m in runs), default=0),
            "lr_range": stats.lr_range([t["lr"] for t in sweep], [t["val_acc"] for t in sweep])
            if sweep else None,
        })
    return rows


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


SEEDED = [("vs_lora", "vs LoRA (95% interval)"), ("verdict", "verdict")]  # after test acc, from 2 seeds


LM = [("test_loss", "test loss"), ("test_ppl", "test perplexity")]  # after test acc, causal LM runs


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    i = [k for k, _ in COLUMNS].index("test_acc") + 1
    extra = (SEEDED if any(r["test_acc_ci95"] for r in rows) else []) + (
        LM if any(r.get("test_ppl") is not None for r in rows) else [])
    return COLUMNS[:i] + extra + COLUMNS[i:]


def _cell(key: str, row: dict[str, Any]) -> str:
    value = row.get(key)
    if key == "test_acc" and row["test_acc_ci95"]:
        low, high = row["test_acc_ci95"]
        return f"{100 * value:.2f} ± {50 * (high - low):.2f}%"
    if key in ("vs_lora", "verdict"):
        vs = row["vs_lora"]
        if vs is None:
            return "reference" if row["method"] == "lora" else "—"
        low, high = vs["ci95"]
        return vs["verdict"] if key == "verdict" else f"{vs['diff_mean']:+.2f} ± {(high - low) / 2:.2f} pt"
    if value is None:
        return "—"
    if key in ("test_acc", "val_acc"):
        return f"{100 * value:.2f}%"
    if key == "gap_to_full":
        return f"{value:+.2f} pt"
    if key in ("test_loss", "test_ppl"):
        return f"{value:.4f}"
    if key == "step_time_vs_lora":
        return f"{value:.2f}×"
    if key == "cpu_time":
        low, high = (f"{v:,.0f}" for v in value)
        return low if low == high else f"{low}–{high}"
    if key == "trainable_params":
        return f"{value:,}"
    if key == "optimizer_state_bytes":
        return _bytes(value)
    if key == "violation":
        off = row.get("off_by_design")
        return f"{value:.1e}" + (f" ({off} off by design)" if off else "")
    if key == "lr":
        return f"{value:g}"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    cols = _columns(rows)
    lines = ["| " + " | ".join(h for _, h in cols) + " |",
             "|" + "|".join(" --- " if k in ("method", "verdict") else " ---: " for k, _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(k, r) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def sweep_table(results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """Validation (test) accuracy, mean over the seeds, of every lr tried, one row per swept
    recipe, and the lr range within 1 point of its best."""
    swept = [(r, row) for r, row in zip(results, rows) if r.get("sweep")]
    if not swept:
        return ""
    lrs = sorted({t["lr"] for r, _ in swept for t in r["sweep"]})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | within 1 pt of best |",
             "| --- |" + " ---: |" * (len(lrs) + 1)]
    for r, row in swept:
        got = {t["lr"]: t for t in r["sweep"]}
        cells = [f"{100 * got[lr]['val_acc']:.2f} ({100 * got[lr]['test_acc']:.2f})" if lr in got else "—"
                 for lr in lrs]
        cells = [f"**{c}**" if lr == r["lr"] else c for c, lr in zip(cells, lrs)]
        span = row["lr_range"]
        cells.append(f"{span['low']:g} – {span['high']:g} ({span['decades']:.2f} decades)")
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return ("\n\n## lr sweep\n\nvalidation accuracy % (test accuracy %) at each lr tried, mean over "
            "the seeds; bold: the lr kept (best validation accuracy); within 1 pt of best: the "
            "contiguous lr range of the grid whose validation accuracy is within 1 point of the "
            "best (0 decades: the best point alone; the grid's spacing bounds it)\n\n"
            + "\n".join(lines) + "\n")


def _test_val(test: float, val: float | None) -> str:
    return f"{100 * test:.2f}" + ("" if val is None else f" ({100 * val:.2f})")


def seed_table(results: list[dict[str, Any]]) -> str:
    """Test (validation) accuracy of every run, one column per seed, one row per recipe and
    lr tried (a swept recipe's kept lr in bold); empty with one seed. A recipe scored by loss
    only (a causal LM without answers: no `points`) gets no row."""
    points = [(r["method"], t["lr"], t["lr"] == r["lr"] and bool(r["sweep"]),
               dict(zip(t["seeds"], zip(t["test_accs"], t["val_accs"]))))
              for r in results if r.get("points") for t in r["points"]]  # (method, lr, kept, {seed: (test, val)})
    seeds = sorted({s for *_, by in points for s in by})
    if len(seeds) < 2:
        return ""
    lines = ["| method | lr | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "| --- |" + " ---: |" * (len(seeds) + 1)]
    for method, lr, kept, by in points:
        cells = [_test_val(*by[s]) if s in by else "—" for s in seeds]
        lines.append(f"| {method} | {f'**{lr:g}**' if kept else f'{lr:g}'} | " + " | ".join(cells) + " |")
    return ("\n\n## Per seed\n\ntest accuracy % (validation accuracy %) of each run; a swept "
            "recipe has a row per lr tried, the kept one in bold\n\n" + "\n".join(lines) + "\n")


def markdown(cfg, rows: list[dict[str, Any]], lr_sweep: bool, results: list[dict[str, Any]] = ()) -> str:
    lr_note = ("each recipe's lr chosen from its grid by validation accuracy" if lr_sweep
               else "lr: train.lr, else the recipe's recommended lr, else train.default_lr; "
                    "full fine-tuning: train.full_lr")
    seeds = rows[0]["seeds"] if rows else [cfg.train.seed]
    head = (f"# geopeft compare: {cfg.run}\n\n"
            f"model `{cfg.model.path or cfg.model.kind + (':' + cfg.model.name if cfg.model.name else '')}`"
            f", task {cfg.task}, data `{cfg.data.path or cfg.data.name}` (split seed {cfg.data.split_seed}), "
            f"targets {', '.join(cfg.adapt.targets) if cfg.adapt.targets else 'the model preset'}, rank {cfg.adapt.rank}; {cfg.train.steps} steps of "
            f"batch {cfg.train.batch_size}, {cfg.train.optimizer} with {cfg.train.schedule} schedule, "
            f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}; {lr_note}.\n\n")
    if len(seeds) > 1:
        seeded = (f"test acc: mean over the {len(seeds)} seeds ± the half-width of its 95% interval; "
                  "vs LoRA: the mean paired difference in points (same seed, same test example) ± "
                  "the half-width of its 95% interval, and the verdict: better / worse when the "
                  "interval excludes 0, else no difference detected; ")
    else:
        seeded = ("one seed: no verdict (`seeds=[0,1,2]` gives intervals and verdicts against LoRA). "
                  "test acc: ")
    notes = (f"\n\n{seeded}accuracy on the test split"
             + (f" (first {cfg.data.max_eval} examples)" if cfg.data.max_eval else "")
             + "; gap to full: test acc minus full fine-tuning's, in points; val acc: the "
               "validation split at the last step; step time vs LoRA: median time of one training "
               "step (forward, backward, optimizer) over LoRA's, wall time (a machine busy with other work "
               "skews it); CPU-s per run: the run's own CPU time, setup and evaluations included "
               "(lowest–highest over the seeds), which other load barely changes; total rank: the adapters' ranks summed at the "
               "end (rank-adaptive recipes change it); optimizer state: bytes of every "
               "tensor the optimizer keeps; invariant violation: the largest distance of a factor "
               "from its manifold at the end (— for Euclidean factors only), over the factors the "
               "manifold keeps on it; k off by design: factors its projection leaves off (BaLoRA: "
               "pairs with rank(BA) < r), most in one run. See docs/compare.md.\n")
    warned = [f"- **{r['method']}**, seed {w['seed']}, lr {w['lr']:g}: {w['warning']}"
              for r in results for w in r.get("warnings", ())]
    warnings = "\n\n## Warnings\n\n" + "\n".join(warned) + "\n" if warned else ""
    return (head + table(rows) + notes + warnings + sweep_table(list(results), rows)
            + seed_table(list(results)))


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path) -> None:
    """Left 2×2: training loss and validation accuracy against steps and against wall time
    (the first seed's runs); right: the spread, each seed's test accuracy per recipe with the
    mean and its 95% interval."""
    plt = _pyplot()
    fig = plt.figure(figsize=(15, 7.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 1, 0.8])
    axes = [[fig.add_subplot(grid[i, j]) for j in range(2)] for i in range(2)]
    # a causal LM without answers to score: validation loss instead of accuracy
    by_loss = any(e["val_acc"] is None for res in results for e in res["runs"][0]["evals"])
    val = "validation loss" if by_loss else "validation accuracy [%]"
    for res in results:
        r = res["runs"][0]
        losses = r["losses"]
        steps = list(range(1, len(losses) + 1))
        times, total = [], 0.0
        for dt in _step_times(r):
            total += dt
            times.append(total)
        smooth = _smooth(losses, max(1, len(losses) // 25))
        style = {"color": "black", "linestyle": "--"} if r["method"] == FULL else {}
        label = f"{r['method']} (lr {r['lr']:g})"
        axes[0][0].plot(steps, smooth, label=label, **style)
        axes[0][1].plot(times, smooth, label=label, **style)
        ev = r["evals"]
        ys = [e["val_loss"] if by_loss else 100 * e["val_acc"] for e in ev]
        axes[1][0].plot([e["step"] for e in ev], ys, marker="o", label=label, **style)
        axes[1][1].plot([e["time"] for e in ev], ys, marker="o", label=label, **style)
    for ax, (x, y) in zip([a for row in axes for a in row],
                          [("step", "training loss (moving mean)"), ("training time [s]", "training loss (moving mean)"),
                           ("step", val), ("training time [s]", val)]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[0][0].set_title(f"seed {results[0]['runs'][0]['seed']}" if results else "", fontsize=9)
    if not by_loss:
        _plot_spread(fig.add_subplot(grid[:, 2]), results, rows)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_spread(ax, results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    for x, (res, row) in enumerate(zip(results, rows)):
        accs = [100 * m["test_acc"] for m in res["runs"]]
        ax.scatter([x] * len(accs), accs, color="gray", s=14, zorder=2,
                   label="one seed" if x == 0 else None)
        mean = 100 * row["test_acc_mean"]
        if row["test_acc_ci95"]:
            low, high = (100 * v for v in row["test_acc_ci95"])
            ax.errorbar([x], [mean], yerr=[[mean - low], [high - mean]], fmt="o", color="C3", capsize=5,
                        zorder=3, label="mean, 95% interval" if x == 0 else None)
        else:
            ax.plot([x], [mean], "o", color="C3", zorder=3)
    ax.set_xticks(range(len(results)), [r["method"] for r in results], rotation=30)
    ax.set_ylabel("test accuracy [%]")
    ax.set_title(f"spread over {len(rows[0]['seeds']) if rows else 0} seed(s)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def plot_lr(results: list[dict[str, Any]], path: Path) -> None:
    """Validation accuracy (mean over seeds, each seed faint) against lr per swept recipe;
    the thick segment: the lr range within 1 point of the recipe's best."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for i, r in enumerate(res for res in results if res["sweep"]):
        sweep, color = r["sweep"], f"C{i}"
        lrs = [t["lr"] for t in sweep]
        accs = [100 * t["val_acc"] for t in sweep]
        ax.plot(lrs, accs, marker="o", color=color, label=r["method"],
                linestyle="--" if r["method"] == FULL else "-")
        for t in sweep:
            ax.scatter([t["lr"]] * len(t["val_accs"]), [100 * a for a in t["val_accs"]], color=color,
                       alpha=0.3, s=10)
        span = stats.lr_range(lrs, [t["val_acc"] for t in sweep])
        ax.plot([span["low"], span["high"]], [max(accs) + 0.15] * 2, color=color, linewidth=4, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("validation accuracy [%] (mean over seeds)")
    ax.set_title("accuracy against lr; bar: the range within 1 point of the best", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _step_times(r: dict[str, Any]) -> list[float]:
    return r.get("step_times") or [r["train_time"] / max(1, len(r["losses"]))] * len(r["losses"])


def plot_ranks(results: list[dict[str, Any]], path: Path) -> None:
    """Rank-adaptive recipes: the rank of every adapted layer at each evaluation."""
    plt = _pyplot()
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
