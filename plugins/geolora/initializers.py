"""GeoLoRA's start: U, V random orthonormal, S = 0, so ΔW = 0 at step 0."""

from __future__ import annotations

from geopeft import Initializer
from geopeft.kernels import random_stiefel


class ZeroCoreInit(Initializer):
    """U, V Haar-random orthonormal (sign-fixed QR of Gaussians), S = 0: ΔW = s·U S Vᵀ = 0,
    as a LoRA starts (the GeoLoRA and AdaLoRA papers' initialisation)."""

    name = "zero_core"
    requires = frozenset({"U", "S", "V"})

    def initialize(self, adapters, model=None, batches=None, loss_fn=None):
        for _, a in adapters:
            (m, n), r = a.shape, a.rank
            a.U.copy_(random_stiefel((m, r)))
            a.V.copy_(random_stiefel((n, r)))
            a.S.zero_()
