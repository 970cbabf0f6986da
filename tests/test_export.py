"""export_peft: PEFT's PeftModel loads the directory and computes the same outputs."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import geopeft

from helpers import TinyNet


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


@given(method=st.sampled_from(["lora", "rslora"]), rank=st.integers(1, 6), seed=st.integers(0, 999))
def test_peft_loads_the_export_with_equal_outputs(tmp_path_factory, method, rank, seed):
    torch.manual_seed(seed)
    base = TinyNet()
    fresh = copy.deepcopy(base)
    model = geopeft.adapt(base, method, targets=["embed", "query", "ffn.2"], rank=rank, alpha=5,
                          trainable=["classifier"], ranks={"ffn.2": 2})
    with torch.no_grad():
        for _, a in geopeft.adapters(model):
            a.A.normal_()
            a.B.normal_()
        model.classifier.bias.add_(3.0)
    out = tmp_path_factory.mktemp("peft")
    geopeft.export_peft(model, out)
    loaded = peft.PeftModel.from_pretrained(fresh, str(out)).eval()
    ids = torch.randint(0, 50, (4, 7))
    with torch.no_grad():
        assert torch.allclose(loaded(ids), model.eval()(ids), rtol=1e-5, atol=1e-5)


def test_conv2d_export(tmp_path):
    torch.manual_seed(0)
    base = ConvNet()
    fresh = copy.deepcopy(base)
    geopeft.adapt(base, "lora", targets=["conv"], rank=3)
    with torch.no_grad():
        base.conv.adapter.B.normal_()
    geopeft.export_peft(base, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(loaded(x), base(x), rtol=1e-5, atol=1e-6)


def test_export_refuses_merged_model(tiny, tmp_path):
    geopeft.adapt(tiny, "lora", targets=["query"], rank=2)
    geopeft.merge(tiny)
    with pytest.raises(geopeft.GeopeftError, match="unmerge"):
        geopeft.export_peft(tiny, tmp_path)


def test_gpt2_conv1d_export(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    base = GPT2LMHeadModel(config).eval()
    fresh = copy.deepcopy(base)
    geopeft.adapt(base, "lora", targets=["c_attn", "c_proj"], rank=4, alpha=8)
    assert {a.ops.kind for _, a in geopeft.adapters(base)} == {"conv1d"}
    with torch.no_grad():
        for _, a in geopeft.adapters(base):
            a.B.normal_()
    geopeft.export_peft(base, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


def test_cli_export_without_base_model(tmp_path):
    from geopeft.cli import main

    torch.manual_seed(0)
    base = TinyNet()
    fresh = copy.deepcopy(base)
    geopeft.adapt(base, "rslora", targets=["embed", "query", "ffn.0"], rank=4, alpha=6,
                  trainable=["classifier"])
    with torch.no_grad():
        for _, a in geopeft.adapters(base):
            a.A.normal_()
            a.B.normal_()
        base.classifier.weight.mul_(2)
    geopeft.save(base, tmp_path / "saved")
    assert main(["export", str(tmp_path / "saved"), str(tmp_path / "peft")]) == 0
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "peft")).eval()
    ids = torch.randint(0, 50, (3, 8))
    with torch.no_grad():
        assert torch.allclose(loaded(ids), base.eval()(ids), rtol=1e-5, atol=1e-5)


def test_cli_export_reports_bad_source(tmp_path, capsys):
    from geopeft.cli import main

    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a geopeft adapter directory" in capsys.readouterr().err


def test_export_keeps_every_parameter_of_a_nested_trainable_head(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2)))
    fresh = copy.deepcopy(base)
    geopeft.adapt(base, "lora", targets="0", rank=2, trainable=["1"])  # regex: "0" only
    with torch.no_grad():
        base[0].adapter.B.normal_()
        for p in base[1].parameters():
            p.add_(1.0)  # a trained head, nested two levels deep
    geopeft.export_peft(base, tmp_path)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), base(x), atol=1e-6)
