"""How a low-rank update meets each kind of base layer.

Every supported base layer is seen as a matrix W of shape (m, n) = (out, in),
the layout PEFT uses for LoRA's B (m, r) and A (r, n). A `LayerOps` knows, for
one kind of layer, how to read that matrix, how to write a (m, n) update back
in the layer's own weight layout, and how to push activations through a
factor without forming the (m, n) matrix:

    lift(x, A)  : input x, A (r, n)  -> h (..., r) features  (channels-first for conv)
    lower(h, B) : h, B (m, r)        -> (..., m), same layout as the base output

so that `lower(lift(x, A), B) == base_with_weight(s.t. W = B @ A)(x)` with no bias.
Core knows nn.Linear, transformers' Conv1D (GPT-2 layout, duck-typed: core never
imports transformers), nn.Conv2d and nn.Embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerOps:
    """Geometry of one base layer kind. `m`, `n`: out and in sizes of the matrix view."""

    kind: str
    m: int
    n: int

    def weight_matrix(self, base: nn.Module) -> Tensor:
        """The base weight as an (m, n) matrix (a view where possible)."""
        return self.as_matrix(base.weight)

    def as_matrix(self, t: Tensor) -> Tensor:
        """A tensor in the base weight's layout (the weight, its gradient) as (m, n)."""
        raise NotImplementedError

    def to_weight_layout(self, delta: Tensor, base: nn.Module) -> Tensor:
        """An (m, n) matrix in the base weight's own shape and layout."""
        raise NotImplementedError

    def lift(self, x: Tensor, a: Tensor, base: nn.Module) -> Tensor:
        raise NotImplementedError

    def lower(self, h: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def add_lowered(self, base_out: Tensor, h: Tensor, b: Tensor, alpha: float) -> Tensor:
        """base_out + alpha·lower(h, b), as one fused op where the layer allows."""
        return torch.add(base_out, self.lower(h, b).to(base_out.dtype), alpha=alpha)

    @property
    def takes_dropout(self) -> bool:
        """Whether input dropout makes sense (not for token ids)."""
        return True


class LinearOps(LayerOps):
    def as_matrix(self, t):
        return t

    def to_weight_layout(self, delta, base):
        return delta

    def lift(self, x, a, base):
        return F.linear(x, a)

    def lower(self, h, b):
        return F.linear(h, b)

    def add_lowered(self, base_out, h, b, alpha):
        # one GEMM accumulating into base_out: no separate scale of the (tokens, m) output,
        # and none of its gradient in backward
        if base_out.dtype != h.dtype or base_out.dim() < 2:
            return super().add_lowered(base_out, h, b, alpha)
        m = base_out.shape[-1]
        out = torch.addmm(base_out.reshape(-1, m), h.reshape(-1, h.shape[-1]), b.t(), alpha=alpha)
        return out.view(base_out.shape)


class Conv1DOps(LinearOps):
    """transformers' Conv1D: weight is (in, out), y = x @ W + b."""

    def as_matrix(self, t):
        return t.T

    def to_weight_layout(self, delta, base):
        return delta.T


class Conv2dOps(LayerOps):
    """A is a conv with the base kernel (r, c·kh·kw); B is a 1×1 conv (m, r)."""

    def as_matrix(self, t):
        return t.reshape(self.m, self.n)

    def to_weight_layout(self, delta, base):
        return delta.reshape(base.weight.shape)

    def lift(self, x, a, base):
        kernel = a.reshape(a.shape[0], *base.weight.shape[1:])
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            return F.conv2d(x, kernel, None, base.stride, 0, base.dilation)
        return F.conv2d(x, kernel, None, base.stride, base.padding, base.dilation)

    def lower(self, h, b):
        return F.conv2d(h, b[:, :, None, None])


class EmbeddingOps(LayerOps):
    """Embedding W is (num, dim); its matrix view is (dim, num): one-hot in, vector out."""

    def as_matrix(self, t):
        return t.T

    def to_weight_layout(self, delta, base):
        return delta.T

    def lift(self, x, a, base):
        return F.embedding(x, a.T, padding_idx=base.padding_idx)

    def lower(self, h, b):
        return F.linear(h, b)

    @property
    def takes_dropout(self):
        return False


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


SUPPORTED_LAYERS = ("nn.Linear", "transformers Conv1D", "nn.Conv2d (groups=1)", "nn.Embedding")


def layer_ops(module: nn.Module) -> LayerOps | None:
    """The ops for `module`, or None when geopeft cannot adapt that kind of layer."""
    if isinstance(module, nn.Linear):
        return LinearOps("linear", module.out_features, module.in_features)
    if _is_hf_conv1d(module):
        n, m = module.weight.shape
        return Conv1DOps("conv1d", m, n)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        w = module.weight
        return Conv2dOps("conv2d", w.shape[0], w[0].numel())
    if isinstance(module, nn.Embedding):
        return EmbeddingOps("embedding", module.embedding_dim, module.num_embeddings)
    return None


def why_unsupported(module: nn.Module) -> str:
    """A sentence saying why `module` cannot be adapted."""
    if isinstance(module, nn.Conv2d):
        return f"grouped convolutions (groups={module.groups}) are not supported"
    return f"{type(module).__name__} is not a supported layer type (supported: {', '.join(SUPPORTED_LAYERS)})"


class Conv1D(nn.Module):
    """Weightless stand-in for transformers' Conv1D (weight (n, m)), used by `stub_layer`."""

    def __init__(self, nf: int, nx: int, device: torch.device | str | None = None):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight


def stub_layer(kind: str, weight_shape: list[int]) -> nn.Module:
    """A base layer of `kind` with its weight on the meta device (no memory): enough
    to rebuild an adapter from a saved file without the base model."""
    meta = torch.device("meta")
    if kind == "linear":
        return nn.Linear(weight_shape[1], weight_shape[0], bias=False, device=meta)
    if kind == "conv1d":
        return Conv1D(weight_shape[1], weight_shape[0], device=meta)
    if kind == "conv2d":
        out_c, in_c, kh, kw = weight_shape
        return nn.Conv2d(in_c, out_c, (kh, kw), bias=False, device=meta)
    if kind == "embedding":
        return nn.Embedding(weight_shape[0], weight_shape[1], device=meta)
    raise ValueError(f"unknown layer kind {kind!r}; kinds: linear, conv1d, conv2d, embedding")
