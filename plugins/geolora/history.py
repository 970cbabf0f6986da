"""What rank controllers show the user: a `rank_history` and one INFO line per change."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger("geopeft.ranks")


class RankHistory:
    """Ranks over training: `entries` is [{"step": t, "ranks": {layer: rank}}], one entry
    per step that changed a rank (and step 0), JSON-able; `log` writes one INFO line per
    changed layer ("<controller>: <layer> rank <old> → <new> at step <t>")."""

    def __init__(self, label: str):
        self.label = label
        self.entries: list[dict[str, Any]] = []

    def start(self, ranks: Mapping[str, int]) -> None:
        if not self.entries:
            self.entries.append({"step": 0, "ranks": dict(ranks)})

    @property
    def current(self) -> dict[str, int]:
        return dict(self.entries[-1]["ranks"]) if self.entries else {}

    def record(self, step: int, ranks: Mapping[str, int]) -> dict[str, int]:
        """Record the ranks after `step`; returns (and logs) those that changed."""
        before = self.current
        changed = {n: r for n, r in ranks.items() if before.get(n) != r}
        for name, rank in changed.items():
            logger.info("%s: %s rank %s → %d at step %d", self.label, name, before.get(name, "?"),
                        rank, step)
        if changed:
            self.entries.append({"step": int(step), "ranks": {**before, **ranks}})
        return changed

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"step": e["step"], "ranks": dict(e["ranks"])} for e in self.entries]

    def load_state_dict(self, entries: list[Mapping[str, Any]]) -> None:
        self.entries = [{"step": int(e["step"]), "ranks": dict(e["ranks"])} for e in entries]
