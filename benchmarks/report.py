"""What every benchmark script records beside its figures: versions, machine, date;
and the `--json` report writer."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any

import torch

import geopeft


def environment(**versions: str) -> dict[str, Any]:
    """torch / geopeft / Python versions (plus `versions`, e.g. peft=...), machine, CPU and
    thread counts, today's date and the 1-minute load average (None where the OS has none)."""
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return {"torch": torch.__version__, "geopeft": geopeft.__version__, **versions,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(), "load_average_1min": load}


def write_report(report: dict[str, Any], path: str | None) -> None:
    """Write `report` as JSON to `path` (nothing when path is None) and say so."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"results written to {path}")
