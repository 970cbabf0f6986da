"""One training run: a recipe (or full fine-tuning) on the encoded data, with evaluation,
progress bar, metrics and exact resumption from a checkpoint."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import geopeft

from . import measure
from .checkpoint import load_checkpoint, save_checkpoint
from .models import Encoded, build_model

FULL = "full"  # the name full fine-tuning goes by in results


def recipe_lr(method: str) -> float | None:
    """The learning rate the recipe recommends (`Recipe.lr`), if any."""
    from geopeft.registry import get_registry

    return getattr(get_registry().get("method", method), "lr", None)


def resolve_lr(cfg, method: str) -> tuple[float, str]:
    """(lr, where it came from) for `method` under `cfg.train`."""
    if method == FULL:
        return cfg.train.full_lr, "train.full_lr"
    if cfg.train.lr is not None:
        return cfg.train.lr, "train.lr"
    rec = recipe_lr(method)
    return (rec, "recipe") if rec is not None else (cfg.train.default_lr, "train.default_lr")


def lr_at(step: int, base: float, steps: int, warmup: float, schedule: str) -> float:
    """The learning rate of 0-based `step`: linear warm-up, then constant / linear / cosine decay."""
    warm = int(warmup * steps)
    if step < warm:
        return base * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    if schedule == "linear":
        return base * (1.0 - progress)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base


class BatchOrder:
    """The batch of each step, a pure function of (seed, step): epoch e is a permutation
    seeded by (seed, e), cut into full batches. Resuming needs no sampler state."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.bs, self.seed = n, min(batch_size, n), seed
        self.per_epoch = n // self.bs
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm[k * self.bs:(k + 1) * self.bs]

    def digest(self, steps: int) -> str:
        """sha256 (16 hex digits) of the example indices of steps 0 … steps − 1: runs with
        equal digests saw the same batches in the same order."""
        import hashlib

        h = hashlib.sha256()
        for step in range(steps):
            h.update(self(step).numpy().astype("<i8").tobytes())
        return h.hexdigest()[:16]


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, batch_size: int = 128) -> tuple[float, float, list[int]]:
    """(mean cross-entropy, accuracy, 0/1 per example) on `data`, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, []
    for i in range(0, len(data), batch_size):
        inputs, labels = data.batch(torch.arange(i, min(i + batch_size, len(data))))
        logits = model(*inputs)
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += (logits.argmax(-1) == labels).int().tolist()
    model.train(was_training)
    return loss_sum / len(data), sum(correct) / len(data), correct


_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def calibration_batches(cfg, train: Encoded) -> list[tuple[tuple, torch.Tensor]]:
    """The first adapt.init_batches batches of the training split, in file order: what a
    data-driven initializer (e.g. CG-LoRA's) sees. Drawing them uses no random state."""
    bs = min(cfg.train.batch_size, len(train))
    count = min(cfg.adapt.init_batches, len(train) // bs)
    return [train.batch(torch.arange(i * bs, (i + 1) * bs)) for i in range(count)]


def _calibration_loss(model: nn.Module, batch) -> torch.Tensor:
    inputs, labels = batch
    return nn.functional.cross_entropy(model(*inputs), labels)


def build(cfg, method: str, num_labels: int, lr: float, train: Encoded | None = None):
    """(model, optimizer) for `method` (a recipe name, or "full"), seeded by train.seed;
    `train` gives a data-driven initializer its calibration batches."""
    model = build_model(cfg.model, num_labels, cfg.train.seed)
    kw: dict[str, Any] = {"lr": lr, "weight_decay": cfg.train.weight_decay}
    if cfg.train.optimizer == "sgd":
        kw["momentum"] = 0.9
    cls = _OPTIMIZERS[cfg.train.optimizer]
    if method == FULL:
        return model, cls([p for p in model.parameters() if p.requires_grad], **kw)
    alpha = cfg.adapt.alpha if cfg.adapt.alpha is not None else 2.0 * cfg.adapt.rank
    options = dict(cfg.adapt.method_options.get(method, {}))
    calib = calibration_batches(cfg, train) if train is not None else None
    geopeft.adapt(model, method=method, targets=list(cfg.adapt.targets), rank=cfg.adapt.rank,
                  alpha=alpha, trainable=list(cfg.adapt.trainable), init_batches=calib,
                  loss_fn=_calibration_loss if calib else None, **options)
    return model, geopeft.optimizer(model, cls, **kw)


@dataclass
class RunState:
    """Everything a run accumulates; checkpointed with the model and optimizer."""

    step: int = 0
    train_time: float = 0.0
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


def _checkpoint(path: Path, model: nn.Module, opt, run: RunState, meta: dict[str, Any]) -> None:
    save_checkpoint({
        "meta": meta, "step": run.step, "train_time": run.train_time, "losses": run.losses,
        "step_times": run.step_times, "evals": run.evals, "rng": torch.get_rng_state(),
        "model": {n: p for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": opt.state_dict(),
    }, path)


def _restore(path: Path, model: nn.Module, opt, meta: dict[str, Any]) -> RunState:
    state = load_checkpoint(path)
    if state["meta"] != meta:
        from geopeft.errors import CheckpointError
        raise CheckpointError(f"the checkpoint in {str(path)!r} is of another run ({state['meta']}, "
                              f"this one is {meta}); resume with the same config, or start afresh")
    opt.load_state_dict(state["optimizer"])  # resizes adapters to the saved ranks first
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value)
    torch.set_rng_state(state["rng"])
    return RunState(state["step"], state["train_time"], state["losses"], state["step_times"], state["evals"])


def run_key(cfg, method: str, lr: float) -> str:
    """A digest of everything that decides a run's result: model, data, adaptation (this
    recipe's options only), training (not what only shapes the record: progress bar, thread
    count, eval and checkpoint intervals), method, lr."""
    import hashlib

    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    train = {k: v for k, v in c["train"].items() if k not in ("progress", "threads", "eval_every", "checkpoint_every")}
    adapt = dict(c["adapt"], method_options=c["adapt"]["method_options"].get(method, {}))
    blob = json.dumps([c["model"], c["data"], adapt, train, method, lr], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_run(cfg, method: str, data: dict[str, Encoded], out: Path | None, *, lr: float | None = None,
              resume: bool = False, checkpoint: bool = False,
              on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train `method` for train.steps; returns its metrics (also written to out/metrics.json).

    With `checkpoint`, a resumable state is written to out/checkpoint every
    train.checkpoint_every steps; `resume` continues from it and ends bitwise where an
    uninterrupted run ends. `on_step(step)` is called after each completed step."""
    from tqdm import tqdm

    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    lr = lr if lr is not None else resolve_lr(cfg, method)[0]
    num_labels = int(max(int(d.labels.max()) for d in data.values()) + 1)
    model, opt = build(cfg, method, num_labels, lr, data["train"])
    meta = {"method": method, "lr": lr, "steps": t.steps, "seed": t.seed}
    ckpt = out / "checkpoint" if out is not None else None
    run = _restore(ckpt, model, opt, meta) if resume and ckpt is not None else RunState()
    if not resume:
        torch.manual_seed(t.seed)  # dropout stream, after the model's own seeded init
    val, test = data["val"].head(cfg.data.max_eval), data["test"].head(cfg.data.max_eval)
    order = BatchOrder(len(data["train"]), t.batch_size, t.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    bar = tqdm(total=t.steps, initial=run.step, desc=f"{method:>8}", disable=not t.progress,
               dynamic_ncols=True, leave=True)
    ema = None
    for step in range(run.step, t.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, t.steps, t.warmup, t.schedule)
        start = time.perf_counter()
        inputs, labels = data["train"].batch(order(step))
        loss = nn.functional.cross_entropy(model(*inputs), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        elapsed = time.perf_counter() - start
        run.step, run.train_time = step + 1, run.train_time + elapsed
        run.losses.append(loss.item())
        run.step_times.append(elapsed)
        ema = run.losses[-1] if ema is None else 0.9 * ema + 0.1 * run.losses[-1]
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", step_ms=f"{1000 * elapsed:.0f}")
        if run.step % t.eval_every == 0 or run.step == t.steps:
            val_loss, val_acc, _ = evaluate(model, val)
            run.evals.append({"step": run.step, "time": run.train_time, "val_loss": val_loss,
                              "val_acc": val_acc, "ranks": measure.ranks(model)})
            bar.set_postfix(loss=f"{ema:.3f}", val_acc=f"{val_acc:.3f}")
        if checkpoint and ckpt is not None and (run.step % t.checkpoint_every == 0 or run.step == t.steps):
            _checkpoint(ckpt, model, opt, run, meta)
        if on_step is not None:
            on_step(run.step)
    bar.close()
    test_loss, test_acc, test_correct = evaluate(model, test)
    timed = run.step_times[3:] or run.step_times
    metrics = {
        "method": method, "lr": lr, "steps": t.steps, "seed": t.seed,
        "run_key": run_key(cfg, method, lr), "batches": order.digest(t.steps),
        "test_acc": test_acc, "test_loss": test_loss, "test_correct": test_correct,
        "val_acc": run.evals[-1]["val_acc"] if run.evals else None,
        "trainable_params": measure.trainable_params(model),
        "optimizer_state_bytes": measure.optimizer_state_bytes(opt),
        "violation": None if method == FULL else measure.invariant_violation(model),
        "step_time": statistics.median(timed) if timed else None,
        "train_time": run.train_time,
        "ranks": measure.ranks(model), "rank_adaptive": _rank_adaptive(model),
        "losses": run.losses, "step_times": run.step_times, "evals": run.evals,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if method == FULL:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
        else:
            geopeft.save(model, out / "adapter")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _rank_adaptive(model: nn.Module) -> bool:
    state = getattr(model, "geopeft_state", None)
    return state is not None and state.resolved.recipe.rank_controller != "fixed"
