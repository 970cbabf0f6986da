"""The job data sets: fixed, seeded, disjoint train / validation / test splits."""

from __future__ import annotations

import numpy as np
import pytest

from geopeft.errors import ConfigError
from geopeft.jobs.data import load_dataset, rotten_tomatoes_examples, split_indices

# sha256 of each split of rotten_tomatoes at the default fractions and split_seed=0
# (docs/data.md): a change to the loader or the split shows up here.
RT_FINGERPRINTS = {
    "train": "a298151a68bf1a0c5ea49dfafeed9bad793a57b9c3f8063a6703c14e6eda0cc9",
    "val": "e64a803875739701524dc19a2422fa8de23ef5087e5a43283fd6755ecf5c388a",
    "test": "775b2331e93d9fc0a0d57e447e2235db80d706b43f6cd96b2d992020fb1b15a7",
}


def test_rotten_tomatoes_split_is_fixed_and_disjoint():
    a, b = load_dataset("rotten_tomatoes"), load_dataset("rotten_tomatoes")
    prints = {s: getattr(a, s).fingerprint() for s in ("train", "val", "test")}
    assert prints == {s: getattr(b, s).fingerprint() for s in ("train", "val", "test")}
    assert prints == RT_FINGERPRINTS
    texts = [set(getattr(a, s).inputs) for s in ("train", "val", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    all_texts, labels = rotten_tomatoes_examples()
    assert sum(map(len, texts)) == len(all_texts) == len(set(all_texts))  # a partition, no duplicates
    assert (len(a.val), len(a.test)) == (round(0.1 * len(labels)), round(0.15 * len(labels)))
    assert set(np.unique(labels)) == {0, 1} and 0.5 < labels.mean() < 0.65  # fresh is the majority
    other = load_dataset("rotten_tomatoes", split_seed=1)
    assert other.test.fingerprint() != prints["test"]


def test_split_indices_partition_and_errors():
    tr, va, te = split_indices(1797, 0.1, 0.15, seed=3)
    assert np.array_equal(np.sort(np.concatenate([tr, va, te])), np.arange(1797))
    tr2, _, _ = split_indices(1797, 0.1, 0.15, seed=3)
    assert np.array_equal(tr, tr2)
    with pytest.raises(ConfigError, match="sum to less than 1"):
        split_indices(10, 0.5, 0.5, seed=0)
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        load_dataset("digit")


def test_drug_reviews_three_classes_split_is_fixed():
    d = load_dataset("drug_reviews", val_fraction=0.15, test_fraction=0.3, split_seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (538, 147, 293) and d.kind == "text"
    assert d.classes == ("negative", "neutral", "positive")
    assert np.bincount(np.concatenate([d.train.labels, d.val.labels, d.test.labels])).tolist() == [256, 90, 632]
    assert d.test.fingerprint() == "e6b379dcca5eb9fab6606627f9ef7b1db78a53e8801285f88d5413a2abce7124"
    assert not any("&#039;" in t or t.startswith('"') for t in d.train.inputs)  # entities and quotes undone
