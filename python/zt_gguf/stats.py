"""Held-out statistics: the Wilson interval of an accuracy, the paired bootstrap interval of a difference."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["paired_bootstrap_delta", "wilson_interval"]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n ((0, 1) when n == 0)."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def paired_bootstrap_delta(
    a_correct: Sequence[float] | np.ndarray,
    b_correct: Sequence[float] | np.ndarray,
    seed: int,
    n_boot: int = 2000,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(delta, lo, hi): delta = mean(b) - mean(a) over paired items, with a percentile bootstrap interval.

    a and b are per-item values on the same items in the same order (0/1 correctness, or any per-item
    score); the items are resampled with replacement, keeping the pairs together.
    """
    a = np.asarray(a_correct, dtype=np.float64)
    b = np.asarray(b_correct, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-D of the same length, got {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("no items")
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError("need n_boot >= 1 and 0 < level < 1")
    d = b - a
    delta = float(d.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return delta, float(lo), float(hi)
