"""What a run writes to `<output_dir>/<run>/` (rank 0 only): `adapter/` (geopeft.save),
`peft/` (a PEFT LoRA directory that `peft.AutoPeftModelFor...` loads by itself: geopeft's
export names the base model path and the task type), `merged/` (`export.merged`: the fine-tuned model with the
adapters merged, and its tokenizer, `save_pretrained`), `metrics.json` and README.md (a
short model card). Full fine-tuning writes `model/` (a path model, `save_pretrained`) or
`model.safetensors` instead of the adapter directories."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import geopeft
from geopeft.export import export_saved

from . import dist

AUTO_CLASS = {"causal_lm": "AutoPeftModelForCausalLM", "classification": "AutoPeftModelForSequenceClassification"}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers, whole, on the CPU (sharded ones gathered: under FSDP2 every
    process calls it; its state_dict hooks are not used — they fail on CPU-gathered shards)."""
    from geopeft.kernels import full

    named = list(model.named_parameters())
    for prefix, module in model.named_modules():
        named += [(f"{prefix}.{n}" if prefix else n, b) for n, b in module.named_buffers(recurse=False)
                  if n not in module._non_persistent_buffers_set]
    return {k: full(v).detach().cpu().contiguous() for k, v in named}


def export_merged(cfg, adapter: Path, dst: Path, num_labels: int, tokenizer) -> Path:
    """The base from model.path with the saved adapters merged into its weights, as a plain
    HF model directory (+ tokenizer): geopeft.load then geopeft.unload(merge=True)."""
    from .models import build_hf_model

    base = build_hf_model(cfg.model, cfg.task, num_labels, getattr(tokenizer, "pad_token_id", None))
    merged = geopeft.unload(geopeft.load(base, adapter), merge=True)
    merged.config.use_cache = True
    merged.save_pretrained(dst)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    return dst


def write(cfg, method: str, model: nn.Module, metrics: dict[str, Any], out: Path, ctx: dist.Context,
          *, tokenizer=None, classes=()) -> None:
    from .train import FULL

    sharded = ctx.world > 1 and cfg.train.distributed == "fsdp2"
    if method == FULL:
        state = _state(model) if sharded or ctx.main else None
        if ctx.main:
            out.mkdir(parents=True, exist_ok=True)
            if cfg.model.path:
                model.save_pretrained(out / "model", state_dict=state)
                if tokenizer is not None:
                    tokenizer.save_pretrained(out / "model")
            else:
                save_file(state, str(out / "model.safetensors"))
    elif sharded and not ctx.main:  # saving gathers the sharded factors: every process takes part
        with tempfile.TemporaryDirectory() as scratch:
            geopeft.save(model, Path(scratch) / "adapter")
    elif ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        geopeft.save(model, out / "adapter")
        if cfg.model.path and cfg.export.peft:
            export_saved(out / "adapter", out / "peft")  # names the base model and task itself
        if cfg.model.path and cfg.export.merged:
            export_merged(cfg, out / "adapter", out / "merged", len(classes), tokenizer)
    if ctx.main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (out / "README.md").write_text(model_card(cfg, method, metrics, out, classes))


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def model_card(cfg, method: str, m: dict[str, Any], out: Path, classes=()) -> str:
    """A short README: base model, data files, recipe and training, metrics, how to load."""
    from .train import FULL

    model = cfg.model.path or cfg.model.kind + (f":{cfg.model.name}" if cfg.model.name else "")
    data = cfg.data.path or cfg.data.name
    files = [f"- training data: `{data}`"] + [f"- {what} data: `{cfg.data[k]}`" for what, k in
                                               (("validation", "val_path"), ("test", "test_path"))
                                               if cfg.data[k]]
    lines = [f"# {cfg.run}: {method} on {Path(str(model)).name}", "",
             f"- task: {cfg.task}" + (f" ({len(classes)} classes: {', '.join(classes[:10])})" if classes else ""),
             f"- base model: `{model}` ({cfg.model.dtype})", *files,
             f"- recipe: `{method}`" + ("" if method == FULL else
                                        f", rank {cfg.adapt.rank}, targets "
                                        f"{', '.join(cfg.adapt.targets) if cfg.adapt.targets else 'the model family preset'}"),
             f"- training: {m['steps']} steps of {cfg.train.batch_size} examples, {cfg.train.optimizer} "
             f"at lr {m['lr']:g} ({cfg.train.schedule}), seed {m['seed']}, {m['processes']} process(es)",
             "", "| metric | validation | test |", "| --- | ---: | ---: |",
             f"| loss | {m['val_loss']:.4f} | {m['test_loss']:.4f} |" if m.get("val_loss") is not None
             else f"| loss | — | {m['test_loss']:.4f} |"]
    if cfg.task == "causal_lm":
        lines.append(f"| perplexity | {m['val_ppl']:.3f} | {m['test_ppl']:.3f} |")
    if m["test_acc"] is not None:
        what = "accuracy" if cfg.task == "classification" else "accuracy (choices) / exact match"
        lines.append(f"| {what} | {_pct(m['val_acc'])} | {_pct(m['test_acc'])} |")
    lines += ["", "geopeft's own adapter: `geopeft.load(base_model, 'adapter')`."]
    if method != FULL and cfg.model.path and cfg.export.peft:
        extra = f", num_labels={len(classes)}" if cfg.task == "classification" else ""
        lines += ["", "With PEFT (the base model is read from `model.path`):", "", "```python",
                  f"from peft import {AUTO_CLASS[cfg.task]}",
                  f"model = {AUTO_CLASS[cfg.task]}.from_pretrained({str(out / 'peft')!r}{extra})",
                  "```"]
    if method != FULL and cfg.model.path and cfg.export.merged:
        lines += ["", "`merged/` is the fine-tuned model on its own (`from_pretrained('merged')`)."]
    return "\n".join(lines) + "\n"
