"""HF transformers: target presets by `config.model_type`, and `GeoTrainer`.

The presets (PEFT's defaults for each architecture, so a PEFT user gets the same
modules) are registered through the `geopeft` entry point and matched by
`config.model_type` alone: importing this module does not import transformers.
`GeoTrainer` (a `transformers.Trainer` that builds `geopeft.optimizer` and saves
geopeft adapter directories) is imported on first use.
"""

from __future__ import annotations

from typing import Any

from geopeft import TargetPreset

from ._plugin import preset_hook

#: (preset name, HF model types, targets)
_FAMILIES = [
    ("bert", ("bert", "roberta", "xlm-roberta", "electra", "camembert"), ("query", "value")),
    ("deberta-v2", ("deberta-v2",), ("query_proj", "value_proj")),
    ("distilbert", ("distilbert",), ("q_lin", "v_lin")),
    ("gpt2", ("gpt2",), ("c_attn",)),
    ("llama", ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "bart", "opt"),
     ("q_proj", "v_proj")),
    ("t5", ("t5", "mt5"), ("q", "v")),
    ("vit", ("vit",), ("q_proj", "v_proj")),
]

PRESETS = [TargetPreset(name=name, targets=targets, model_types=types,
                        description=f"HF {'/'.join(types)}: {', '.join(targets)}")
           for name, types, targets in _FAMILIES]

register_target_presets = preset_hook(PRESETS)


def __getattr__(name: str) -> Any:
    if name == "GeoTrainer":
        from .hf_trainer import GeoTrainer

        return GeoTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
