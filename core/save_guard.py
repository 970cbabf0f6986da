"""An adapted model's own `save_pretrained` (Hugging Face's) refuses, naming the fix.

HF's `save_pretrained` writes the model's `state_dict()`: an adapted layer's weight is
under `<layer>.base_layer.weight`, next to the adapter's factors, keys `from_pretrained`
does not read, so it would re-initialise those layers at random without a word. While a
model carries adapters (`adapt`, `load`), its `save_pretrained` is shadowed by one that
raises; `unload` removes it, after which `save_pretrained` writes the fine-tuned model.
Duck-typed: core never imports transformers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import GeopeftError

ATTR = "save_pretrained"


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise GeopeftError(
        "this model carries geopeft adapters: save_pretrained would write its adapted layers as "
        "'<layer>.base_layer.weight' plus adapter factors, keys from_pretrained does not read (it "
        "would re-initialise those layers at random). Save the adapters with geopeft.save(model, dir) "
        "(geopeft.load(base_model, dir) restores them; geopeft.export_peft writes a PEFT adapter), or "
        "make a plain fine-tuned model with geopeft.unload(model) and then call save_pretrained. "
        "Under transformers.Trainer, use geopeft.integrations.transformers.GeoTrainer, which saves "
        "geopeft checkpoints")


_refuse.geopeft_guard = True  # type: ignore[attr-defined]


def guard_save_pretrained(model: nn.Module) -> None:
    """Shadow `model.save_pretrained`, if its class has one, by `_refuse`."""
    if callable(getattr(type(model), ATTR, None)) and ATTR not in model.__dict__:
        model.__dict__[ATTR] = _refuse


def release_save_pretrained(model: nn.Module) -> None:
    """Undo `guard_save_pretrained`: the class's own `save_pretrained` again."""
    if getattr(model.__dict__.get(ATTR), "geopeft_guard", False):
        del model.__dict__[ATTR]
