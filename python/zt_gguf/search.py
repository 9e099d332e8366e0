"""Calibration search: which first-token biases to deploy, judged by an objective on calibration items.

The search sees items and a scoring function (:data:`Scorer`: set a bias matrix, score items), never
llama.cpp, so it can be tested with a fake scorer. A bias matrix is float32 ``[n_layer, n_head]`` in logit
units (ln gamma). Every candidate is scored on the same items, in one fixed order (a seeded permutation of
the items given), ``chunk_size`` items per scorer call.

Methods
-------
``paper`` (ZeroTuning, zerotuning-method.md section 2): score the baseline (all zeros); for every query-head
index h, probe gamma=probe_up and gamma=probe_down on head h in every layer of [layer_start, layer_end); the
gain of a probe is its objective minus the baseline's. The dominant type is "up" if the positive up-gains sum
to at least the positive down-gains, else "down". The selected heads S are the ceil(head_fraction * n_head)
heads of that type with the largest gains, but only those with a positive gain when fewer are positive (at
least one head, the best, when none is). One gamma from the type's grid is then applied to S in all the
layers of the range; the best of the baseline and the grid candidates is the result.

``bands`` (beyond the paper): the paper procedure, then coordinate ascent over n_bands contiguous layer
bands: for each band in turn, try every gamma of the type's grid and 1 (off) on the heads S of that band,
keeping the rest of the incumbent; move to the best if it beats the incumbent. Passes repeat until a pass
makes no move or ``budget`` new candidates have been scored.

``heads`` (beyond the paper): the paper procedure, then a greedy coordinate search over single (layer, head)
entries, heads in the order of their best probe gain, layers in order; each entry tries gamma in {1, the
paper's gamma, probe_up, probe_down} with the other entries of the incumbent kept; same passes and budget.

``probe_items`` (beyond the paper, off by default): the probes are scored on the first probe_items items of
the fixed order only (rounded up to whole chunks), and a probe's gain is its paired mean there against the
baseline's per-item values (against a baseline scored on those items when the objective has no per-item
values); the baseline and the grid are scored on every item. It cuts the probes' cost; the heads it selects
come from fewer items (benchmarks/results/search_cost.md).

"Better" means a higher objective; a tie (within 1e-12) goes to the smaller sum of |ln gamma| (so toward the
baseline), then to the earlier candidate. A candidate stopped early is never the best.

Early stopping (racing)
-----------------------
A candidate is raced against a reference that has been scored on all the items: the baseline for the
probes (their gains are measured against it), the best candidate so far otherwise (the best grid candidate
so far, or the best move so far for the current band/entry, starting from the incumbent). After each chunk,
with the candidate scored on the first m items, d_i = v_i(candidate) - v_i(reference) for i < m, where v_i
is the per-item value whose mean is the objective (0/1 correctness for the accuracy objectives, the answer's
log-probability for "logprob", minus the entropy for the entropy objectives). The candidate is stopped when

    mean(d) + 2.58 * sd(d) / sqrt(m) < 0        (sd with ddof=1)

and at least 2 chunks have been scored (small-sample guard), i.e. when it is clearly worse than the
reference on the same items. "mutual-information" is not a mean of per-item values: its candidates are never
stopped. A probe stopped early gets the paired mean mean(d) as its gain (negative: it is never selected when a
head with a positive gain exists). The savings are reported as the share of items not scored, relative to
scoring every candidate on every item.

Events
------
``events(name, data)``, when given, tells what the search is about to do and what it found early:
``"plan"`` before the first candidate (``n_candidates``: the most the method will score, ``n_items``,
``chunk_size``, ``n_chunks``); ``"estimate"`` once the first chunk of items has been scored by the scorer
(``chunk_s``: its wall time, ``estimate_s``: chunk_s x the plan's chunks / workers (every candidate on every
chunk, the probes on probe_items only), the time without early stopping or the checkpoint, ``n_workers``);
``"candidate"`` before each candidate (``description``, ``index``); ``"done"`` after each candidate this run
scores (``description``, ``n_done``: the count so far; with several workers candidates finish out of order);
``"no_discrimination"`` once, when the baseline and the first EQUAL_PROBE_CHECK probes give exactly the same
per-item values on the first chunk (the scoring cannot tell those candidates apart: an accuracy of a
generation that never names a label, for instance).
The names are the ``EVENT_*`` constants of zt_gguf.search_events.

Pools
-----
Candidates that do not depend on each other (the probes; the grid; the moves of one band or entry) are
scored as one batch over a :class:`ChunkPool`: the :class:`LocalPool` (this process, one chunk at a time)
or several workers (zt_gguf.distributed). Each job is one chunk of one candidate, always the same items
(chunk k is items[k*chunk_size:(k+1)*chunk_size] of the fixed order), so a worker scores exactly what a
sequential run scores. Where a candidate's racing reference is the best so far (the grid, the moves), the
candidates after an unfinished one are scored ahead, and the race is replayed chunk by chunk in order once
the reference is known: every candidate stops where the sequential search stops it, and the search makes the
same picks with any number of workers; only the chunks scored ahead beyond a stop are extra work.

Checkpoint and resume
---------------------
Every completed candidate evaluation (stopped early or not) is stored in a :class:`SearchState`, keyed by
objective + a hash of the items (in evaluation order) + a hash of the bias matrix rounded to 1e-6, and the
state is written atomically (temporary file + os.replace) to the checkpoint path after each one. A rerun
with the same arguments replays the same sequence of candidates, takes the completed ones from the state
without calling the scorer, and produces the same result. Records stopped early are reused only under the
same racing settings. The records are kept per ``scorer_id`` (model, scoring settings): one checkpoint file
can hold the runs of several tasks or scorings, and a run uses only its scorer's records.

Modules
-------
This module runs the methods; the parts live in search_config (SearchConfig, its validation, SearchError),
search_rules (the decisions, as pure functions), search_eval (scoring batches of candidates: racing, pools,
the checkpoint), search_state (the checkpoint's records and hashes), search_pool (Scorer, ChunkPool,
LocalPool) and search_events (progress and events). Their public names are importable from here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .objectives import get_objective
from .search_config import METHODS, SearchConfig, SearchError, validated
from .search_eval import Evaluator, RunStats
from .search_events import (
    EVENT_PLAN,
    Events,
    Progress,
    SearchEvents,
    StageProgress,
)
from .search_pool import ChunkPool, LocalPool, Scorer, context_scorer
from .search_rules import (
    RACE_MIN_CHUNKS,
    RACE_Z,
    TIE_TOL,
    Coordinate,
    band_coordinates,
    best_index,
    block_bias,
    dominant_type,
    gain,
    head_coordinates,
    head_gammas,
    max_candidates,
    max_chunk_jobs,
    probe_items,
    top_heads,
)
from .search_state import STATE_VERSION, Evaluation, SearchState, bias_hash, items_hash
from .tasks import Item

__all__ = [
    "METHODS",
    "RACE_MIN_CHUNKS",
    "RACE_Z",
    "STATE_VERSION",
    "TIE_TOL",
    "Candidate",
    "ChunkPool",
    "Evaluation",
    "Events",
    "LocalPool",
    "Progress",
    "RunStats",
    "Scorer",
    "SearchConfig",
    "SearchError",
    "SearchResult",
    "SearchState",
    "bias_hash",
    "context_scorer",
    "items_hash",
    "search",
]


@dataclass
class Candidate:
    """A candidate as reported in SearchResult."""

    description: str
    stage: str
    objective: float
    n_items_evaluated: int
    stopped_early: bool
    summary: dict[str, Any]


@dataclass
class SearchResult:
    method: str
    objective: str
    bias: np.ndarray  # float32 [n_layer, n_head], ln gamma
    gamma: np.ndarray  # float64 [n_layer, n_head], exp(bias)
    heads: list[int]  # the head indices selected by the paper's profiling (S)
    head_type: str  # "up" | "down"
    best_gamma: float  # the paper's gamma for S (1.0 when the baseline won the paper stage)
    baseline_objective: float
    best_objective: float
    best_description: str
    gains_up: list[float]  # per head index, probe gamma=probe_up
    gains_down: list[float]  # per head index, probe gamma=probe_down
    baseline_summary: dict[str, Any]
    best_summary: dict[str, Any]
    candidates: list[Candidate]  # every distinct candidate, in the order first evaluated
    n_items: int
    n_evaluations: int  # distinct candidates evaluated
    items_scored: int  # items scored over all candidates (early stopping makes it smaller)
    items_full: int  # n_evaluations * n_items: the cost without early stopping
    config: dict[str, Any]
    run: RunStats = field(default_factory=RunStats, compare=False)

    @property
    def savings(self) -> float:
        """Share of item scorings saved by early stopping."""
        return 1.0 - self.items_scored / self.items_full if self.items_full else 0.0

    def to_dict(self, include_run: bool = True) -> dict[str, Any]:
        """A JSON-serialisable dict (arrays as nested lists)."""
        d: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            if name == "run" and not include_run:
                continue
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, list) and value and isinstance(value[0], Candidate):
                value = [asdict(c) for c in value]
            elif isinstance(value, RunStats):
                value = asdict(value)
            d[name] = value
        d["savings"] = self.savings
        return d


@dataclass(frozen=True)
class Profile:
    """What the paper stage found: the probe gains, the heads S, their type and the paper's gamma for S."""

    heads: list[int]
    head_type: str  # "up" | "down"
    best_gamma: float  # 1.0 when the baseline won the grid
    gains_up: list[float]
    gains_down: list[float]


