"""Causal-LM supervised fine-tuning data: rows → token ids with the loss on the response
only, and the held-out scores (token loss, perplexity, choice accuracy, exact match).

A row is `prompt` + `response` (the response is appended to the prompt as is, then EOS), or
`messages` (a chat: [{role, content}, ...], rendered with the tokenizer's chat template; the
loss is on the assistant turns). Optional `choices` (a list of strings) and `answer` (a
choice's index or text) make a multiple-choice row, scored by ranking each choice's
log-likelihood after the prompt; `answer` alone is scored by exact match of a greedy
generation. Without `response`, the answer (the right choice) is the training target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from geopeft.errors import ConfigError, DataError

from .files import column, has_column, where

ROLES = ("prompt", "response", "messages", "choices", "answer")
IGNORE = -100  # label of a token the loss skips (prompt, padding)

# a chat template for tokenizers without one: "role: content" lines, EOS after each assistant turn
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}")


@dataclass
class Example:
    """One row: `prompt` + `response`, or `messages`; `choices` / `answer` for scoring;
    `source` is 'file: row N' for messages."""

    source: str
    prompt: str = ""
    response: str | None = None
    messages: list[dict[str, str]] | None = None
    choices: list[str] | None = None
    answer: int | str | None = None


def _messages(value: Any, at: str, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{at}: column {name!r} (messages) must be a non-empty list of "
                        f"{{role, content}} objects, got {type(value).__name__}")
    for k, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{at}: column {name!r} (messages) item {k} is not a {{role, content}} "
                            f"object of strings: {m!r:.80}")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{at}: column {name!r} (messages) item {k} has role {m['role']!r}; "
                            "roles: system, user, assistant")
    if not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{at}: column {name!r} (messages) has no assistant turn to train on")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_rows(rows: list[dict[str, Any]], path: str, names: dict[str, str]) -> list[Example]:
    """The file's rows as Examples, every field checked (DataError: file, row, column)."""
    if has_column(rows, names["messages"]):
        values = column(rows, path, "messages", names["messages"], kind=list)
        return [Example(where(path, i), messages=_messages(v, where(path, i), names["messages"]))
                for i, v in enumerate(values)]
    prompts = column(rows, path, "prompt", names["prompt"])
    choices = column(rows, path, "choices", names["choices"], kind=list, required=False)
    answers = column(rows, path, "answer", names["answer"], kind=(int, str), required=False)
    if not has_column(rows, names["response"]) and not has_column(rows, names["answer"]):
        column(rows, path, "response", names["response"])  # raises: no such column, those found
    responses = column(rows, path, "response", names["response"], required=False)
    out = []
    for i, (p, r, c, a) in enumerate(zip(prompts, responses, choices, answers)):
        at = where(path, i)
        if c is not None:
            if len(c) < 2 or not all(isinstance(x, str) and x for x in c):
                raise DataError(f"{at}: column {names['choices']!r} (choices) must list at least two "
                                f"non-empty strings, got {c!r:.80}")
            if a is None:
                raise DataError(f"{at}: column {names['answer']!r} (answer) is missing: a row with "
                                "choices needs the right one (its index or its text)")
            if isinstance(a, str) and a not in c or isinstance(a, int) and not 0 <= a < len(c):
                raise DataError(f"{at}: column {names['answer']!r} (answer) is {a!r}, neither an "
                                f"index (0..{len(c) - 1}) nor the text of one of the choices")
            a = c.index(a) if isinstance(a, str) else a
        elif a is not None and not isinstance(a, str):
            raise DataError(f"{at}: column {names['answer']!r} (answer) is {a!r}: without choices "
                            "an answer is the text to generate")
        if r is None:
            if a is None:
                raise DataError(f"{at}: column {names['response']!r} (response) is missing or null")
            r = c[a] if c is not None else a
        out.append(Example(at, prompt=p, response=r, choices=c, answer=a))
    return out


