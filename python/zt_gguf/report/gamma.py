"""The bias matrix of a report and its colour scale.

A bias matrix is float ``[n_layer, n_head]`` in logit units: ``b = ln(gamma)`` is added to the attention logit
of the first token, per layer and query head. ``gamma = 1`` (b = 0) leaves a head untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

GAMMA_FLOOR = 1.25  # a colour scale spans at least gamma in [1/1.25, 1.25]


def as_matrix(biases: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """The biases as a float64 [n_layer, n_head] matrix; ValueError for another shape or an empty one."""
    b = np.asarray(biases, dtype=np.float64)
    if b.ndim != 2 or b.size == 0:
        raise ValueError(f"biases must be a non-empty 2-D [n_layer, n_head] matrix, got shape {b.shape}")
    return b


def gamma_table(biases: np.ndarray) -> np.ndarray:
    """gamma = exp(b), float64, same shape."""
    return np.exp(np.asarray(biases, dtype=np.float64))


def ln_span(b: np.ndarray) -> float:
    """The symmetric colour scale in ln(gamma): max |b| over the finite entries, at least ln(GAMMA_FLOOR)."""
    finite = np.abs(b[np.isfinite(b)])
    vmax = float(finite.max()) if finite.size else 0.0
    return max(vmax, math.log(GAMMA_FLOOR))
