"""Small models shared by the tests."""

from __future__ import annotations

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
