"""The `geopeft train` and `geopeft compare` commands (core/cli.py imports this lazily)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from geopeft.errors import ConfigError

from .config import check_methods, load_config, to_yaml


def prepare(cfg):
    """The data set of cfg.data, encoded for cfg.model."""
    from .data import load_dataset
    from .models import encode

    d = cfg.data
    if cfg.model.path or d.path or cfg.task != "classification":  # being built: never ignore them
        raise ConfigError("model.path, data.path and task=causal_lm are not wired into the jobs yet")
    dataset = load_dataset(d.name, d.val_fraction, d.test_fraction, d.split_seed, d.image_size)
    print(dataset.summary())
    return encode(dataset, cfg.model)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train_run

    cfg = load_config(args.config, args.overrides)
    check_methods([cfg.method])
    out = Path(cfg.output_dir) / cfg.run
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    metrics = train_run(cfg, cfg.method, prepare(cfg), out, resume=args.resume, checkpoint=True)
    print(f"{cfg.method}: test accuracy {100 * metrics['test_acc']:.2f}%, val accuracy "
          f"{100 * metrics['val_acc']:.2f}% after {metrics['steps']} steps (lr {metrics['lr']:g})")
    print(f"wrote {out}/ (adapter/, config.yaml, metrics.json, checkpoint/)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    cfg = load_config(args.config, args.overrides)
    check_methods(list(cfg.methods))
    out = compare(cfg, prepare(cfg), lr_sweep=args.lr_sweep, reuse=args.reuse)
    print()
    print((out / "compare.md").read_text())
    files = ["compare.md", "compare.json", "compare.png"] + (
        ["compare_ranks.png"] if (out / "compare_ranks.png").exists() else [])
    print(f"wrote {', '.join(str(out / f) for f in files)}")
    summary = json.loads((out / "compare.json").read_text())["summary"]
    return 0 if summary else 1
