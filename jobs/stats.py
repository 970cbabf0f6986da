"""Intervals and verdicts for `geopeft compare` over several seeds.

A run's outcome on the test split is a 0/1 vector `correct` (one entry per test example).
Several seeds give a matrix X of shape (n seeds, m examples); a paired comparison of a
recipe R with LoRA uses X = correct_R − correct_LoRA, paired by seed (same head init and
batches) and by example. The estimate is the grand mean of X; its variance is

    var(mean) ≈ var_s(row means) / n  +  var_i(column means) / m

(the seed-to-seed spread of the per-seed accuracy, and the example-to-example spread of the
per-example mean over seeds; each term also holds a share of the seed × example noise,
so the sum over-counts it: conservative), and the 95% interval is mean ± t(0.975, n − 1) ·
√var — Student's t with the seeds' degrees of freedom, the scarcer of the two. See
docs/compare.md for why this is valid here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no difference detected"


def t_quantile(df: int, q: float = 0.975) -> float:
    """Student's t quantile (scipy comes with the jobs extra, through scikit-learn)."""
    from scipy.stats import t

    return float(t.ppf(q, df))


def interval(x: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high): the 95% interval of the grand mean of x (n seeds, m examples), n ≥ 2."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"an interval needs at least 2 seeds × 2 examples, got shape {x.shape}")
    n, m = x.shape
    mean = float(x.mean())
    var = x.mean(1).var(ddof=1) / n + x.mean(0).var(ddof=1) / m
    half = t_quantile(n - 1) * math.sqrt(var)
    return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
    """better / worse when the interval of (recipe − LoRA) excludes 0, else no difference."""
    if low > 0:
        return BETTER
    if high < 0:
        return WORSE
    return NO_DIFFERENCE


def correct_matrix(runs: Sequence[dict]) -> np.ndarray:
    """(seeds, examples) 0/1 matrix from runs' `test_correct` lists, in the runs' order."""
    return np.array([r["test_correct"] for r in runs], dtype=np.float64)


def vs_reference(runs: Sequence[dict], reference: Sequence[dict]) -> dict:
    """{diff_mean, ci95, verdict} of runs − reference in accuracy points, paired by seed
    (the two lists in the same seed order) and by test example."""
    seeds, ref_seeds = [r["seed"] for r in runs], [r["seed"] for r in reference]
    if seeds != ref_seeds:
        raise ValueError(f"paired runs need the same seeds in the same order, got {seeds} and {ref_seeds}")
    mean, low, high = interval(correct_matrix(runs) - correct_matrix(reference))
    return {"diff_mean": 100 * mean, "ci95": [100 * low, 100 * high], "verdict": verdict(low, high)}


def lr_range(lrs: Sequence[float], accs: Sequence[float], within: float = 0.01) -> dict:
    """The contiguous run of grid points (lrs ascending) around the best accuracy whose
    accuracy is within `within` of it: {best_lr, low, high, decades} (decades = log10 high/low;
    0 when only the best point qualifies; the grid's spacing bounds the resolution)."""
    order = np.argsort(lrs)
    lrs, accs = [lrs[i] for i in order], [accs[i] for i in order]
    best = int(np.argmax(accs))  # first of equals: the smaller lr
    lo = hi = best
    while lo > 0 and accs[lo - 1] >= accs[best] - within:
        lo -= 1
    while hi < len(lrs) - 1 and accs[hi + 1] >= accs[best] - within:
        hi += 1
    return {"best_lr": lrs[best], "low": lrs[lo], "high": lrs[hi],
            "decades": math.log10(lrs[hi] / lrs[lo])}
