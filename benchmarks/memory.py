"""Training memory: optimizer state of LoRA, LoRA-Pro and full fine-tuning; and a 4-bit
(QLoRA-style) base against the bf16 one, with step time against PEFT's LoRA on it.

Part `state` — what it measures: the bytes of optimizer state that training keeps between steps -
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

Part `qlora` — a Llama-architecture causal LM (random weights saved once in bf16 to a
temporary directory: hidden 1024, MLP 2816, vocabulary 2048, 8 layers for memory and 2
for step time by default), LoRA rank 8 on every attention and MLP projection (q, k, v, o,
gate, up, down):

- peak training memory: `bf16` (the model loaded in bfloat16) and `nf4` (loaded with
  `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_compute_dtype=torch.bfloat16)`, the QLoRA setup), each in a fresh process:
  the peak resident set size during `--steps` geopeft LoRA + AdamW steps minus the
  resident set size before the model was loaded (so weights, adapters, optimizer
  state, activations and gradients; the load's transient buffers are returned to the
  OS with malloc_trim before the steps). glibc's mmap threshold is fixed at 64 KiB in
  those processes (MALLOC_MMAP_THRESHOLD_), so a freed large block (the 4-bit layer's
  dequantised weight, one per call) leaves the RSS at once, as it leaves a GPU
  allocator's count: the RSS is memory in use, not what malloc keeps cached. The ratio
  nf4 / bf16 is the figure (goal ≤ 0.40).
- step time: geopeft LoRA and PEFT's LoRA (`get_peft_model`, same rank, alpha, targets)
  on two copies of the same nf4 model (float32 compute and non-quantized weights: on a
  CPU without a bfloat16 matrix unit bf16 products are emulated and would bury both
  contenders' own work) in one process, one step of each in turn for
  `--rounds` rounds (a shared, loaded machine: paired in time); the median of the per-round
  ratios geopeft / PEFT is the figure (goal ≤ 1.00).

    .venv/bin/python benchmarks/memory.py
    .venv/bin/python benchmarks/memory.py --part qlora --json qlora.json
    .venv/bin/python benchmarks/memory.py --part state --rank 16 --json memory.json
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import ctypes.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
from init_cost import PeakRSS, rss  # noqa: E402
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
    parser.add_argument("--part", choices=("state", "qlora", "all"), default="all")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    parser.add_argument("--steps", type=int, default=2, help="training steps before counting")
    parser.add_argument("--batch", type=int, default=2, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--hidden", type=int, default=1024, help="qlora: hidden size")
    parser.add_argument("--layers", type=int, default=8, help="qlora: decoder layers (memory)")
    parser.add_argument("--time-layers", type=int, default=2, help="qlora: decoder layers (step time)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="qlora: paired step-time rounds (0: memory only, no step time)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: one memory contender
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- qlora
QLORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_llama(args, directory: str, layers: int) -> None:
    """A random Llama (seed 0) saved in bf16: the base both contenders load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)


def load_llama(directory: str, four_bit: bool, compute: torch.dtype = torch.bfloat16):
    """The saved model in bf16, or in nf4 computing in `compute`; every float tensor copied out
    of the file's memory map, so that both hold their weights in anonymous memory (a
    mapped page counts in RSS only once touched, which would blur the comparison)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=compute) if four_bit else None
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=compute if four_bit else torch.bfloat16,
                                                 quantization_config=quantization)
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            t.data = t.data.clone()
    return model


def lm_step(model, optimizer, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS is what is in use."""
    name = ctypes.util.find_library("c")
    if name and hasattr(ctypes.CDLL(name), "malloc_trim"):
        ctypes.CDLL(name).malloc_trim(0)


def measure_training_memory(args) -> dict:
    """In this fresh process: peak RSS of geopeft LoRA training on the bf16 or nf4 base
    above the RSS before the model was loaded."""
    import bitsandbytes  # noqa: F401  (imported before the baseline: its code is not the model's)

    _malloc_trim()
    before = rss()
    model = load_llama(args.model_dir, args.only == "nf4")
    geopeft.adapt(model, "lora", targets=QLORA_TARGETS, rank=args.rank, alpha=2 * args.rank)
    optimizer = geopeft.optimizer(model, torch.optim.AdamW, lr=LR)
    ids = make_batch(2048, args.batch, args.seq)["input_ids"]
    _malloc_trim()
    with PeakRSS() as mem:
        for _ in range(args.steps):
            lm_step(model, optimizer, ids)
    return {"peak_mib": (mem.peak - before) / 2**20, "weights_mib": base_bytes(model) / 2**20}