def prepare_tokenizer(tokenizer) -> None:
    """Right padding with a pad token (EOS when the tokenizer has none); a chat template."""
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {tokenizer.name_or_path!r} has no EOS token: causal_lm "
                          "appends it to every response so the model learns to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def _chat_tokens(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """(ids, labels) of a chat: the template's text, labels on the assistant turns' tokens."""
    if not tokenizer.is_fast:
        raise ConfigError("messages need a fast tokenizer (tokenizer.json) to find the assistant "
                          "turns' tokens")
    msgs = ex.messages

    def render(upto: int, gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs[:upto], tokenize=False, add_generation_prompt=gen)

    text = render(len(msgs), False)
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start, end = len(render(k, True)) if k else 0, len(render(k + 1, False))
        if not text.startswith(render(k + 1, False)) or (k and not render(k + 1, False).startswith(render(k, True))):
            raise DataError(f"{ex.source}: the chat template does not render this conversation "
                            "turn by turn (each prefix a prefix of the whole); cannot find the "
                            "assistant's tokens")
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(s <= a < e for s, e in spans) else IGNORE
              for t, (a, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def tokenize(tokenizer, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) truncated to max_length; labels are IGNORE on prompt tokens."""
    if ex.messages is not None:
        ids, labels = _chat_tokens(tokenizer, ex)
    else:
        p = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"] if ex.prompt else []
        if not p and tokenizer.bos_token_id is not None:
            p = [tokenizer.bos_token_id]
        r = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, labels = p + r, [IGNORE] * len(p) + r
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE for t in labels[1:]):
        raise DataError(f"{ex.source}: no response token is left within model.max_length="
                        f"{max_length} tokens (the prompt takes {len(ids)}); raise model.max_length "
                        "or shorten the prompt")
    return ids, labels


@dataclass
class Scored:
    """What a held-out split is scored on besides its loss: per example, the prompt ids and
    either the choices' ids and the answer index, or the answer text."""

    prompts: list[list[int]] = field(default_factory=list)
    choices: list[list[list[int]] | None] = field(default_factory=list)
    answers: list[int | str] = field(default_factory=list)


def scored(tokenizer, examples: list[Example], max_length: int) -> Scored | None:
    """The examples with an answer (all or none: a split is scored one way)."""
    with_answer = [ex for ex in examples if ex.answer is not None and ex.messages is None]
    if not with_answer:
        return None
    out = Scored()
    for ex in with_answer:
        p = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"] if ex.prompt else [tokenizer.bos_token_id]
        out.prompts.append(p[-max_length:])
        out.choices.append(None if ex.choices is None else
                           [tokenizer(c, add_special_tokens=False)["input_ids"] for c in ex.choices])
        out.answers.append(ex.answer)
    return out


def pad(seqs: list[list[int]], value: int, length: int | None = None) -> Tensor:
    length = length or max(map(len, seqs))
    return torch.tensor([s + [value] * (length - len(s)) for s in seqs], dtype=torch.long)


def pack(seqs: list[tuple[list[int], list[int]]], length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Concatenate the examples in order and cut the stream into rows of `length` tokens
    (the last row may be shorter); each token keeps its label."""
    ids = [t for s, _ in seqs for t in s]
    labels = [t for _, s in seqs for t in s]
    return ([ids[i:i + length] for i in range(0, len(ids), length)],
            [labels[i:i + length] for i in range(0, len(labels), length)])


def token_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """(sum of next-token cross-entropies over labelled positions, their count)."""
    target = labels[:, 1:]
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(),
                                       ignore_index=IGNORE, reduction="sum")
    return loss, int((target != IGNORE).sum())


def logits_of(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    out = model(*inputs)
    return getattr(out, "logits", out)


@torch.no_grad()
def choice_scores(model: nn.Module, prompt: list[int], choices: list[list[int]], device) -> list[float]:
    """Each choice's summed log-likelihood after the prompt (one right-padded batch: causal
    attention keeps padding out of the earlier positions)."""
    seqs = [prompt + c for c in choices]
    ids = pad(seqs, 0).to(device)
    mask = pad([[1] * len(q) for q in seqs], 0).to(device)
    logp = torch.log_softmax(logits_of(model, (ids, mask)).float(), -1)
    n = len(prompt)
    return [float(logp[j, n - 1:n + len(c) - 1].gather(-1, ids[j, n:n + len(c), None]).sum())
            for j, c in enumerate(choices)]


def choice_correct(model: nn.Module, prompt: list[int], choices: list[list[int]], answer: int,
                   device) -> int:
    """1 when the answer has the highest summed log-likelihood of the choices."""
    scores = choice_scores(model, prompt, choices, device)
    return int(max(range(len(scores)), key=scores.__getitem__) == answer)


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer, prompt: list[int], answer: str, max_new_tokens: int,
                device) -> int:
    """1 when the greedy generation (up to EOS or max_new_tokens), stripped, equals the answer."""
    ids = torch.tensor([prompt], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, use_cache=True)
    return int(tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip() == str(answer).strip())
