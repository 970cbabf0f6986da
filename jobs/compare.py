"""`geopeft compare`: several recipes and full fine-tuning under one budget and seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from . import report
from .config import to_yaml
from .train import FULL, resolve_lr, run_key, train_run


def lr_grid(cfg, method: str) -> list[float]:
    explicit = cfg.sweep.full_lrs if method == FULL else cfg.sweep.lrs
    if explicit:
        return sorted(set(explicit))
    base = resolve_lr(cfg, method)[0]
    return sorted({round(base * f, 12) for f in cfg.sweep.factors})


def _train(cfg, method: str, data, out: Path, lr: float | None, reuse: bool) -> dict[str, Any]:
    """train_run, or with `reuse` the metrics a run of the same key left in `out`."""
    lr = lr if lr is not None else resolve_lr(cfg, method)[0]
    saved = out / "metrics.json"
    if reuse and saved.is_file():
        m = json.loads(saved.read_text())
        if m.get("run_key") == run_key(cfg, method, lr):
            print(f"{method:>8}: reusing {saved}")
            return m
    return train_run(cfg, method, data, out, lr=lr)


def run_method(cfg, method: str, data, out: Path, lr_sweep: bool, reuse: bool = False) -> dict[str, Any]:
    """Train `method` once, or at each lr of its grid keeping the best validation accuracy
    (the test split is never looked at to choose)."""
    sweep = lr_sweep and (method != FULL or cfg.sweep.full)
    if not sweep:
        return _train(cfg, method, data, out / method, None, reuse)
    tried = []
    for lr in lr_grid(cfg, method):
        m = _train(cfg, method, data, out / "sweep" / f"{method}-lr{lr:g}", lr, reuse)
        tried.append({"lr": lr, "val_acc": m["val_acc"], "test_acc": m["test_acc"]})
        print(f"  {method} lr {lr:g}: val acc {m['val_acc']:.4f}")
    best = max(tried, key=lambda t: t["val_acc"])  # first of equals: the smaller lr
    m = json.loads((out / "sweep" / f"{method}-lr{best['lr']:g}" / "metrics.json").read_text())
    m["sweep"] = tried
    return m


def compare(cfg, data, lr_sweep: bool = False, reuse: bool = False) -> Path:
    """Run every recipe of cfg.methods (+ full fine-tuning), write compare.md/json/png.
    With `reuse`, a run whose metrics.json has the same `run_key` is not trained again
    (so recipes can be trained by separate processes, then tabulated together)."""
    out = Path(cfg.output_dir) / cfg.run
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    methods = list(cfg.methods) + ([FULL] if cfg.full else [])
    results = [run_method(cfg, m, data, out, lr_sweep, reuse) for m in methods]
    summary = report.summarize(results)
    config = OmegaConf.to_container(cfg, resolve=True)
    (out / "compare.json").write_text(json.dumps({"config": config, "summary": summary,
                                                  "runs": results}, indent=1))
    (out / "compare.md").write_text(report.markdown(cfg, summary, lr_sweep, results))
    report.plot_curves(results, out / "compare.png")
    if any(r["rank_adaptive"] for r in results):
        report.plot_ranks(results, out / "compare_ranks.png")
    return out
