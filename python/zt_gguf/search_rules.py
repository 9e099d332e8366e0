"""The search's decisions as pure functions: which candidate is better, when a race stops a candidate, the
gain of a probe, the dominant head type and the selected heads, the candidates' bias matrices and the
coordinates of the finer stages. See "Methods" and "Early stopping" in zt_gguf.search."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .search_config import SearchConfig
from .search_state import Evaluation

__all__ = [
    "RACE_MIN_CHUNKS",
    "RACE_Z",
    "TIE_TOL",
    "Coordinate",
    "band_coordinates",
    "best_index",
    "better",
    "block_bias",
    "clearly_worse",
    "dominant_type",
    "gain",
    "head_coordinates",
    "head_gammas",
    "max_candidates",
    "max_chunk_jobs",
    "probe_items",
    "top_heads",
]

RACE_Z = 2.58  # one-sided z of the racing bound
RACE_MIN_CHUNKS = 2  # no early stop before this many chunks
TIE_TOL = 1e-12


class Coordinate(NamedTuple):
    """A block of the bias matrix that the coordinate ascent sets to one gamma."""

    layers: np.ndarray
    heads: list[int]
    label: str


def _value(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def better(a: Evaluation, b: Evaluation) -> bool:
    """a beats b: higher objective, or a tie and a smaller norm; a candidate stopped early never wins."""
    if a.stopped_early:
        return False
    if b.stopped_early:
        return True
    va, vb = _value(a.objective), _value(b.objective)
    if va > vb + TIE_TOL:
        return True
    if va < vb - TIE_TOL:
        return False
    return a.norm < b.norm - 1e-9


def best_index(start: Evaluation | None, recs: Sequence[Evaluation]) -> int | None:
    """The best-so-far rule: the index of the last of recs to beat start and every rec before it (None:
    start stays the best). With no start, recs[0] is the first best."""
    best, index = start, None
    for i, rec in enumerate(recs):
        if best is None or better(rec, best):
            best, index = rec, i
    return index


def clearly_worse(d: np.ndarray) -> bool:
    """The racing bound on paired differences d (candidate minus reference, one per item scored):
    mean(d) + RACE_Z * sd(d) / sqrt(m) < 0."""
    upper = float(np.mean(d)) + RACE_Z * float(np.std(d, ddof=1)) / math.sqrt(len(d))
    return upper < 0


def gain(rec: Evaluation, base: Evaluation) -> float:
    """rec's objective minus base's on the same items: the paired mean on rec's items when rec was scored on
    fewer items than base (stopped early, or probed on a subsample); base must then have per-item values, or
    be scored on exactly rec's items."""
    m = rec.n_items_evaluated
    if m < base.n_items_evaluated:
        if rec.values is None or base.values is None:
            raise ValueError("a gain on fewer items than the reference's needs per-item values")
        return float(np.mean(np.asarray(rec.values) - np.asarray(base.values[:m])))
    if m != base.n_items_evaluated:
        raise ValueError(f"a gain of a candidate scored on {m} items against one scored on fewer")
    return _value(rec.objective) - _value(base.objective)


def probe_items(config: SearchConfig, n_items: int) -> int | None:
    """The items each probe is scored on: None (all n_items, the paper) unless config.probe_items is smaller;
    then that many, rounded up to whole chunks (the search scores in chunks)."""
    if config.probe_items is None:
        return None
    m = math.ceil(config.probe_items / config.chunk_size) * config.chunk_size
    return m if m < n_items else None


def dominant_type(gains_up: Sequence[float], gains_down: Sequence[float]) -> str:
    """ "up" when the positive up-gains sum to at least the positive down-gains, else "down"."""
    positive_up = sum(max(g, 0.0) for g in gains_up)
    positive_down = sum(max(g, 0.0) for g in gains_down)
    return "up" if positive_up >= positive_down else "down"


def top_heads(gains: Sequence[float], head_fraction: float) -> list[int]:
    """The ceil(head_fraction * n_head) heads with the largest gains, only those with a positive gain when
    fewer are positive, the best one when none is; in head order."""
    n_head = len(gains)
    ranked = sorted(range(n_head), key=lambda h: (-gains[h], h))
    k = math.ceil(head_fraction * n_head)
    positive = [h for h in ranked if gains[h] > 0]
    return sorted(ranked[:k] if len(positive) >= k else positive or ranked[:1])


def block_bias(bias: np.ndarray, layers: np.ndarray, heads: Sequence[int], gamma: float) -> np.ndarray:
    """A copy of bias with ln(gamma) on the block (layers x heads)."""
    out = bias.copy()
    out[np.ix_(layers, list(heads))] = np.float32(math.log(gamma))
    return out


def band_coordinates(layers: np.ndarray, n_bands: int, heads: list[int]) -> list[Coordinate]:
    """The heads S on each of (at most) n_bands contiguous bands of layers."""
    bands = [b for b in np.array_split(layers, min(n_bands, len(layers))) if len(b)]
    return [Coordinate(b, heads, f"layers {b[0]}-{b[-1]} heads {heads}") for b in bands]


def head_coordinates(
    layers: np.ndarray, gains_up: Sequence[float], gains_down: Sequence[float]
) -> list[Coordinate]:
    """Single (layer, head) entries: heads in the order of their best probe gain, layers in order."""
    best_gain = [max(u, d) for u, d in zip(gains_up, gains_down)]
    order = sorted(range(len(best_gain)), key=lambda h: (-best_gain[h], h))
    return [Coordinate(np.array([layer]), [h], f"layer {layer} head {h}") for h in order for layer in layers]


def head_gammas(best_gamma: float, probe_up: float, probe_down: float) -> list[float]:
    """The gammas an entry of the "heads" stage tries: 1, the paper's gamma, the probes (no repeats)."""
    gammas: list[float] = []
    for g in (1.0, best_gamma, probe_up, probe_down):
        if g not in gammas:
            gammas.append(g)
    return gammas


def max_chunk_jobs(config: SearchConfig, n_head: int, n_items: int) -> int:
    """The most chunks the method scores: every candidate of max_candidates on every chunk, but the probes
    (and a baseline on their items, which an objective without per-item values needs) on probe_items only."""
    n_chunks = math.ceil(n_items / config.chunk_size)
    m = probe_items(config, n_items)
    if m is None:
        return max_candidates(config, n_head) * n_chunks
    probe_chunks = math.ceil(m / config.chunk_size)
    return (max_candidates(config, n_head) - 2 * n_head) * n_chunks + (2 * n_head + 1) * probe_chunks


def max_candidates(config: SearchConfig, n_head: int) -> int:
    """The most candidates the method scores: baseline, 2 probes a head, the larger grid, the budget."""
    n = 1 + 2 * n_head + max(len(config.grid_up), len(config.grid_down))
    return n + (config.budget if config.method in ("bands", "heads") else 0)
