"""The base model's own values of `trainable=` modules, kept so that
`disable_adapters` computes the base function exactly (PEFT's `modules_to_save`
keeps a copy of such modules for the same reason).

`adapt` and `load` take the copies (`snapshot`) before a trainable module changes;
`swapped_in` puts them in place of the trained parameters and buffers for the length
of a block — by replacing the module's entries, not by writing into the trained
tensors, so an autograd graph recorded before the block (a DPO-style policy forward)
still backpropagates through the trained values afterwards, and the optimizer's
parameters are never touched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

from .targets import name_matches


def trainable_modules(model: nn.Module, trainable: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module named (PEFT's suffix rule) in `trainable`."""
    for name, module in model.named_modules():
        if any(name_matches(name, t) for t in trainable):
            yield name, module


def snapshot(model: nn.Module, trainable: Sequence[str]) -> dict[str, Tensor]:
    """{full name: detached copy} of the parameters and buffers of the `trainable` modules."""
    found: dict[str, Tensor] = {}
    for mname, module in trainable_modules(model, trainable):
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if f"{mname}.{name}" not in found:
                found[f"{mname}.{name}"] = t.detach().clone()
    return found


@contextmanager
def swapped_in(root: nn.Module, originals: Mapping[str, Tensor]):
    """Within the block, `root`'s parameters and buffers named in `originals` are the
    originals (frozen; cast to the current tensor's device and dtype, so `.to()` / `.half()`
    after `adapt` give what the base model would); afterwards the trained ones again."""
    replaced: dict[str, Tensor] = {}
    try:
        replaced = exchange(root, frozen_entries(root, originals))
        yield
    finally:
        exchange(root, replaced)


def frozen_entries(root: nn.Module, originals: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`originals` as entries for `root`'s tables: on the current entry's device and dtype,
    a parameter's as a frozen `nn.Parameter`, a buffer's as a copy (BatchNorm updates its
    buffers in place)."""
    entries = {}
    for full, original in originals.items():
        table, attr = _table(root, full)
        current = table[attr]
        value = original.to(device=current.device, dtype=current.dtype)
        if table is _module(root, full)._parameters:
            value = nn.Parameter(value, requires_grad=False)
        elif value is original:
            value = original.clone()
        entries[full] = value
    return entries


def exchange(root: nn.Module, entries: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Put `entries` ({full name: tensor}) in place of `root`'s parameters and buffers of
    those names, replacing the table entries (never writing into a tensor); returns the
    replaced ones, which a second `exchange` puts back."""
    replaced = {}
    try:
        for full, value in entries.items():
            table, attr = _table(root, full)
            replaced[full] = table[attr]
            table[attr] = value
    except BaseException:
        exchange(root, replaced)
        raise
    return replaced


def _module(root: nn.Module, full: str) -> nn.Module:
    return root.get_submodule(full.rpartition(".")[0])


def _table(root: nn.Module, full: str) -> tuple[dict, str]:
    module, attr = _module(root, full), full.rpartition(".")[2]
    return (module._parameters if attr in module._parameters else module._buffers), attr
