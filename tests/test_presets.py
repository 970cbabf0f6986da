"""Target presets: `adapt` without `targets` picks the model family's modules; optional
dependencies stay optional."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

import geopeft

SILENT = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def tiny_hf(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        return tf.GPT2Model(tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16, **SILENT))
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                  num_key_value_heads=1, intermediate_size=24, vocab_size=32,
                                                  **SILENT))
    if kind == "t5":
        return tf.T5Model(tf.T5Config(d_model=16, d_ff=24, num_layers=1, num_heads=2, d_kv=8, vocab_size=32,
                                      decoder_start_token_id=0, **SILENT))
    if kind == "vit":
        return tf.ViTModel(tf.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=24, image_size=16, patch_size=8))
    return tf.BertModel(tf.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=24, vocab_size=32, **SILENT))


EXPECTED = {
    "bert": ("bert", [f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]),
    "gpt2": ("gpt2", ["h.0.attn.c_attn", "h.1.attn.c_attn"]),
    "llama": ("llama", [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]),
    "t5": ("t5", [f"{stack}.block.0.layer.{j}.{att}.{p}" for stack, j, att in
                  [("encoder", 0, "SelfAttention"), ("decoder", 0, "SelfAttention"),
                   ("decoder", 1, "EncDecAttention")] for p in ("q", "v")]),
    "vit": ("vit", [f"layers.{i}.attention.{p}" for i in range(2) for p in ("q_proj", "v_proj")]),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_hf_presets_find_the_expected_modules(kind, caplog):
    model = tiny_hf(kind)
    preset, names = EXPECTED[kind]
    with caplog.at_level(logging.INFO, logger="geopeft"):
        geopeft.adapt(model, "lora", rank=2)
    assert sorted(n for n, _ in geopeft.adapters(model)) == sorted(names)
    assert f"preset {preset!r}" in caplog.text and names[0] in caplog.text


def test_lora_on_gpt2_conv1d_equals_the_dense_formula():
    """Conv1D stores W as (in, out) and computes x·W + b; the adapted layer must compute
    x·(W + s·(B·A)ᵀ) + b."""
    model = tiny_hf("gpt2")
    geopeft.adapt(model, "lora", rank=3, alpha=6)
    layer = model.h[0].attn.c_attn
    adapter = layer.adapter
    with torch.no_grad():
        adapter.B.normal_()
        x = torch.randn(2, 5, 16)
        dense = x @ (layer.base_layer.weight + 2.0 * (adapter.B @ adapter.A).T) + layer.base_layer.bias
        assert torch.allclose(layer(x), dense, atol=1e-5)
        assert torch.allclose(adapter.delta_weight(), 2.0 * (adapter.B @ adapter.A).T)


def test_a_model_without_a_preset_asks_for_targets():
    with pytest.raises(geopeft.TargetError, match="needs targets=.*no registered target preset"):
        geopeft.adapt(nn.Sequential(nn.Linear(4, 4)), "lora", rank=2)


def test_multihead_attention_out_proj_is_refused():
    """nn.MultiheadAttention uses out_proj.weight without calling out_proj: an adapter
    there would silently do nothing."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    with pytest.raises(geopeft.TargetError, match="never run"):
        geopeft.adapt(Block(), "lora", targets=["out_proj"], rank=2)
    with pytest.raises(geopeft.TargetError, match="matched no adaptable layer"):
        geopeft.adapt(Block(), "lora", targets="all-linear", rank=2)


OPTIONAL_IMPORTS = """
import sys
import geopeft
geopeft.components()  # load every plugin, the integrations' presets included
print(sorted(m for m in ("transformers", "timm", "torchvision", "peft", "accelerate", "bitsandbytes",
                         "torchao") if m in sys.modules))
sys.modules["transformers"] = None  # as if not installed
try:
    from geopeft.integrations.transformers import GeoTrainer
except ImportError as exc:
    print(exc)
"""


def test_optional_dependencies_stay_optional():
    """`import geopeft` (plugins loaded) imports none of them; a missing one is an
    ImportError naming the extra. One subprocess: a fresh interpreter costs seconds."""
    out = subprocess.run([sys.executable, "-c", OPTIONAL_IMPORTS], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "[]"
    assert "pip install geopeft[hf]" in out[1]
