"""The train and compare jobs on a tiny BERT built from a config (a few steps each)."""

from __future__ import annotations

import json
import types

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import geopeft
from geopeft.cli import main
from geopeft.jobs.cli import prepare
from geopeft.jobs.config import load_config
from geopeft.jobs.train import train_run

TINY = """
methods: [lora, tiny_stella]
model: {kind: bert, hidden_size: 32, layers: 2, heads: 2, intermediate_size: 64, max_length: 24}
adapt: {targets: [query, value], rank: 4}
data: {max_eval: 48}
train: {steps: 6, batch_size: 8, eval_every: 3, checkpoint_every: 2, progress: false}
jobs: 1
"""


@pytest.fixture
def tiny_config(tmp_path, plugin):
    """A tiny-BERT config, and a third-party recipe 'tiny_stella' that recommends lr 2e-3."""
    @geopeft.hookimpl
    def register_methods(register):
        register("tiny_stella", geopeft.Recipe(name="tiny_stella", adapter="usv",
                                               initializer="orthonormal", lr=2e-3))

    plugin(types.SimpleNamespace(register_methods=register_methods), "tiny_recipes")
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY + f"output_dir: {tmp_path / 'results'}\n")
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY)
    return prepare(load_config(path))


def test_compare_writes_table_json_and_png(tiny_config, capsys):
    assert main(["compare", str(tiny_config), "train.steps=4"]) == 0
    out = tiny_config.parent / "results" / "tiny"
    summary = json.loads((out / "compare.json").read_text())["summary"]
    assert [r["method"] for r in summary] == ["lora", "tiny_stella", "full"]
    by = {r["method"]: r for r in summary}
    assert by["tiny_stella"]["lr"] == 2e-3 and by["lora"]["lr"] == 1e-3  # recipe lr, else default_lr
    assert by["full"]["gap_to_full"] == 0.0 and by["lora"]["step_time_vs_lora"] == 1.0
    assert by["tiny_stella"]["violation"] < 1e-5 and by["lora"]["violation"] is None  # Stiefel U, V
    assert by["full"]["trainable_params"] > 50 * by["lora"]["trainable_params"]
    assert by["lora"]["total_rank"] == 4 * 4 and by["full"]["total_rank"] is None  # rank 4 × 4 layers
    table = (out / "compare.md").read_text()
    assert sum(line.startswith("| lora |") or line.startswith("| tiny_stella |")
               or line.startswith("| full |") for line in table.splitlines()) == 3
    assert "| lora |" in capsys.readouterr().out  # the table is printed too
    with Image.open(out / "compare.png") as img:
        img.load()  # decodes the whole image
        assert img.format == "PNG" and img.size == (1350, 675)
    # --reuse takes each run from its metrics.json: same table, nothing trained again
    assert main(["compare", str(tiny_config), "train.steps=4", "--reuse"]) == 0
    assert capsys.readouterr().out.count("reusing") == 3
    assert json.loads((out / "compare.json").read_text())["summary"] == summary


def test_a_changed_recipe_definition_is_not_reused(tiny_config, plugin):
    from geopeft.jobs.train import run_key
    from geopeft.registry import get_registry

    cfg = load_config(tiny_config)
    before = {m: run_key(cfg, m, 1e-3) for m in ("lora", "tiny_stella", "full")}
    get_registry().unregister_plugin("tiny_recipes")  # the same name, now training its bases differently

    @geopeft.hookimpl
    def register_methods(register):
        register("tiny_stella", geopeft.Recipe(name="tiny_stella", adapter="usv", initializer="orthonormal",
                                               lr=2e-3, riemannian_grad=False))

    plugin(types.SimpleNamespace(register_methods=register_methods), "tiny_recipes_changed")
    after = {m: run_key(cfg, m, 1e-3) for m in before}
    assert after["tiny_stella"] != before["tiny_stella"]  # --reuse trains it again
    assert after["lora"] == before["lora"] and after["full"] == before["full"]

    get_registry().unregister_plugin("tiny_recipes_changed")  # only the recommended lr changed

    @geopeft.hookimpl
    def register_methods(register):  # noqa: F811
        register("tiny_stella", geopeft.Recipe(name="tiny_stella", adapter="usv",
                                               initializer="orthonormal", lr=5e-3))

    plugin(types.SimpleNamespace(register_methods=register_methods), "tiny_recipes_new_lr")
    assert run_key(cfg, "tiny_stella", 1e-3) == before["tiny_stella"]  # a run at 1e-3 is the same run
    assert run_key(cfg, "tiny_stella", 5e-3) != before["tiny_stella"]


def test_the_run_gives_each_component_the_options_it_takes(tiny_config, tiny_data, monkeypatch):
    from geopeft.jobs.train import build

    given = {}

    def adapt(model, method, **options):
        given[method] = options
        raise StopIteration  # the options are all this test looks at
    monkeypatch.setattr(geopeft, "adapt", adapt)
    cfg = load_config(tiny_config)  # train.progress: false, 6 steps
    for method in ("lora", "adalora", "cglora"):
        with pytest.raises(StopIteration):
            build(cfg, method, 2, 1e-3, tiny_data["train"])
    assert "total_steps" not in given["lora"] and "progress" not in given["lora"]
    assert given["adalora"]["total_steps"] == 6  # its budget schedule spans the run
    assert given["cglora"]["progress"] is False  # no calibration bar where the training bar is off


def test_bad_key_and_unknown_recipe_fail_before_running(tiny_config, capsys):
    assert main(["compare", str(tiny_config), "train.stepz=4"]) == 2
    err = capsys.readouterr().err
    assert "'train.stepz'" in err and "did you mean 'steps'" in err and "batch_size" in err
    assert main(["compare", str(tiny_config), "methods=[lora,stela]"]) == 2
    assert "did you mean 'stella'" in capsys.readouterr().err
    assert main(["train", str(tiny_config), "train.steps=many"]) == 2
    assert "'train.steps'" in capsys.readouterr().err
    assert not (tiny_config.parent / "results").exists()  # nothing ran


