"""The jobs on the user's own work: a local HF model directory (a tiny random Llama and
BERT built offline) and the user's data files (JSONL prompt/response, CSV text/label),
through the example configs, from the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import geopeft
from geopeft.cli import main

from tiny_hf import license_sentences, sft_rows, tiny_bert, tiny_llama, write_csv, write_jsonl

ROOT = Path(__file__).parent.parent
SFT = ROOT / "configs" / "examples" / "causal_lm_sft.yaml"
CLS = ROOT / "configs" / "examples" / "classify_csv.yaml"
FAST = ["train.steps=3", "train.eval_every=3", "train.batch_size=8", "train.progress=false",
        "data.max_eval=8", "data.max_new_tokens=4"]
RECIPES = ["lora", "stella", "lorapro", "balora", "geolora", "cglora"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Model directories and data files, as a user would have them."""
    d = tmp_path_factory.mktemp("work")
    gpl, apache = license_sentences("GPL-3", 48), license_sentences("Apache-2.0", 48)
    texts = gpl + apache + ["complete"]
    rows = [{"sentence": s, "verdict": "gpl"} for s in gpl] + [{"sentence": s, "verdict": "apache"} for s in apache]
    return {
        "llama": tiny_llama(d / "llama", texts), "bert": tiny_bert(d / "bert", texts),
        "jsonl": write_jsonl(d / "train.jsonl", sft_rows(gpl)),
        "csv": write_csv(d / "reviews.csv", rows[::2] + rows[1::2], ["sentence", "verdict"]),
        "dir": d,
    }


def sft_args(work, out, *extra):
    return [str(SFT), f"model.path={work['llama']}", "model.dtype=float32", "model.max_length=24",
            f"data.path={work['jsonl']}", "data.val_fraction=0.15", "data.test_fraction=0.2",
            f"output_dir={out}", "train.checkpoint_every=2", *FAST, *extra]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_causal_lm_compare_every_recipe(work, tmp_path, capsys):
    """Every recipe and full fine-tuning trains a few SFT steps on the JSONL; the table has
    loss, perplexity and choice accuracy."""
    assert main(["compare", *sft_args(work, tmp_path, f"methods=[{','.join(RECIPES)}]", "full=true", "jobs=1")]) == 0
    out = tmp_path / "causal_lm_sft"
    runs = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["runs"]}
    assert list(runs) == RECIPES + ["full"]
    for name, r in runs.items():
        assert r["task"] == "causal_lm" and len(r["losses"]) == 3
        assert all(torch.isfinite(torch.tensor(r["losses"]))), name
        assert r["test_ppl"] == pytest.approx(torch.tensor(r["test_loss"]).exp().item(), rel=1e-6)
        assert 0 <= r["test_acc"] <= 1  # the test rows with choices / answers are scored
    assert (out / "full" / "model" / "config.json").is_file()  # full fine-tuning: save_pretrained
    assert (out / "geolora" / "peft" / "adapter_config.json").is_file()
    assert "| stella |" in (out / "compare.md").read_text() and "test perplexity" in capsys.readouterr().out


def test_causal_lm_train_outputs_load_with_peft(work, tmp_path):
    """train writes adapter/, peft/ (AutoPeftModelForCausalLM loads it by itself), merged/, the
    resolved config, metrics and a model card; all three give the trained model's logits.
    CG-LoRA shifts the base weights: the PEFT export carries the shift."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    assert main(["train", *sft_args(work, tmp_path, "method=cglora", "export.merged=true",
                                    "data.packing=true")]) == 0
    out = tmp_path / "causal_lm_sft"
    assert {p.name for p in out.iterdir()} >= {"adapter", "peft", "merged", "checkpoint", "config.yaml",
                                                "metrics.json", "README.md"}
    card = (out / "README.md").read_text()
    assert str(work["llama"]) in card and str(work["jsonl"]) in card and "cglora" in card
    assert "perplexity" in card and "AutoPeftModelForCausalLM" in card
    ids = torch.tensor([[1, 5, 9, 14, 3, 22]])
    trained = geopeft.load(AutoModelForCausalLM.from_pretrained(work["llama"]), out / "adapter")
    want = logits(trained, ids)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out / "peft")
    assert torch.allclose(logits(peft_model, ids), want, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert torch.allclose(logits(merged, ids), want, atol=1e-5)
    base = logits(AutoModelForCausalLM.from_pretrained(work["llama"]), ids)
    assert not torch.allclose(base, want, atol=1e-4)  # training changed the model


def test_classification_csv_with_column_mapping(work, tmp_path):
    """A BERT directory classifies the CSV (columns renamed through data.columns); the head is
    trained in full and exported as modules_to_save; AutoPeftModelForSequenceClassification
    loads the export by itself."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification

    assert main(["train", str(CLS), f"model.path={work['bert']}", f"data.path={work['csv']}",
                 "data.columns={text: sentence, label: verdict}", f"output_dir={tmp_path}", "method=stella",
                 "model.max_length=16", *FAST]) == 0
    out = tmp_path / "classify_csv"
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "classification" and 0 <= m["test_acc"] <= 1 and m["processes"] == 1
    saved = load_file(out / "adapter" / "adapter.safetensors")
    assert any(k.startswith("trainable.classifier.") for k in saved)  # the head, by default
    ids = torch.tensor([[2, 7, 11, 30, 3]])
    trained = geopeft.load(AutoModelForSequenceClassification.from_pretrained(work["bert"]), out / "adapter")
    peft_model = AutoPeftModelForSequenceClassification.from_pretrained(out / "peft")
    assert torch.allclose(logits(peft_model, ids), logits(trained, ids), atol=1e-5)
    assert "apache, gpl" in (out / "README.md").read_text()  # the classes, sorted


