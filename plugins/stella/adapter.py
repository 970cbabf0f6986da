"""StelLA's three-factor adapter: ΔW = s·U·S·Vᵀ, U (m, r), S (r, r) or diag (r,), V (n, r)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from geopeft import Adapter, ShapeError
from geopeft.kernels import lora_linear, random_stiefel


class USVAdapter(Adapter):
    """ΔW = scaling·U·S·Vᵀ with U, V orthonormal (on `stiefel` by default) and S free.

    `diag_s=True` keeps S as a vector of r singular-value-like entries. Forward:
    base_out + scaling·x·V·Sᵀ·Uᵀ without forming ΔW; S is folded into the thinner of
    U (m·r²) and V (n·r²) first, so the two matmuls over the tokens are LoRA's.
    Built valid: U, V random orthonormal, S = I (an initializer then sets them).
    """

    factor_names = ("U", "S", "V")
    default_manifolds = {"U": "stiefel", "S": "euclidean", "V": "stiefel"}

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, rslora: bool = False,
                 diag_s: bool = False, dropout: float = 0.0, dtype: torch.dtype | None = None):
        super().__init__(base, rank, alpha=alpha, rslora=rslora, dtype=dtype)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        m, n = self.shape
        kw = {"device": self.factor_device, "dtype": self.factor_dtype}
        self.diag_s = bool(diag_s)
        self.rank_dims = {"U": (1,), "S": (0,) if self.diag_s else (0, 1), "V": (1,)}
        self.U = nn.Parameter(random_stiefel((m, rank)).to(**kw))
        self.S = nn.Parameter(torch.ones(rank, **kw) if self.diag_s else torch.eye(rank, **kw))
        self.V = nn.Parameter(random_stiefel((n, rank)).to(**kw))
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 and self.ops.takes_dropout else nn.Identity()

    def _fold(self) -> tuple[Tensor, Tensor]:
        """(B (m, r), A (r, n)) with B·A = U·S·Vᵀ, S multiplied into the thinner side."""
        u, s, v = self.U, self.S, self.V
        if u.shape[0] <= v.shape[0]:
            return (u * s if self.diag_s else u @ s), v.mT
        return u, (s[:, None] * v.mT if self.diag_s else s @ v.mT)

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        b, a = self.in_input_dtype(x, *self._fold())
        h = self.ops.lift(self.dropout(x), a, self.base_layer)
        return self.ops.add_lowered(base_out, h, b, self.scaling)

    def fused_forward(self, x: Tensor) -> Tensor | None:
        """base(x) + s·x·V·Sᵀ·Uᵀ as one `geopeft.kernels.lora_linear` with the folded pair
        (B, A), where `can_fuse_linear(x)` allows; else None (the unfused path)."""
        if not self.can_fuse_linear(x):
            return None
        b, a = self.in_input_dtype(x, *self._fold())
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias, a, b, self.scaling)

    def delta_weight(self) -> Tensor:
        b, a = self._fold()
        return self.ops.to_weight_layout(self.scaling * (b @ a), self.base_layer)

    def to_lora(self) -> tuple[Tensor, Tensor]:
        """B = U·S, A = Vᵀ: scaling·B·A = ΔW (the scale stays the adapter's)."""
        s = torch.diag(self.S) if self.diag_s else self.S
        return self.U @ s, self.V.mT

    @torch.no_grad()
    def resize(self, new_rank: int, keep: Tensor | None = None, *, basis=None, values=None):
        """Adapter.resize; growing by `keep` (no `basis` or `values` for U, V) fills the new
        columns of U and V orthonormally (to each other and to the kept ones) while S's new
        rows and columns stay zero: U, V stay on the Stiefel manifold and ΔW does not change."""
        m, n = self.shape
        if isinstance(new_rank, int) and new_rank > min(m, n):
            raise ShapeError(f"rank {new_rank} is larger than this {m}x{n} layer allows (U and V "
                             f"need orthonormal columns): use rank <= {min(m, n)}")
        kept = min(self.rank, new_rank) if keep is None else len(keep)
        swapped = super().resize(new_rank, keep, basis=basis, values=values)
        given = set(basis or {}) | set(values or {})
        if new_rank > kept:
            for name in ("U", "V"):
                if name in given:
                    continue
                factor = getattr(self, name)
                old = factor[:, :kept].float()
                fresh = torch.randn(factor.shape[0], new_rank - kept, device=factor.device)
                for _ in range(2):  # twice: one Gram–Schmidt pass loses orthogonality
                    fresh = fresh - old @ (old.T @ fresh)
                factor[:, kept:] = torch.linalg.qr(fresh).Q.to(factor.dtype)
        return swapped

    def options(self):
        return {**super().options(), "diag_s": self.diag_s, "dropout": self.dropout_p}
