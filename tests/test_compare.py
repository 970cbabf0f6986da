"""`geopeft compare` over several seeds: paired runs, intervals, verdicts, lr sweep,
parallel runs (a tiny BERT on a few synthetic token sequences; a few steps each)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from geopeft.errors import ConfigError
from geopeft.jobs import report, stats
from geopeft.jobs.compare import choose, compare, execute, plan
from geopeft.jobs.config import load_config
from geopeft.jobs.models import Encoded
from geopeft.jobs.report import summarize
from geopeft.jobs.train import resolve_lr

TINY = ["methods=[lora,stella]", "model.kind=bert", "model.hidden_size=16", "model.layers=1",
        "model.heads=2", "model.intermediate_size=32", "adapt.targets=[query,value]", "adapt.rank=2",
        "train.steps=3", "train.batch_size=8", "train.eval_every=3", "train.progress=false",
        "train.threads=1"]


@pytest.fixture(scope="module")
def data():
    """Random token sequences (length 8) labelled by their first token's parity."""
    gen = torch.Generator().manual_seed(0)

    def split(n):
        ids = torch.randint(1000, 2000, (n, 8), generator=gen)
        return Encoded((ids, torch.ones_like(ids)), ids[:, 0] % 2, True)
    return {"train": split(48), "val": split(16), "test": split(24)}


def tiny(tmp_path, *extra):
    return load_config(None, TINY + [f"output_dir={tmp_path}", *extra])


def test_a_sweep_reuses_the_runs_at_the_recommended_lr(tmp_path, data, capsys, monkeypatch):
    for figure in ("plot_curves", "plot_lr"):  # drawn by the other tests
        monkeypatch.setattr(report, figure, lambda *args: None)
    lr = resolve_lr(tiny(tmp_path), "stella")[0]  # the recipe's recommended lr
    cfg = tiny(tmp_path, "jobs=1", "full=false", "methods=[stella]", f"sweep.lrs=[{lr},1e-2]")
    out = compare(cfg, data)  # stella at its recipe lr, in <out>/stella/
    [single] = json.loads((out / "compare.json").read_text())["runs"]
    capsys.readouterr()
    compare(cfg, data, lr_sweep=True, reuse=True)
    assert capsys.readouterr().out.count("reusing") == 1  # the recipe lr: not trained again
    runs = {r["lr"]: r for r in json.loads((out / "compare.json").read_text())["runs"]}
    assert set(runs) == {lr, 1e-2} and runs[lr]["losses"] == single["losses"]
    assert not (out / "sweep" / f"stella-lr{lr:g}").exists() and (out / "sweep" / "stella-lr0.01").is_dir()


def test_seeds_pair_batches_across_recipes_and_sweep_writes_lr_figure(tmp_path, data):
    cfg = tiny(tmp_path, "seeds=[0,1]", "jobs=1", "sweep.lrs=[1e-3,4e-3]")
    out = compare(cfg, data, lr_sweep=True)
    saved = json.loads((out / "compare.json").read_text())
    runs = saved["runs"]
    assert len(runs) == 2 * 2 * 2 + 2  # (lora, stella) × seeds × lrs, + full per seed
    digest = {s: {r["batches"] for r in runs if r["seed"] == s} for s in (0, 1)}
    assert len(digest[0]) == len(digest[1]) == 1 and digest[0] != digest[1]  # same within a seed only
    lora = {r["seed"]: r for r in runs if r["method"] == "lora" and r["lr"] == 1e-3}
    assert lora[0]["losses"] != lora[1]["losses"]  # seeds change the runs
    rows = {r["method"]: r for r in saved["summary"]}
    for row in rows.values():
        low, high = row["test_acc_ci95"]
        assert row["seeds"] == [0, 1] and low <= row["test_acc_mean"] <= high
    assert rows["lora"]["vs_lora"] is None and rows["full"]["vs_lora"]["verdict"] in (
        stats.BETTER, stats.WORSE, stats.NO_DIFFERENCE)
    best = max([1e-3, 4e-3], key=lambda lr: sum(r["val_acc"] for r in runs
                                               if r["method"] == "stella" and r["lr"] == lr))
    assert rows["stella"]["lr"] == best and rows["stella"]["lr_range"]["best_lr"] == best
    stella_cpu = [r["cpu_time"] for r in runs if r["method"] == "stella" and r["lr"] == best]
    assert rows["stella"]["cpu_time"] == [min(stella_cpu), max(stella_cpu)] and min(stella_cpu) > 0
    table = (out / "compare.md").read_text()
    assert "| verdict |" in table and "within 1 pt of best" in table and "one seed" not in table
    assert "| CPU-s per run |" in table
    per_seed = table.split("## Per seed")[1]  # every run, swept lrs included, by seed
    for lr in (1e-3, 4e-3):
        by_seed = {r["seed"]: r for r in runs if r["method"] == "stella" and r["lr"] == lr}
        cells = " | ".join(f"{100 * by_seed[s]['test_acc']:.2f} ({100 * by_seed[s]['val_acc']:.2f})"
                           for s in (0, 1))
        assert f"{lr:g}{'**' * (lr == best)} | {cells} |" in per_seed
    assert f"| full | {rows['full']['lr']:g} |" in per_seed
    for name in ("compare.png", "compare_lr.png"):
        with Image.open(out / name) as img:
            img.load()


