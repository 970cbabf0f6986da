"""The user's data files (`data.path`, `val_path`, `test_path`): .jsonl / .json / .csv /
.parquet read with Hugging Face `datasets`, and every row's fields checked before training.

Every problem is a `DataError` naming the file, the row (1-based; for CSV also the line)
and the column.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geopeft.errors import ConfigError, DataError

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def where(path: str | Path, row: int) -> str:
    """'file: row N' (CSV: '(line N+1)' too), `row` 0-based."""
    line = f" (line {row + 2})" if str(path).endswith(".csv") else ""
    return f"{path}: row {row + 1}{line}"


def _bad_json_line(path: Path) -> str | None:
    """The first line of a JSON-lines file that is not a JSON object, as a sentence."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {number} is not valid JSON ({exc.msg} at column {exc.colno})"
            if not isinstance(obj, dict):
                return f"line {number} is a JSON {type(obj).__name__}, not an object of columns"
    return None


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a data file as dicts of column -> value (a cell a row lacks is None)."""
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError("data.path needs Hugging Face datasets: pip install geopeft[jobs]") from exc
    path = Path(path)
    builder = _BUILDERS.get(path.suffix)
    if builder is None:
        raise ConfigError(f"{path}: not a data file this job reads ({', '.join(_BUILDERS)})")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors become ours
    with tempfile.TemporaryDirectory(prefix="geopeft-data-") as cache:
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)
        except Exception as exc:  # datasets wraps the parser's error
            detail = _bad_json_line(path) if path.suffix == ".jsonl" else None
            cause = exc.__cause__ or exc
            reason = detail or (str(cause).splitlines()[0] if str(cause) else type(cause).__name__)
            raise DataError(f"{path}: cannot be read as {builder}: {reason}") from exc
        rows = table.to_list()
    if not rows:
        raise DataError(f"{path}: holds no rows")
    return rows


def column(rows: list[dict[str, Any]], path: str | Path, role: str, name: str, *,
           kind: type | tuple[type, ...] = str, required: bool = True) -> list[Any]:
    """The values of column `name` (the data's `role`), each checked: present, not null, of
    `kind`, and a non-empty string when `kind` is str."""
    if required and rows and all(name not in r for r in rows):
        found = ", ".join(sorted(rows[0])) or "none"
        raise DataError(f"{path}: no column {name!r} ({role}); columns found: {found}. Name yours "
                        f"with data.columns.{role}=<column>")
    values = []
    for i, r in enumerate(rows):
        value = r.get(name)
        if value is None:
            if required:
                raise DataError(f"{where(path, i)}: column {name!r} ({role}) is missing or null")
            values.append(None)
            continue
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise DataError(f"{where(path, i)}: column {name!r} ({role}) is {type(value).__name__} "
                            f"{value!r:.60}, expected {names}")
        if isinstance(value, str) and not value.strip() and role not in ("prompt",):
            raise DataError(f"{where(path, i)}: column {name!r} ({role}) is an empty string")
        values.append(value)
    return values


def has_column(rows: Sequence[dict[str, Any]], name: str) -> bool:
    return any(r.get(name) is not None for r in rows)
