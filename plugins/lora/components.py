"""LoRA's other parts: the flat manifold, the fixed rank controller, PEFT's init."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from geopeft import Initializer, Manifold, RankController

from .adapter import lora_init_


class EuclideanManifold(Manifold):
    """The flat space R^{n×p}: every geometric operation is the identity."""

    name = "euclidean"
    is_euclidean = True

    def project_tangent(self, x: Tensor, u: Tensor) -> Tensor:
        return u

    def egrad_to_rgrad(self, x: Tensor, g: Tensor) -> Tensor:
        return g

    def retract(self, x: Tensor, u: Tensor) -> Tensor:
        return x + u

    def transport(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return v

    def project(self, x: Tensor) -> Tensor:
        return x

    def violation(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[:-2])

    def random_point(self, shape: Sequence[int], generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)


class FixedRank(RankController):
    """Ranks never change."""

    name = "fixed"
    static = True

    def step(self, step, adapters, optimizer):
        return None


class LoRAInit(Initializer):
    """PEFT's LoRA init: A Kaiming-uniform, B = 0 (embeddings: A = 0, B normal), so ΔW = 0."""

    name = "lora"
    requires = frozenset({"A", "B"})

    def initialize(self, adapters, model=None, batches=None, loss_fn=None):
        for _, adapter in adapters:
            lora_init_(adapter)
