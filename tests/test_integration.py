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
    """The reference: one process, whole batches, every case of train.py."""
    out = tmp_path_factory.mktemp("single")
    subprocess.run([sys.executable, str(TRAIN), "single", str(out)], check=True, env=ENV, timeout=300)
    return load_file(out / "rank0.safetensors")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_match_single_process(mode, single_process_run, tmp_path):
    """Every registered method, two gloo ranks with half batches each under DDP / FSDP2: the
    ranks are bitwise equal after every step — GeoLoRA's and AdaLoRA's rank changes included
    (their new factors' gradients are averaged by geopeft) — and within 1e-5 of one process
    with whole batches; each rank's saved adapter loads onto a plain base model exactly."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(TRAIN), mode, str(tmp_path)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = load_file(tmp_path / "rank0.safetensors")
    r1 = load_file(tmp_path / "rank1.safetensors")
    assert r0.keys() == r1.keys() <= single_process_run.keys()
    trained = {k.split("/")[0] for k in r0}
    assert set(geopeft.components()["method"]) <= trained  # every registered method
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # ranks in lockstep, after every step
        assert r0[k].shape == single_process_run[k].shape, k
        assert torch.allclose(r0[k], single_process_run[k], atol=1e-5), k
    last = max(int(k.split("/")[1]) for k in r0)
    for case in ("geolora", "adalora"):  # ranks changed within the run
        assert len({r0[f"{case}/{t}/query.adapter.U"].shape for t in range(1, last + 1)}) > 1, case
    norms = r0[f"lora+oblique+scaled_gd/{last}/query.adapter.A"].norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    for case in trained:  # saved from the wrapped model
        torch.manual_seed(0)
        loaded = geopeft.load(TinyNet(), tmp_path / case / "adapter0")
        for name, a in geopeft.adapters(loaded):
            for f, p in a.factors().items():
                assert torch.equal(p, r0[f"{case}/{last}/{name}.adapter.{f}"]), (case, name, f)


@pytest.fixture
def one_process_group():
    """A gloo process group of this process alone (what DDP and FSDP2 need to be built)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_wrappers_that_would_sync_resized_factors_are_refused(one_process_group):
    """A rank controller replaces factors by new Parameters: a DDP or FSDP2 wrapper built
    over them would go on syncing the old ones. `adapt` lists them in the model's DDP ignore
    list (so DDP(model) leaves them to geopeft, and `unload` takes them off it); a DDP over an
    outer module, or an FSDP2 that sharded them, is refused by `geopeft.optimizer`."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    def geolora():
        torch.manual_seed(0)
        return geopeft.adapt(TinyNet(), "geolora", targets="all-linear", rank=4, trainable=["classifier"])

    model = geolora()
    names = {n for n, p in model.named_parameters() if p in geopeft.resizable_factors(model)}
    assert len(names) == 12 and set(model._ddp_params_and_buffers_to_ignore) == names
    geopeft.optimizer(DDP(model), torch.optim.SGD, lr=0.1)  # accepted: DDP leaves them alone
    outer = torch.nn.Sequential(geolora())
    with pytest.raises(geopeft.ConfigError, match="DistributedDataParallel syncs 0.query.adapter.U"):
        geopeft.optimizer(DDP(outer), torch.optim.SGD, lr=0.1)
    sharded = fully_shard(geolora())
    with pytest.raises(geopeft.ConfigError, match=r"ignored_params=geopeft.resizable_factors\(model\)"):
        geopeft.optimizer(sharded, torch.optim.SGD, lr=0.1)
    model = geolora()
    geopeft.optimizer(fully_shard(model, ignored_params=geopeft.resizable_factors(model)),
                      torch.optim.SGD, lr=0.1)
    lora = geopeft.adapt(TinyNet(), "lora", targets="all-linear", rank=4)
    assert geopeft.resizable_factors(lora) == set() and not hasattr(lora, "_ddp_params_and_buffers_to_ignore")
    geopeft.unload(geolora_model := geolora())
    assert not hasattr(geolora_model, "_ddp_params_and_buffers_to_ignore")


def test_resized_factors_are_averaged_once_per_backward_also_after_a_failed_one(one_process_group,
                                                                              monkeypatch):
    """GeoLoRA's factors (12, with a trainable head beside them) are averaged by one
    all-reduce of them all at the end of each backward pass, through rank changes; a backward
    that raised part-way (its queued average never ran) does not stop the next from averaging."""
    import torch.distributed as dist

    sizes = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: sizes.append(t.numel()) or real(t, **kw))
    torch.manual_seed(0)
    model = geopeft.adapt(TinyNet(), "geolora", targets="all-linear", rank=4, trainable=["classifier"],
                          period=1, tau=0.5)
    opt = geopeft.optimizer(model, torch.optim.SGD, lr=0.1)
    ids = torch.randint(0, 50, (4, 6))

    def expected():  # one presence flag and the values of each factor
        factors = geopeft.resizable_factors(model)
        return len(factors) + sum(p.numel() for p in factors)

    ranks = {tuple(opt.ranks().values())}
    for step in range(3):
        size = expected()
        model(ids).pow(2).mean().backward()
        assert sizes == [size], step
        sizes.clear()
        opt.step()
        opt.zero_grad()
        ranks.add(tuple(opt.ranks().values()))
    assert len(ranks) > 1  # the ranks changed, and the new factors were averaged

    def fail(_):
        raise RuntimeError("a failure part-way through backward")

    hook = model.query.register_forward_hook(lambda m, i, out: [out.register_hook(fail)] and None)
    with pytest.raises(RuntimeError, match="part-way"):
        model(ids).pow(2).mean().backward()  # the ffn factors' gradients came first, then this
    hook.remove()
    assert sizes == []
    opt.zero_grad()
    model(ids).pow(2).mean().backward()
    assert sizes == [expected()]


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
