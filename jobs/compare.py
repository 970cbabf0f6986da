"""`geopeft compare`: several recipes and full fine-tuning under one budget, over one or
more seeds, each (recipe, seed, lr) run in its own process when `jobs` > 1."""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from . import report
from .config import to_yaml
from .train import FULL, code_digest, resolve_lr, run_key, train_run


def lr_grid(cfg, method: str) -> list[float]:
    explicit = cfg.sweep.full_lrs if method == FULL else cfg.sweep.lrs
    if explicit:
        return sorted(set(explicit))
    base = resolve_lr(cfg, method)[0]
    return sorted({round(base * f, 12) for f in cfg.sweep.factors})


def seeds_of(cfg) -> list[int]:
    """The seeds a compare runs: `seeds`, else [train.seed]."""
    return list(cfg.seeds) or [cfg.train.seed]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Run:
    """One training run of a compare: recipe, seed, lr and the directory it writes."""

    method: str
    seed: int
    lr: float
    out: str
    swept: bool


def plan(cfg, out: Path, lr_sweep: bool) -> list[Run]:
    """Every run, recipe by recipe (table order), then seed, then lr. One seed keeps the
    single-seed layout (<out>/<method>/); several put each under <out>/seed<s>/."""
    seeds = seeds_of(cfg)
    runs = []
    for method in list(cfg.methods) + ([FULL] if cfg.full else []):
        swept = lr_sweep and (method != FULL or cfg.sweep.full)
        lrs = lr_grid(cfg, method) if swept else [resolve_lr(cfg, method)[0]]
        for seed in seeds:
            base = out / f"seed{seed}" if len(seeds) > 1 else out
            for lr in lrs:
                runs.append(Run(method, seed, lr, str(run_dir(base, method, lr, swept)), swept))
    return runs


def run_dir(base: Path, method: str, lr: float, swept: bool) -> Path:
    """Where a run writes, under its seed's directory `base`: <method>/ at its single lr,
    sweep/<method>-lr<lr>/ as a point of an lr sweep."""
    return base / "sweep" / f"{method}-lr{lr:g}" if swept else base / method


def seeded(cfg, seed: int, **train):
    """A copy of cfg with train.seed = seed (and any other train.* given)."""
    c = copy.deepcopy(cfg)
    c.train.seed = seed
    for key, value in train.items():
        c.train[key] = value
    return c


def _train(cfg, run: Run, data, reuse: bool, ctx=None) -> dict[str, Any]:
    """train_run, or with `reuse` the metrics a run of the same key left in run.out (or in
    the other layout's place for it: a sweep takes the seeds' run at the recommended lr)."""
    cfg = seeded(cfg, run.seed)
    for saved in (Path(where) / "metrics.json" for where in _places(run) if reuse):
        if not saved.is_file():
            continue
        m = json.loads(saved.read_text())
        if m.get("run_key") == run_key(cfg, run.method, run.lr) and "test_correct" in m:
            print(f"{run.method:>8}: reusing {saved}")
            return _code_checked(m, run.method, saved)
    return train_run(cfg, run.method, data, Path(run.out), lr=run.lr, ctx=ctx)


def _code_checked(m: dict[str, Any], method: str, saved: Path) -> dict[str, Any]:
    """A reused run's metrics, with a warning (in compare.md's Warnings) when its recipe's
    component code (`code_digest`) differs from this checkout's: the run is kept, not retrained."""
    now = code_digest(method)
    if m.get("code") == now:
        return m
    was = f"other code ({m['code']})" if m.get("code") else "code older than the record of it"
    note = (f"reused from {saved}, trained by {was} of {method}'s components (now {now}); "
            "run without --reuse to retrain it")
    print(f"warning: {note}", file=sys.stderr)
    return {**m, "warning": "; ".join(w for w in (m.get("warning"), note) if w)}


def _places(run: Run) -> list[Path]:
    """run.out, then where the other layout (`run_dir`, swept or not) puts the same run."""
    base = Path(run.out).parent.parent if run.swept else Path(run.out).parent
    return [Path(run.out), run_dir(base, run.method, run.lr, not run.swept)]


_WORKER_DATA: dict | None = None


def _worker_init(data, parent: int) -> None:
    global _WORKER_DATA
    _WORKER_DATA = data
    exit_with_parent(parent)


def exit_with_parent(parent: int, every: float = 1.0) -> None:
    """End this worker (exit status 143, as SIGTERM's) once process `parent` is gone or
    this process was reparented: a compare killed with SIGTERM or SIGKILL leaves no runs
    training behind it. A daemon thread polls every `every` seconds."""
    import threading
    import time

    first = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(every)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(143)
            if os.getppid() != first:
                os._exit(143)

    threading.Thread(target=watch, name="geopeft-exit-with-parent", daemon=True).start()


def _worker_run(cfg, run: Run, reuse: bool) -> dict[str, Any]:
    return _train(cfg, run, _WORKER_DATA, reuse)


