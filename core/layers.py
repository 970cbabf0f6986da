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
imports transformers), nn.Conv2d and nn.Embedding; a Linear whose weight is stored
quantized (bitsandbytes 4-/8-bit, torchao) is a `QuantizedLinearOps` when a registered
`Quantization` component recognises it (by qualified class name: core imports none of
those libraries).
"""

from __future__ import annotations

import abc
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geopeft.kernels.lora import unviewed

logger = logging.getLogger("geopeft")


@dataclass(frozen=True)
class LayerOps:
    """Geometry of one base layer kind. `m`, `n`: out and in sizes of the matrix view."""

    kind: str
    m: int
    n: int
    #: the stored format of a quantized weight; None for a float weight
    quantization: Quantization | None = None

    def weight_matrix(self, base: nn.Module) -> Tensor:
        """The base weight as an (m, n) matrix (a view where possible)."""
        return self.as_matrix(base.weight)

    def weight_dtype(self, base: nn.Module) -> torch.dtype:
        """The floating dtype the layer computes in (its weight's dtype)."""
        return base.weight.dtype

    def weight_shape(self, base: nn.Module) -> list[int]:
        """The shape of the weight as the layer's own layout has it (what `save` records)."""
        return list(base.weight.shape)

    @torch.no_grad()
    def add_to_weight(self, base: nn.Module, delta: Tensor, sign: int, *, merging: bool = False) -> None:
        """W ← W + sign·delta (`delta` in the weight's layout), correctly rounded to W's
        dtype: the sum is formed in float64 (float32 on MPS) and rounded once. `merging`:
        this is a merge (sign +1) or its unmerge (sign −1) of the adapter's ΔW."""
        w = base.weight
        wide = torch.float32 if w.device.type == "mps" else torch.float64
        w.copy_((w.to(wide) + sign * delta.to(w.device, wide)).to(w.dtype))

    def snapshot_weight(self, base: nn.Module) -> Any:
        """What `restore_weight` needs to put the weight back bit for bit (a copy)."""
        return base.weight.detach().clone()

    @torch.no_grad()
    def restore_weight(self, base: nn.Module, saved: Any) -> None:
        base.weight.copy_(saved)

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
        return unviewed(out, base_out.shape)


class Conv1DOps(LinearOps):
    """transformers' Conv1D: weight is (in, out), y = x @ W + b."""

    def as_matrix(self, t):
        return t.T

    def to_weight_layout(self, delta, base):
        return delta.T


@dataclass(frozen=True)
class QuantizedLinearOps(LinearOps):
    """A Linear whose weight is stored quantized (`quantization` knows the format).

    The forward runs the layer's own kernel; the adapter's factors are float (the
    layer's compute dtype, float32 on a half one) beside the frozen quantized weight.
    Reading W dequantises it; writing W (merge, an initializer's base shift) dequantises,
    adds in float64 and requantises — a rounding to the quantization grid, which is logged
    with its size — or raises `GeopeftError` when the format cannot be requantised. A
    merge keeps the quantized weight it replaced, so unmerge restores it bit for bit."""

    def weight_matrix(self, base):
        return self.quantization.dequantize(base)

    def weight_dtype(self, base):
        return self.quantization.compute_dtype(base)

    def weight_shape(self, base):
        return [self.m, self.n]

    @torch.no_grad()
    def add_to_weight(self, base, delta, sign, *, merging=False):
        q = self.quantization
        if merging and sign < 0 and _PREMERGE in base.__dict__:  # unmerge: the weight merge replaced
            self.restore_weight(base, base.__dict__.pop(_PREMERGE))
            return
        saved = self.snapshot_weight(base) if merging and sign > 0 else None
        exact = q.dequantize(base).double() + sign * delta.to(base.weight.device, torch.float64)
        q.requantize(base, exact.float())  # may refuse (GeopeftError): nothing changed then
        if saved is not None:
            base.__dict__[_PREMERGE] = saved
        err = torch.linalg.matrix_norm(q.dequantize(base).double() - exact).item()
        what = ("merge" if merging else "unshift") if sign > 0 else ("unmerge" if merging else "shift")
        report_requantised(what, f"{self.m}x{self.n} {q.describe(base)}", err,
                           torch.linalg.matrix_norm(delta.double()).item())

    def snapshot_weight(self, base):
        return self.quantization.snapshot(base)

    def restore_weight(self, base, saved):
        self.quantization.restore(base, saved)


#: operation -> (the sum requantised, what that means for the user)
_REQUANTISED = {
    "merge": ("W + ΔW (a merge)", "unmerge restores the quantized weight exactly; unload(merge=True) "
              "keeps the rounded one"),
    "unmerge": ("W − ΔW (an unmerge of a weight merged elsewhere)", "the base is back up to this rounding"),
    "shift": ("W − s·B₀A₀ (an initializer's base shift: the residual is quantized)",
              "step 0 then computes Q(W − s·B₀A₀) + s·B₀A₀, and disable_adapters / "
              "unload(merge=False) give the base back only up to this rounding"),
    "unshift": ("W + s·B₀A₀ (a base shift undone)", "the base is back up to this rounding"),
}
_warned: set[str] = set()


def report_requantised(what: str, layer: str, error: float, size: float) -> None:
    """Log the rounding of one requantised weight: each at INFO, the first of each kind
    (`what`: a key of `_REQUANTISED`) in a process at WARNING too, saying what it means."""
    sum_, meaning = _REQUANTISED[what]
    line = (f"geopeft: {sum_} was requantised into a {layer} weight: the stored weight is off the "
            f"exact sum by {error:.3g} (Frobenius norm; the added term's is {size:.3g})")
    logger.info(line)
    if what not in _warned:
        _warned.add(what)
        logger.warning("%s; %s. Each layer's rounding is logged at INFO level", line, meaning)


#: where a merged quantized layer keeps the quantized weight its merge replaced
_PREMERGE = "_geopeft_premerge_weight"


def drop_premerge(base: nn.Module) -> None:
    """Forget the pre-merge quantized weight a merge kept (`unload(merge=True)`: no unmerge
    will follow)."""
    base.__dict__.pop(_PREMERGE, None)


class Quantization(abc.ABC):
    """A stored format of quantized Linear weights (a `quantization` component, registered
    by an integration): how to recognise it, read it as floats and write floats back.

    `classes` are fully qualified class names matched against the MRO of the layer or of
    its weight ("bitsandbytes.nn.modules.Linear4bit", "torchao.utils.TorchAOBaseTensor"),
    so recognising a layer imports nothing. The methods run only on a layer of the format
    (whose library is then imported already)."""

    name: str = ""
    classes: tuple[str, ...] = ()

    def matches(self, module: nn.Module) -> bool:
        types = type(module).__mro__ + type(getattr(module, "weight", None)).__mro__
        return any(qualified_name(c) in self.classes for c in types)

    @abc.abstractmethod
    def dequantize(self, base: nn.Module) -> Tensor:
        """The weight as a float32 (out, in) matrix (a new tensor)."""

    @abc.abstractmethod
    def requantize(self, base: nn.Module, weight: Tensor) -> None:
        """Store the float (out, in) `weight` in `base`, quantized in the layer's own format
        (replacing the weight parameter, never writing into the old one); `GeopeftError`
        with the reason when this format cannot be requantised."""

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        """The float dtype the layer computes in (the adapter's factors follow it)."""
        return torch.float32

    def describe(self, base: nn.Module) -> str:
        """The format in a few words: 'bitsandbytes nf4'."""
        return self.name

    def snapshot(self, base: nn.Module) -> Any:
        """What `restore` needs to put the quantized weight back bit for bit: by default
        the weight parameter itself (`requantize` replaces it, never writes into it)."""
        return base.weight

    def restore(self, base: nn.Module, saved: Any) -> None:
        base.weight = saved


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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


SUPPORTED_LAYERS = ("nn.Linear", "transformers Conv1D", "nn.Conv2d (groups=1)", "nn.Embedding",
                    "quantized Linear (bitsandbytes 4-/8-bit, torchao; geopeft[quant])")


def layer_ops(module: nn.Module) -> LayerOps | None:
    """The ops for `module`, or None when geopeft cannot adapt that kind of layer."""
    if isinstance(module, nn.Linear):
        if type(module) is nn.Linear and type(module.weight) is nn.Parameter:  # the common case
            return LinearOps("linear", module.out_features, module.in_features)
        quantization = quantization_of(module)
        if quantization is not None:
            return QuantizedLinearOps("linear", module.out_features, module.in_features, quantization)
        if _quantized_library(module) is not None:
            return None
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


#: libraries whose Linear layers store their weight quantized (a `quantization` component
#: must recognise them: a float view of their weight would be wrong)
QUANTIZED_LIBRARIES = ("bitsandbytes", "torchao")


def quantization_of(module: nn.Module) -> Quantization | None:
    """The registered `quantization` component that recognises `module`, or None."""
    from .registry import get_registry

    for _, quantization in get_registry().items("quantization"):
        if quantization.matches(module):
            return quantization
    return None


def _quantized_library(module: nn.Module) -> str | None:
    types = type(module).__mro__ + type(getattr(module, "weight", None)).__mro__
    return next((c.__module__.split(".")[0] for c in types
                 if c.__module__.split(".")[0] in QUANTIZED_LIBRARIES), None)


def why_unsupported(module: nn.Module) -> str:
    """A sentence saying why `module` cannot be adapted."""
    library = _quantized_library(module) if isinstance(module, nn.Linear) else None
    if library is not None:
        weight = type(getattr(module, "weight", None))
        return (f"{type(module).__name__} stores its weight quantized by {library} "
                f"({public_name(weight)}), a format no loaded 'quantization' component "
                f"recognises (loaded: {', '.join(_quantization_names()) or 'none'}); install "
                "geopeft[quant] (and let GEOPEFT_PLUGINS load 'quantized')")
    if isinstance(module, nn.Conv2d):
        return f"grouped convolutions (groups={module.groups}) are not supported"
    return f"{public_name(type(module))} is not a supported layer type (supported: {', '.join(SUPPORTED_LAYERS)})"


def public_name(cls: type) -> str:
    """`cls` by the shortest loaded module path that exposes it: torch.nn.LayerNorm,
    torch.ao.nn.quantized.dynamic.Linear (not the bare "Linear" of several classes)."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            return f"{module.__name__}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _quantization_names() -> list[str]:
    from .registry import get_registry

    return [name for name, _ in get_registry().items("quantization")]


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
