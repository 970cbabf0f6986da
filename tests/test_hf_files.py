"""What an adapted Hugging Face model writes: its own `save_pretrained` refuses (it would
write keys `from_pretrained` ignores), `export_peft` loads through PEFT's auto classes."""

from __future__ import annotations

import copy

import pytest
import torch

import geopeft

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """(a tiny random LlamaForCausalLM, the directory it was saved to with save_pretrained)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return model, path


def test_save_pretrained_of_an_adapted_model_is_refused_naming_save_and_unload(tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM

    base, base_dir = tiny_llama
    model = geopeft.adapt(copy.deepcopy(base), "stella", targets=["q_proj", "v_proj"], rank=2)
    fix = r"geopeft\.save\(model, dir\).*geopeft\.unload\(model\)"
    with pytest.raises(geopeft.GeopeftError, match=fix):
        model.save_pretrained(tmp_path / "adapted")
    assert not (tmp_path / "adapted").exists()
    geopeft.save(model, tmp_path / "ckpt")
    loaded = geopeft.load(LlamaForCausalLM.from_pretrained(base_dir).eval(), tmp_path / "ckpt")
    with pytest.raises(geopeft.GeopeftError, match=fix):
        loaded.save_pretrained(tmp_path / "adapted")
    geopeft.unload(model)  # the fine-tuned model, ΔW merged: save_pretrained is right again
    model.save_pretrained(tmp_path / "plain")
    with torch.no_grad():
        assert torch.equal(LlamaForCausalLM.from_pretrained(tmp_path / "plain").eval()(IDS).logits,
                           model(IDS).logits)

