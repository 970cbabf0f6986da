"""Keep a compare's runs in the repository: copy every metrics.json under SRC to the same
place under DST (benchmarks/runs/<name>/), as compact JSON without the per-example
validation predictions (only the run's own class-prior check reads them, at training time).

`geopeft compare ... output_dir=benchmarks/runs run=<name> --reuse` then takes every archived
run instead of training it (same run key: task, model, data files, training settings, recipe,
lr) and writes the tables of docs/benchmarks.md in seconds; a run trained by other code of its
recipe's components is kept with a warning. Runs trained on different machines sit side by
side: each is a real run, not bitwise the run another BLAS build would give.

    python benchmarks/archive_runs.py /work/runs/rt benchmarks/runs/rotten_tomatoes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def archived(metrics: dict) -> dict:
    """`metrics` without what reuse never reads: the evaluations' per-example predictions."""
    evals = [{k: v for k, v in e.items() if k != "val_predicted"} for e in metrics.get("evals", [])]
    return {**metrics, "evals": evals}


def archive(src: Path, dst: Path) -> list[Path]:
    """Copy each finished run (a metrics.json with test results) under `src` to `dst`."""
    written = []
    for path in sorted(src.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        if "run_key" not in metrics or "test_correct" not in metrics:
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(archived(metrics), separators=(",", ":")) + "\n")
        written.append(target)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="a compare's directory (output_dir/run)")
    ap.add_argument("dst", type=Path, help="where to keep its runs, e.g. benchmarks/runs/rotten_tomatoes")
    args = ap.parse_args()
    written = archive(args.src, args.dst)
    print(f"{len(written)} runs kept under {args.dst} "
          f"({sum(p.stat().st_size for p in written) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