def test_parallel_runs_equal_sequential_runs(tmp_path, data):
    cfg = tiny(tmp_path, "methods=[lora]", "seeds=[0,1]")
    runs = plan(cfg, tmp_path / "a", lr_sweep=False)
    sequential = execute(tiny(tmp_path, "methods=[lora]", "seeds=[0,1]", "jobs=1"), data, runs)
    runs = plan(cfg, tmp_path / "b", lr_sweep=False)
    parallel = execute(tiny(tmp_path, "methods=[lora]", "seeds=[0,1]", "jobs=2"), data, runs)
    keys = ("method", "seed", "lr", "batches", "losses", "test_correct", "test_loss", "val_acc")
    same = lambda m: ({k: m[k] for k in keys}, [dict(e, time=None) for e in m["evals"]])  # noqa: E731
    assert [same(m) for m in parallel] == [same(m) for m in sequential]


def test_one_seed_gives_no_interval_and_says_so(tmp_path, data):
    from geopeft.jobs.report import markdown

    cfg = tiny(tmp_path, "full=false", "jobs=1")
    runs = plan(cfg, tmp_path, lr_sweep=False)
    metrics = execute(cfg, data, runs)
    metrics[1]["warning"] = "it learned only the class prior"  # as train_run's check words it
    results = choose(runs, metrics)
    rows = summarize(results)
    assert all(r["test_acc_ci95"] is None and r["vs_lora"] is None for r in rows)
    table = markdown(cfg, rows, False, results)
    assert "one seed: no verdict" in table
    assert (f"## Warnings\n\n- **{runs[1].method}**, seed 0, lr {runs[1].lr:g}: it learned only the "
            "class prior\n") in table and table.count("\n- **") == 1


def _flip(x: np.ndarray, rows_frac: list[float], rng) -> np.ndarray:
    """x with a share rows_frac[s] of its zeros in row s turned to ones."""
    x = x.copy()
    for s, frac in enumerate(rows_frac):
        zeros = np.flatnonzero(x[s] == 0)
        x[s, rng.choice(zeros, int(frac * len(zeros)), replace=False)] = 1
    return x


def test_verdicts_on_constructed_runs():
    rng = np.random.default_rng(0)
    lora = (rng.random((3, 400)) < 0.7).astype(float)
    run = lambda x: [{"seed": s, "test_correct": list(row)} for s, row in enumerate(x)]  # noqa: E731
    better = _flip(lora, [0.3, 0.25, 0.35], rng)  # right on a quarter to a third of LoRA's misses
    assert stats.vs_reference(run(better), run(lora))["verdict"] == stats.BETTER
    assert stats.vs_reference(run(lora), run(better))["verdict"] == stats.WORSE
    same = stats.vs_reference(run(lora), run(lora))
    assert same == {"diff_mean": 0.0, "ci95": [0.0, 0.0], "verdict": stats.NO_DIFFERENCE}
    other = (rng.random((3, 400)) < 0.7).astype(float)  # same accuracy, independent errors
    assert stats.vs_reference(run(other), run(lora))["verdict"] == stats.NO_DIFFERENCE
    with pytest.raises(ValueError, match="same seeds"):
        stats.vs_reference(run(lora), run(lora)[::-1])


def test_interval_is_the_seed_and_example_variance_with_t():
    # constant rows: the example term is 0, the seed term var(1, 0, 1) / 3 = 1/9; t(0.975, 2) = 4.3027
    mean, low, high = stats.interval(np.array([[1.0] * 5, [0.0] * 5, [1.0] * 5]))
    assert mean == pytest.approx(2 / 3) and high - mean == pytest.approx(4.302653 / 3, rel=1e-6)
    rng = np.random.default_rng(1)
    for n, m in ((2, 3), (3, 50), (5, 7)):
        mean, low, high = stats.interval(rng.random((n, m)))
        assert low < mean < high and mean - low == pytest.approx(high - mean)
    with pytest.raises(ValueError, match="2 seeds"):
        stats.interval(np.ones((1, 10)))


def test_lr_range_is_the_contiguous_run_within_a_point():
    lrs, accs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], [0.70, 0.795, 0.80, 0.792, 0.795]
    assert stats.lr_range(lrs, accs) == {"best_lr": 1e-3, "low": 3e-4, "high": 1e-2,
                                         "decades": pytest.approx(np.log10(1e-2 / 3e-4))}
    assert stats.lr_range(lrs, [0.5, 0.6, 0.8, 0.6, 0.8])["decades"] == 0.0  # first of equals, alone


@pytest.mark.parametrize("override, message", [("seeds=[0,1,0]", "twice"), ("jobs=0", "at least 1")])
def test_bad_seeds_and_jobs_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


