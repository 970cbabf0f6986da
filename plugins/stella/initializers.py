"""StelLA's initializers: U, V orthonormal and S = I; nothing is subtracted from W
(the paper's ablation: subtracting the initial adapter hurts, 84.2 vs 86.7)."""

from __future__ import annotations

import torch

from geopeft import Initializer
from geopeft.kernels import random_stiefel


def _set(adapter, u, v) -> None:
    adapter.U.copy_(u)
    adapter.V.copy_(v)
    adapter.S.copy_(torch.ones_like(adapter.S) if adapter.S.dim() == 1 else torch.eye(adapter.rank))


class OrthonormalInit(Initializer):
    """U, V random orthonormal (Haar), S = I."""

    name = "orthonormal"
    requires = frozenset({"U", "S", "V"})

    def initialize(self, adapters, model=None, batches=None, loss_fn=None):
        for _, a in adapters:
            (m, n), r = a.shape, a.rank
            _set(a, random_stiefel((m, r)), random_stiefel((n, r)))


class SVDInit(Initializer):
    """U, V the top-r (`major`) or bottom-r (`minor`) singular vectors of the base
    weight W (m, n), computed in fp32; S = I."""

    requires = frozenset({"U", "S", "V"})
    part = "major"

    def initialize(self, adapters, model=None, batches=None, loss_fn=None):
        for name, a in adapters:
            w = a.base_weight()
            if w.is_meta:
                raise ValueError(f"{self.name} initializer needs the base weight of {name!r}, "
                                 "which is on the meta device")
            u, _, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
            keep = slice(0, a.rank) if self.part == "major" else slice(u.shape[1] - a.rank, u.shape[1])
            _set(a, u[:, keep], vh[keep].mT)


class SVDMajorInit(SVDInit):
    name = "svd_major"
    part = "major"


class SVDMinorInit(SVDInit):
    name = "svd_minor"
    part = "minor"