class _Search:
    """The methods of one search (paper, then bands or heads) over an Evaluator."""

    def __init__(self, config: SearchConfig, shape: tuple[int, int], ev: Evaluator) -> None:
        self.config = config
        self.shape = shape
        self.ev = ev
        self.progress = ev.progress
        start, end = config.layer_start, config.layer_end if config.layer_end is not None else shape[0]
        self.layers = np.arange(start, end)

    def _bias(self, heads: Sequence[int], gamma: float) -> np.ndarray:
        """The candidate with gamma on heads in every layer of the range, 1 elsewhere."""
        return block_bias(np.zeros(self.shape, dtype=np.float32), self.layers, heads, gamma)

    # --- paper ---

    def paper(self) -> tuple[Evaluation, Evaluation, Profile]:
        """(baseline, best, profile): the baseline, the probes, the grid on the selected heads."""
        base = self._baseline()
        gains_up, gains_down = self._probes(base)
        head_type = dominant_type(gains_up, gains_down)
        heads = top_heads(gains_up if head_type == "up" else gains_down, self.config.head_fraction)
        best, best_gamma = self._grid(base, heads, head_type)
        return base, best, Profile(heads, head_type, best_gamma, gains_up, gains_down)

    def _baseline(self) -> Evaluation:
        self.progress.begin("baseline", 1)
        base = self.ev.evaluate(np.zeros(self.shape, np.float32), "baseline", None)
        self.progress.end()
        return base

    def _probes(self, base: Evaluation) -> tuple[list[float], list[float]]:
        """(gains_up, gains_down) per head index: both probes of head h in every layer, raced against base; on
        the first probe_items items only when the config says so (the gains are then measured on those items,
        against the baseline's values there, or a baseline scored on them when the objective has none)."""
        c = self.config
        m = probe_items(c, self.ev.n)
        ref = base
        if m is not None and base.values is None:
            self.progress.begin("probe baseline", 1, m)
            zeros = np.zeros(self.shape, np.float32)
            ref = self.ev.evaluate(zeros, f"baseline on {m} items", None, n_items=m)
            self.progress.end()
        self.progress.begin("probe", 2 * self.shape[1], m)
        probes = []
        for h in range(self.shape[1]):
            probes.append((self._bias([h], c.probe_up), f"probe head {h} gamma={c.probe_up:g}"))
            probes.append((self._bias([h], c.probe_down), f"probe head {h} gamma={c.probe_down:g}"))
        recs = self.ev.evaluate_batch(probes, ref, chain=False, n_items=m)
        gains_up = [gain(rec, ref) for rec in recs[0::2]]
        gains_down = [gain(rec, ref) for rec in recs[1::2]]
        self.progress.end()
        return gains_up, gains_down

    def _grid(self, base: Evaluation, heads: list[int], head_type: str) -> tuple[Evaluation, float]:
        """(best, its gamma): the best of base (gamma 1) and the type's grid on heads."""
        grid = self.config.grid_up if head_type == "up" else self.config.grid_down
        self.progress.begin("grid", len(grid))
        recs = self.ev.evaluate_batch(
            [(self._bias(heads, g), f"heads {heads} gamma={g:g}") for g in grid], base, chain=True
        )
        j = best_index(base, recs)
        self.progress.end()
        return (base, 1.0) if j is None else (recs[j], grid[j])

    # --- bands and heads ---

    def bands(self, start: Evaluation, profile: Profile) -> Evaluation:
        c = self.config
        coordinates = band_coordinates(self.layers, c.n_bands, profile.heads)
        grid = c.grid_up if profile.head_type == "up" else c.grid_down
        return self._ascent("bands", start, coordinates, (*grid, 1.0))

    def heads(self, start: Evaluation, profile: Profile) -> Evaluation:
        c = self.config
        coordinates = head_coordinates(self.layers, profile.gains_up, profile.gains_down)
        gammas = head_gammas(profile.best_gamma, c.probe_up, c.probe_down)
        return self._ascent("heads", start, coordinates, gammas)

    def _ascent(
        self, stage: str, start: Evaluation, coordinates: list[Coordinate], gammas: Sequence[float]
    ) -> Evaluation:
        """Coordinate ascent from start: passes over the coordinates until a pass makes no move or the budget
        of new candidates is spent; each coordinate's gammas are raced as a chain from the incumbent."""
        budget = self.config.budget
        self.progress.begin(stage, budget)
        incumbent, used, n_moves = start, 0, 0
        moved = True
        while moved and used < budget:
            moved = False
            for coordinate in coordinates:
                label = f"{stage} move {n_moves + 1}: {coordinate.label}"
                line, used = self._line(incumbent, coordinate, gammas, label, used)
                recs = self.ev.evaluate_batch(line, incumbent, chain=True)
                j = best_index(incumbent, recs)
                if j is not None:
                    incumbent, moved, n_moves = recs[j], True, n_moves + 1
                if used >= budget:
                    break
        self.progress.end()
        return incumbent

    def _line(
        self, incumbent: Evaluation, coordinate: Coordinate, gammas: Sequence[float], label: str, used: int
    ) -> tuple[list[tuple[np.ndarray, str]], int]:
        """(candidates, used): the incumbent with each gamma on the coordinate, skipping the incumbent itself;
        a candidate not scored before spends one of the budget, and the line ends where the budget does."""
        inc_bias = self.ev.biases[incumbent.key]
        line: list[tuple[np.ndarray, str]] = []
        for g in gammas:
            cand = block_bias(inc_bias, coordinate.layers, coordinate.heads, g)
            if self.ev.key(cand) == incumbent.key:
                continue
            if not self.ev.seen(cand):
                if used >= self.config.budget:
                    break
                used += 1
            line.append((cand, f"{label} gamma={g:g}"))
        return line, used

    # --- the result ---

    def result(self, base: Evaluation, best: Evaluation, profile: Profile) -> SearchResult:
        log = self.ev.log
        bias = self.ev.biases[best.key].astype(np.float32)
        candidates = [
            Candidate(r.description, r.stage, r.objective, r.n_items_evaluated, r.stopped_early, r.summary)
            for r in log.values()
        ]
        return SearchResult(
            method=self.config.method,
            objective=self.config.objective,
            bias=bias,
            gamma=np.exp(bias.astype(np.float64)),
            heads=profile.heads,
            head_type=profile.head_type,
            best_gamma=profile.best_gamma,
            baseline_objective=base.objective,
            best_objective=best.objective,
            best_description=best.description,
            gains_up=profile.gains_up,
            gains_down=profile.gains_down,
            baseline_summary=base.summary,
            best_summary=best.summary,
            candidates=candidates,
            n_items=self.ev.n,
            n_evaluations=len(log),
            items_scored=sum(r.n_items_evaluated for r in log.values()),
            items_full=len(log) * self.ev.n,
            config=self.config.to_dict(),
            run=self.ev.run,
        )


