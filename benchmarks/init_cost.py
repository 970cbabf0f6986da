"""Cost of the data-aware initializers: wall time and peak memory of `cg`, `lora_ga` and
`pissa` (and of PEFT's own LoRA-GA) on MiniLM against 8 LoRA training steps on the same
batches.

Setup: the pretrained all-MiniLM-L6-v2 encoder with a linear head (mean pooling, 2
classes), LoRA rank 8 / alpha 16 on the 36 linear layers of the encoder (query, key,
value, dense), 8 calibration batches of 16 rotten_tomatoes training snippets padded to
128 tokens (`geopeft.jobs.data`). Contenders, alternated round by round:

- `8 steps`:  8 training steps of geopeft LoRA + AdamW on the 8 batches (the baseline);
- `cg`, `lora_ga`, `pissa`: the `geopeft.adapt(...)` call that builds and initialises the
  adapters (calibration included for cg and lora_ga), on a fresh copy of the model;
- `cg sketch`, `cg diagonal`: `cg` with `dense_limit=1024`, so that the 1536-wide sides
  keep a rank-256 Nyström sketch (`sketch_size=256`) or only the diagonal of their moment;
- `peft lora_ga`: PEFT's LoRA-GA on the same model and batches, `preprocess_loraga` (its
  gradient estimation: the forward/backward of the batches with weight gradients on the
  target layers) then `get_peft_model` (the SVDs and the base offset) — the route LoRA-GA's
  authors ship, i.e. what the CG-LoRA paper's cost comparison is against.

Each contender runs in a fresh process (so one's freed memory does not hide another's
peak), after the model and batches are loaded. Time: median over rounds of the wall
time. Memory: the peak resident set size during the contender minus the resident set
size just before it (a 2 ms sampling thread reading /proc/self/statm; includes the
allocator's caching), median over rounds.

    .venv/bin/python benchmarks/init_cost.py --rounds 3 --json init_cost.json
    .venv/bin/python benchmarks/init_cost.py --rounds 1 --first-round 1   # one round, reversed order
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from report import environment, write_report  # noqa: E402

import geopeft  # noqa: E402

TARGETS = r"encoder\.encoder\..*\.(query|key|value|dense)"  # the 36 encoder linears (not the unused pooler)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak resident set size above the value at entry, sampled every 2 ms."""

    def __enter__(self):
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def bytes(self) -> int:
        return self.peak - self.start


def classification_batches(n_batches: int, batch: int, seq: int, seed: int = 0):
    """`n_batches` batches of ((input_ids, attention_mask), labels) from rotten_tomatoes' train
    split, padded to `seq` tokens."""
    from geopeft.jobs.data import load_dataset
    from geopeft.jobs.models import build_tokenizer

    train = load_dataset("rotten_tomatoes").train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    tok = build_tokenizer(None)
    out = []
    for i in range(n_batches):
        idx = order[i * batch:(i + 1) * batch].tolist()
        enc = tok([train.inputs[j] for j in idx], padding="max_length", truncation=True,
                  max_length=seq, return_tensors="pt")
        out.append(((enc["input_ids"], enc["attention_mask"]),
                    torch.as_tensor(train.labels[idx], dtype=torch.long)))
    return out


def text_classifier(seed: int = 0):
    from transformers import AutoModel

    from geopeft.jobs.models import TextClassifier, minilm_path

    torch.manual_seed(seed)
    return TextClassifier(AutoModel.from_pretrained(minilm_path()), 2)


def ce_loss(model, batch):
    (ids, mask), labels = batch
    return F.cross_entropy(model(ids, mask), labels)


def contenders(base, batches, rank: int) -> dict[str, Callable[[], None]]:
    common = {"targets": TARGETS, "rank": rank, "alpha": 2 * rank, "trainable": ["classifier"]}

    def steps():
        model = geopeft.adapt(copy.deepcopy(base), "lora", **common)
        opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-4)
        return lambda: _train(model, opt, batches)

    def init(method, **options):
        def make():
            model = copy.deepcopy(base)
            return lambda: geopeft.adapt(model, method, init_batches=batches, loss_fn=ce_loss, **common, **options)
        return make

    def peft_lora_ga():
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraGAConfig, preprocess_loraga

        model = copy.deepcopy(base)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, modules_to_save=["classifier"],
                            init_lora_weights="lora_ga",
                            lora_ga_config=LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16))

        def train_step():  # PEFT's protocol: the user's forward/backward over the calibration batches
            for batch in batches:
                ce_loss(model, batch).backward()

        def run():
            preprocess_loraga(model, config, train_step)  # attaches the estimated gradients to the layers
            get_peft_model(model, config)                 # SVDs, factors, base offset

        return run

    return {"8 steps": steps, "cg": init("cglora"),
            "cg sketch": init("cglora", dense_limit=1024, sketch_size=256),
            "cg diagonal": init("cglora", dense_limit=1024, sketch_size=0),
            "lora_ga": init("lora-ga"), "pissa": init("pissa"), "peft lora_ga": peft_lora_ga}


def _train(model, opt, batches):
    model.train()
    for batch in batches:
        opt.zero_grad()
        ce_loss(model, batch).backward()
        opt.step()


def measure(name: str, args) -> dict:
    """One contender in this (fresh) process: wall time and peak RSS above the start."""
    base = text_classifier()
    batches = classification_batches(args.batches, args.batch, args.seq)
    run = contenders(base, batches, args.rank)[name]()  # building the model copy is not timed
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        run()
        elapsed = time.perf_counter() - t0
    return {"time_s": elapsed, "peak_mib": mem.bytes / 2**20}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--first-round", type=int, default=0,
                        help="index of the first round (sets the order: even rounds forwards)")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one contender
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.only:
        print("RESULT " + json.dumps(measure(args.only, args)))
        return {}
    names = ["8 steps", "cg", "cg sketch", "cg diagonal", "lora_ga", "peft lora_ga", "pissa"]
    runs: dict[str, list[dict]] = {k: [] for k in names}
    passthrough = ["--rank", str(args.rank), "--batch", str(args.batch), "--seq", str(args.seq),
                   "--batches", str(args.batches)]
    for r in range(args.first_round, args.first_round + args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):  # alternate the order
            done = subprocess.run([sys.executable, __file__, "--only", name, *passthrough],
                                  capture_output=True, text=True, check=True)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
            runs[name].append(json.loads(line.removeprefix("RESULT ")))
    base_t = statistics.median(x["time_s"] for x in runs["8 steps"])
    base_m = statistics.median(x["peak_mib"] for x in runs["8 steps"])
    results = {}
    print(f"{'contender':13s} {'time s':>8s} {'x 8 steps':>10s} {'peak MiB':>9s} {'x 8 steps':>10s}")
    for name in names:
        t = statistics.median(x["time_s"] for x in runs[name])
        m = statistics.median(x["peak_mib"] for x in runs[name])
        results[name] = {"time_s": t, "time_ratio_to_8_steps": t / base_t, "peak_mib": m,
                         "peak_ratio_to_8_steps": m / base_m, "runs": runs[name]}
        print(f"{name:13s} {t:8.2f} {t / base_t:10.2f} {m:9.0f} {m / base_m:10.2f}")
    report = {"benchmark": "init_cost", "args": vars(args), "environment": environment(),
              "results": results}
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
