"""Several processes: the same `geopeft train` / `compare` command under `torchrun
--nproc_per_node N -m geopeft ...` or `accelerate launch -m geopeft ...` trains data-parallel.

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; with WORLD_SIZE > 1 the job
joins the process group (nccl on CUDA, gloo on CPU), wraps the adapted model in DDP
(`train.distributed: ddp`) or shards it with FSDP2 (`fsdp2`: each block named by the model's
`_no_split_modules`, then the root); factors a rank controller replaces stay out of both
wrappers (geopeft averages their gradients itself), and each process takes its contiguous share of every
global batch. Rank 0 writes every file; at the end the processes' trainable parameters are
compared bitwise (a divergence is an error, never a silently wrong adapter).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from geopeft.errors import ConfigError, GeopeftError


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup(cfg) -> Context:
    """The process's rank, world size and device; joins the process group when launched
    with several processes (once per process: compare's runs share it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.train.device
    cuda = torch.cuda.is_available() and want != "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no CUDA device (train.device=auto runs on the CPU)")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if world > 1 and cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the global batch: it must split "
                          f"evenly over the {world} processes")
    return Context(rank, world, device)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: modules whose class the model (or a submodule)
    names in `_no_split_modules` (HF's transformer blocks)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap(model: nn.Module, ctx: Context, how: str) -> nn.Module:
    """The model as the processes train it: itself (one process), DDP, or sharded (FSDP2)."""
    if ctx.world == 1:
        return model
    if how == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        import geopeft

        # factors a rank controller replaces stay whole (geopeft averages their gradients)
        ignored = geopeft.resizable_factors(model) if geopeft.adapters(model) else set()
        for block in shard_units(model):
            fully_shard(block, ignored_params=ignored)
        return fully_shard(model, ignored_params=ignored)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    if all(n in ignored for n, p in model.named_parameters() if p.requires_grad):
        return model  # every trained factor is resizable: geopeft averages their gradients itself
    return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def share(idx: torch.Tensor, ctx: Context) -> torch.Tensor:
    """This process's contiguous share of the global batch `idx`."""
    return idx.chunk(ctx.world)[ctx.rank] if ctx.world > 1 else idx


def fingerprint(model: nn.Module) -> str:
    """sha256 of the trainable parameters' full values (a collective under FSDP2)."""
    from geopeft.kernels import full

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(full(p).detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_lockstep(model: nn.Module, ctx: Context) -> str:
    """Every process holds bitwise the same trainable parameters; returns their fingerprint."""
    mine = fingerprint(model)
    if ctx.world == 1:
        return mine
    found: list[str] = [""] * ctx.world
    dist.all_gather_object(found, mine)
    if len(set(found)) > 1:
        raise GeopeftError(f"the {ctx.world} processes ended with different trainable parameters "
                           f"(fingerprints {', '.join(f[:12] for f in found)}): a component is not "
                           "data-parallel safe; the adapter was not written")
    return mine
