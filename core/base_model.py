"""What a Hugging Face base model is, read off the model (duck-typed: core never imports
transformers): where it came from (`config._name_or_path`) and its PEFT task type, from
its class name. `save` records both in geopeft.json and `export_peft` writes them to
adapter_config.json, so `peft.AutoPeftModelFor...` can rebuild the model from the export."""

from __future__ import annotations

from typing import Any

from torch import nn

#: HF head class suffix → PEFT TaskType value
_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
          ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
          ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"))


def describe(model: nn.Module) -> dict[str, str | None]:
    """{"name_or_path": the model's `config._name_or_path` (None if empty or absent),
    "task_type": PEFT's task for its class (None for a model that is not an HF one)}."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None)
    return {"name_or_path": name if isinstance(name, str) and name else None,
            "task_type": task_type(model, config)}


def task_type(model: nn.Module, config: Any) -> str | None:
    """CAUSAL_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS, SEQ_2_SEQ_LM (…ForConditionalGeneration
    of an encoder-decoder; a decoder-only one is CAUSAL_LM), FEATURE_EXTRACTION (a bare
    …Model), or None."""
    if config is None or not callable(getattr(model, "save_pretrained", None)):
        return None
    cls = type(model).__name__
    for suffix, task in _TASKS:
        if cls.endswith(suffix):
            return task
    if cls.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM" if getattr(config, "is_encoder_decoder", False) else "CAUSAL_LM"
    return "FEATURE_EXTRACTION" if cls.endswith("Model") else None