def test_train_resume_is_bitwise_equal(tiny_config, tiny_data, tmp_path):
    cfg = load_config(tiny_config, ["method=stella", f"output_dir={tmp_path}"])
    whole = train_run(cfg, "stella", tiny_data, tmp_path / "whole", checkpoint=True)

    def interrupt(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the last checkpoint is at step 4
        train_run(cfg, "stella", tiny_data, tmp_path / "cut", checkpoint=True, on_step=interrupt)
    assert not (tmp_path / "cut" / "adapter").exists()
    assert main(["train", str(tiny_config), "method=stella", f"output_dir={tmp_path}", "run=cut",
                 "--resume"]) == 0
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert resumed["losses"] == whole["losses"] and resumed["test_acc"] == whole["test_acc"]
    untimed = [[{k: v for k, v in e.items() if k != "time"} for e in m["evals"]] for m in (resumed, whole)]
    assert untimed[0] == untimed[1]  # with the examples predicted per class
    assert [sum(e["val_predicted"]) for e in whole["evals"]] == [len(tiny_data["val"].head(48))] * 2
    assert (tmp_path / "cut" / "config.yaml").is_file()


def test_a_classifier_that_predicts_one_class_for_everything_is_reported(tiny_data, recwarn):
    from geopeft.jobs.measure import one_class_warning
    from geopeft.jobs.train import evaluate

    class Constant(torch.nn.Module):  # the class prior only: class 1 for every input
        def forward(self, ids, mask, *rest):
            return torch.tensor([0.0, 1.0]).expand(ids.shape[0], 2)

    val = tiny_data["val"]
    _, acc, correct, predicted = evaluate(Constant(), val, batch_size=7)
    assert predicted == [0, len(val)] and acc == int(val.labels.sum()) / len(val) == sum(correct) / len(val)
    assert not recwarn.list
    message = one_class_warning([{"val_predicted": predicted}] * 2, [0, 5], ("neg", "pos"))
    assert [str(w.message) for w in recwarn.list] == [message]
    assert "one class ('pos') for every example, at each of 2 validation evaluations and on the test split" in message
    recwarn.clear()
    assert one_class_warning([{"val_predicted": predicted}] * 2, [1, 4], ("neg", "pos")) is None  # one test example differs
    assert one_class_warning([{"val_predicted": [3, 0]}], [0, 5]) is None  # a different class on each split
    assert one_class_warning([{"val_predicted": [3]}], [5]) is None  # one class in all: nothing to learn
    assert one_class_warning([], None) is None and not recwarn.list


def test_config_reference_is_current():
    from pathlib import Path

    from geopeft.jobs.docgen import render

    path = Path(__file__).parent.parent / "docs" / "config.md"
    assert path.read_text() == render(), "regenerate: python -m geopeft.jobs.docgen docs/config.md"


def test_ranks_figure_for_rank_adaptive_recipes(tmp_path):
    from geopeft.jobs.report import plot_ranks

    evals = [{"step": s, "ranks": {"l0": r0, "l1": 8}} for s, r0 in ((5, 8), (10, 5))]
    runs = [{"method": "adaptive", "rank_adaptive": True, "ranks": {"l0": 5, "l1": 8},
             "steps": 10, "evals": evals},
            {"method": "lora", "rank_adaptive": False}]
    plot_ranks(runs, tmp_path / "ranks.png")
    with Image.open(tmp_path / "ranks.png") as img:
        img.load()
        assert img.size == (990, 288)  # one panel: only the rank-adaptive recipe


def test_rank_growth_watch_warns_once_when_the_loss_is_back_at_its_start_while_ranks_grew(recwarn):
    import geopeft
    from geopeft.jobs.measure import RankGrowthWatch

    from helpers import TinyNet

    model = geopeft.adapt(TinyNet(), "geolora", targets=["query", "value"], rank=2)
    cycling = RankGrowthWatch(model, window=2)  # diverging, but each cycle truncates back to the start
    for i, loss in enumerate((1.0, 0.9, 0.8, 0.7, 0.9, 1.0, 1.1, 1.2)):
        geopeft.adapters(model)[0][1].resize(4 if i % 2 else 2)
        cycling.update(loss, model)
    assert cycling.message is None and not recwarn.list
    geopeft.adapters(model)[0][1].resize(2)
    slow = RankGrowthWatch(model, window=2)  # a slow start: at its start loss, never lower yet
    for loss in (1.0, 0.9, 0.95, 0.97, 0.96, 0.98):
        slow.update(loss, model)
        geopeft.adapters(model)[0][1].resize(3)  # ranks grew meanwhile
    assert slow.message is None and not recwarn.list
    geopeft.adapters(model)[0][1].resize(2)
    watch = RankGrowthWatch(model, window=2)
    for loss in (1.0, 0.9, 0.8, 0.7, 0.9, 1.0):  # back at the start, but the ranks did not grow
        watch.update(loss, model)
    geopeft.adapters(model)[0][1].resize(5)
    for loss in (0.6, 0.5, 0.4, 0.3):  # ranks grew, the loss keeps falling
        watch.update(loss, model)
    assert watch.message is None and not recwarn.list
    for loss in (0.9, 1.0, 1.0, 1.2):
        watch.update(loss, model)
    assert [str(w.message) for w in recwarn.list] == [watch.message]
    assert "back at its start (0.95, mean of the last 2 steps; 0.95 over the first 2) after 12 steps" in watch.message
    assert "total rank grew from 4 to 7" in watch.message
