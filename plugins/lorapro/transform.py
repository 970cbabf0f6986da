"""The `lorapro` gradient transform: LoRA-Pro's adjusted factor gradients, two modes.

- `efficient` (default): the factor gradients are replaced by LoRA-Pro's adjusted
  ones (ĝ_A, ĝ_B); the user's optimizer (any torch optimizer, any param-group layout
  and parameter order) takes its ordinary step on them. No extra state.
- `full`: the paper's full mode. Per adapter it keeps Adam moments of the equivalent
  gradient g̃ = s(B ĝ_A + ĝ_B A) as m × n tensors (transform state, so they round-trip
  through `optimizer.state_dict()`), forms the Adam direction d in the full m × n space,
  takes its factor gradients s·Bᵀd and s·d·Aᵀ and adjusts them again; these are the
  step itself (`takes_own_step`): `geopeft.optimizer` applies them to the factors as
  p ← p − lr·g with the factors' param-group lr, and the user's optimizer (AdamW, say)
  steps every other trainable parameter as usual.

The batched math is in `geopeft.kernels.lorapro`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from geopeft import GradientTransform
from geopeft.kernels import full, lorapro_adjust, lorapro_equivalent_gradient, stack_fp32
from geopeft.kernels.lorapro import DEFAULT_DELTA, gram_eigs

MODES = ("efficient", "full")


class LoRAProTransform(GradientTransform):
    """LoRA-Pro (Wang et al., ICLR 2025): factor gradients adjusted so that the equivalent
    full-weight gradient is the closest one to the true full gradient.

    Options: `mode` ("efficient" or "full"); `delta`, the relative eigenvalue cutoff of
    the regularised pseudo-inverses of BᵀB and AAᵀ; full mode only: `betas`, `eps`,
    `weight_decay` of its Adam step in full space (defaults 0.9/0.999, 1e-8, 0).
    """

    name = "lorapro"
    requires = frozenset({"A", "B"})
    exclusive = "gram_preconditioner"  # (BᵀB)⁻¹, (AAᵀ)⁻¹ already: no second such transform

    def __init__(self, mode: str = "efficient", delta: float = DEFAULT_DELTA,
                 betas: Sequence[float] | None = None, eps: float | None = None,
                 weight_decay: float | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if not 0.0 < float(delta) < 1.0:
            raise ValueError(f"delta (relative eigenvalue cutoff) must be in (0, 1), got {delta!r}")
        given = [name for name, v in (("betas", betas), ("eps", eps), ("weight_decay", weight_decay))
                 if v is not None]
        if mode == "efficient" and given:
            raise ValueError(f"{', '.join(given)} only apply to mode='full' (LoRA-Pro's own Adam step); "
                             "in the efficient mode give them to your optimizer "
                             "(geopeft.optimizer(model, torch.optim.AdamW, betas=..., ...))")
        betas = (0.9, 0.999) if betas is None else tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        eps = 1e-8 if eps is None else float(eps)
        weight_decay = 0.0 if weight_decay is None else float(weight_decay)
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps!r} and {weight_decay!r}")
        self.mode = mode
        self.delta = float(delta)
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay

    def options(self):
        opts = {"mode": self.mode, "delta": self.delta}
        if self.mode == "full":
            opts |= {"betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}
        return opts

    @property
    def takes_own_step(self) -> bool:
        """Full mode's gradients are its Adam step: `geopeft.optimizer` applies them to the
        factors as p ← p − lr·g (lr of their param group) and lets the user's optimizer step
        every other parameter (a `trainable=` head gets its AdamW, as in the official code)."""
        return self.mode == "full"

    # ------------------------------------------------------------------ the transform
    def transform(self, adapter, grads, state):
        return self.transform_group([adapter], [grads], [state])[0]

    def transform_group(self, adapters, grads, states):
        A = stack_fp32([full(a.A) for a in adapters])          # (G, r, n)
        B = stack_fp32([full(a.B) for a in adapters])          # (G, m, r)
        ga = stack_fp32([g["A"] for g in grads])
        gb = stack_fp32([g["B"] for g in grads])
        s = torch.tensor([a.scaling for a in adapters], dtype=A.dtype, device=A.device)
        if self.mode == "full":
            eigs = gram_eigs(A, B, self.delta)  # B and A do not change in between: decompose once
            d = self._adam_direction(lorapro_equivalent_gradient(A, B, ga, gb, s, eigs=eigs), states)
            sv = s.reshape(-1, 1, 1)
            new_a, new_b, _ = lorapro_adjust(A, B, sv * (B.mT @ d), sv * (d @ A.mT), s, eigs=eigs)
            if self.weight_decay:
                # decoupled decay of s·B·A by (1 − lr·wd) to first order in lr; the frozen base
                # weight is never decayed
                new_a = new_a + (self.weight_decay / 2) * A
                new_b = new_b + (self.weight_decay / 2) * B
        else:
            new_a, new_b, _ = lorapro_adjust(A, B, ga, gb, s, self.delta)
        # fallback: an adapter whose adjusted gradients are not finite in the gradients' dtype
        # (e.g. beyond float16's range) keeps its plain gradients for this step
        if len({(g["A"].dtype, g["B"].dtype) for g in grads}) == 1:
            return self._finite_or_plain(new_a, new_b, ga, gb, grads)
        return [self._finite_or_plain(new_a[i:i + 1], new_b[i:i + 1], ga[i:i + 1], gb[i:i + 1], [g])[0]
                for i, g in enumerate(grads)]

    @staticmethod
    def _finite_or_plain(new_a, new_b, ga, gb, grads):
        dtype_a, dtype_b = grads[0]["A"].dtype, grads[0]["B"].dtype
        new_a, new_b = new_a.to(dtype_a), new_b.to(dtype_b)
        ok = (new_a.isfinite().all(-1).all(-1) & new_b.isfinite().all(-1).all(-1)).reshape(-1, 1, 1)
        new_a = torch.where(ok, new_a, ga.to(dtype_a))  # no host sync: always a `where`
        new_b = torch.where(ok, new_b, gb.to(dtype_b))
        return [{**g, "A": new_a[i], "B": new_b[i]} for i, g in enumerate(grads)]

    def _adam_direction(self, gt: Tensor, states: Sequence[dict[str, Tensor]]) -> Tensor:
        """Adam's step direction in full space (G, m, n) for the equivalent gradients gt,
        updating each adapter's m × n moments in place (allocated at the first step)."""
        beta1, beta2 = self.betas
        for st in states:
            if "exp_avg" not in st:
                st["exp_avg"] = gt.new_zeros(gt.shape[1:])
                st["exp_avg_sq"] = gt.new_zeros(gt.shape[1:])
                st["step"] = torch.zeros((), dtype=torch.float64)
            for key in ("exp_avg", "exp_avg_sq"):  # e.g. a state loaded onto another device
                if st[key].device != gt.device or st[key].dtype != gt.dtype:
                    st[key] = st[key].to(gt.device, gt.dtype)
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        g = list(gt.unbind(0))
        torch._foreach_lerp_(exp_avgs, g, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, g, g, 1 - beta2)
        for st in states:
            st["step"] += 1
        t = torch.stack([st["step"] for st in states]).to(gt.device)
        bc1 = (1 - beta1 ** t).to(gt.dtype).reshape(-1, 1, 1)
        bc2 = (1 - beta2 ** t).to(gt.dtype).sqrt().reshape(-1, 1, 1)
        return (torch.stack(exp_avgs) / bc1) / (torch.stack(exp_avg_sqs).sqrt() / bc2 + self.eps)
