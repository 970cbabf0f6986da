"""`GeoTrainer`: HF `Trainer` for a geopeft-adapted model.

- The optimizer is `geopeft.optimizer` around the one `TrainingArguments` asks for
  (`optim`, `learning_rate`, Adam betas/eps, `weight_decay` with HF's no-decay groups
  for biases and norms); the LR scheduler is built on it as usual. Under gradient
  accumulation Trainer steps it once per optimizer step, so the geometry runs once per
  step, never per micro-batch.
- `save_model` and every checkpoint write a geopeft adapter directory (`geopeft.save`:
  adapters, ranks and `trainable` modules such as the classification head) instead of
  the full model, plus the tokenizer / processor and `training_args.json`.
- `resume_from_checkpoint` puts the adapters back (resized to the saved ranks first), and
  Trainer then restores the optimizer (geopeft's step count, ranks and transform state
  included), the scheduler and the RNG state: the run continues as if uninterrupted.
- A quantized base (a 4-bit / 8-bit model, QLoRA-style) trains as with PEFT: Trainer
  refuses a quantized model without PEFT adapters, so while it checks, the model says it
  has adapters (HF's `_hf_peft_config_loaded` flag, put back right after).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import geopeft
from geopeft.model import find_state
from geopeft.serialization import CONFIG, restore

from ._extras import require

transformers = require("transformers", "hf", "geopeft.integrations.transformers.GeoTrainer")


@contextmanager
def _adapters_declared(model: Any):
    """`model` declares adapters to Trainer's check against training a purely quantized
    model (which knows only PEFT's); the flag is put back as it was on exit."""
    if model is None or not getattr(model, "is_quantized", False):
        yield
        return
    own = model.__dict__
    had, before = "_hf_peft_config_loaded" in own, own.get("_hf_peft_config_loaded")
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if had:
            own["_hf_peft_config_loaded"] = before
        else:
            del own["_hf_peft_config_loaded"]


class GeoTrainer(transformers.Trainer):
    """`transformers.Trainer` that trains, saves and resumes geopeft adapters (see module doc)."""

    def __init__(self, model: Any = None, *args: Any, **kwargs: Any):
        if model is not None and find_state(model) is None:
            raise geopeft.GeopeftError("GeoTrainer trains a geopeft-adapted model: call "
                                       "geopeft.adapt(model, ...) before building the trainer")
        with _adapters_declared(model):
            super().__init__(model, *args, **kwargs)

    def create_optimizer(self, model: Any = None):
        model = self.model if model is None else model
        super().create_optimizer(model)  # HF's optimizer and param groups, from the arguments
        if not isinstance(self.optimizer, geopeft.GeometricOptimizer):
            self.optimizer = geopeft.optimizer(model, self.optimizer)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        geopeft.save(self.model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        (Path(output_dir) / "training_args.json").write_text(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not os.path.isfile(os.path.join(resume_from_checkpoint, CONFIG)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not os.path.isfile(os.path.join(best, CONFIG)):
            return super()._load_best_model()
        restore(self.model, best)
