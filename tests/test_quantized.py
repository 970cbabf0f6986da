"""Quantized base layers as layer kinds: bitsandbytes Linear4bit (nf4, fp4) and Linear8bitLt,
torchao int8 weight-only. The factors train in float beside the frozen quantized weight; the
forward is the layer's own kernel; merge requantises (unmerge is exact); save / load /
export_peft are those of a float Linear; every recipe runs, PiSSA on the dequantised weight."""

from __future__ import annotations

import copy
import logging

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

import geopeft
from geopeft.layers import QuantizedLinearOps, layer_ops

# Each 4-bit layer's input width a multiple of bitsandbytes' block size (64): on a CPU with
# AVX512 its native 4-bit kernels dequantise a row that shares a block with the next one
# wrongly (bitsandbytes 0.50.2: 0.37 relative error at 32x32, 0.09 at 32x64 as NF4 should) and
# its inference repacking fails (docs/integrations.md, "Quantized bases").
D = 64


class Net(nn.Module):
    def __init__(self, make=nn.Linear):
        super().__init__()
        self.query, self.value, self.head = make(D, D), make(D, D), nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.value(torch.tanh(self.query(x))))


def quantized(kind: str, seed: int = 0) -> tuple[Net, Net]:
    """(float model, its quantized twin) with the same weights."""
    torch.manual_seed(seed)
    plain = Net()
    if kind == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = copy.deepcopy(plain)
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: name in ("query", "value"))
        return plain, model
    if kind == "int8":
        make = lambda i, o: bnb.nn.Linear8bitLt(i, o, has_fp16_weights=False)  # noqa: E731
    else:
        make = lambda i, o: bnb.nn.Linear4bit(i, o, compute_dtype=torch.float32, quant_type=kind)  # noqa: E731
    model = Net(make)
    model.load_state_dict(plain.state_dict())
    for layer in (model.query, model.value):  # float32 forwards on every CPU, as float twins compute
        # (with AVX512-BF16, bitsandbytes' eval forward repacks the weight and computes in bfloat16:
        # the Llama test runs it, test_a_4bit_weight_repacked_for_cpu_inference_is_read_as_it_is reads it)
        layer.support_avx512bf16_for_cpu = False
    return plain, model.to("cpu")  # bitsandbytes quantizes on the move to a device


def stored(layer: nn.Module) -> list[torch.Tensor]:
    """The quantized weight's storage: what must never change by training or merge + unmerge."""
    w = layer.weight
    if hasattr(w, "qdata"):
        return [w.qdata, w.scale]
    scales = getattr(w, "SCB", None)
    if scales is None and hasattr(layer, "state"):
        scales = layer.state.SCB
    return [w.data] + ([scales] if scales is not None else [])


