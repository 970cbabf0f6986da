"""`python train.py MODE OUT`: train an adapted TinyNet with every case of `CASES` (every
registered method, and LoRA with a non-Euclidean factor and a gradient transform from the
example plugin) for a few steps each. Writes OUT/rank{r}.safetensors — every trainable
parameter of every case after every step, keyed `{case}/{step}/{name}` — and each case's
final adapter to OUT/{case}/adapter{r}.

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
from geopeft.registry import get_registry  # noqa: E402

from helpers import TinyNet  # noqa: E402

STEPS = 4
SGD = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
ADAMW = (torch.optim.AdamW, {"lr": 1e-2})


def calibration() -> dict:
    """What data-aware initializers take: the same whole batches on every rank."""
    g = torch.Generator().manual_seed(7)
    return {"init_batches": [torch.randint(0, 50, (8, 6), generator=g) for _ in range(2)],
            "loss_fn": lambda m, ids: m(ids).pow(2).mean()}


def cases(mode: str) -> dict[str, dict]:
    """{case: its settings}: every registered method on a fixed-seed SGD run (geolora and
    adalora change ranks at every step) — LoRA-Pro under AdamW, as in its paper: under SGD its
    adjusted gradient, (BᵀB)⁻¹-scaled while B ≈ 0, turns round-off into 1e-3 within steps —;
    LoRA with an `oblique` A and the `scaled_gd` transform (AdamW); and GeoLoRA with the
    optimizer built before the wrapper and gradients clipped, as HF Trainer and accelerate
    do (not under FSDP2: its optimizer is built on the sharded model, and torch's
    clip_grad_norm_ refuses a mix of sharded and whole gradients)."""
    options = {"geolora": {"period": 2, "tau": 0.5},
               "adalora": {"target_rank": 2, "total_steps": STEPS, "tfinal": 1}}
    adam = {"lorapro", "rslora-pro"}
    out = {m: {"method": m, "options": options.get(m, {}), "optimizer": ADAMW if m in adam else SGD}
           for m in geopeft.components()["method"]}
    out["lora+oblique+scaled_gd"] = {"method": "lora", "optimizer": ADAMW, "options": {
        "manifold": {"A": "oblique"}, "transforms": ["scaled_gd"], "delta": 1e-2}}
    if mode != "fsdp2":
        out["geolora+late-wrap+clip"] = {**out["geolora"], "late_wrap": True, "clip": 0.05}
    return out


def batches(world: int, rank: int):
    """The same global batches on every rank; each rank takes its shard."""
    g = torch.Generator().manual_seed(123)
    for _ in range(STEPS):
        ids = torch.randint(0, 50, (8, 6), generator=g)
        yield ids.chunk(world)[rank]


def wrap(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "ddp":
        return DDP(model)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        # factors a rank change replaces stay whole (geopeft averages their gradients)
        ignored = geopeft.resizable_factors(model)
        for layer in (model.query, model.value, model.ffn):
            fully_shard(layer, ignored_params=ignored)
        return fully_shard(model, ignored_params=ignored)
    return model


def run(case: str, spec: dict, mode: str, out: str, rank: int, world: int) -> dict:
    """Train one case; {f"{case}/{step}/{name}": value} of every trainable parameter after every step."""
    torch.manual_seed(0)
    base = TinyNet()
    registry = get_registry()
    initializer = registry.get("initializer", registry.get("method", spec["method"]).initializer)
    data = calibration() if initializer.needs_data else {}
    model = geopeft.adapt(base, spec["method"], targets="all-linear", rank=4, trainable=["classifier"],
                          **data, **spec["options"])
    late = spec.get("late_wrap", False)
    wrapped = model if late else wrap(model, mode)
    cls, kwargs = spec["optimizer"]
    opt = geopeft.optimizer(wrapped, cls, **kwargs)
    wrapped = wrap(model, mode) if late else wrapped
    params = {}
    for step, ids in enumerate(batches(world, rank), 1):
        wrapped(ids).pow(2).mean().backward()
        if "clip" in spec:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
        opt.step()
        opt.zero_grad()
        params.update({f"{case}/{step}/{n}": full(p).detach().clone().contiguous()
                       for n, p in model.named_parameters() if p.requires_grad})
    # names are the bare model's, so an adapter trained wrapped loads onto a plain base model
    assert [n for n, _ in geopeft.adapters(wrapped)] == [n for n, _ in geopeft.adapters(model)]
    geopeft.save(wrapped, os.path.join(out, case, f"adapter{rank}"))
    return params


def main(mode: str, out: str) -> None:
    if mode != "single":
        dist.init_process_group("gloo")
    rank = dist.get_rank() if mode != "single" else 0
    world = dist.get_world_size() if mode != "single" else 1
    params = {}
    for case, spec in cases(mode).items():
        params.update(run(case, spec, mode, out, rank, world))
    save_file(params, os.path.join(out, f"rank{rank}.safetensors"))
    if mode != "single":
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
