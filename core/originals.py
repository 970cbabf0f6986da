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
    undo = []
    try:
        for full, original in originals.items():
            module_name, _, attr = full.rpartition(".")
            module = root.get_submodule(module_name)
            table = module._parameters if attr in module._parameters else module._buffers
            current = table[attr]
            value = original.to(device=current.device, dtype=current.dtype)
            if table is module._parameters:
                value = nn.Parameter(value, requires_grad=False)
            elif value is original:
                value = original.clone()  # a buffer may be updated in place (BatchNorm)
            undo.append((table, attr, current))
            table[attr] = value
        yield
    finally:
        for table, attr, current in reversed(undo):
            table[attr] = current
