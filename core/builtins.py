"""The components core itself provides, so core works with no plugin installed:
the flat manifold `euclidean`, the rank controller `fixed` and the default
initializer `lora`. The registry registers this module as the plugin "core",
whatever `GEOPEFT_PLUGINS` says."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .hookspecs import hookimpl
from .interfaces import Adapter, Initializer, Manifold, RankController


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


def lora_init_(adapter: Adapter) -> None:
    """PEFT's LoRA init of an (A (r, n), B (m, r)) adapter: A Kaiming-uniform (a=√5), B zero;
    for embeddings A zero, B normal. Either way ΔW = 0."""
    with torch.no_grad():
        if adapter.ops.kind == "embedding":
            nn.init.zeros_(adapter.A)
            nn.init.normal_(adapter.B)
        else:
            nn.init.kaiming_uniform_(adapter.A, a=math.sqrt(5))
            nn.init.zeros_(adapter.B)


class LoRAInit(Initializer):
    """PEFT's LoRA init (`lora_init_`) on every adapter, so ΔW = 0 at the start."""

    name = "lora"
    requires = frozenset({"A", "B"})

    def initialize(self, adapters, model=None, batches=None, loss_fn=None):
        for _, adapter in adapters:
            lora_init_(adapter)


@hookimpl
def register_manifolds(register):
    register("euclidean", EuclideanManifold)


@hookimpl
def register_rank_controllers(register):
    register("fixed", FixedRank)


@hookimpl
def register_initializers(register):
    register("lora", LoRAInit)
