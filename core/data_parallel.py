"""Data-parallel training when ranks change: the factors a rank controller replaces.

A rank change replaces an adapter's factors by new Parameters of another shape
(`Adapter.resize`). A wrapper registers parameters once, when it is built — DDP's reducer
buckets them, FSDP2 shards them — so it would go on syncing the old ones and never the
new. The factors of adapters under a rank controller that is not `static` (*resizable
factors*) are therefore kept out of the wrappers, and geopeft averages their gradients
itself, at the end of each backward pass (before clipping or the optimizer see them):

- DDP: `adapt` and `load` list their names in the adapted model's
  `_ddp_params_and_buffers_to_ignore` (the attribute DDP reads for parameters it leaves
  alone), so `DistributedDataParallel(model)` needs nothing else;
- FSDP2: `fully_shard(module, ignored_params=geopeft.resizable_factors(model))`; the
  optimizer refuses a resizable factor that FSDP2 sharded.

`GradientSync` (owned by the optimizer, re-attached after every rank change) all-reduces
them over the wrapper's process group — the default group when the optimizer was built
on the bare model and the wrapper came later (accelerate, HF Trainer) — in one flat
buffer. The first time, it checks that every process holds the same factors (names,
shapes, values): DDP broadcasts rank 0's parameters, but not these.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from geopeft.kernels.batched import DTensor

from .errors import ConfigError, GeopeftError
from .interfaces import Adapter

#: the module attribute DDP reads for the names of parameters it leaves alone
DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"


def resizable(named_adapters: Sequence[tuple[str, Adapter]], controller) -> list[tuple[str, str, nn.Parameter]]:
    """[(layer, factor name, factor)] of the adapters `controller` may resize (none when it is static)."""
    if controller.static:
        return []
    return [(name, f, p) for name, a in named_adapters for f, p in a.factors().items()]


def resizable_factors(model: nn.Module) -> set[nn.Parameter]:
    """The factors of `model` (adapted, or a wrapper of it) that a rank change replaces:
    keep them out of a sharding wrapper, `fully_shard(m, ignored_params=resizable_factors(model))`;
    geopeft averages their gradients. Empty for methods whose ranks are fixed."""
    from .model import adapters, require_state

    state = require_state(model)
    return {p for name, entry in state.by_name.items()  # every named adapter's, active or not
            for *_, p in resizable(adapters(model, name), entry.resolved.rank_controller)}


def _names_in(module: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    ids = {id(p) for p in params}
    return [n for n, p in module.named_parameters() if id(p) in ids]


def mark_ignored_by_ddp(root: nn.Module) -> None:
    """List the resizable factors of the adapted `root` in its DDP ignore list."""
    names = _names_in(root, list(resizable_factors(root)))
    if names:
        setattr(root, DDP_IGNORE, sorted(set(getattr(root, DDP_IGNORE, ())) | set(names)))


def unmark_ignored_by_ddp(root: nn.Module) -> None:
    """Undo `mark_ignored_by_ddp` (the adapters are going)."""
    names = set(_names_in(root, list(resizable_factors(root))))
    rest = [n for n in getattr(root, DDP_IGNORE, ()) if n not in names]
    if rest:
        setattr(root, DDP_IGNORE, rest)
    elif DDP_IGNORE in root.__dict__:
        delattr(root, DDP_IGNORE)


def wrapper_group(model: nn.Module, factors: Sequence[tuple[str, str, nn.Parameter]]):
    """The process group of a DDP or FSDP2 wrapper inside `model` (None if there is none),
    after checking that the wrapper leaves the resizable `factors` to geopeft."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    sharded = [f"{f} of {name!r}" for name, f, p in factors if isinstance(p, DTensor)]
    if sharded:
        raise ConfigError(
            f"FSDP2 sharded {', '.join(sharded[:3])}, which the rank controller replaces by factors of "
            "another shape when ranks change (FSDP2 keeps the shapes it was built with); keep them "
            "out of the sharding: fully_shard(module, ignored_params=geopeft.resizable_factors(model)) "
            "— they are thin, and geopeft averages their gradients")
    for module in model.modules():
        if isinstance(module, DDP):
            synced = [n for n in _names_in(module.module, [p for *_, p in factors])
                      if n not in module.parameters_to_ignore]
            if synced:
                raise ConfigError(
                    f"DistributedDataParallel syncs {', '.join(synced[:3])}, which the rank controller "
                    "replaces by new parameters when ranks change (DDP keeps the ones it was built "
                    "with): wrap the module geopeft.adapt was called on — DDP(model) — which lists "
                    f"them in model.{DDP_IGNORE}, or add them to that list of the module you wrap")
            return module.process_group
    for p in model.parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            if mesh.ndim != 1:
                raise ConfigError(f"a rank controller under FSDP2 needs a 1-D device mesh (its resizable "
                                  f"factors are averaged over it), got {mesh.ndim} dims")
            return mesh.get_group()
    return None


