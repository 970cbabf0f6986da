"""What an adapted Hugging Face model writes: its own `save_pretrained` refuses (it would
write keys `from_pretrained` ignores), `export_peft` loads through PEFT's auto classes."""

from __future__ import annotations

import copy

import pytest
import torch

import geopeft
from geopeft.export import export_saved

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



def _auto_peft_output(head: str, directory) -> torch.Tensor:
    import peft

    model = getattr(peft, f"AutoPeftModelFor{head}").from_pretrained(str(directory)).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("head", ["CausalLM", "SequenceClassification"])
def test_export_peft_loads_with_peft_auto_classes(tiny_llama, tmp_path, head):
    """task_type and base_model_name_or_path come from the model (its class, its
    config._name_or_path) and geopeft.json records them: the export of the model and
    `export_saved` of its checkpoint both load with `peft.AutoPeftModelFor<head>`."""
    import json

    import transformers

    _, base_dir = tiny_llama
    task, trainable = "CAUSAL_LM", []
    if head == "SequenceClassification":  # its own saved base: from_pretrained would draw a new head
        task, trainable, base_dir = "SEQ_CLS", ["score"], tmp_path / "base"
        torch.manual_seed(0)
        seq = transformers.LlamaForSequenceClassification.from_pretrained(tiny_llama[1], num_labels=2)
        seq.config.pad_token_id = 0
        seq.save_pretrained(base_dir)
    cls = getattr(transformers, f"LlamaFor{head}")
    model = geopeft.adapt(cls.from_pretrained(base_dir).eval(), "stella", targets=["q_proj", "v_proj"],
                          rank=2, trainable=trainable)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad and p.dim() == 2 and p.shape[0] == 2:
                p.add_(1.0)  # a trained head
        expected = model(IDS).logits
    geopeft.save(model, tmp_path / "ckpt")
    recorded = json.loads((tmp_path / "ckpt" / "geopeft.json").read_text())["base_model"]
    assert recorded == {"name_or_path": str(base_dir), "task_type": task}
    geopeft.export_peft(model, tmp_path / "peft")
    export_saved(tmp_path / "ckpt", tmp_path / "peft-from-ckpt")  # without the base model
    for out in ("peft", "peft-from-ckpt"):
        config = json.loads((tmp_path / out / "adapter_config.json").read_text())
        assert (config["task_type"], config["base_model_name_or_path"]) == (task, str(base_dir))
        torch.testing.assert_close(_auto_peft_output(head, tmp_path / out), expected, rtol=1e-5, atol=1e-5)
    if head == "SequenceClassification":  # an untrained head: PEFT still expects it in the file
        geopeft.unload(model, merge=False)
        geopeft.adapt(model, "stella", targets=["q_proj", "v_proj"], rank=2)
        with torch.no_grad():
            expected = model(IDS).logits
        geopeft.export_peft(model, tmp_path / "untrained-head")
        torch.testing.assert_close(_auto_peft_output(head, tmp_path / "untrained-head"), expected,
                                   rtol=1e-5, atol=1e-5)
        geopeft.save(model, tmp_path / "no-head")
        with pytest.raises(geopeft.GeopeftError, match=r"holds no head .* geopeft\.export_peft\(geopeft\.load"):
            export_saved(tmp_path / "no-head", tmp_path / "nothing")
