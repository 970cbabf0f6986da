"""Run under `torchrun --nproc_per_node 2`: DDP training of an adapted TinyNet with a
non-Euclidean factor; each rank saves its final parameters to OUT/rank{r}.safetensors."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import geopeft  # noqa: E402

from helpers import TinyNet  # noqa: E402


def batches(steps: int, world: int, rank: int):
    """The same global batches on every rank; each rank takes its shard."""
    g = torch.Generator().manual_seed(123)
    for _ in range(steps):
        ids = torch.randint(0, 50, (8, 6), generator=g)
        yield ids.chunk(world)[rank] if world > 1 else ids


def main(out: str, steps: int = 5) -> None:
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(0)
    model = geopeft.adapt(TinyNet(), "lora", targets="all-linear", rank=4,
                          manifold={"A": "oblique"}, trainable=["classifier"])
    wrapped = DDP(model) if distributed else model
    opt = geopeft.optimizer(wrapped, torch.optim.AdamW, lr=1e-2)
    for ids in batches(steps, world, rank):
        wrapped(ids).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    params = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(params, os.path.join(out, f"rank{rank}.safetensors"))
    # names are the bare model's, so a DDP-trained adapter loads onto a plain base model
    assert [n for n, _ in geopeft.adapters(wrapped)] == [n for n, _ in geopeft.adapters(model)]
    geopeft.save(wrapped, os.path.join(out, f"adapter{rank}"))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