def test_sft_labels_response_only_chat_packing_and_choice_scores(work):
    """prompt tokens carry no loss, the response ends with EOS; a chat's loss is on its
    assistant turns only (the fallback template); choices scored in one padded batch score as
    each alone; packing keeps each token's label."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from geopeft.jobs.sft import IGNORE, Example, choice_scores, pack, prepare_tokenizer, tokenize

    tok = AutoTokenizer.from_pretrained(work["llama"])
    prepare_tokenizer(tok)
    assert tok.pad_token_id == tok.eos_token_id and tok.chat_template
    ids, labels = tokenize(tok, Example("t", prompt="complete the gnu", response="general public license"), 64)
    response = tok("general public license", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert labels == [IGNORE] * 4 + response + [tok.eos_token_id]
    chat = [{"role": "user", "content": "the gnu"}, {"role": "assistant", "content": "general license"},
            {"role": "user", "content": "copyright"}, {"role": "assistant", "content": "free software"}]
    ids, labels = tokenize(tok, Example("t", messages=chat), 64)
    kept = [t for t in labels if t != IGNORE]
    word = tok.convert_tokens_to_ids
    assert kept == [word("general"), word("license"), tok.eos_token_id,
                    word("free"), word("software"), tok.eos_token_id]
    model = AutoModelForCausalLM.from_pretrained(work["llama"])
    prompt, choices = [1, 5, 9], [[14], [22, 7, 3], [30, 2]]
    alone = []
    for c in choices:  # each choice on its own, unpadded
        logp = torch.log_softmax(logits(model, torch.tensor([prompt + c])), -1)[0]
        alone.append(sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(c)))
    assert choice_scores(model, prompt, choices, torch.device("cpu")) == pytest.approx(alone, abs=1e-5)
    rows, row_labels = pack([([1, 2, 3], [IGNORE, 2, 3]), ([1, 4], [IGNORE, 4])], 2)
    assert rows == [[1, 2], [3, 1], [4]] and row_labels == [[IGNORE, 2], [3, IGNORE], [4]]


BAD = [  # (file name, content, overrides, what the error names)
    ("a.jsonl", '{"prompt": "x", "response": "y"}\n{"prompt": "x", "response": \n', [],
     ["a.jsonl", "line 2", "not valid JSON"]),
    ("a.jsonl", '{"prompt": "x", "response": "y"}\n{"prompt": "x", "response": null}\n', [],
     ["a.jsonl: row 2", "'response'", "missing or null"]),
    ("a.jsonl", '{"question": "x", "response": "y"}\n', [],
     ["a.jsonl", "no column 'prompt'", "columns found: question, response", "data.columns.prompt"]),
    ("a.jsonl", '{"question": "x", "response": "y"}\n', ["data.columns={promt: question}"],
     ["data.columns", "'promt'", "did you mean 'prompt'"]),
    ("a.jsonl", '{"prompt": "x", "choices": ["a", "b"], "answer": 2}\n', [],
     ["a.jsonl: row 1", "'answer'", "neither an index (0..1)"]),
    ("a.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', [],
     ["a.jsonl: row 1", "no assistant turn"]),
    ("a.csv", "text,label\nfine text,good\n,bad\n", ["task=classification"],
     ["a.csv: row 2 (line 3)", "'text'", "missing or null"]),
    ("a.txt", "hello", [], ["data.path", "a.txt", ".jsonl, .json, .csv, .parquet"]),
]


def test_bad_files_named_errors_before_training(work, tmp_path, capsys):
    for name, content, extra, expected in BAD:
        path = tmp_path / name
        path.write_text(content)
        args = sft_args(work, tmp_path / "results", f"data.path={path}", *extra)
        assert main(["train", *args]) == 2, name
        err = capsys.readouterr().err
        assert all(e in err for e in expected), (expected, err)
    val = tmp_path / "val.csv"
    val.write_text("sentence,verdict\nsome text,mit\n")
    assert main(["train", str(CLS), f"model.path={work['bert']}", f"data.path={work['csv']}",
                 f"data.val_path={val}", "data.columns={text: sentence, label: verdict}",
                 f"output_dir={tmp_path / 'results'}", *FAST]) == 2
    err = capsys.readouterr().err
    assert "val.csv: row 1 (line 2)" in err and "'mit', a label no training row has" in err
    assert not (tmp_path / "results").exists()  # nothing ran


def test_two_processes_stay_bitwise_equal(work, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): compare runs each recipe on both processes, each
    taking half of every global batch — DDP, with GeoLoRA's resizable factors kept out of it
    (no DDP wrapper at all when they are all that trains) —; the processes end bitwise equal
    (checked by the job itself: a divergence fails the command), rank 0 writes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "geopeft", "compare", *sft_args(work, tmp_path, "methods=[stella,geolora]", "full=true")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "causal_lm_sft"
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["stella", "geolora", "full"]
    assert all(r["processes"] == 2 and len(r["fingerprint"]) == 64 for r in runs)
    assert done.stdout.count("| stella |") == 1  # one table: rank 0 prints
