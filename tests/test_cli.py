"""The `geopeft` command: `plugins` (JSON) and `methods` (one line per recipe),
in-process, as `python -m geopeft` and as the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import geopeft
from geopeft import cli
from geopeft.kinds import KINDS
from geopeft.registry import get_registry

PLUGIN_KEYS = {"name", "distribution", "version", "components", "error"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GEOPEFT_PLUGINS"}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=_env(**env), timeout=120,
                          cwd=str(Path(__file__).resolve().parent))


def _check_plugins_report(report) -> dict[str, dict]:
    assert isinstance(report, list) and report
    for entry in report:
        assert isinstance(entry, dict)
        assert set(entry) == PLUGIN_KEYS
        assert isinstance(entry["components"], dict)
        assert set(entry["components"]) <= set(KINDS)
    names = [p["name"] for p in report]
    assert names == sorted(names) and len(set(names)) == len(names)
    by_name = {p["name"]: p for p in report}
    lora = by_name["lora"]
    assert lora["distribution"] == "geopeft" and lora["version"] == geopeft.__version__
    assert lora["error"] is None
    assert lora["components"]["adapter"] == ["lora"]
    assert lora["components"]["method"] == ["lora", "rslora"]
    example = by_name["example"]
    assert example["distribution"] == "geopeft-example-plugin"
    assert example["version"] == "0.1.0"
    assert example["error"] is None
    assert example["components"] == {"manifold": ["oblique"], "gradient_transform": ["scaled_gd"]}
    return by_name


def _check_methods_output(out: str) -> dict[str, str]:
    lines = [line for line in out.splitlines() if line.strip()]
    by_name = {line.split()[0]: line for line in lines}
    assert len(by_name) == len(lines), "one line per recipe"
    assert set(by_name) == set(geopeft.components()["method"])
    lora, rslora = by_name["lora"], by_name["rslora"]
    for line in (lora, rslora):
        assert "adapter=lora" in line
        assert "manifolds=A:euclidean,B:euclidean" in line
        assert "transforms=-" in line
        assert "rank_controller=fixed" in line
        assert "initializer=lora" in line
    assert "options=rslora=True" in rslora
    assert "manifolds=(B,A):balanced " in by_name["balora"]  # the coupled key replaces A and B
    assert "options=" not in lora
    assert "# LoRA" in lora  # the description
    return by_name


# --------------------------------------------------------------------------- in-process
def test_plugins_in_process(capsys):
    assert cli.main(["plugins"]) == 0
    by_name = _check_plugins_report(json.loads(capsys.readouterr().out))
    assert set(by_name) == set(get_registry().plugins)


def test_plugins_reports_hand_registered_plugins_and_their_errors(plugin, capsys):
    @geopeft.hookimpl
    def register_manifolds(register):
        register("not_a_manifold", object)

    import types

    plugin(types.SimpleNamespace(register_manifolds=register_manifolds), "clibad")
    with pytest.warns(RuntimeWarning):
        assert cli.main(["plugins"]) == 0
    by_name = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert by_name["clibad"]["distribution"] is None
    assert "must be a subclass of geopeft.Manifold" in by_name["clibad"]["error"]
    assert by_name["lora"]["error"] is None


def test_methods_in_process(capsys):
    assert cli.main(["methods"]) == 0
    _check_methods_output(capsys.readouterr().out)


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: geopeft" in err and "plugins" in err and "methods" in err


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["plugin"])
    assert info.value.code == 2
    assert "invalid choice: 'plugin'" in capsys.readouterr().err


# --------------------------------------------------------------------------- subprocesses
def test_python_m_geopeft_plugins():
    proc = _run(sys.executable, "-m", "geopeft", "plugins")
    assert proc.returncode == 0, proc.stderr
    _check_plugins_report(json.loads(proc.stdout))


def test_python_m_geopeft_methods():
    proc = _run(sys.executable, "-m", "geopeft", "methods")
    assert proc.returncode == 0, proc.stderr
    _check_methods_output(proc.stdout)


def test_console_script_and_allow_list():
    script = Path(sys.executable).with_name("geopeft")
    assert script.exists(), f"console script {script} is not installed"
    proc = _run(str(script), "plugins", GEOPEFT_PLUGINS="lora")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [p["name"] for p in report] == ["core", "lora"]  # core's own components always load
    assert {p["distribution"] for p in report} == {"geopeft"}

    proc = _run(str(script), "methods")
    assert proc.returncode == 0, proc.stderr
    _check_methods_output(proc.stdout)
