"""The `riemannian_precond` gradient transform: Riemannian preconditioned LoRA / scaled GD
(F. Zhang, M. Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation
Models", ICML 2024, arXiv 2402.02347).

    g_A ← (BᵀB + reg·I)⁻¹ g_A,    g_B ← g_B (AAᵀ + reg·I)⁻¹

r×r preconditioners, formed in fp32 (at least) and inverted with a pseudo-inverse, batched
over same-shape adapters: the same update as PEFT's `create_riemannian_optimizer`.
"""

from __future__ import annotations

import torch

from geopeft import GradientTransform
from geopeft.kernels import full


class RiemannianPrecond(GradientTransform):
    """Scaled gradient descent on LoRA factors (Zhang & Pilanci, ICML 2024); `reg` damps the
    r×r matrices (PEFT's default 1e-2)."""

    name = "riemannian_precond"
    requires = frozenset({"A", "B"})
    exclusive = "gram_preconditioner"  # not to be chained with lorapro or scaled_gd

    def __init__(self, reg: float = 1e-2):
        if not float(reg) >= 0:
            raise ValueError(f"reg must be >= 0, got {reg!r}")
        self.reg = float(reg)

    def transform(self, adapter, grads, state):
        return self.transform_group([adapter], [grads], [state])[0]

    def transform_group(self, adapters, grads, states):
        dtype = torch.promote_types(adapters[0].A.dtype, torch.float32)
        a = torch.stack([full(ad.A).detach().to(dtype) for ad in adapters])  # (G, r, n)
        b = torch.stack([full(ad.B).detach().to(dtype) for ad in adapters])  # (G, m, r)
        ga = torch.stack([g["A"].to(dtype) for g in grads])
        gb = torch.stack([g["B"].to(dtype) for g in grads])
        eye = self.reg * torch.eye(a.shape[1], dtype=dtype, device=a.device)
        new_a = torch.linalg.pinv(b.mT @ b + eye) @ ga
        new_b = gb @ torch.linalg.pinv(a @ a.mT + eye)
        return [{**g, "A": na.to(g["A"].dtype), "B": nb.to(g["B"].dtype)}
                for g, na, nb in zip(grads, new_a, new_b)]

    def options(self):
        return {"reg": self.reg}
