"""The main job under two processes (torchrun, gloo, CPU), beyond what `make test` runs:
every recipe and full fine-tuning under DDP and under FSDP2, and `--resume` under DDP,
on the tiny random Llama and the JSONL the tests build (tests/tiny_hf.py).

Each launch fails when the processes end with different trainable parameters (the job
checks it); the script also checks that every run of a launch has `processes == 2`, and that
a run interrupted at step 3 and resumed with `--resume` ends bitwise where the
uninterrupted run ends (adapter and loss curve). Prints one line per check, exits 1 on any
failure.

    .venv/bin/python benchmarks/jobs_processes.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

RECIPES = "lora,stella,lorapro,balora,geolora,cglora"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# the interrupted run: a run stopped (exit 0) after step 3, its checkpoint at step 2
CUT = """
import sys
from pathlib import Path
from geopeft.jobs import dist
from geopeft.jobs.cli import prepare
from geopeft.jobs.config import load_config
from geopeft.jobs.train import train_run
cfg = load_config(sys.argv[1], sys.argv[2:])
data = prepare(cfg)
ctx = dist.setup(cfg)
def stop(step):
    if step == 3:
        raise SystemExit(0)
train_run(cfg, cfg.method, data, Path(cfg.output_dir) / cfg.run, checkpoint=True, on_step=stop, ctx=ctx)
"""


def launch(args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(TORCHRUN + args, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])


def main() -> int:
    import torch
    from safetensors.torch import load_file

    from tiny_hf import license_sentences, sft_rows, tiny_llama, write_jsonl

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    a = parser.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        gpl = license_sentences("GPL-3", 48)
        llama = tiny_llama(d / "llama", gpl + license_sentences("Apache-2.0", 48) + ["complete"])
        jsonl = write_jsonl(d / "train.jsonl", sft_rows(gpl))
        config = HERE.parent / "configs" / "examples" / "causal_lm_sft.yaml"
        common = [f"model.path={llama}", "model.dtype=float32", "model.max_length=24", f"data.path={jsonl}",
                  f"train.steps={a.steps}", "train.batch_size=8", "train.eval_every=5", "train.progress=false",
                  "train.checkpoint_every=2", "data.max_eval=8", "data.max_new_tokens=4"]
        for how in ("ddp", "fsdp2"):
            out = d / how
            try:
                launch(["-m", "geopeft", "compare", str(config), *common, f"methods=[{RECIPES}]", "full=true",
                        f"train.distributed={how}", f"output_dir={out}"])
                runs = json.loads((out / "causal_lm_sft" / "compare.json").read_text())["runs"]
                ok = all(r["processes"] == 2 for r in runs) and len(runs) == 7
                print(f"{how}: {', '.join(r['method'] for r in runs)}: processes bitwise equal: {ok}")
            except RuntimeError as exc:
                ok = False
                print(f"{how}: FAILED\n{exc}")
            failed += not ok
        run = [*common, "method=geolora", f"output_dir={d / 'resume'}"]
        launch(["-m", "geopeft", "train", str(config), *run, "run=whole"])
        (d / "cut.py").write_text(CUT)
        launch([str(d / "cut.py"), str(config), *run, "run=cut"])
        launch(["-m", "geopeft", "train", str(config), *run, "run=cut", "--resume"])
        w, c = (d / "resume" / r for r in ("whole", "cut"))
        x, y = (load_file(p / "adapter" / "adapter.safetensors") for p in (w, c))
        same = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        same &= json.loads((w / "metrics.json").read_text())["losses"] == json.loads(
            (c / "metrics.json").read_text())["losses"]
        print(f"ddp --resume (geolora, cut after step 3): bitwise the uninterrupted run: {same}")
        failed += not same
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
