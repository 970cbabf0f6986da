"""Importing an integration's optional dependency, or saying which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, what: str) -> ModuleType:
    """`import module`, or an ImportError naming `pip install geopeft[extra]`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs {module}, which is not installed: "
                          f"pip install geopeft[{extra}]") from exc
