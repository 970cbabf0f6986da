"""One training run: a recipe (or full fine-tuning) on the encoded data — classification
(cross-entropy on the labels) or causal-LM SFT (next-token loss on the response tokens) — in
one process or several, with evaluation, progress bar, metrics, outputs and exact
resumption from a checkpoint."""

from __future__ import annotations

import inspect
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import geopeft

from . import dist, measure
from .checkpoint import load_checkpoint, save_checkpoint
from .models import Encoded, build_model, head_modules
from .sft import IGNORE, choice_correct, exact_match, logits_of, token_loss

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
def evaluate(model: nn.Module, data: Encoded, batch_size: int = 128,
             device: torch.device | None = None) -> tuple[float, float, list[int], list[int]]:
    """(mean cross-entropy, accuracy, 0/1 per example in `data`'s order, how many examples
    each class was predicted for) of a classifier on `data`, in eval mode. Text is batched
    shortest first, so that a batch trimmed to its longest example carries little padding
    (a third of the cost on short texts)."""
    was_training = model.training
    model.eval()
    order = torch.argsort(data.inputs[1].sum(1), stable=True) if data.text else torch.arange(len(data))
    loss_sum, correct = 0.0, torch.zeros(len(data), dtype=torch.int64)
    guesses = torch.zeros(len(data), dtype=torch.int64)
    for i in range(0, len(data), batch_size):
        idx = order[i:i + batch_size]
        inputs, labels = _to(data.batch(idx), device)
        logits = logits_of(model, inputs)
        loss_sum += float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        guess = logits.argmax(-1)
        correct[idx] = (guess == labels).long().cpu()
        guesses[idx] = guess.cpu()
    model.train(was_training)
    predicted = torch.bincount(guesses, minlength=logits.shape[-1]).tolist()
    return loss_sum / len(data), float(correct.sum()) / len(data), correct.tolist(), predicted


@torch.no_grad()
def evaluate_lm(model: nn.Module, data: Encoded, *, tokenizer=None, max_new_tokens: int = 32,
                batch_size: int = 16, device: torch.device | None = None) -> dict[str, Any]:
    """A causal LM on `data`: token-mean loss on the response tokens, perplexity exp(loss),
    and over the rows with an answer, 0/1 per row (`correct`) and their mean (`acc`): the
    right choice ranked first by log-likelihood (rows with choices), or a greedy generation
    equal to the answer (exact match); both None when no row has an answer."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        inputs, labels = _to(data.batch(torch.arange(i, min(i + batch_size, len(data)))), device)
        s, n = token_loss(logits_of(model, inputs), labels)
        loss_sum, count = loss_sum + float(s), count + n
    correct = None
    if data.scored is not None:
        sc = data.scored
        correct = [choice_correct(model, p, c, a, device) if c is not None else
                   exact_match(model, tokenizer, p, a, max_new_tokens, device)
                   for p, c, a in zip(sc.prompts, sc.choices, sc.answers)]
    model.train(was_training)
    loss = loss_sum / max(1, count)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "correct": correct,
            "acc": sum(correct) / len(correct) if correct else None}


def _to(batch, device):
    inputs, labels = batch
    if device is None or device.type == "cpu":
        return inputs, labels
    return tuple(t.to(device) for t in inputs), labels.to(device)


def scores(cfg, model: nn.Module, data: Encoded, tokenizer, device) -> dict[str, float | None]:
    """{"loss", "acc", "correct"} and "predicted" (examples per class) for a classifier, or
    "ppl" for causal_lm, of `model` on a held-out split."""
    if cfg.task == "causal_lm":
        return evaluate_lm(model, data, tokenizer=tokenizer, max_new_tokens=cfg.data.max_new_tokens,
                           device=device)
    loss, acc, correct, predicted = evaluate(model, data, device=device)
    return {"loss": loss, "acc": acc, "correct": correct, "predicted": predicted}


def batch_loss(cfg, model: nn.Module, batch, global_labels: torch.Tensor | None = None,
               world: int = 1) -> torch.Tensor:
    """The training loss of this process's share of a batch, scaled so that the processes'
    averaged gradients (DDP) are the gradient of the global batch's mean loss: per example
    (classification) or per response token (causal_lm). `global_labels`: the whole batch's."""
    inputs, labels = batch
    logits = logits_of(model, inputs)
    if cfg.task == "causal_lm":
        total, n = token_loss(logits, labels)
        if world > 1:
            n = int((global_labels[:, 1:] != IGNORE).sum())
        return total * world / max(1, n)
    if world == 1:
        return nn.functional.cross_entropy(logits.float(), labels)
    return nn.functional.cross_entropy(logits.float(), labels, reduction="sum") * world / len(global_labels)


