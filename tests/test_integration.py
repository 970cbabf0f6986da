"""geopeft inside the ecosystem: real MiniLM weights, HF Trainer, accelerate, DDP."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import geopeft
from geopeft.geometry import max_violation

from helpers import TinyNet

HERE = Path(__file__).parent
TRAIN = HERE / "distributed" / "train.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_minilm_lora_trains_saves_loads_and_merges(minilm, tmp_path):
    tok, base = minilm
    fresh = copy.deepcopy(base)
    model = copy.deepcopy(base)
    geopeft.adapt(model, "lora", targets=["query", "value"], rank=8, alpha=16)
    assert len(geopeft.adapters(model)) == 12
    batch = tok(["geometry-aware fine-tuning", "a second, somewhat longer sentence here",
                 "low-rank adapters"], return_tensors="pt", padding=True)
    target = torch.randn(3, 384, generator=torch.Generator().manual_seed(0))
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=5e-3)
    losses = []
    for _ in range(8):
        emb = model(**batch).last_hidden_state[:, 0]
        loss = (emb - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        geopeft.save(model, tmp_path)
        loaded = geopeft.load(fresh, tmp_path).eval()
        assert torch.equal(loaded(**batch).last_hidden_state, out)
        geopeft.merge(model)
        merged = model(**batch).last_hidden_state
        assert (merged - out).norm() <= 1e-5 * out.norm()


def test_hf_trainer_drives_the_optimizer(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config)
    geopeft.adapt(model, "lora", targets=["query", "value"], rank=4, trainable=["classifier"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = geopeft.optimizer(model, torch.optim.AdamW, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (12,), generator=g), "labels": torch.tensor(i % 2)}
            for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=100,
                             max_grad_norm=1.0)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched)).train()
    assert opt.step_count == 4
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_accelerate_prepare_keeps_geometry(tiny):
    from accelerate import Accelerator

    geopeft.adapt(tiny, "lora", targets="all-linear", rank=4, manifold={"A": "oblique"})
    accelerator = Accelerator(cpu=True)
    opt = geopeft.optimizer(tiny, torch.optim.AdamW, lr=5e-2)
    model, prepared = accelerator.prepare(tiny, opt)
    for i in range(3):
        ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(i))
        accelerator.backward(model(ids).pow(2).mean())
        prepared.step()
        prepared.zero_grad()
    assert opt.step_count == 3
    assert max_violation([a for _, a in geopeft.adapters(tiny)]) <= 1e-5


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """The reference: one process, whole batches."""
    out = tmp_path_factory.mktemp("single")
    subprocess.run([sys.executable, str(TRAIN), "single", str(out)], check=True, env=ENV, timeout=120)
    return load_file(out / "rank0.safetensors")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_match_single_process(mode, single_process_run, tmp_path):
    """Two gloo ranks with half batches each end where one process with whole batches does:
    the geometric stages and the transform run on whole factors and stay in lockstep."""
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", str(TRAIN), mode, str(tmp_path)],
                   check=True, env=ENV, capture_output=True, timeout=300)
    r0 = load_file(tmp_path / "rank0.safetensors")
    r1 = load_file(tmp_path / "rank1.safetensors")
    assert r0.keys() == r1.keys() == single_process_run.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # ranks stay in lockstep
        assert torch.allclose(r0[k], single_process_run[k], atol=1e-5), k
        if k.endswith(".A"):
            norms = r0[k].norm(dim=-1)
            assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    torch.manual_seed(0)
    loaded = geopeft.load(TinyNet(), tmp_path / "adapter0")  # saved from the wrapped model
    for name, a in geopeft.adapters(loaded):
        assert torch.equal(a.A, r0[f"{name}.adapter.A"])


def test_torch_compile_fullgraph(tiny):
    """The adapted model compiles without graph breaks and trains through the compiled module."""
    geopeft.adapt(tiny, "lora", targets="all-linear", rank=4, manifold={"A": "oblique"})
    ids = torch.randint(0, 50, (4, 6))
    expected = tiny(ids)
    compiled = torch.compile(tiny, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(ids), expected, atol=1e-6)
    opt = geopeft.optimizer(compiled, torch.optim.AdamW, lr=1e-2)
    assert [n for n, _ in geopeft.adapters(compiled)] == ["query", "value", "ffn.0", "ffn.2"]
    for _ in range(2):
        compiled(ids).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert opt.step_count == 2
    assert max_violation([a for _, a in geopeft.adapters(tiny)]) <= 1e-5