class GradientSync:
    """Averages the gradients of the resizable factors over the data-parallel processes at
    the end of every backward pass (`attach` hooks them; the first hook queues the average)."""

    def __init__(self, group=None):
        self.group = group  # None: the default group, if one is initialized
        self.factors: list[tuple[str, str, nn.Parameter]] = []
        self._handles: list = []
        self._queued: int | None = None  # the graph task whose average is queued
        self._checked = False

    def attach(self, factors: Sequence[tuple[str, str, nn.Parameter]]) -> None:
        """Hook `factors` (replacing the factors hooked before: a rank change)."""
        for h in self._handles:
            h.remove()
        self.factors = list(factors)
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for *_, p in self.factors]

    def world(self):
        """(group, size) to average over, or None when no process group is initialized."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.group if self.group is not None else dist.group.WORLD
        return group, dist.get_world_size(group)

    def _on_grad(self, _param: nn.Parameter) -> None:
        # once per backward pass (graph task): one that raised before its end never ran
        # its queued average, and must not stop the next one from queuing
        task = torch._C._current_graph_task_id()
        if task == self._queued or self.world() is None:
            return
        self._queued = task
        torch.autograd.Variable._execution_engine.queue_callback(self.average)

    @torch.no_grad()
    def average(self) -> None:
        """grad ← the mean of every process's grad, for each resizable factor that has one
        on some process (one all-reduce; each process divides first, as DDP does)."""
        self._queued = None
        world = self.world()
        if world is None or not self.factors:
            return
        group, size = world
        if not self._checked:
            self._check_same_everywhere(group, size)
        params = [p for *_, p in self.factors]
        dtype = torch.promote_types(params[0].dtype, torch.float32)
        flat = torch.cat([torch.tensor([float(p.grad is not None) for p in params], dtype=dtype)]
                         + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) / size
                            for p in params])
        dist.all_reduce(flat, group=group)
        present, values = flat[:len(params)], flat[len(params):]
        offset = 0
        for p, seen in zip(params, present.tolist()):
            n = p.numel()
            if seen:
                value = values[offset:offset + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = value.clone()
                else:
                    p.grad.copy_(value)
            offset += n

    def _check_same_everywhere(self, group, size: int) -> None:
        """GeopeftError unless every process holds the same resizable factors, bit for bit."""
        digest = hashlib.sha256()
        for name, f, p in self.factors:
            digest.update(f"{name}.{f}{tuple(p.shape)}{p.dtype}".encode())
            digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        mine = digest.hexdigest()
        everyone: list = [None] * size
        dist.all_gather_object(everyone, mine, group=group)
        if len(set(everyone)) > 1:
            raise GeopeftError(
                "the processes hold different adapter factors under a rank controller (DDP does not "
                "broadcast them, geopeft averages their gradients): seed every process alike "
                "(torch.manual_seed) before geopeft.adapt, and give data-aware initializers the same "
                "calibration batches on every process")
        self._checked = True
