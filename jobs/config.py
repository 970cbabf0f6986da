"""Loading a job config: YAML file(s) + dotted overrides, validated against `schema.JobConfig`.

    cfg = load_config("configs/minilm.yaml", ["methods=[lora,stella]", "train.steps=200"])

Every problem (an unknown key, a value of the wrong type, an unknown choice, a missing
file) is a `ConfigError` naming the key and what is accepted, raised before anything runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from geopeft.errors import ConfigError, did_you_mean

from .schema import CHOICES, JobConfig


def _schema_at(path: Sequence[str]) -> type | None:
    """The dataclass at a dotted key path of JobConfig (None past a free-form dict)."""
    cls: Any = JobConfig
    for part in path:
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return None
        cls = fields[part].default_factory if fields[part].default_factory is not dataclasses.MISSING else None
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return None
    return cls


def _translate(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = exc.full_key or ""
    if isinstance(exc, ConfigKeyError):
        *parent, leaf = key.split(".") if key else [""]
        cls = _schema_at(parent)
        accepted = [f.name for f in dataclasses.fields(cls)] if cls else []
        where = f" under {'.'.join(parent)!r}" if parent else ""
        return ConfigError(f"unknown config key {key!r} (in {source}){did_you_mean(leaf, accepted)} "
                           f"accepted keys{where}: {', '.join(accepted)}")
    message = str(exc.msg).split("\n")[0]
    return ConfigError(f"bad value for config key {key!r} (in {source}): {message}")


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (see configs/ for examples)")
    try:
        data = OmegaConf.load(path)
    except Exception as exc:  # yaml syntax errors
        raise ConfigError(f"cannot parse config file {str(path)!r}: {exc}") from exc
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return data


def _layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The file and the files it names as `base`, base first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config files name each other as base: {' -> '.join(map(str, seen + (path,)))}")
    data = _read_yaml(path)
    base = data.get("base")
    layers = _layers(path.parent / str(base), seen + (path,)) if base else []
    return layers + [(str(path), data)]


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> DictConfig:
    """The validated config (a DictConfig typed as JobConfig); `run` defaults to the file's stem."""
    cfg = OmegaConf.structured(JobConfig)
    layers = _layers(Path(path)) if path is not None else []
    for bad in [o for o in overrides if "=" not in o]:
        raise ConfigError(f"override {bad!r} is not key=value (e.g. train.steps=200)")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse the overrides {list(overrides)}: {exc}") from exc
    for source, layer in layers + [("the command line", dotlist)]:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise _translate(exc, source) from exc
    if cfg.run is None:
        cfg.run = Path(path).stem if path is not None else "run"
    check_values(cfg)
    resolve_defaults(cfg)
    return cfg


ENCODER_TARGETS = ["query", "key", "value", "dense"]
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def resolve_defaults(cfg: DictConfig) -> None:
    """Fill what null means for this model and task, and make the user's paths absolute, so
    the resolved config (config.yaml) says what ran."""
    if cfg.adapt.targets is None and not cfg.model.path and cfg.model.kind in ("minilm", "bert"):
        cfg.adapt.targets = list(ENCODER_TARGETS)
    if cfg.adapt.trainable is None:
        if cfg.task == "causal_lm":
            cfg.adapt.trainable = []
        elif not cfg.model.path:
            cfg.adapt.trainable = ["classifier"]
    if cfg.model.path and Path(cfg.model.path).expanduser().is_dir():
        cfg.model.path = str(Path(cfg.model.path).expanduser().resolve())
    for key in ("path", "val_path", "test_path"):
        if cfg.data[key]:
            cfg.data[key] = str(Path(cfg.data[key]).expanduser().resolve())


def check_values(cfg: DictConfig) -> None:
    """Choices and ranges the types alone do not express."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key {key!r} is {value!r}{did_you_mean(str(value), choices)} "
                              f"accepted: {', '.join(choices)}")
    for key in ("train.steps", "train.batch_size", "train.eval_every", "train.checkpoint_every",
                "adapt.rank", "model.max_length"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"config key {key!r} must be at least 1, got {OmegaConf.select(cfg, key)}")
    if cfg.jobs is not None and cfg.jobs < 1:
        raise ConfigError(f"config key 'jobs' must be at least 1 (or null: one per core), got {cfg.jobs}")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"config key 'seeds' lists a seed twice: {list(cfg.seeds)}")
    if not 0 <= cfg.train.warmup < 1:
        raise ConfigError(f"config key 'train.warmup' is a share of the steps in [0, 1), got {cfg.train.warmup}")
    if cfg.model.kind in ("timm", "torchvision") and not cfg.model.name and not cfg.model.path:
        raise ConfigError(f"model.kind={cfg.model.kind} needs model.name (e.g. resnet18)")
    if cfg.model.path and cfg.model.kind != "minilm":
        raise ConfigError(f"model.path ({cfg.model.path!r}) and model.kind ({cfg.model.kind!r}) both "
                          "name a model: keep one (model.path replaces model.kind)")
    if cfg.task == "causal_lm" and not cfg.model.path:
        raise ConfigError("task=causal_lm fine-tunes a Hugging Face causal LM: set model.path to its "
                          "directory (config.json, weights and tokenizer)")
    if cfg.task == "causal_lm" and not cfg.data.path:
        raise ConfigError("task=causal_lm trains on your file: set data.path (.jsonl, .json, .csv or "
                          ".parquet with prompt and response, or messages)")
    if cfg.data.path and cfg.model.path == "" and cfg.model.kind not in ("minilm", "bert"):
        raise ConfigError(f"data.path holds text; model.kind={cfg.model.kind} reads images: use "
                          "model.kind minilm or bert, or model.path")
    for key in ("path", "val_path", "test_path"):
        name = cfg.data[key]
        if not name:
            continue
        if not name.endswith(DATA_SUFFIXES):
            raise ConfigError(f"data.{key} {name!r} is not a data file this job reads: "
                              f"{', '.join(DATA_SUFFIXES)}")
        if not Path(name).expanduser().is_file():
            raise ConfigError(f"data.{key}: file {name!r} does not exist (relative paths are "
                              f"relative to the working directory, {str(Path.cwd())!r})")
    if (cfg.data.val_path or cfg.data.test_path) and not cfg.data.path:
        raise ConfigError("data.val_path / data.test_path need data.path, the training file")


def check_methods(names: Sequence[str]) -> None:
    """Every recipe name is registered (the registry's error lists them and the closest)."""
    from geopeft.registry import get_registry

    reg = get_registry()
    for name in names:
        if name == "full":
            raise ConfigError("'full' is not a recipe: full fine-tuning is the reference that "
                              "compare adds when full=true")
        reg.get("method", name)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