_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def calibration_batches(cfg, train: Encoded) -> list[tuple[tuple, torch.Tensor]]:
    """The first adapt.init_batches batches of the training split, in file order: what a
    data-driven initializer (e.g. CG-LoRA's) sees. Drawing them uses no random state."""
    bs = min(cfg.train.batch_size, len(train))
    count = min(cfg.adapt.init_batches, len(train) // bs)
    return [train.batch(torch.arange(i * bs, (i + 1) * bs)) for i in range(count)]


def _calibration_loss_fn(cfg):
    def loss(model: nn.Module, batch) -> torch.Tensor:
        return batch_loss(cfg, model, batch)

    return loss


def trainable_modules(cfg, model: nn.Module) -> list[str]:
    """adapt.trainable, or (null) the model's classification head."""
    if cfg.adapt.trainable is not None:
        return list(cfg.adapt.trainable)
    return [] if cfg.task == "causal_lm" else head_modules(model)


def _gradient_checkpointing(model: nn.Module) -> None:
    for m in (model, getattr(model, "encoder", None)):
        if hasattr(m, "activation_checkpointing_enable"):  # transformers 5's name
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            return
        if hasattr(m, "gradient_checkpointing_enable"):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return
    from geopeft.errors import ConfigError
    raise ConfigError("train.gradient_checkpointing: this model has no activation / gradient "
                      "checkpointing (Hugging Face models have it)")


def build(cfg, method: str, num_labels: int, lr: float, train: Encoded | None = None,
          ctx: dist.Context | None = None, pad_token_id: int | None = None):
    """(model, trained module, optimizer) for `method` (a recipe name, or "full"), seeded by
    train.seed; `train` gives a data-driven initializer its calibration batches. The trained
    module is the model itself in one process, else its DDP / FSDP2 wrapper."""
    ctx = ctx or dist.Context()
    model = build_model(cfg.model, num_labels, cfg.train.seed, cfg.task, pad_token_id).to(ctx.device)
    if cfg.train.gradient_checkpointing:
        _gradient_checkpointing(model)
    kw: dict[str, Any] = {"lr": lr, "weight_decay": cfg.train.weight_decay}
    if cfg.train.optimizer == "sgd":
        kw["momentum"] = 0.9
    cls = _OPTIMIZERS[cfg.train.optimizer]
    if method == FULL:
        wrapped = dist.wrap(model, ctx, cfg.train.distributed)
        return model, wrapped, cls([p for p in wrapped.parameters() if p.requires_grad], **kw)
    alpha = cfg.adapt.alpha if cfg.adapt.alpha is not None else 2.0 * cfg.adapt.rank
    options = dict(cfg.adapt.method_options.get(method, {}))
    if component_takes(method, options, "rank_controller", "total_steps"):  # AdaLoRA's schedule spans the run
        options.setdefault("total_steps", cfg.train.steps)
    if not (cfg.train.progress and ctx.main) and component_takes(method, options, "initializer", "progress"):
        options.setdefault("progress", False)  # a calibration bar only where the training bar shows
    calib = calibration_batches(cfg, train) if train is not None else None
    if calib:
        calib = [_to(b, ctx.device) for b in calib]
    targets = list(cfg.adapt.targets) if cfg.adapt.targets is not None else None
    geopeft.adapt(model, method=method, targets=targets, rank=cfg.adapt.rank,
                  alpha=alpha, trainable=trainable_modules(cfg, model), init_batches=calib,
                  loss_fn=_calibration_loss_fn(cfg) if calib else None, **options)
    wrapped = dist.wrap(model, ctx, cfg.train.distributed)
    return model, wrapped, geopeft.optimizer(wrapped, cls, **kw)


def component_takes(method: str, options: dict[str, Any], kind: str, parameter: str) -> bool:
    """Whether the `kind` component ("rank_controller", "initializer") that recipe `method`
    uses (after `options`) takes `parameter`."""
    from geopeft.registry import get_registry

    reg = get_registry()
    name = options.get(kind, getattr(reg.get("method", method), kind))
    if not isinstance(name, str):
        return False
    return parameter in inspect.signature(reg.get(kind, name)).parameters


@dataclass
class RunState:
    """Everything a run accumulates; checkpointed with the model and optimizer."""

    step: int = 0
    train_time: float = 0.0
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


def _full_values(obj: Any) -> Any:
    """`obj` with every sharded DTensor gathered whole (a collective under FSDP2)."""
    from geopeft.kernels import full

    if isinstance(obj, torch.Tensor):
        return full(obj)
    if isinstance(obj, dict):
        return {k: _full_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_full_values(v) for v in obj)
    return obj


def _checkpoint(path: Path, model: nn.Module, opt, run: RunState, meta: dict[str, Any],
                ctx: dist.Context) -> None:
    """Rank 0 writes the state (the processes hold the same one: DDP replicas)."""
    if not ctx.main:
        return
    save_checkpoint({
        "meta": meta, "step": run.step, "train_time": run.train_time, "losses": run.losses,
        "step_times": run.step_times, "evals": run.evals, "rng": torch.get_rng_state(),
        "model": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
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


def _file_digest(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_key(cfg, method: str, lr: float) -> str:
    """A digest of everything that decides a run's result: task, model, data (the files'
    contents too), adaptation (this recipe's options only), training (not what only shapes
    the record or the memory: progress bar, thread count, eval and checkpoint intervals,
    gradient checkpointing, how processes share the model), method — the registered recipe's
    definition too, so a recipe whose components or options changed is trained again, but not
    its recommended lr, which only picks a run's lr — and the run's lr."""
    import hashlib

    from omegaconf import OmegaConf

    from geopeft.registry import get_registry

    c = OmegaConf.to_container(cfg, resolve=True)
    train = {k: v for k, v in c["train"].items()
             if k not in ("progress", "threads", "eval_every", "checkpoint_every", "gradient_checkpointing",
                          "distributed")}
    adapt = dict(c["adapt"], method_options=c["adapt"]["method_options"].get(method, {}))
    files = [_file_digest(c["data"][k]) for k in ("path", "val_path", "test_path") if c["data"][k]]
    recipe = None if method == FULL else {k: v for k, v in get_registry().get("method", method).to_dict().items()
                                           if k not in ("description", "lr")}
    blob = json.dumps([c["task"], c["model"], c["data"], files, adapt, train, method, recipe, lr],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def code_digest(method: str) -> str | None:
    """A digest of the source files that define `method`'s components (adapter, manifolds,
    gradient transforms, rank controller, initializer), recorded in metrics.json: `compare
    --reuse` warns when a run was trained by other code of them. None for full fine-tuning.
    What every recipe shares (core's step, layers, kernels; this job) is not in it: a change
    there is for the reader of the diff to judge, not a reason to doubt one recipe's runs."""
    if method == FULL:
        return None
    import hashlib

    from geopeft.registry import get_registry

    reg = get_registry()
    recipe = reg.get("method", method)
    adapter = reg.get("adapter", recipe.adapter)
    named = [("manifold", n) for n in {**adapter.default_manifolds, **recipe.manifolds}.values()]
    named += [("gradient_transform", n) for n in recipe.transforms]
    named += [("rank_controller", recipe.rank_controller), ("initializer", recipe.initializer)]
    sources = dict(_source_of(c) for c in [adapter, *(reg.get(k, n) for k, n in named)])
    h = hashlib.sha256()
    for where in sorted(sources):
        h.update(sources[where] + b"\0")
    return h.hexdigest()[:16]


def _source_of(component: Any) -> tuple[str, bytes]:
    """(path, file name and contents) of the module defining `component`; its qualified
    name twice where there is no file to read (a class defined at an interactive prompt)."""
    try:
        path = inspect.getsourcefile(component)
        if path:
            return path, Path(path).name.encode() + b"\0" + Path(path).read_bytes()
    except (TypeError, OSError):
        pass
    name = f"{component.__module__}.{component.__qualname__}"
    return name, name.encode()


def train_run(cfg, method: str, data, out: Path | None, *, lr: float | None = None,
              resume: bool = False, checkpoint: bool = False,
              on_step: Callable[[int], None] | None = None,
              ctx: dist.Context | None = None) -> dict[str, Any]:
    """Train `method` for train.steps; returns its metrics (also written to out/metrics.json,
    with the outputs of `outputs.write`).

    With `checkpoint`, a resumable state is written to out/checkpoint every
    train.checkpoint_every steps; `resume` continues from it and ends bitwise where an
    uninterrupted run ends. `on_step(step)` is called after each completed step. `ctx`: the
    processes (`dist.setup`); each takes its share of every global batch, rank 0 writes."""
    from tqdm import tqdm

    from . import outputs

    cpu_start = time.process_time()
    ctx = ctx or dist.Context()
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    lr = lr if lr is not None else resolve_lr(cfg, method)[0]
    code = code_digest(method)
    causal = cfg.task == "causal_lm"
    classes = getattr(data, "classes", ())
    num_labels = 0 if causal else len(classes) or int(max(int(d.labels.max()) for d in data.values()) + 1)
    tokenizer = getattr(data, "tokenizer", None)
    model, wrapped, opt = build(cfg, method, num_labels, lr, data["train"], ctx,
                                getattr(tokenizer, "pad_token_id", None))
    meta = {"method": method, "lr": lr, "steps": t.steps, "seed": t.seed}
    sharded = ctx.world > 1 and t.distributed == "fsdp2"
    ckpt = out / "checkpoint" if out is not None and not sharded else None
    if resume and sharded:
        from geopeft.errors import ConfigError
        raise ConfigError("--resume under train.distributed=fsdp2 is not supported: its checkpoint "
                          "would hold each process's shard; resume with train.distributed=ddp")
    run = _restore(ckpt, model, opt, meta) if resume and ckpt is not None else RunState()
    if not resume:
        torch.manual_seed(t.seed)  # dropout stream, after the model's own seeded init
    val, test = data["val"].head(cfg.data.max_eval), data["test"].head(cfg.data.max_eval)
    order = BatchOrder(len(data["train"]), t.batch_size, t.seed)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    model.train()
    bar = tqdm(total=t.steps, initial=run.step, desc=f"{method:>8}", disable=not (t.progress and ctx.main),
               dynamic_ncols=True, leave=True)
    ema = None
    watch = measure.RankGrowthWatch(model) if _rank_adaptive(model) else None
    for step in range(run.step, t.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, t.steps, t.warmup, t.schedule)
        start = time.perf_counter()
        idx = order(step)
        batch = _to(data["train"].batch(dist.share(idx, ctx)), ctx.device)
        whole = data["train"].labels[idx] if ctx.world > 1 else None
        loss = batch_loss(cfg, wrapped, batch, whole, ctx.world)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        value = loss.detach().float()
        if ctx.world > 1:  # the global batch's loss: the mean of the processes' scaled losses
            torch.distributed.all_reduce(value)
            value = value / ctx.world
        elapsed = time.perf_counter() - start
        run.step, run.train_time = step + 1, run.train_time + elapsed
        run.losses.append(value.item())
        run.step_times.append(elapsed)
        if watch is not None:
            watch.update(run.losses[-1], model)
        ema = run.losses[-1] if ema is None else 0.9 * ema + 0.1 * run.losses[-1]
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", step_ms=f"{1000 * elapsed:.0f}")
        if run.step % t.eval_every == 0 or run.step == t.steps:
            got = scores(cfg, model, val, tokenizer, ctx.device)
            run.evals.append({"step": run.step, "time": run.train_time, "val_loss": got["loss"],
                              "val_acc": got["acc"], "ranks": measure.ranks(model),
                              **({"val_predicted": got["predicted"]} if "predicted" in got else {})})
            bar.set_postfix(loss=f"{ema:.3f}", val_loss=f"{got['loss']:.3f}",
                            **({"val_acc": f"{got['acc']:.3f}"} if got["acc"] is not None else {}))
        if checkpoint and ckpt is not None and (run.step % t.checkpoint_every == 0 or run.step == t.steps):
            _checkpoint(ckpt, model, opt, run, meta, ctx)
        if on_step is not None:
            on_step(run.step)
    bar.close()
    fingerprint = dist.check_lockstep(model, ctx)
    got = scores(cfg, model, test, tokenizer, ctx.device)
    timed = run.step_times[3:] or run.step_times
    violation, off_by_design = (None, 0) if method == FULL else measure.invariant_violation(model)
    metrics = {
        "task": cfg.task, "method": method, "lr": lr, "steps": t.steps, "seed": t.seed,
        "run_key": run_key(cfg, method, lr), "code": code, "batches": order.digest(t.steps),
        "test_acc": got["acc"], "test_loss": got["loss"], "test_correct": got["correct"],
        "val_acc": run.evals[-1]["val_acc"] if run.evals else None,
        "val_loss": run.evals[-1]["val_loss"] if run.evals else None,
        **({"test_ppl": got["ppl"], "val_ppl": math.exp(min(run.evals[-1]["val_loss"], 700.0))
            if run.evals else None} if causal else {}),
        "processes": ctx.world, "fingerprint": fingerprint,
        "trainable_params": measure.trainable_params(model),
        "optimizer_state_bytes": measure.optimizer_state_bytes(opt),
        "violation": violation, "off_by_design": off_by_design,
        "step_time": statistics.median(timed) if timed else None,
        "train_time": run.train_time, "cpu_time": time.process_time() - cpu_start,
        "ranks": measure.ranks(model), "rank_adaptive": _rank_adaptive(model),
        "warning": "; ".join(m for m in (watch.message if watch is not None else None,
                                         measure.one_class_warning(run.evals, got.get("predicted"), classes))
                             if m) or None,
        "losses": run.losses, "step_times": run.step_times, "evals": run.evals,
    }
    if out is not None:
        outputs.write(cfg, method, model, metrics, out, ctx, tokenizer=tokenizer, classes=classes)
    ctx.barrier()
    return metrics


def _rank_adaptive(model: nn.Module) -> bool:
    state = getattr(model, "geopeft_state", None)
    return state is not None and state.resolved.recipe.rank_controller != "fixed"