def perturb(model: nn.Module, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, a in geopeft.adapters(model):
            a.B.copy_(scale * torch.randn(a.B.shape, generator=g))


KINDS = ["nf4", "fp4", "int8", "torchao"]


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_beside_quantized_weight_trains_merges_and_unmerges_exactly(kind, caplog):
    plain, model = quantized(kind)
    x = torch.randn(6, D)
    with torch.no_grad():
        base_out = model(x)
    before = {n: [t.clone() for t in stored(getattr(model, n))] for n in ("query", "value")}
    geopeft.adapt(model, "lora", targets=["query", "value"], rank=4, trainable=["head"])
    ops = model.query.adapter.ops
    assert isinstance(ops, QuantizedLinearOps) and (ops.m, ops.n) == (D, D)
    assert model.query.adapter.A.dtype == torch.float32 and model.query.adapter.A.requires_grad
    assert torch.equal(model(x), base_out)  # LoRA starts at ΔW = 0
    opt = geopeft.optimizer(model, torch.optim.Adam, lr=1e-2)
    for _ in range(2):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert model.query.adapter.B.abs().sum() > 0  # gradients reached the factors
    for n, tensors in before.items():  # the quantized weight is frozen and untouched
        assert all(torch.equal(a, b) for a, b in zip(stored(getattr(model, n)), tensors))
    perturb(model)
    with torch.no_grad():
        adapted = model(x)
        # the forward is the quantized layer's own kernel plus the low-rank path
        a = model.query.adapter
        h = torch.tanh(model.query.base_layer(x) + a.scaling * (x @ a.A.T) @ a.B.T)
        assert torch.allclose(model.value(h), model.value.base_layer(h) + a.scaling
                              * (h @ model.value.adapter.A.T) @ model.value.adapter.B.T, atol=1e-6)
        with caplog.at_level(logging.INFO, logger="geopeft"):
            geopeft.merge(model)
        merged = model(x)
        assert sum("was requantised" in r.message for r in caplog.records if r.levelno == logging.INFO) == 2
        # the merged (rounded) model is far closer to the adapted one than the base is
        assert (merged - adapted).norm() < 0.3 * (base_out - adapted).norm()
        geopeft.unmerge(model)
        assert torch.equal(model(x), adapted)  # unmerge puts the pre-merge quantized weight back
        geopeft.unload(model, merge=True)
    assert type(model.query) is type(quantized(kind)[1].query)
    assert not hasattr(model.query, "_geopeft_premerge_weight")
    assert torch.allclose(model(x), merged)


def test_qlora_llama_nf4_as_with_peft(tmp_path):
    """The QLoRA workflow: transformers loads a 4-bit Llama; geopeft's LoRA trains on it
    (with HF Trainer, which refuses a quantized model without adapters), reloads bitwise,
    exports to PEFT (same outputs) and loads onto the float base."""
    import peft
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        LlamaConfig,
        LlamaForCausalLM,
        TrainingArguments,
    )

    from geopeft.integrations.transformers import GeoTrainer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    q4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            bnb_4bit_compute_dtype=torch.float32)
    load = lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=q4)  # noqa: E731
    model = geopeft.adapt(load(), "lora", targets=["q_proj", "v_proj"], rank=4)
    ids = torch.randint(0, 64, (2, 8))
    b0 = model.model.layers[0].self_attn.q_proj.adapter.B.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    GeoTrainer(model=model, args=args, train_dataset=[{"input_ids": i, "labels": i} for i in ids]).train()
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.adapter.B, b0)
    assert "_hf_peft_config_loaded" not in model.__dict__
    model.eval()  # as from_pretrained leaves the reloaded ones (bitsandbytes' CPU inference path)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    geopeft.save(model, tmp_path / "adapter")
    geopeft.export_peft(model, tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(geopeft.load(load(), tmp_path / "adapter")(input_ids=ids).logits, out)
        theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "peft")(input_ids=ids).logits
        assert torch.allclose(theirs, out, atol=1e-6)
    on_float = geopeft.load(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    ours = dict(geopeft.adapters(model))
    for name, adapter in geopeft.adapters(on_float):  # a QLoRA adapter is a float Linear's adapter
        assert torch.equal(adapter.A, ours[name].A) and torch.equal(adapter.B, ours[name].B)


def test_pissa_on_4bit_reads_the_dequantised_weight_and_requantises_the_residual(tmp_path, caplog):
    plain, model = quantized("nf4")
    w = model.query.weight
    dequantised = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    with caplog.at_level(logging.INFO, logger="geopeft"):
        geopeft.adapt(model, "pissa", targets=["query", "value"], rank=4)
    a = model.query.adapter
    u, s, vh = torch.linalg.svd(dequantised.double())
    top = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(a.scaling * (a.B @ a.A).double(), top, atol=1e-5)
    assert any("residual is quantized" in r.message for r in caplog.records)
    # the stored weight is Q(W − s·B₀A₀): its dequantised value is the residual up to 4-bit rounding
    residual = model.query.adapter.ops.weight_matrix(model.query.base_layer).double()
    assert (residual - (dequantised.double() - top)).norm() < 0.2 * top.norm()
    x = torch.randn(4, D)
    geopeft.save(model, tmp_path)
    with torch.no_grad():  # load replays the shift onto a fresh 4-bit model: the same function
        assert torch.equal(geopeft.load(quantized("nf4")[1], tmp_path)(x), model(x))


def test_cg_calibration_on_4bit_equals_its_float_twin():
    """CG-LoRA's calibration reads activations and output gradients, not the weight: on a
    4-bit model it gives the factors of the float model holding the dequantised weights."""
    plain, model = quantized("nf4")
    twin = copy.deepcopy(plain)
    with torch.no_grad():
        for n in ("query", "value"):
            getattr(twin, n).weight.copy_(layer_ops(getattr(model, n)).weight_matrix(getattr(model, n)))
    x, y = torch.randn(8, D), torch.randn(8, 3)
    batches, loss = [(x, y)] * 2, lambda m, b: (m(b[0]) - b[1]).pow(2).mean()
    for m in (model, twin):
        torch.manual_seed(3)
        geopeft.adapt(m, "cglora", targets=["query", "value"], rank=4, init_batches=batches, loss_fn=loss)
    for (_, ours), (_, theirs) in zip(geopeft.adapters(model), geopeft.adapters(twin)):
        assert torch.allclose(ours.B @ ours.A, theirs.B @ theirs.A, atol=1e-5)


def test_unrequantisable_formats_are_refused_and_nothing_changes():
    from torchao.quantization import Int8WeightOnlyConfig, PerGroup, quantize_

    model = Net()
    quantize_(model, Int8WeightOnlyConfig(granularity=PerGroup(16)), filter_fn=lambda m, name: name == "query")
    geopeft.adapt(model, "lora", targets=["query"], rank=2)
    perturb(model)
    x = torch.randn(3, D)
    with torch.no_grad():
        out = model(x)
        with pytest.raises(geopeft.GeopeftError, match="block size"):
            geopeft.merge(model)
        assert not model.query.merged and torch.equal(model(x), out)
    with pytest.raises(geopeft.GeopeftError, match="has_fp16_weights"):
        geopeft.adapt(Net(lambda i, o: bnb.nn.Linear8bitLt(i, o, has_fp16_weights=True)), "pissa",
                      targets=["query"], rank=2)


def test_without_the_quantized_plugin_a_4bit_layer_is_refused(monkeypatch, fresh_registry):
    monkeypatch.setenv("GEOPEFT_PLUGINS", "lora")
    from geopeft.registry import reset_registry

    reset_registry()
    _, model = quantized("nf4")
    with pytest.raises(geopeft.TargetError, match=r"quantized by bitsandbytes.*geopeft\[quant\]"):
        geopeft.adapt(model, "lora", targets=["query"], rank=2)


def test_summary_counts_a_4bit_weight_as_the_matrix_it_stands_for():
    plain, model = quantized("nf4")
    geopeft.adapt(model, "lora", targets=["query", "value"], rank=2)
    info = geopeft.summary(model)
    assert info.total_params == sum(p.numel() for p in plain.parameters()) + info.adapter_params
    assert info.layers[0].kind == "linear (bnb-4bit)"


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "single-quant"])
def test_a_4bit_weight_repacked_for_cpu_inference_is_read_as_it_is(nested):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place at its first
    eval forward without gradients. Reading it (dequantise: merge, PiSSA, CG-LoRA's shift)
    gives the same weight up to the bfloat16 absmax the packing keeps, and leaves the layer
    as it is; merge and unmerge work on it. The packing is done here by bitsandbytes' own
    function, so any CPU shows it."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    torch.manual_seed(0)
    plain = nn.Linear(128, 64)
    with torch.no_grad():  # rows of different scales: a block read with another's absmax shows
        plain.weight.mul_(torch.logspace(-2, 1, 64).unsqueeze(1))
    layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=nested)
    layer.load_state_dict(plain.state_dict())
    layer = layer.to("cpu")
    ops = layer_ops(layer)
    unpacked = ops.weight_matrix(layer).clone()
    w = layer.weight
    w.data, w.quant_state = _convert_weight_packed_for_cpu(w.data, w.quant_state)
    codes, absmax = w.data.clone(), w.quant_state.absmax.clone()
    read = ops.weight_matrix(layer)
    assert ((read - unpacked).abs() <= 2.0 ** -8 * unpacked.abs()).all()  # bfloat16 absmax
    assert layer.weight is w and w.quant_state.packing_format_for_cpu  # the layer as it was
    assert torch.equal(w.data, codes) and torch.equal(w.quant_state.absmax, absmax)
    net = nn.Sequential(layer)
    geopeft.adapt(net, "lora", targets=["0"], rank=4)
    perturb(net)
    adapter = net[0].adapter
    delta = (adapter.scaling * adapter.B @ adapter.A).detach()
    geopeft.merge(net)  # requantised from the weight as read, in the layer's own float dtype
    merged = ops.weight_matrix(net[0].base_layer)
    assert net[0].base_layer.weight.quant_state.dtype == torch.float32
    assert (merged - (read + delta)).norm() < 0.15 * (read + delta).norm()  # NF4 rounding
    geopeft.unmerge(net)
    assert net[0].base_layer.weight is w and torch.equal(w.data, codes)  # exactly as it was
