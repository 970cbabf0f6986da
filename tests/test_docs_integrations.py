"""Every example in docs/integrations.md runs as written (each in a fresh namespace and
an empty working directory)."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).parent.parent / "docs" / "integrations.md"


def examples() -> dict[str, str]:
    """{section heading: its python code block}; one block per section."""
    found = {}
    for section in re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]:
        heading = section.splitlines()[0]
        blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
        assert len(blocks) == 1, f"section {heading!r} should hold one runnable example"
        found[heading] = blocks[0]
    return found


EXAMPLES = examples()


@pytest.mark.parametrize("heading", list(EXAMPLES))
def test_example_runs(heading, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    reset_accelerate()  # each example starts as a fresh program would, and leaves no trace
    try:
        exec(compile(EXAMPLES[heading], f"{DOC.name}: {heading}", "exec"), {"__name__": "__doc_example__"})
    finally:
        root.handlers[:], root.level = handlers, level
        reset_accelerate()


def reset_accelerate() -> None:
    """accelerate keeps one process-wide state (mixed precision included); Trainer creates it."""
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
