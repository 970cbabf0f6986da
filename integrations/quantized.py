"""Quantized base layers: bitsandbytes `Linear4bit` (nf4, fp4) and `Linear8bitLt`, and
torchao's weight-only quantized `nn.Linear` (its weight a torchao tensor subclass).

Each format is a `geopeft.Quantization` registered through the `geopeft` entry point and
recognised by qualified class name: importing this module imports neither library. Its
methods (dequantise, requantise) import the library on first use, which a model holding
such a layer has imported already. Install both with `pip install geopeft[quant]`.

The adapter's factors train in float beside the frozen quantized weight; the forward is
the layer's own kernel plus the adapter's low-rank path (core's `QuantizedLinearOps`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from geopeft import GeopeftError, Quantization, hookimpl

from ._extras import require


def _bnb(module: str = "bitsandbytes"):
    return require(module, "quant", "a bitsandbytes quantized layer")


class BitsAndBytes4bit(Quantization):
    """`bitsandbytes.nn.Linear4bit` (QLoRA's NF4, and FP4): blockwise 4-bit codes plus
    per-block absmax scales (`quant_state`); requantised with the layer's own block size,
    quant type, statistics compression and storage dtype."""

    name = "bnb-4bit"
    classes = ("bitsandbytes.nn.modules.Linear4bit",)

    def dequantize(self, base: nn.Module) -> Tensor:
        functional = _bnb("bitsandbytes.functional")
        return functional.dequantize_4bit(*_standard_layout(base.weight)).float()

    def requantize(self, base: nn.Module, weight: Tensor) -> None:
        old = base.weight
        state = old.quant_state  # the float dtype it was quantized from, packed for CPU or not
        dtype = state.original_dtype if getattr(state, "packing_format_for_cpu", False) else state.dtype
        data = weight.to(device="cpu", dtype=dtype)
        new = type(old)(data, requires_grad=False, quant_type=old.quant_type, blocksize=old.blocksize,
                        compress_statistics=old.compress_statistics, quant_storage=old.quant_storage,
                        module=base)
        base.weight = new.to(old.device)  # Params4bit quantizes on its move to a device

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        return base.compute_dtype or torch.float32

    def describe(self, base: nn.Module) -> str:
        return f"bitsandbytes 4-bit {base.weight.quant_type}"

    def restore(self, base: nn.Module, saved: Any) -> None:
        base.weight = saved
        base.quant_state = saved.quant_state


def _standard_layout(weight: nn.Parameter) -> tuple[Tensor, Any]:
    """(codes, quant_state) of a `Params4bit` in bitsandbytes' standard layout, the layer left
    as it is. On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place at its
    first forward in eval mode without gradients (codes regrouped, absmax transposed to
    (in/blocksize, out) in bfloat16, flag `packing_format_for_cpu`). Its inverse rewrites the
    quant_state it is given, so it runs on a copy (the layer's codes stay packed: a flag
    flipped under them makes its next forward read them as unpacked), and it leaves a
    non-nested absmax transposed (and re-quantizes a nested one): the absmax is read here
    from the packed one, as float32 blocks in the codes' order."""
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        functional = _bnb("bitsandbytes.functional")
        packed_absmax = state.absmax  # (in / blocksize, out)
        data, state = functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
        state.absmax, state.nested = packed_absmax.T.reshape(-1).float(), False
    return data, state


class BitsAndBytes8bit(Quantization):
    """`bitsandbytes.nn.Linear8bitLt` with int8 weights (`has_fp16_weights=False`, as
    `load_in_8bit` loads them): row-wise absmax int8 codes and their scales (SCB)."""

    name = "bnb-8bit"
    classes = ("bitsandbytes.nn.modules.Linear8bitLt",)

    def _scales(self, base: nn.Module) -> Tensor:
        w = base.weight
        return w.SCB if w.SCB is not None else base.state.SCB  # the first forward moves them to state

    def dequantize(self, base: nn.Module) -> Tensor:
        w = base.weight
        if w.dtype != torch.int8:  # has_fp16_weights=True: a float weight, quantized per call
            return w.detach().float().clone()
        return _bnb("bitsandbytes.functional").int8_vectorwise_dequant(w.data, self._scales(base)).float()

    def requantize(self, base: nn.Module, weight: Tensor) -> None:
        old = base.weight
        if old.dtype != torch.int8:
            raise GeopeftError("this Linear8bitLt keeps float weights (has_fp16_weights=True): it has "
                               "no int8 weight to requantise; load the model with load_in_8bit")
        new = type(old)(weight.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False)
        self._install(base, new.to(old.device))  # Int8Params quantizes on its move to a device

    def snapshot(self, base: nn.Module) -> Any:
        return base.weight, self._scales(base)

    def restore(self, base: nn.Module, saved: Any) -> None:
        weight, scales = saved
        weight.CB, weight.SCB = weight.data, scales
        self._install(base, weight)

    @staticmethod
    def _install(base: nn.Module, weight: nn.Parameter) -> None:
        base.weight = weight
        base.state.CB = base.state.SCB = None  # the next forward takes the weight's CB, SCB

    def describe(self, base: nn.Module) -> str:
        return "bitsandbytes 8-bit (LLM.int8)"


class TorchAOWeightOnly(Quantization):
    """An `nn.Linear` whose weight torchao replaced by a quantized tensor subclass
    (`quantize_(model, Int8WeightOnlyConfig())` and the like). Any such weight dequantises;
    requantising is supported for `Int8Tensor` (int8 weight-only) with row-wise or
    per-tensor scales, and refused with the reason for other formats."""

    name = "torchao"
    classes = ("torchao.utils.TorchAOBaseTensor",)

    def dequantize(self, base: nn.Module) -> Tensor:
        return base.weight.detach().dequantize().float()

    def requantize(self, base: nn.Module, weight: Tensor) -> None:
        quantization = require("torchao.quantization", "quant", "a torchao quantized layer")
        old = base.weight
        kind = type(old).__name__
        symmetric = old.zero_point is None or not old.zero_point.any()
        if kind != "Int8Tensor" or not symmetric or old.act_quant_kwargs is not None:
            raise GeopeftError(f"requantising a torchao {kind} weight is not supported (geopeft "
                               "requantises int8 weight-only Int8Tensor weights): keep the adapter "
                               "unmerged, or geopeft.unload(model, merge=False) and merge into a float "
                               "copy of the base model")
        rows, cols = old.shape
        granularity = {(1, cols): quantization.PerRow(), (rows, cols): quantization.PerTensor()}.get(
            tuple(old.block_size))
        if granularity is None:
            raise GeopeftError(f"requantising a torchao Int8Tensor with block size {old.block_size} is "
                               "not supported (row-wise or per-tensor scales are)")
        new = quantization.Int8Tensor.from_hp(weight.to(old.device, old.dtype), granularity)
        base.weight = nn.Parameter(new, requires_grad=False)

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        return base.weight.dtype  # the float dtype the tensor subclass stands for

    def describe(self, base: nn.Module) -> str:
        return f"torchao {type(base.weight).__name__}"


QUANTIZATIONS = (BitsAndBytes4bit(), BitsAndBytes8bit(), TorchAOWeightOnly())


@hookimpl
def register_quantizations(register):
    for quantization in QUANTIZATIONS:
        register(quantization.name, quantization)
