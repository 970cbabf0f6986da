"""AdaLoRA's orthogonality regulariser as a gradient transform (for U, V left Euclidean)."""

from __future__ import annotations

import torch

from geopeft import GradientTransform
from geopeft.kernels import stack_fp32


class OrthogonalityPenalty(GradientTransform):
    """Adds the gradient of w·R, R = (1/N)·Σ ‖XᵀX − I‖_F over the N = 2·layers bases X ∈ {U, V}
    — PEFT AdaLoRA's `orth_reg_weight` term, ‖AAᵀ − I‖_F + ‖BᵀB − I‖_F averaged over its A
    and B matrices — without touching the loss: ∂‖XᵀX − I‖_F/∂X = 2X(XᵀX − I)/‖XᵀX − I‖_F.
    Batched over same-shape adapters. With U and V on `stiefel` the term is ~0 (they are
    exactly orthonormal); it is for `manifold={"U": "euclidean", "V": "euclidean"}`."""

    name = "orth_reg"
    requires = frozenset({"U", "V"})

    def __init__(self, orth_reg_weight: float = 0.5):
        if not orth_reg_weight >= 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {orth_reg_weight!r}")
        self.weight = float(orth_reg_weight)
        self._matrices = 2

    def check_optimizer(self, optimizer, adapters):
        self._matrices = 2 * max(1, len(adapters))

    def transform(self, adapter, grads, state):
        return self.transform_group([adapter], [grads], [state])[0]

    def transform_group(self, adapters, grads, states):
        out = [dict(g) for g in grads]
        for name in ("U", "V"):
            x = stack_fp32([getattr(a, name) for a in adapters])
            gram = x.mT @ x
            gap = gram - torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
            norm = torch.linalg.matrix_norm(gap).clamp_min(1e-12)[:, None, None]
            extra = (2 * self.weight / self._matrices) * (x @ gap) / norm
            for i, g in enumerate(out):
                g[name] = g[name] + extra[i].to(g[name].dtype)
        return out

    def options(self):
        return {"orth_reg_weight": self.weight}
