"""`python train.py MODE OUT`: train an adapted TinyNet (a non-Euclidean factor and a
gradient transform, from the example plugin) for a few steps and write each rank's final
trainable parameters to OUT/rank{r}.safetensors and its adapter to OUT/adapter{r}.

MODE is `single` (one process, whole batches), or `ddp` / `fsdp2` under
`torchrun --nproc_per_node 2` (each rank takes its half of the same batches).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import geopeft  # noqa: E402
from geopeft.kernels import full  # noqa: E402

from helpers import TinyNet  # noqa: E402


def batches(steps: int, world: int, rank: int):
    """The same global batches on every rank; each rank takes its shard."""
    g = torch.Generator().manual_seed(123)
    for _ in range(steps):
        ids = torch.randint(0, 50, (8, 6), generator=g)
        yield ids.chunk(world)[rank]


def wrap(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "ddp":
        return DDP(model)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in (model.query, model.value, model.ffn):
            fully_shard(layer)
        return fully_shard(model)
    return model


def main(mode: str, out: str, steps: int = 5) -> None:
    if mode != "single":
        dist.init_process_group("gloo")
    rank = dist.get_rank() if mode != "single" else 0
    world = dist.get_world_size() if mode != "single" else 1
    torch.manual_seed(0)
    model = geopeft.adapt(TinyNet(), "lora", targets="all-linear", rank=4, trainable=["classifier"],
                          manifold={"A": "oblique"}, transforms=["scaled_gd"], delta=1e-2)
    wrapped = wrap(model, mode)
    opt = geopeft.optimizer(wrapped, torch.optim.AdamW, lr=1e-2)
    for ids in batches(steps, world, rank):
        wrapped(ids).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    params = {n: full(p).detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(params, os.path.join(out, f"rank{rank}.safetensors"))
    # names are the bare model's, so an adapter trained wrapped loads onto a plain base model
    assert [n for n, _ in geopeft.adapters(wrapped)] == [n for n, _ in geopeft.adapters(model)]
    geopeft.save(wrapped, os.path.join(out, f"adapter{rank}"))
    if mode != "single":
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
