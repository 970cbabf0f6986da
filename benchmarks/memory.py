"""Optimizer-state memory: LoRA, LoRA-Pro (efficient and full mode) and full fine-tuning.

What it measures: the bytes of optimizer state that training keeps between steps -
the sum of `numel * element_size` over every tensor in the inner optimizer's `state`
(Adam's moments and step counters, SGD's buffers) plus every tensor in geopeft's
transform state (LoRA-Pro full mode's m x n moments) - for the pretrained
all-MiniLM-L6-v2 encoder with the same 36 target layers as benchmarks/step_time.py
(every nn.Linear of the encoder, not the pooler), rank 8, alpha 16:

- lora:              geopeft LoRA + torch.optim.AdamW (the baseline);
- lorapro-efficient: geopeft LoRA-Pro, mode "efficient" + torch.optim.AdamW;
- lorapro-full:      geopeft LoRA-Pro, mode "full" + torch.optim.SGD (its own Adam in full space);
- full-ft:           full fine-tuning of the same 36 layers' weight matrices (biases and
                     all other parameters frozen) + torch.optim.AdamW.

How: each method is built in turn, takes a few training steps (optimizers create their
state lazily, at the first step) on a small fixed batch, and its state is counted; the
script prints one row per method with the ratio to LoRA and to full fine-tuning.
State is what it is at any step count: these numbers are exact, not timings.

    .venv/bin/python benchmarks/memory.py
    .venv/bin/python benchmarks/memory.py --rank 16 --json memory.json
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import re  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
from report import environment, write_report  # noqa: E402
from step_time import EXPECTED_LAYERS, LR, TARGETS, load_minilm, loss_of, make_batch  # noqa: E402
from torch import nn  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import geopeft  # noqa: E402
from geopeft.jobs.measure import tensor_bytes  # noqa: E402

BASELINE = "lora"


def _geopeft(method: str, optimizer_cls, **options) -> Callable[[argparse.Namespace], tuple]:
    def build(args):
        model = geopeft.adapt(load_minilm(), method=method, targets=TARGETS, rank=args.rank,
                              alpha=2 * args.rank, dropout=0.0, **options)
        assert len(geopeft.adapters(model)) == EXPECTED_LAYERS
        return model, geopeft.optimizer(model, optimizer_cls, lr=LR)
    return build


def build_full_ft(args):
    """AdamW over the weight matrices of the same 36 layers; everything else frozen."""
    model = load_minilm()
    model.requires_grad_(False)
    weights = [m.weight for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and re.fullmatch(TARGETS, name)]
    assert len(weights) == EXPECTED_LAYERS
    for w in weights:
        w.requires_grad_(True)
    return model, torch.optim.AdamW(weights, lr=LR)


METHODS: dict[str, Callable[[argparse.Namespace], tuple]] = {
    "lora": _geopeft("lora", torch.optim.AdamW),
    "lorapro-efficient": _geopeft("lorapro", torch.optim.AdamW),
    "lorapro-full": _geopeft("lorapro", torch.optim.SGD, mode="full"),
    "full-ft": build_full_ft,
}


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    inner = optimizer.optimizer if isinstance(optimizer, geopeft.GeometricOptimizer) else optimizer
    transform = tensor_bytes(getattr(optimizer, "transform_states", {}))
    opt = tensor_bytes(dict(inner.state))
    return {"optimizer_state_bytes": opt, "transform_state_bytes": transform, "total_bytes": opt + transform}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    parser.add_argument("--steps", type=int, default=2, help="training steps before counting")
    parser.add_argument("--batch", type=int, default=2, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    results = {}
    for name, build in METHODS.items():
        torch.manual_seed(0)
        model, optimizer = build(args)
        batch = make_batch(model.config.vocab_size, args.batch, args.seq)
        for _ in range(args.steps):
            loss_of(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        results[name] = {**state_bytes(optimizer), "trainable_params": trainable}
        del model, optimizer
    base, full = results[BASELINE]["total_bytes"], results["full-ft"]["total_bytes"]
    for r in results.values():
        r["ratio_to_lora"] = r["total_bytes"] / base
        r["ratio_to_full_ft"] = r["total_bytes"] / full
    print(f"MiniLM (all-MiniLM-L6-v2), {EXPECTED_LAYERS} encoder Linear layers, rank {args.rank}, "
          f"alpha {2 * args.rank}; optimizer state after {args.steps} steps")
    header = (f"{'method':<18} {'optimizer MiB':>13} {'transform MiB':>13} {'total MiB':>10} "
              f"{'vs lora':>8} {'vs full-ft':>10} {'trainable':>11}")
    print(header)
    print("-" * len(header))
    mib = 2.0 ** 20
    for name, r in results.items():
        print(f"{name:<18} {r['optimizer_state_bytes'] / mib:13.2f} {r['transform_state_bytes'] / mib:13.2f} "
              f"{r['total_bytes'] / mib:10.2f} {r['ratio_to_lora']:8.2f} {r['ratio_to_full_ft']:10.3f} "
              f"{r['trainable_params']:11,}")
    print("state = tensors in the optimizer's state + geopeft transform state (LoRA-Pro full mode's "
          "m x n moments); bytes are exact")
    report = {"benchmark": "memory", "baseline": BASELINE, "config": vars(args),
              "environment": environment(),
              "results": results}
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
