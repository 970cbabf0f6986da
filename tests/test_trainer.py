"""GeoTrainer on the real MiniLM with StelLA: HF Trainer builds the geopeft optimizer,
saves geopeft adapter directories and resumes bitwise."""

from __future__ import annotations

import pytest
import torch

import geopeft
from geopeft.geometry import max_violation

from helpers import factor_layouts

TEXTS = ["a good day", "a bad day", "good food here", "bad service there", "very good indeed",
         "really bad news", "good people", "bad weather"]


@pytest.fixture(scope="module")
def classification(minilm):
    tok, _ = minilm
    enc = tok(TEXTS, padding="max_length", max_length=8, return_tensors="pt")
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": torch.tensor(int("good" in t))} for i, t in enumerate(TEXTS)]


def adapted_classifier(path):
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return geopeft.adapt(model, "stella", targets=["query", "value"], rank=4, trainable=["classifier"])


def trainer(model, data, out):
    from transformers import TrainingArguments

    from geopeft.integrations.transformers import GeoTrainer

    args = TrainingArguments(output_dir=str(out), max_steps=30, per_device_train_batch_size=2,
                             learning_rate=5e-3, weight_decay=0.01,
                             save_steps=25, logging_steps=1, seed=0, report_to=[], use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0)
    return GeoTrainer(model=model, args=args, train_dataset=data)


def trained(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_geotrainer_trains_saves_and_resumes_bitwise(minilm_path, classification, tmp_path):
    model = adapted_classifier(minilm_path)
    run = trainer(model, classification, tmp_path / "run")
    run.train()
    opt = run.optimizer.optimizer  # accelerate's wrapper around the GeometricOptimizer
    assert isinstance(opt, geopeft.GeometricOptimizer)
    assert opt.step_count == 30
    # built from TrainingArguments: AdamW, HF's no-decay groups, no decay on the Stiefel factors
    assert isinstance(opt.optimizer, torch.optim.AdamW)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    adapter = model.bert.encoder.layer[0].attention.self.query.adapter
    assert decay[id(model.classifier.weight)] == 0.01 and decay[id(model.classifier.bias)] == 0.0
    assert decay[id(adapter.U)] == decay[id(adapter.V)] == 0.0 and decay[id(adapter.S)] == 0.01
    assert max_violation([a for _, a in geopeft.adapters(model)]) <= 1e-5
    losses = [h["loss"] for h in run.state.log_history if "loss" in h]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])

    run.save_model(tmp_path / "final")  # a geopeft directory, head included, not the full model
    assert (tmp_path / "final" / "geopeft.json").exists()
    assert not (tmp_path / "final" / "model.safetensors").exists()
    from transformers import AutoModelForSequenceClassification

    fresh = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    loaded = geopeft.load(fresh, tmp_path / "final").eval()
    batch = {k: torch.stack([d[k] for d in classification]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model.eval()(**batch).logits)

    resumed_model = adapted_classifier(minilm_path)  # its own fresh factors and head
    resumed = trainer(resumed_model, classification, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-25"))
    assert resumed.optimizer.optimizer.step_count == 30
    final, again = trained(model), trained(resumed_model)
    assert final.keys() == again.keys()
    assert all(torch.equal(final[n], again[n]) for n in final)


def test_resume_restores_changed_ranks(tmp_path):
    """GeoLoRA changes ranks while training; a resumed run first resizes the fresh adapters to
    the checkpoint's ranks, then continues bitwise. Under gradient accumulation the geometry
    and the rank controller run once per optimizer step."""
    import json

    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        TrainerCallback,
        TrainingArguments,
    )

    from geopeft.integrations.transformers import GeoTrainer

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32, num_labels=2)

    def make():
        torch.manual_seed(0)
        return geopeft.adapt(BertForSequenceClassification(config), "geolora", rank=4,
                             trainable=["classifier"], period=2, tau=0.3, r_max=8)

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (12,), generator=g), "labels": torch.tensor(i % 2)}
            for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, save_steps=4,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    class Layouts(TrainerCallback):  # the factors' (shape, strides) as each step begins
        def __init__(self):
            self.at = {}

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.at.setdefault(state.global_step, factor_layouts(model))

    model, seen, seen_again = make(), Layouts(), Layouts()
    run = GeoTrainer(model=model, args=args, train_dataset=data, callbacks=[seen])
    run.train()
    assert run.optimizer.optimizer.step_count == 8  # not 16, the micro-batches
    saved = json.loads((tmp_path / "checkpoint-4" / "geopeft.json").read_text())["layers"]
    assert {info["rank"] for info in saved.values()} != {4}  # the checkpoint's ranks moved
    again = make()
    GeoTrainer(model=again, args=args, train_dataset=data, callbacks=[seen_again]).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert seen_again.at[4] == seen.at[4]  # resumed with the trained layouts: the same BLAS path
    assert {n: a.rank for n, a in geopeft.adapters(again)} == {n: a.rank for n, a in geopeft.adapters(model)}
    final, resumed = trained(model), trained(again)
    assert final.keys() == resumed.keys() and all(torch.equal(final[n], resumed[n]) for n in final)
