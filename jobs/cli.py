"""The `geopeft train` and `geopeft compare` commands (core/cli.py imports this lazily)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import check_methods, load_config, to_yaml


def prepare(cfg):
    """The data of cfg.data (the user's files, or a built-in data set), encoded for cfg.model;
    every row checked before any training."""
    from .data import load_classification_files, load_dataset
    from .models import encode, encode_causal

    d = cfg.data
    if cfg.task == "causal_lm":
        data = encode_causal(cfg)
        _print(f"{Path(d.path).name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} "
              f"test {'rows of packed tokens' if d.packing else 'examples'}")
        return data
    if d.path:
        dataset = load_classification_files(d)
    else:
        dataset = load_dataset(d.name, d.val_fraction, d.test_fraction, d.split_seed, d.image_size)
    _print(dataset.summary())
    return encode(dataset, cfg.model)


def _print(*args) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        print(*args)


def cmd_train(args: argparse.Namespace) -> int:
    from . import dist
    from .train import train_run

    cfg = load_config(args.config, args.overrides)
    check_methods([cfg.method])
    data = prepare(cfg)
    ctx = dist.setup(cfg)
    out = Path(cfg.output_dir) / cfg.run
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    m = train_run(cfg, cfg.method, data, out, resume=args.resume, checkpoint=True, ctx=ctx)
    if ctx.main:
        print(f"{cfg.method}: {summary_line(m)} after {m['steps']} steps (lr {m['lr']:g}"
              f"{f', {ctx.world} processes' if ctx.world > 1 else ''})")
        written = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
        print(f"wrote {out}/ ({', '.join(written)})")
    return 0


def summary_line(m: dict) -> str:
    """Test (val) accuracy, and loss / perplexity for a causal LM."""
    parts = []
    if m.get("test_acc") is not None:
        val = f" (val {100 * m['val_acc']:.2f}%)" if m.get("val_acc") is not None else ""
        parts.append(f"test accuracy {100 * m['test_acc']:.2f}%{val}")
    if m.get("test_ppl") is not None:
        parts.append(f"test loss {m['test_loss']:.4f}, perplexity {m['test_ppl']:.3f}")
    return ", ".join(parts)


def cmd_compare(args: argparse.Namespace) -> int:
    from . import dist
    from .compare import compare

    cfg = load_config(args.config, args.overrides)
    check_methods(list(cfg.methods))
    data = prepare(cfg)
    ctx = dist.setup(cfg)
    out = compare(cfg, data, lr_sweep=args.lr_sweep, reuse=args.reuse, ctx=ctx)
    ctx.barrier()
    if not ctx.main:
        return 0
    print()
    print((out / "compare.md").read_text())
    files = ["compare.md", "compare.json", "compare.png"] + (
        ["compare_ranks.png"] if (out / "compare_ranks.png").exists() else [])
    print(f"wrote {', '.join(str(out / f) for f in files)}")
    summary = json.loads((out / "compare.json").read_text())["summary"]
    return 0 if summary else 1
