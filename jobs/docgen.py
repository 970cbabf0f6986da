"""Writes docs/config.md, the config reference, from the schemas in schema.py:
`python -m geopeft.jobs.docgen [docs/config.md]` (tests/test_jobs.py checks it is current)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

from .schema import CHOICES, JobConfig

HEADER = """# Config reference

Generated from `jobs/schema.py` by `python -m geopeft.jobs.docgen docs/config.md`; do not
edit by hand. A config is a YAML file of these keys (any subset: the rest keep their
defaults); `base: other.yaml` layers it over another file; `key=value` arguments on the
command line (`train.steps=200`, `methods=[lora,stella]`, `adapt.method_options.stella.retraction=qr`)
override both. An unknown key, a value of the wrong type or an unknown choice is an error
naming the key and what is accepted, before anything runs.
"""


def _comments(cls: type) -> dict[str, str]:
    found = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+= .*?  # (.*)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return None
    if value == "":
        return '""'
    return "null" if value is None else repr(value).replace("'", "")


def _type(f: dataclasses.Field) -> str:
    return str(f.type).replace("typing.", "")


def _section(cls: type, prefix: str) -> list[str]:
    doc = (cls.__doc__ or "").strip()
    lines = [f"\n## `{prefix or 'top level'}`\n", doc + "\n", "| key | type | default | meaning |",
             "| --- | --- | --- | --- |"]
    comments, nested = _comments(cls), []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        default = _default(f)
        if default is None:
            nested.append((f.default_factory, key))
            lines.append(f"| `{key}` | section | | see [`{key}`](#{key.replace('.', '')}) |")
            continue
        meaning = comments.get(f.name, "")
        if key in CHOICES:
            meaning += f" (one of: {', '.join(CHOICES[key])})"
        cells = [f"`{key}`", f"`{_type(f)}`", f"`{default}`", meaning]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    for sub, key in nested:
        lines += _section(sub, key)
    return lines


def render() -> str:
    return HEADER + "\n".join(_section(JobConfig, "")) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if target:
        target.write_text(render())
    else:
        print(render())