KILLED_PARENT = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
from geopeft.jobs.compare import exit_with_parent
if __name__ == "__main__":
    ctx = multiprocessing.get_context("forkserver")
    pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=exit_with_parent,
                               initargs=(os.getpid(), 0.1))
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 60)
    time.sleep(60)
"""


def test_workers_exit_when_the_compare_process_is_killed(tmp_path):
    """SIGTERM to `geopeft compare` (no cleanup runs) must not leave its runs training."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "parent.py").write_text(KILLED_PARENT)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE,
                              text=True)
    worker = int(parent.stdout.readline())
    parent.send_signal(signal.SIGTERM)
    parent.wait(10)

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(worker):
        os.kill(worker, signal.SIGKILL)
        pytest.fail(f"worker {worker} still running 10 s after its compare was killed")


def test_reuse_warns_when_a_recipe_s_component_code_changed(tmp_path, data, capsys, monkeypatch):
    from geopeft.jobs import compare as compare_module
    from geopeft.jobs.train import code_digest

    for figure in ("plot_curves", "plot_lr"):
        monkeypatch.setattr(report, figure, lambda *args: None)
    cfg = tiny(tmp_path, "jobs=1", "full=false", "methods=[stella]")
    out = compare(cfg, data)
    [run] = json.loads((out / "compare.json").read_text())["runs"]
    assert run["code"] == code_digest("stella") and "Warnings" not in (out / "compare.md").read_text()
    monkeypatch.setattr(compare_module, "code_digest", lambda method: "0" * 16)  # stella's files edited
    capsys.readouterr()
    compare(cfg, data, reuse=True)
    assert capsys.readouterr().out.count("reusing") == 1  # kept, not retrained ...
    [again] = json.loads((out / "compare.json").read_text())["runs"]
    assert again["losses"] == run["losses"]
    warned = (out / "compare.md").read_text().split("## Warnings")[1]  # ... and said so
    assert f"trained by other code ({run['code']}) of stella's components" in warned
    assert "run without --reuse to retrain it" in warned


def test_the_code_digest_follows_the_files_that_define_a_recipe_s_components(tmp_path, plugin, monkeypatch):
    import importlib
    import types

    import geopeft
    from geopeft.jobs.train import code_digest

    assert code_digest("full") is None
    assert code_digest("rslora") == code_digest("lora")  # same components, options aside
    assert len({code_digest(m) for m in ("lora", "stella", "lorapro", "balora", "geolora")}) == 5
    source = tmp_path / "my_init.py"
    source.write_text("from geopeft.builtins import LoRAInit\n\n\n"
                      "class MyInit(LoRAInit):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("my_init")

    @geopeft.hookimpl
    def register_initializers(register):
        register("my_init", module.MyInit)

    @geopeft.hookimpl
    def register_methods(register):
        register("my_lora", geopeft.Recipe(name="my_lora", initializer="my_init"))

    plugin(types.SimpleNamespace(register_initializers=register_initializers,
                                 register_methods=register_methods), "my_plugin")
    before = code_digest("my_lora")
    assert before != code_digest("lora")
    source.write_text(source.read_text() + "    # a change to the initializer\n")
    assert code_digest("my_lora") != before
    typed = type("TypedInit", (module.MyInit,), {"__module__": "typed_at_a_prompt"})  # no file

    @geopeft.hookimpl
    def register_initializers(register):  # noqa: F811
        register("typed_init", typed)

    @geopeft.hookimpl
    def register_methods(register):  # noqa: F811
        register("typed_lora", geopeft.Recipe(name="typed_lora", initializer="typed_init"))

    plugin(types.SimpleNamespace(register_initializers=register_initializers,
                                 register_methods=register_methods), "typed_plugin")
    assert code_digest("typed_lora") not in (code_digest("lora"), None)  # by name: no file to read


def test_archived_runs_are_reused_and_give_the_same_table(tmp_path, data, capsys, monkeypatch):
    import importlib.util
    from pathlib import Path

    for figure in ("plot_curves", "plot_lr"):
        monkeypatch.setattr(report, figure, lambda *args: None)
    script = Path(__file__).parents[1] / "benchmarks" / "archive_runs.py"
    spec = importlib.util.spec_from_file_location("archive_runs", script)
    archive_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(archive_runs)
    extra = ["jobs=1", "full=false", "seeds=[0,1]", "run=task"]
    out = compare(tiny(tmp_path / "trained", *extra), data)
    kept = archive_runs.archive(out, tmp_path / "archive" / "task")
    assert len(kept) == 4  # (lora, stella) × 2 seeds
    assert all("val_predicted" not in e for p in kept for e in json.loads(p.read_text())["evals"])
    capsys.readouterr()
    again = compare(tiny(tmp_path / "archive", *extra), data, reuse=True)
    assert capsys.readouterr().out.count("reusing") == 4  # nothing trained
    summary = [json.loads((d / "compare.json").read_text())["summary"] for d in (out, again)]
    assert summary[0] == summary[1]
    assert (again / "compare.md").read_text() == (out / "compare.md").read_text()
