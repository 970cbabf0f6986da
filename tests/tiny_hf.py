"""Tiny Hugging Face model directories and data files for the job tests, built offline: a
word-level tokenizer trained on licence texts every Debian system ships, a random 2-layer
Llama (causal LM) and BERT (sequence classification) saved with it, a JSONL of
prompt/response rows (some with choices) and a CSV of text/label rows."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")


def license_sentences(name: str, n: int, words: int = 10) -> list[str]:
    """`n` lower-case word runs of `words` words from the licence text `name`."""
    tokens = re.findall(r"[a-z]+", (LICENSES / name).read_text(encoding="utf-8").lower())
    return [" ".join(tokens[i:i + words]) for i in range(0, words * n, words)]


def word_tokenizer(texts: list[str], specials: dict[str, str], template: str | None):
    """A fast word-level tokenizer over `texts`' words; `template` (e.g. '<s> $A') adds
    special tokens around a sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(specials.values())))
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, tok.token_to_id(t)) for t in specials.values()
                                             if t in template])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def tiny_llama(path: Path, texts: list[str]) -> Path:
    """A random 2-layer Llama and its tokenizer (BOS added, no pad token) saved to `path`."""
    import torch
    import transformers as tf

    tok = word_tokenizer(texts, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}, "<s> $A")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_bert(path: Path, texts: list[str], num_labels: int = 2) -> Path:
    """A random 2-layer BERT for sequence classification and its tokenizer saved to `path`."""
    import torch
    import transformers as tf

    tok = word_tokenizer(texts, {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                                 "sep_token": "[SEP]"}, "[CLS] $A [SEP]")
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=128, num_labels=num_labels,
        pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sft_rows(sentences: list[str], choices_every: int = 4) -> list[dict]:
    """prompt / response rows (complete a sentence's last 3 words); every `choices_every`-th
    row also has 3 choices and the answer's index, the row after it an answer to generate
    (exact match) instead of a response."""
    rows = []
    for i, s in enumerate(sentences):
        words = s.split()
        row = {"prompt": "complete " + " ".join(words[:-3]), "response": " ".join(words[-3:])}
        if i % choices_every == 0:
            others = [" ".join(sentences[(i + k) % len(sentences)].split()[-3:]) for k in (1, 2)]
            row["choices"] = [others[0], row["response"], others[1]]
            row["answer"] = 1
        elif i % choices_every == 1:
            row["answer"] = row.pop("response")
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path
