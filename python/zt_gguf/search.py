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
(``chunk_s``: its wall time, ``estimate_s``: chunk_s x chunks x candidates / workers, the time without
early stopping or the checkpoint, ``n_workers``); ``"candidate"`` before each candidate (``description``,
``index``); ``"done"`` after each candidate this run scores (``description``, ``n_done``: the count so far;
with several workers candidates finish out of order); ``"no_discrimination"`` once, when the baseline and
the first EQUAL_PROBE_CHECK probes give exactly the same per-item values on the first chunk (the scoring
cannot tell those candidates apart: an accuracy of a generation that never names a label, for instance).

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
same racing settings; a checkpoint made with another ``scorer_id`` (model, scoring settings) is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .fsutil import atomic_write_bytes
from .metrics import Objective, get_objective, item_results, summarize
from .tasks import Item

if TYPE_CHECKING:
    from .engine import Scores

__all__ = [
    "METHODS",
    "RACE_MIN_CHUNKS",
    "RACE_Z",
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

# sets the bias matrix, then scores the items: one Scores per item, in order
Scorer = Callable[[np.ndarray, Sequence[Item]], "list[Scores]"]
# (stage name, done, total), in items scored (or skipped) within the stage
Progress = Callable[[str, int, int], None]
# (event name, data): see "Events" in the module docstring
Events = Callable[[str, dict[str, Any]], None]

METHODS = ("paper", "bands", "heads")
RACE_Z = 2.58  # one-sided z of the racing bound
RACE_MIN_CHUNKS = 2  # no early stop before this many chunks
TIE_TOL = 1e-12
STATE_VERSION = 1
EQUAL_PROBE_CHECK = 4  # probes compared with the baseline on the first chunk for "no_discrimination"


class SearchError(ValueError):
    """A search that cannot run as asked (configuration, items, checkpoint)."""


@dataclass
class SearchConfig:
    method: str = "paper"  # "paper" | "bands" | "heads"
    objective: str = "accuracy-generate"  # a name in metrics.OBJECTIVES
    probe_up: float = 2.0
    probe_down: float = 0.5
    head_fraction: float = 0.4
    grid_up: tuple[float, ...] = (1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
    grid_down: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    layer_start: int = 0
    layer_end: int | None = None  # exclusive; None: n_layer
    n_bands: int = 3
    budget: int = 60  # new candidates scored by the finer stage ("bands" / "heads")
    early_stop: bool = True
    chunk_size: int = 32
    seed: int = 0  # of the permutation that fixes the order in which items are scored

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid_up"] = list(self.grid_up)
        d["grid_down"] = list(self.grid_down)
        return d


@dataclass
class Evaluation:
    """One candidate scored on the calibration items (the first n_items_evaluated of them)."""

    key: str
    description: str
    stage: str
    objective: float  # on the items evaluated
    n_items_evaluated: int
    n_items: int
    stopped_early: bool
    norm: float  # sum |ln gamma| of the candidate (tie-breaker)
    values: list[float] | None  # per-item objective values, in evaluation order; None: not decomposable
    summary: dict[str, Any]  # metrics.Summary of the items evaluated
    race: str | None = None  # the racing settings under which it was stopped early


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
class RunStats:
    """What this particular run did (differs between an interrupted-and-resumed run and a straight one)."""

    scorer_calls: int = 0
    items_scored: int = 0
    evaluations_from_checkpoint: int = 0


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


# --- hashing and the checkpoint -----------------------------------------------------------------------------


def bias_hash(bias: np.ndarray) -> str:
    """A stable hash of a bias matrix rounded to 1e-6 (shape included)."""
    a = np.round(np.asarray(bias, dtype=np.float64), 6) + 0.0  # + 0.0 turns -0.0 into 0.0
    h = hashlib.sha256(repr(a.shape).encode())
    h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
    return h.hexdigest()


def items_hash(items: Sequence[Item]) -> str:
    """A hash of the items in order (id, prompt, choices, answer)."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item.id, item.prompt, list(item.choices), item.answer]).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class SearchState:
    """Completed candidate evaluations, keyed by objective:items-hash:bias-hash; JSON on disk."""

    scorer_id: str = ""
    evaluations: dict[str, Evaluation] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": STATE_VERSION,
                "scorer_id": self.scorer_id,
                "evaluations": {k: asdict(v) for k, v in self.evaluations.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SearchState:
        obj = json.loads(text)
        if not isinstance(obj, dict) or obj.get("version") != STATE_VERSION:
            raise ValueError(f"not a version-{STATE_VERSION} search checkpoint")
        return cls(
            scorer_id=obj["scorer_id"],
            evaluations={k: Evaluation(**v) for k, v in obj["evaluations"].items()},
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], scorer_id: str = "") -> SearchState:
        """The state saved at path, or an empty one when there is no file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(scorer_id=scorer_id)
        except OSError as e:
            raise SearchError(f"{path}: cannot read the checkpoint: {e.strerror or e}") from None
        try:
            state = cls.from_json(text)
        except (ValueError, KeyError, TypeError) as e:
            raise SearchError(
                f"{path}: not a valid search checkpoint ({e}); remove it to start over"
            ) from None
        if state.scorer_id != scorer_id:
            raise SearchError(
                f"{path}: the checkpoint was made with scorer {state.scorer_id!r}, not {scorer_id!r};"
                " remove it or use another checkpoint path"
            )
        return state

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state atomically (a temporary file in the same directory, then os.replace)."""
        atomic_write_bytes(path, self.to_json().encode("utf-8"))


# --- the real scorer ----------------------------------------------------------------------------------------


def context_scorer(ctx: Any, *, n_gen: int = 1, gen_stop: Sequence[str] = ()) -> Scorer:
    """A Scorer over an engine.Context (duck-typed: set_bias(bias), score(items, n_gen=, gen_stop=))."""

    def score(bias: np.ndarray, items: Sequence[Item]) -> list[Scores]:
        ctx.set_bias(bias)
        return ctx.score(items, n_gen=n_gen, gen_stop=gen_stop)

    return score


# --- where chunks are scored -------------------------------------------------------------------------------


class ChunkPool(Protocol):
    """Scores chunks of the calibration items for the search: at most n_workers jobs at once.

    start(items) gives the items once, in evaluation order; submit(job, bias, start, stop) asks for the
    Scores of items[start:stop] under bias; wait() blocks until one submitted job is done and returns
    (job, scores, seconds). A pool that loses a worker rescores its job elsewhere: wait() returns only
    results, or raises."""

    n_workers: int

    def start(self, items: Sequence[Item]) -> None: ...

    def submit(self, job: int, bias: np.ndarray, start: int, stop: int) -> None: ...

    def wait(self) -> tuple[int, list[Scores], float]: ...


class LocalPool:
    """The pool of one: jobs scored in this process, in the order submitted, by a Scorer."""

    n_workers = 1

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.items: list[Item] = []
        self.queue: deque[tuple[int, np.ndarray, int, int]] = deque()

    def start(self, items: Sequence[Item]) -> None:
        self.items = list(items)

    def submit(self, job: int, bias: np.ndarray, start: int, stop: int) -> None:
        self.queue.append((job, bias, start, stop))

    def wait(self) -> tuple[int, list[Scores], float]:
        job, bias, start, stop = self.queue.popleft()
        t0 = time.monotonic()
        scores = self.scorer(bias, self.items[start:stop])
        return job, scores, time.monotonic() - t0


@dataclass(eq=False)
class _Slot:
    """One candidate of evaluate_batch while it is being scored."""

    key: str
    bias: np.ndarray
    description: str
    started: bool = False
    alias: int | None = None  # the earlier slot of this batch with the same bias
    chunks: dict[int, list[Any]] = field(default_factory=dict)  # chunk index -> ItemResults
    in_flight: set[int] = field(default_factory=set)
    next_chunk: int = 0  # the next chunk to submit
    prefix: int = 0  # chunks 0..prefix-1 are scored
    checked: int = 0  # chunks the race has looked at
    ticked: int = 0  # items reported to progress
    ref_values: np.ndarray | None = None


# --- the search ---------------------------------------------------------------------------------------------


def _value(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def _better(a: Evaluation, b: Evaluation) -> bool:
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


def _check_grid(name: str, grid: Sequence[float], up: bool) -> tuple[float, ...]:
    values = tuple(float(g) for g in grid)
    if not values:
        raise SearchError(f"{name} is empty")
    for g in values:
        if not math.isfinite(g) or g <= 0 or (up and g <= 1) or (not up and g >= 1):
            raise SearchError(f"{name} must hold gammas {'> 1' if up else 'in (0, 1)'}, got {g}")
    return values


class _Search:
    def __init__(
        self,
        scorer: Scorer,
        items: Sequence[Item],
        shape: tuple[int, int],
        config: SearchConfig,
        checkpoint: str | os.PathLike[str] | None,
        progress: Progress | None,
        scorer_id: str,
        events: Events | None = None,
        pool: ChunkPool | None = None,
    ) -> None:
        self.pool: ChunkPool = pool if pool is not None else LocalPool(scorer)
        self.job_id = 0
        # jobs in the pool: id -> (the batch's slots, slot, chunk); a job of an earlier batch can still be
        # out (scored ahead for a candidate that the race stopped): its result is dropped when it comes
        self.jobs: dict[int, tuple[list[_Slot], int, int]] = {}
        self.events = events
        self.n_started = 0  # candidates announced by the "candidate" event
        self.n_done = 0  # candidates scored by this run ("done" event)
        self.first_chunks: list[tuple[float, ...]] = []  # per-item values of the first chunk, per candidate
        self.estimated = False
        self.warned_equal = False
        self.config = config
        self.shape = (int(shape[0]), int(shape[1]))
        self.objective: Objective = self._check(items)
        order = np.random.default_rng(config.seed).permutation(len(items))
        self.items: list[Item] = [items[i] for i in order]
        self.n = len(self.items)
        self.items_hash = items_hash(self.items)
        self.pool.start(self.items)
        self.racing = config.early_stop and self.objective.per_item is not None
        self.race_tag = f"z={RACE_Z},min_chunks={RACE_MIN_CHUNKS},chunk={config.chunk_size}"
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.state = (
            SearchState.load(self.checkpoint, scorer_id)
            if self.checkpoint
            else SearchState(scorer_id=scorer_id)
        )
        self.progress = progress
        self.run = RunStats()
        self.log: dict[str, Evaluation] = {}  # distinct candidates of this search, in order
        self.biases: dict[str, np.ndarray] = {}
        start, end = config.layer_start, config.layer_end if config.layer_end is not None else self.shape[0]
        self.layers = np.arange(start, end)
        self.stage = ""
        self.stage_done = 0
        self.stage_total = 0

    def _check(self, items: Sequence[Item]) -> Objective:
        c = self.config
        n_layer, n_head = self.shape
        if n_layer < 1 or n_head < 1:
            raise SearchError(f"bad bias shape {self.shape}")
        if c.method not in METHODS:
            raise SearchError(f"unknown method {c.method!r}; choose from {', '.join(METHODS)}")
        try:
            objective = get_objective(c.objective)
        except ValueError as e:
            raise SearchError(str(e)) from None
        if not items:
            raise SearchError("no calibration items")
        if objective.needs_labels and any(item.answer is None for item in items):
            raise SearchError(f"objective {c.objective!r} needs an answer for every calibration item")
        if not (math.isfinite(c.probe_up) and c.probe_up > 1):
            raise SearchError(f"probe_up must be > 1, got {c.probe_up}")
        if not (math.isfinite(c.probe_down) and 0 < c.probe_down < 1):
            raise SearchError(f"probe_down must be in (0, 1), got {c.probe_down}")
        if not 0 < c.head_fraction <= 1:
            raise SearchError(f"head_fraction must be in (0, 1], got {c.head_fraction}")
        c.grid_up = _check_grid("grid_up", c.grid_up, up=True)
        c.grid_down = _check_grid("grid_down", c.grid_down, up=False)
        end = c.layer_end if c.layer_end is not None else n_layer
        if not 0 <= c.layer_start < end <= n_layer:
            raise SearchError(f"layer range [{c.layer_start}, {end}) is not inside [0, {n_layer})")
        if c.n_bands < 1:
            raise SearchError(f"n_bands must be >= 1, got {c.n_bands}")
        if c.budget < 0:
            raise SearchError(f"budget must be >= 0, got {c.budget}")
        if c.chunk_size < 1:
            raise SearchError(f"chunk_size must be >= 1, got {c.chunk_size}")
        return objective

    # --- progress ---

    def _begin(self, stage: str, n_candidates: int) -> None:
        self.stage, self.stage_done, self.stage_total = stage, 0, n_candidates * self.n
        self._tick(0)

    def _tick(self, n: int) -> None:
        self.stage_done = min(self.stage_done + n, self.stage_total)
        if self.progress is not None:
            self.progress(self.stage, self.stage_done, self.stage_total)

    def _end(self) -> None:
        self._tick(self.stage_total - self.stage_done)

    # --- events ---

    def _event(self, name: str, **data: Any) -> None:
        if self.events is not None:
            self.events(name, data)

    def n_chunks(self) -> int:
        return math.ceil(self.n / self.config.chunk_size)

    def plan(self) -> int:
        """The most candidates the method scores: baseline, 2 probes a head, the larger grid, the budget."""
        c = self.config
        n = 1 + 2 * self.shape[1] + max(len(c.grid_up), len(c.grid_down))
        return n + (c.budget if c.method in ("bands", "heads") else 0)

    def _first_chunk(self, values: np.ndarray | None, seconds: float) -> None:
        """After a candidate's first chunk: the time estimate (once) and the discrimination check (once)."""
        if not self.estimated:
            self.estimated = True
            total = self.plan()
            workers = self.pool.n_workers
            self._event(
                "estimate",
                chunk_s=seconds,
                estimate_s=seconds * self.n_chunks() * total / workers,
                n_candidates=total,
                n_workers=workers,
            )
        if values is None or self.warned_equal:
            return
        self.first_chunks.append(tuple(float(v) for v in values))
        if len(self.first_chunks) == 1 + EQUAL_PROBE_CHECK:
            self.warned_equal = True
            if len(set(self.first_chunks)) == 1:
                self._event("no_discrimination", n_candidates=len(self.first_chunks), n_items=len(values))

    # --- candidates ---

    def _bias(self, heads: Sequence[int], gamma: float, layers: np.ndarray | None = None) -> np.ndarray:
        bias = np.zeros(self.shape, dtype=np.float32)
        rows = self.layers if layers is None else layers
        bias[np.ix_(rows, list(heads))] = np.float32(math.log(gamma))
        return bias

    def _key(self, bias: np.ndarray) -> str:
        return f"{self.config.objective}:{self.items_hash[:16]}:{bias_hash(bias)[:16]}"

    def seen(self, bias: np.ndarray) -> bool:
        return self._key(bias) in self.log

    def evaluate(self, bias: np.ndarray, description: str, reference: Evaluation | None) -> Evaluation:
        """One candidate, raced against reference (None: not raced)."""
        return self.evaluate_batch([(bias, description)], reference, chain=False)[0]

    def evaluate_batch(
        self, cands: Sequence[tuple[np.ndarray, str]], start: Evaluation | None, *, chain: bool
    ) -> list[Evaluation]:
        """Candidates that do not depend on each other, scored over the pool; the same Evaluations as scoring
        them one after the other.

        Candidate i is raced against start (chain=False), or against the best of start and candidates 0..i-1
        (chain=True: the best-so-far rule of the grid and the ascent). A candidate whose reference is not
        known yet (an earlier one is still being scored) is scored ahead; once its reference is known, the
        race is replayed over the chunks it has, chunk by chunk in order, so it stops where a sequential run
        would have stopped, and the chunks scored beyond that point are dropped (they count in RunStats only).
        With one worker, candidates and chunks are scored in exactly the sequential order."""
        slots = [_Slot(self._key(b), b.copy(), d) for b, d in cands]
        out: list[Evaluation | None] = [None] * len(slots)
        cs, n_chunks = self.config.chunk_size, self.n_chunks()
        first_of_key: dict[str, int] = {}

        def stop_of(c: int) -> int:
            return min((c + 1) * cs, self.n)

        per_item = self.objective.per_item

        def reference(i: int) -> tuple[bool, Evaluation | None]:
            if not chain:
                return True, start
            best = start
            for j in range(i):
                rec = out[j]
                if rec is None:
                    return False, None
                if best is None or _better(rec, best):
                    best = rec
            return True, best

        def begin(i: int) -> None:
            """What evaluate() did before scoring: the log, the event, the checkpoint."""
            s = slots[i]
            s.started = True
            if s.key in self.log:
                out[i] = self.log[s.key]
                self._tick(self.n)
                return
            if s.key in first_of_key:  # the same bias earlier in this batch
                s.alias = first_of_key[s.key]
                return
            first_of_key[s.key] = i
            self.n_started += 1
            self._event("candidate", description=s.description, index=self.n_started)
            rec = self.state.evaluations.get(s.key)
            if rec is not None and (not rec.stopped_early or (self.racing and rec.race == self.race_tag)):
                self.run.evaluations_from_checkpoint += 1
                self._tick(self.n)
                out[i] = rec

        def next_job() -> tuple[int, int] | None:
            # first the lowest candidate with nothing in flight, then more chunks of one that has
            for busy_ok in (False, True):
                for i, s in enumerate(slots):
                    if out[i] is not None or s.alias is not None:
                        continue
                    if not s.started:
                        if busy_ok:
                            break
                        begin(i)
                        if out[i] is not None or s.alias is not None:
                            continue
                    if s.next_chunk < n_chunks and (busy_ok or not s.in_flight):
                        return i, s.next_chunk
            return None

        def finish(i: int, m: int, stopped: bool) -> None:
            s = slots[i]
            results = [r for c in range(math.ceil(m / cs)) for r in s.chunks[c]]
            rec = self._evaluation(s.key, s.bias, s.description, results, m, stopped)
            out[i] = rec
            self.state.evaluations[s.key] = rec
            if self.checkpoint is not None:
                self.state.save(self.checkpoint)
            self.n_done += 1
            self._event("done", description=s.description, n_done=self.n_done)
            self._tick(self.n - s.ticked)
            s.ticked = self.n

        def advance(i: int) -> None:
            """Race checks over the chunks scored in order, once the reference is known."""
            s = slots[i]
            known, ref = reference(i)
            if not known:
                return
            if s.ref_values is None and self.racing and ref is not None and ref.values is not None:
                if ref.stopped_early or len(ref.values) != self.n:
                    raise AssertionError("the racing reference must be scored on every item")
                s.ref_values = np.asarray(ref.values, dtype=np.float64)
            while s.checked < s.prefix:
                s.checked += 1
                m = min(s.checked * cs, self.n)
                if (
                    s.ref_values is not None
                    and per_item is not None
                    and s.checked >= RACE_MIN_CHUNKS
                    and m < self.n
                ):
                    results = [r for c in range(s.checked) for r in s.chunks[c]]
                    d = per_item(results, self.items[:m]) - s.ref_values[:m]
                    upper = float(np.mean(d)) + RACE_Z * float(np.std(d, ddof=1)) / math.sqrt(m)
                    if upper < 0:
                        finish(i, m, True)
                        return
            if s.prefix == n_chunks:
                finish(i, self.n, False)

        def resolve() -> None:
            for i, s in enumerate(slots):
                if out[i] is not None or not s.started:
                    continue
                if s.alias is not None:
                    if out[s.alias] is not None:
                        out[i] = out[s.alias]
                        self._tick(self.n)
                    continue
                advance(i)

        while True:
            resolve()
            left = sum(o is None for o in out)
            if not left:
                break
            while len(self.jobs) < self.pool.n_workers:
                job = next_job()
                if job is None:
                    break
                i, c = job
                s = slots[i]
                s.next_chunk += 1
                s.in_flight.add(c)
                self.job_id += 1
                self.jobs[self.job_id] = (slots, i, c)
                self.pool.submit(self.job_id, s.bias.copy(), c * cs, stop_of(c))
            if not self.jobs:
                resolve()  # next_job resolved some (log, checkpoint, an alias) without scoring
                if sum(o is None for o in out) == left:
                    raise AssertionError("candidates left that can neither be scored nor resolved")
                continue
            job_id, scores, seconds = self.pool.wait()
            batch, i, c = self.jobs.pop(job_id)
            self.run.scorer_calls += 1
            self.run.items_scored += stop_of(c) - c * cs
            if batch is not slots:
                continue  # scored ahead for a candidate of an earlier batch that the race had stopped
            s = slots[i]
            s.in_flight.discard(c)
            chunk = self.items[c * cs : (c + 1) * cs]
            if len(scores) != len(chunk):
                raise SearchError(f"the scorer returned {len(scores)} scores for {len(chunk)} items")
            if out[i] is not None:
                continue  # scored ahead beyond where the race stopped it
            s.chunks[c] = item_results(scores, chunk)
            if c == 0:
                first = per_item(s.chunks[0], chunk) if per_item is not None else None
                self._first_chunk(first, seconds)
            while s.prefix in s.chunks:
                s.prefix += 1
            s.ticked += len(chunk)
            self._tick(len(chunk))

        recs: list[Evaluation] = []
        for s, rec in zip(slots, out):
            assert rec is not None
            if s.key not in self.log:
                self.log[s.key] = rec
                self.biases[s.key] = s.bias.copy()
            recs.append(rec)
        return recs

    def _evaluation(
        self, key: str, bias: np.ndarray, description: str, results: list[Any], m: int, stopped: bool
    ) -> Evaluation:
        evaluated = self.items[:m]
        per_item = self.objective.per_item
        values = per_item(results, evaluated).tolist() if per_item is not None else None
        return Evaluation(
            key=key,
            description=description,
            stage=self.stage,
            objective=float(self.objective.fn(results, evaluated)),
            n_items_evaluated=m,
            n_items=self.n,
            stopped_early=stopped,
            norm=float(np.sum(np.abs(bias.astype(np.float64)))),
            values=values,
            summary=summarize(results, evaluated).to_dict(),
            race=self.race_tag if stopped else None,
        )

    def gain(self, rec: Evaluation, base: Evaluation) -> float:
        if rec.stopped_early and rec.values is not None and base.values is not None:
            m = rec.n_items_evaluated
            return float(np.mean(np.asarray(rec.values) - np.asarray(base.values[:m])))
        return _value(rec.objective) - _value(base.objective)

    # --- methods ---

    def paper(self) -> tuple[Evaluation, Evaluation, dict[str, Any]]:
        c = self.config
        n_head = self.shape[1]
        self._begin("baseline", 1)
        base = self.evaluate(np.zeros(self.shape, np.float32), "baseline", None)
        self._end()

        self._begin("probe", 2 * n_head)
        probes = []
        for h in range(n_head):
            probes.append((self._bias([h], c.probe_up), f"probe head {h} gamma={c.probe_up:g}"))
            probes.append((self._bias([h], c.probe_down), f"probe head {h} gamma={c.probe_down:g}"))
        recs = self.evaluate_batch(probes, base, chain=False)
        gains_up = [self.gain(rec, base) for rec in recs[0::2]]
        gains_down = [self.gain(rec, base) for rec in recs[1::2]]
        self._end()

        positive_up = sum(max(g, 0.0) for g in gains_up)
        positive_down = sum(max(g, 0.0) for g in gains_down)
        head_type = "up" if positive_up >= positive_down else "down"
        gains = gains_up if head_type == "up" else gains_down
        ranked = sorted(range(n_head), key=lambda h: (-gains[h], h))
        k = math.ceil(c.head_fraction * n_head)
        positive = [h for h in ranked if gains[h] > 0]
        heads = sorted(ranked[:k] if len(positive) >= k else positive or ranked[:1])

        grid = c.grid_up if head_type == "up" else c.grid_down
        self._begin("grid", len(grid))
        best, best_gamma = base, 1.0
        recs = self.evaluate_batch(
            [(self._bias(heads, g), f"heads {heads} gamma={g:g}") for g in grid], base, chain=True
        )
        for g, rec in zip(grid, recs):
            if _better(rec, best):
                best, best_gamma = rec, g
        self._end()
        info = {
            "heads": heads,
            "head_type": head_type,
            "best_gamma": best_gamma,
            "gains_up": gains_up,
            "gains_down": gains_down,
        }
        return base, best, info

    def _ascent(
        self,
        stage: str,
        start: Evaluation,
        coordinates: list[tuple[np.ndarray, list[int], str]],
        gammas: Sequence[float],
    ) -> Evaluation:
        """Coordinate ascent from start: a coordinate is a block (layers, heads) set to one gamma."""
        budget = self.config.budget
        self._begin(stage, budget)
        incumbent, used, n_moves = start, 0, 0
        moved = True
        while moved and used < budget:
            moved = False
            for layers, heads, label in coordinates:
                inc_bias = self.biases[incumbent.key]
                line: list[tuple[np.ndarray, str]] = []
                for g in gammas:
                    cand = inc_bias.copy()
                    cand[np.ix_(layers, heads)] = np.float32(math.log(g))
                    if self._key(cand) == incumbent.key:
                        continue
                    if not self.seen(cand):
                        if used >= budget:
                            break
                        used += 1
                    line.append((cand, f"{stage} move {n_moves + 1}: {label} gamma={g:g}"))
                line_best = incumbent
                for rec in self.evaluate_batch(line, incumbent, chain=True):
                    if _better(rec, line_best):
                        line_best = rec
                if line_best is not incumbent:
                    incumbent, moved, n_moves = line_best, True, n_moves + 1
                if used >= budget:
                    break
        self._end()
        return incumbent

    def bands(self, start: Evaluation, info: dict[str, Any]) -> Evaluation:
        c = self.config
        heads = info["heads"]
        bands = [b for b in np.array_split(self.layers, min(c.n_bands, len(self.layers))) if len(b)]
        coordinates = [(b, heads, f"layers {b[0]}-{b[-1]} heads {heads}") for b in bands]
        grid = c.grid_up if info["head_type"] == "up" else c.grid_down
        return self._ascent("bands", start, coordinates, (*grid, 1.0))

    def heads(self, start: Evaluation, info: dict[str, Any]) -> Evaluation:
        c = self.config
        best_gain = [max(u, d) for u, d in zip(info["gains_up"], info["gains_down"])]
        order = sorted(range(self.shape[1]), key=lambda h: (-best_gain[h], h))
        coordinates = [
            (np.array([layer]), [h], f"layer {layer} head {h}") for h in order for layer in self.layers
        ]
        gammas: list[float] = []
        for g in (1.0, info["best_gamma"], c.probe_up, c.probe_down):
            if g not in gammas:
                gammas.append(g)
        return self._ascent("heads", start, coordinates, gammas)

    def result(self, base: Evaluation, best: Evaluation, info: dict[str, Any]) -> SearchResult:
        bias = self.biases[best.key].astype(np.float32)
        candidates = [
            Candidate(r.description, r.stage, r.objective, r.n_items_evaluated, r.stopped_early, r.summary)
            for r in self.log.values()
        ]
        n_eval = len(self.log)
        return SearchResult(
            method=self.config.method,
            objective=self.config.objective,
            bias=bias,
            gamma=np.exp(bias.astype(np.float64)),
            heads=info["heads"],
            head_type=info["head_type"],
            best_gamma=info["best_gamma"],
            baseline_objective=base.objective,
            best_objective=best.objective,
            best_description=best.description,
            gains_up=info["gains_up"],
            gains_down=info["gains_down"],
            baseline_summary=base.summary,
            best_summary=best.summary,
            candidates=candidates,
            n_items=self.n,
            n_evaluations=n_eval,
            items_scored=sum(r.n_items_evaluated for r in self.log.values()),
            items_full=n_eval * self.n,
            config=self.config.to_dict(),
            run=self.run,
        )


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
    the chunks are scored (see "Pools"); None: by scorer, in this process.
    """
    if pool is None and scorer is None:
        raise SearchError("search needs a scorer or a pool")
    config = SearchConfig(**asdict(config)) if config is not None else SearchConfig()
    s = _Search(scorer, items, shape, config, checkpoint, progress, scorer_id, events, pool)  # type: ignore[arg-type]
    s._event("plan", n_candidates=s.plan(), n_items=s.n, chunk_size=config.chunk_size, n_chunks=s.n_chunks())
    base, best, info = s.paper()
    if config.method == "bands":
        best = s.bands(best, info)
    elif config.method == "heads":
        best = s.heads(best, info)
    return s.result(base, best, info)