def _context(cfg):
    """A fork server that imports the training stack once and forks each worker from it:
    no torch thread pool has started there (safe to fork), and workers start without
    importing torch and transformers each. Spawn where the OS has no fork server."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    text = ["transformers.models.bert.modeling_bert"] if cfg.model.kind in ("minilm", "bert") else []
    ctx.set_forkserver_preload(["geopeft.jobs.compare", *text])
    return ctx


def execute(cfg, data, runs: Sequence[Run], reuse: bool = False, ctx=None) -> list[dict[str, Any]]:
    """The metrics of every run, in `runs` order. With jobs > 1 the runs go to that many
    processes (`_context`), each with train.threads, else
    cores // jobs, torch threads and no progress bar; a run is a pure function of its
    config, recipe, seed and lr, so the metrics equal a sequential run's at the same
    thread count. Under several launched processes (`ctx`: torchrun / accelerate) the runs
    go one after another, each on all of them."""
    jobs = min(cfg.jobs or cores(), len(runs))
    if jobs <= 1 or ctx is not None and ctx.world > 1:
        return [_train(cfg, r, data, reuse, ctx) for r in runs]
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = cfg.train.threads or max(1, cores() // jobs)
    quiet = seeded(cfg, cfg.train.seed, threads=threads, progress=False)
    print(f"{len(runs)} runs, {jobs} at a time, {threads} thread{'s' * (threads > 1)} each")
    results: list[dict[str, Any] | None] = [None] * len(runs)
    with ProcessPoolExecutor(jobs, mp_context=_context(cfg), initializer=_worker_init,
                             initargs=(data, os.getpid())) as pool:
        futures = {pool.submit(_worker_run, quiet, r, reuse): i for i, r in enumerate(runs)}
        for done in as_completed(futures):
            i = futures[done]
            m = results[i] = done.result()
            score = (f"test acc {100 * m['test_acc']:.2f}%, val acc {100 * m['val_acc']:.2f}%"
                     if m["val_acc"] is not None else f"test loss {m['test_loss']:.4f}")
            print(f"{runs[i].method:>8} seed {runs[i].seed} lr {runs[i].lr:g}: {score}, "
                  f"{m['train_time']:.0f} s")
    return results  # type: ignore[return-value]


def choose(runs: Sequence[Run], metrics: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per recipe (plan order): {method, lr, runs (one per seed, seed order), points (per lr
    tried: mean and per-seed accuracies), sweep (points, for a swept recipe), warnings (every
    run's, swept lrs included: `_warnings`)}. A swept
    recipe keeps the lr of best mean validation accuracy over the seeds (first of equals:
    the smaller lr); the test split is never looked at to choose."""
    grouped: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for run, m in zip(runs, metrics):
        grouped.setdefault(run.method, {}).setdefault(run.lr, []).append(m)
    swept = {r.method for r in runs if r.swept}
    out = []
    for method, by_lr in grouped.items():
        if any(m["val_acc"] is None for ms in by_lr.values() for m in ms):  # a causal LM, no answers
            if len(by_lr) > 1:
                from geopeft.errors import ConfigError
                raise ConfigError("--lr-sweep chooses by validation accuracy: give the causal_lm "
                                  "validation rows choices / answer to score")
            lr, ms = next(iter(by_lr.items()))
            out.append({"method": method, "lr": lr, "runs": ms, "sweep": None,
                        "warnings": _warnings(by_lr)})
            continue
        mean = {lr: sum(m["val_acc"] for m in ms) / len(ms) for lr, ms in by_lr.items()}
        best = max(sorted(by_lr), key=lambda lr: mean[lr])
        points = [{"lr": lr, "val_acc": mean[lr],
                   "test_acc": sum(m["test_acc"] for m in by_lr[lr]) / len(by_lr[lr]),
                   "seeds": [m["seed"] for m in by_lr[lr]],
                   "val_accs": [m["val_acc"] for m in by_lr[lr]],
                   "test_accs": [m["test_acc"] for m in by_lr[lr]]} for lr in sorted(by_lr)]
        out.append({"method": method, "lr": best, "runs": by_lr[best], "points": points,
                    "sweep": points if method in swept else None, "warnings": _warnings(by_lr)})
    return out


def _warnings(by_lr: dict[float, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """{seed, lr, warning} of every run of one recipe that warned, at every lr tried."""
    return [{"seed": m["seed"], "lr": lr, "warning": m["warning"]}
            for lr in sorted(by_lr) for m in by_lr[lr] if m.get("warning")]


def compare(cfg, data, lr_sweep: bool = False, reuse: bool = False, ctx=None) -> Path:
    """Run every recipe of cfg.methods (+ full fine-tuning) once per seed, write
    compare.md/json/png (and compare_lr.png with `lr_sweep`). With `reuse`, a run whose
    metrics.json has the same `run_key` is not trained again (so recipes can be trained by
    separate processes, then tabulated together). Under several launched processes (`ctx`),
    rank 0 writes."""
    out = Path(cfg.output_dir) / cfg.run
    main = ctx is None or ctx.main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    runs = plan(cfg, out, lr_sweep)
    metrics = execute(cfg, data, runs, reuse, ctx)
    results = choose(runs, metrics)
    if not main:
        return out
    summary = report.summarize(results)
    config = OmegaConf.to_container(cfg, resolve=True)
    (out / "compare.json").write_text(json.dumps({"config": config, "summary": summary,
                                                  "runs": metrics}, indent=1))
    (out / "compare.md").write_text(report.markdown(cfg, summary, lr_sweep, results))
    report.plot_curves(results, summary, out / "compare.png")
    if any(r["runs"][0]["rank_adaptive"] for r in results):
        report.plot_ranks([r["runs"][0] for r in results], out / "compare_ranks.png")
    if any(r["sweep"] for r in results):
        report.plot_lr(results, out / "compare_lr.png")
    return out