def base_bytes(model) -> int:
    """Bytes of the base model's parameters and buffers, a 4-bit weight's scales included."""
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if ".adapter." in name:
            continue
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values()
                         if isinstance(v, torch.Tensor))
    return total


def paired_step_time(args) -> dict:
    """geopeft LoRA vs PEFT LoRA on two copies of the nf4 model, one step each per round
    (float32 compute: this CPU has no bfloat16 matrix unit, and emulated bf16 products
    would bury both contenders' own work)."""
    import peft

    ours = load_llama(args.model_dir, True, torch.float32)
    geopeft.adapt(ours, "lora", targets=QLORA_TARGETS, rank=args.rank, alpha=2 * args.rank)
    theirs = peft.get_peft_model(load_llama(args.model_dir, True, torch.float32), peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=QLORA_TARGETS, lora_dropout=0.0))
    contenders = {"geopeft": (ours, geopeft.optimizer(ours, torch.optim.AdamW, lr=LR)),
                  "peft": (theirs, torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad],
                                                     lr=LR))}
    ids = make_batch(2048, args.batch, args.seq)["input_ids"]
    for model, optimizer in contenders.values():
        lm_step(model, optimizer, ids)  # warm-up: optimizer state, lazy kernels
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.rounds):
        for name in (list(contenders) if r % 2 == 0 else list(contenders)[::-1]):
            model, optimizer = contenders[name]
            start = time.perf_counter()
            lm_step(model, optimizer, ids)
            times[name].append(time.perf_counter() - start)
    ratios = [g / p for g, p in zip(times["geopeft"], times["peft"])]
    return {"geopeft_step_s": times["geopeft"], "peft_step_s": times["peft"],
            "ratio_median": statistics.median(ratios)}


def qlora(args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    with tempfile.TemporaryDirectory() as directory:
        save_llama(args, directory, args.layers)
        common = ["--rank", str(args.rank), "--steps", str(args.steps), "--batch", str(args.batch),
                  "--seq", str(args.seq), "--model-dir", directory]
        memory = {}
        for name in ("bf16", "nf4"):
            done = subprocess.run([sys.executable, __file__, "--only", name, *common],
                                  capture_output=True, text=True, check=True, env=env)
            memory[name] = json.loads(done.stdout.splitlines()[-1])
    timing = None
    if args.rounds > 0:
        with tempfile.TemporaryDirectory() as directory:
            save_llama(args, directory, args.time_layers)
            args.model_dir = directory
            timing = paired_step_time(args)
    ratio = memory["nf4"]["peak_mib"] / memory["bf16"]["peak_mib"]
    print(f"\nLlama hidden {args.hidden}, LoRA rank {args.rank} on {', '.join(QLORA_TARGETS)}; "
          f"batch {args.batch} x {args.seq} tokens; CPU; {args.layers} layers:")
    print(f"{'base':<6} {'weights MiB':>11} {'peak training MiB':>18} {'vs bf16':>8}")
    for name, m in memory.items():
        print(f"{name:<6} {m['weights_mib']:11.1f} {m['peak_mib']:18.1f} "
              f"{m['peak_mib'] / memory['bf16']['peak_mib']:8.2f}")
    if timing is None:
        print("step time: not measured (--rounds 0)")
    else:
        g, p = (statistics.median(timing[k]) for k in ("geopeft_step_s", "peft_step_s"))
        print(f"step time on the nf4 base ({args.time_layers} layers, float32 compute): geopeft LoRA {g * 1e3:.0f} ms, PEFT LoRA {p * 1e3:.0f} ms "
              f"(medians of {args.rounds}); median paired ratio geopeft / PEFT {timing['ratio_median']:.2f}")
    print("GPU: not measured")
    return {"memory": memory, "memory_ratio_nf4_to_bf16": ratio, "step_time": timing}


def main(argv=None) -> dict:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    if args.only:
        print(json.dumps(measure_training_memory(args)))
        return {}
    report = {"benchmark": "memory", "baseline": BASELINE, "config": vars(args),
              "environment": environment()}
    if args.part in ("state", "all"):
        report["results"] = optimizer_state(args)
    if args.part in ("qlora", "all"):
        report["qlora"] = qlora(args)
    write_report(report, args.json)
    return report


def optimizer_state(args) -> dict:
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
    return results


if __name__ == "__main__":
    main()
