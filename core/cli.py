"""The `geopeft` command (also `python -m geopeft`)."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import GeopeftError
from .recipes import manifold_spec
from .registry import get_registry


def cmd_plugins(args: argparse.Namespace) -> int:
    """JSON: each plugin, its distribution and version, its components, its load error."""
    reg = get_registry()
    reg.components()  # run the hooks, so registration errors are recorded too
    report = [info.to_dict() for info in sorted(reg.plugins.values(), key=lambda i: i.name)]
    print(json.dumps(report, indent=2))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """One line per recipe, with its components."""
    reg = get_registry()
    for name in reg.names("method"):
        r = reg.get("method", name)
        adapter_cls = reg.get("adapter", r.adapter)
        manifolds = manifold_spec(adapter_cls, r.manifolds, None)  # as adapt() resolves them
        parts = [f"adapter={r.adapter}",
                 "manifolds=" + ",".join(f"({k}):{v}" if "," in k else f"{k}:{v}"
                                         for k, v in manifolds.items()),
                 f"transforms={','.join(r.transforms) or '-'}",
                 f"rank_controller={r.rank_controller}", f"initializer={r.initializer}"]
        if r.options:
            parts.append("options=" + ",".join(f"{k}={v}" for k, v in r.options.items()))
        line = f"{name:<12} {' '.join(parts)}"
        print(f"{line}  # {r.description}" if r.description else line)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    """JSON: geopeft, torch and Python versions, and which kernel path (torch / Triton) each op takes."""
    import platform

    import torch

    from geopeft import __version__
    from geopeft.kernels import kernel_report

    print(json.dumps({"geopeft": __version__, "torch": torch.__version__,
                      "python": platform.python_version(), "kernels": kernel_report()}, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A saved geopeft adapter directory → a PEFT LoRA directory."""
    from .export import export_saved

    out = export_saved(args.src, args.dst, adapter_name=args.adapter_name)
    print(f"wrote PEFT adapter to {out}")
    return 0


def _job(name: str):
    """The `train` / `compare` command, imported when it runs (omegaconf, transformers, tqdm
    and matplotlib are imported by geopeft.jobs only)."""
    def run(args: argparse.Namespace) -> int:
        from .jobs import cli

        return getattr(cli, f"cmd_{name}")(args)
    return run


def _add_job_parsers(sub) -> None:
    train = sub.add_parser("train", help="fine-tune one recipe from a config (resumable)")
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 method=stella")
    train.add_argument("--resume", action="store_true", help="continue from <output_dir>/<run>/checkpoint")
    train.set_defaults(func=_job("train"))
    comp = sub.add_parser("compare", help="several recipes and full fine-tuning, one budget, one or more seeds")
    comp.add_argument("config", help="YAML config (see configs/)")
    comp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. methods=[lora,stella]")
    comp.add_argument("--lr-sweep", action="store_true",
                      help="try sweep.factors x each recipe's lr, keep the best by validation accuracy")
    comp.add_argument("--reuse", action="store_true",
                      help="take a run from its metrics.json when model, data, training, method "
                           "(its registered recipe too) and lr match")
    comp.set_defaults(func=_job("compare"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geopeft", description="Geometry-aware low-rank fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="the loaded plugins and their components, as JSON").set_defaults(
        func=cmd_plugins)
    sub.add_parser("methods", help="the registered method recipes").set_defaults(func=cmd_methods)
    sub.add_parser("env", help="versions and the active kernel paths (GEOPEFT_KERNELS), as JSON"
                   ).set_defaults(func=cmd_env)
    export = sub.add_parser("export", help="a saved geopeft adapter to a PEFT LoRA directory")
    export.add_argument("src", help="directory written by geopeft.save")
    export.add_argument("dst", help="PEFT directory to write")
    export.add_argument("--adapter-name", default=None,
                        help="convert only this adapter of a directory holding several (default: all, "
                             "in PEFT's layout)")
    export.set_defaults(func=cmd_export)
    _add_job_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after a flag (`compare cfg.yaml --lr-sweep train.steps=9`)
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except GeopeftError as exc:
        print(f"geopeft {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