def scoring_order(items: Sequence[Item], config: SearchConfig) -> list[Item]:
    """The items in the order the search scores them (a permutation seeded by config.seed)."""
    order = np.random.default_rng(config.seed).permutation(len(items))
    return [items[i] for i in order]


def search_chunks(items: Sequence[Item], config: SearchConfig) -> list[list[Item]]:
    """The chunks the search scores the items in: every candidate is scored chunk by chunk, each chunk in one
    call of the scorer (so a caller that scores the same items again can group them the same way)."""
    ordered = scoring_order(items, config)
    return [ordered[i : i + config.chunk_size] for i in range(0, len(ordered), config.chunk_size)]


def search(
    scorer: Scorer | None,
    items: Sequence[Item],
    shape: tuple[int, int],
    config: SearchConfig | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    scorer_id: str = "",
    events: Events | None = None,
    pool: ChunkPool | None = None,
) -> SearchResult:
    """Run the calibration search (see the module docstring) and return the best candidate.

    shape is (n_layer, n_head) of the bias matrix. checkpoint: a JSON file to resume from and save to after
    every completed candidate (None: no checkpoint). scorer_id names what the scorer computes (model file,
    scoring settings) and must match the checkpoint's. Exceptions of the scorer propagate; the completed
    candidates are in the checkpoint. events(name, data): see "Events" in the module docstring. pool: where
    the chunks are scored (see "Pools"); None: by scorer, in this process. config is not modified.
    """
    if pool is None:
        if scorer is None:
            raise SearchError("search needs a scorer or a pool")
        pool = LocalPool(scorer)
    shape = (int(shape[0]), int(shape[1]))
    config = validated(config if config is not None else SearchConfig(), shape, items)
    ordered = scoring_order(items, config)
    pool.start(ordered)
    path = Path(checkpoint) if checkpoint is not None else None
    state = SearchState.load(path, scorer_id) if path else SearchState(scorer_id=scorer_id)
    n_candidates, n_chunks = max_candidates(config, shape[1]), math.ceil(len(ordered) / config.chunk_size)
    sink = SearchEvents(events, n_candidates, n_chunks, max_chunk_jobs(config, shape[1], len(ordered)))
    ev = Evaluator(
        pool,
        ordered,
        get_objective(config.objective),
        config,
        state,
        path,
        StageProgress(progress, len(ordered)),
        sink,
    )
    s = _Search(config, shape, ev)
    sink.send(
        EVENT_PLAN, n_candidates=n_candidates, n_items=ev.n, chunk_size=config.chunk_size, n_chunks=n_chunks
    )
    base, best, profile = s.paper()
    if config.method == "bands":
        best = s.bands(best, profile)
    elif config.method == "heads":
        best = s.heads(best, profile)
    return s.result(base, best, profile)
