"""Small models shared by the tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class TinyNet(nn.Module):
    """Linear, Conv2d and Embedding layers with names like a transformer's."""

    def __init__(self, vocab: int = 50, dim: int = 16, hidden: int = 24, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.classifier = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.value(torch.tanh(self.query(h)))
        h = h + self.ffn(h)
        return self.classifier(h.mean(1))


def train(model: nn.Module, opt: torch.optim.Optimizer, loss: Callable[[nn.Module, int], torch.Tensor],
          steps: int, start: int = 0) -> list[float]:
    """`steps` optimizer steps on `loss(model, i)` for i = start, …, start + steps − 1
    (backward, step, zero_grad); returns the loss values."""
    values = []
    for i in range(start, start + steps):
        value = loss(model, i)
        value.backward()
        opt.step()
        opt.zero_grad()
        values.append(value.item())
    return values


def tiny_batch(seed: int, n: int = 8) -> torch.Tensor:
    """Token ids (n, 6) for TinyNet."""
    return torch.randint(0, 50, (n, 6), generator=torch.Generator().manual_seed(seed))


def tiny_regression(n: int = 8, classes: int = 3) -> Callable[[nn.Module, int], torch.Tensor]:
    """A fixed TinyNet batch regressed onto a fixed random target (the same at every step)."""
    ids = tiny_batch(0, n)
    target = torch.randn(n, classes, generator=torch.Generator().manual_seed(1))
    return lambda model, i: (model(ids) - target).pow(2).mean()


def mse(x: torch.Tensor, y: torch.Tensor) -> Callable[[nn.Module, int], torch.Tensor]:
    """Full-batch MSE of model(x) against y, the same at every step."""
    return lambda model, i: nn.functional.mse_loss(model(x), y)


def requires_grad_map(model: nn.Module) -> dict[str, bool]:
    """{parameter name: requires_grad}: what `adapt`/`load` froze or unfroze."""
    return {n: p.requires_grad for n, p in model.named_parameters()}


def module_types(model: nn.Module) -> dict[str, type]:
    """{module name: type}: whether a failed call left the model's structure untouched."""
    return {n: type(m) for n, m in model.named_modules()}


def factor_layouts(model: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{layer.factor: (shape, strides)} of every adapter factor: a resumed or reloaded model
    computes bitwise like the trained one only if these are equal (BLAS may round a
    transposed operand differently)."""
    import geopeft

    return {f"{n}.{f}": (tuple(p.shape), p.stride()) for n, a in geopeft.adapters(model)
            for f, p in a.factors().items()}


def minilm_classifier(encoder: nn.Module, blocks: int, seed: int) -> nn.Module:
    """A copy of the MiniLM `encoder` cut to its first `blocks` blocks, under a mean-pooled
    2-class linear head seeded by `seed` (`geopeft.jobs.models.TextClassifier`)."""
    import copy

    from geopeft.jobs.models import TextClassifier

    torch.manual_seed(seed)
    model = TextClassifier(copy.deepcopy(encoder), 2)
    model.encoder.encoder.layer = model.encoder.encoder.layer[:blocks]
    return model


def text_ce(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy of a text classifier on a ((input_ids, attention_mask), labels) batch."""
    (ids, mask), labels = batch
    return nn.functional.cross_entropy(model(ids, mask), labels)


def train_text(model: nn.Module, opt: torch.optim.Optimizer, batches, val) -> list[float]:
    """The mean held-out loss on `val` before training, then after one optimizer step on each
    batch of `batches` (train mode while training, eval mode to measure): [start, end]."""
    def held_out() -> float:
        model.eval()
        with torch.no_grad():
            loss = sum(float(text_ce(model, b)) for b in val) / len(val)
        model.train()
        return loss

    start = held_out()
    for batch in batches:
        opt.zero_grad()
        text_ce(model, batch).backward()
        opt.step()
    return [start, held_out()]
