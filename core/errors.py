"""The exceptions geopeft raises. Each message names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GeopeftError(Exception):
    """Base class of every error geopeft raises on purpose."""


class UnknownComponentError(GeopeftError, KeyError):
    """A component name that no loaded plugin registers."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class IncompatibleComponentsError(GeopeftError, ValueError):
    """Two components that cannot work together (e.g. a transform needing factors A, B on a U S V adapter)."""


class TargetError(GeopeftError, ValueError):
    """`targets` matched nothing, or matched a layer geopeft cannot adapt."""


class ShapeError(GeopeftError, ValueError):
    """A tensor whose shape does not match what the adapter or manifold expects."""


class CheckpointError(GeopeftError, ValueError):
    """A saved adapter directory that is missing, truncated, foreign or inconsistent."""


class PluginError(GeopeftError, RuntimeError):
    """A plugin that failed to load or registers something invalid."""


class ConfigError(GeopeftError, ValueError):
    """An unknown option or a bad value in a recipe override or config file."""


class DataError(ConfigError):
    """A data file that cannot be read, or a row with a missing or malformed field (the message
    names the file, the row and the column)."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest match to `name` among `choices`, or None if nothing is close."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """'; did you mean 'x'?' when a close match exists, else ''."""
    match = closest(name, choices)
    return f"; did you mean {match!r}?" if match else ""
