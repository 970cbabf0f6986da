"""LoRA's two-factor adapter: ΔW = s·B·A, B (m, r), A (r, n)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from geopeft import Adapter
from geopeft.builtins import lora_init_
from geopeft.kernels import lora_linear


class LoRAAdapter(Adapter):
    """ΔW = scaling·B·A with scaling = α/r (α/√r with `rslora`).

    Forward: base_out + scaling·lower(lift(dropout(x), A), B), never forming ΔW.
    Factors are float32 on a float16/bfloat16 base, else in the base weight's dtype,
    unless `dtype` is given; the forward computes in the input's dtype.
    """

    factor_names = ("A", "B")
    rank_dims = {"A": (0,), "B": (1,)}
    default_manifolds = {"A": "euclidean", "B": "euclidean"}

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, rslora: bool = False,
                 dropout: float = 0.0, dtype: torch.dtype | None = None):
        super().__init__(base, rank, alpha=alpha, rslora=rslora, dtype=dtype)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        m, n = self.shape
        kw = {"device": self.factor_device, "dtype": self.factor_dtype}
        self.A = nn.Parameter(torch.empty(rank, n, **kw))
        self.B = nn.Parameter(torch.empty(m, rank, **kw))
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 and self.ops.takes_dropout else nn.Identity()
        lora_init_(self)

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        a, b = self.in_input_dtype(x, self.A, self.B)
        h = self.ops.lift(self.dropout(x), a, self.base_layer)
        return self.ops.add_lowered(base_out, h, b, self.scaling)

    def fused_forward(self, x: Tensor) -> Tensor | None:
        """base(x) + s·(x Aᵀ) Bᵀ as one autograd function (`geopeft.kernels.lora_linear`:
        backward keeps only x and x Aᵀ) for a plain nn.Linear base without hooks, x in
        W's dtype (the factors are cast to it), no active dropout and no autocast; else None."""
        if not self.can_fuse_linear(x):
            return None
        a, b = self.in_input_dtype(x, self.A, self.B)
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias, a, b, self.scaling)

    def delta_weight(self) -> Tensor:
        return self.ops.to_weight_layout(self.scaling * (self.B @ self.A), self.base_layer)

    def to_lora(self) -> tuple[Tensor, Tensor]:
        return self.B, self.A

    def options(self):
        return {**super().options(), "dropout": self.dropout_p}
