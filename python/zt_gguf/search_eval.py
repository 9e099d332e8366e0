"""Scoring candidates for the search: the :class:`Evaluator` scores batches of candidates over a ChunkPool,
chunk by chunk, with racing, the checkpoint, progress and events. See "Early stopping", "Pools" and
"Checkpoint and resume" in zt_gguf.search."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .metrics import item_results, summarize
from .objectives import Objective
from .search_config import SearchConfig, SearchError
from .search_events import SearchEvents, StageProgress
from .search_pool import ChunkPool
from .search_rules import RACE_MIN_CHUNKS, RACE_Z, best_index, clearly_worse
from .search_state import Evaluation, SearchState, bias_hash, items_hash
from .tasks import Item

if TYPE_CHECKING:
    from .engine import Scores

__all__ = ["Evaluator", "RunStats"]


@dataclass
class RunStats:
    """What this particular run did (differs between an interrupted-and-resumed run and a straight one)."""

    scorer_calls: int = 0
    items_scored: int = 0
    evaluations_from_checkpoint: int = 0


class Evaluator:
    """Scores the candidates of one search over pool and remembers each distinct one (log, biases).

    items are in evaluation order; every candidate is scored on chunks of config.chunk_size of them. state
    holds the completed evaluations (saved to checkpoint after each one when given)."""

    def __init__(
        self,
        pool: ChunkPool,
        items: list[Item],
        objective: Objective,
        config: SearchConfig,
        state: SearchState,
        checkpoint: Path | None,
        progress: StageProgress,
        events: SearchEvents,
    ) -> None:
        self.pool = pool
        self.items = items
        self.n = len(items)
        self.objective = objective
        self.objective_name = config.objective
        self.chunk_size = config.chunk_size
        self.n_chunks = math.ceil(self.n / config.chunk_size)
        self.items_hash = items_hash(items)
        self.racing = config.early_stop and objective.per_item is not None
        self.race_tag = f"z={RACE_Z},min_chunks={RACE_MIN_CHUNKS},chunk={config.chunk_size}"
        self.state = state
        self.checkpoint = checkpoint
        self.progress = progress
        self.events = events
        self.run = RunStats()
        self.log: dict[str, Evaluation] = {}  # distinct candidates of this search, in order
        self.biases: dict[str, np.ndarray] = {}
        self.job_id = 0
        # jobs in the pool: id -> (batch, slot, chunk); a job of an earlier batch can still be out (scored
        # ahead for a candidate that the race stopped): its result is dropped when it comes
        self.jobs: dict[int, tuple[_Batch, int, int]] = {}

    def key(self, bias: np.ndarray, n_items: int | None = None) -> str:
        """The record key of bias scored on the first n_items items (None: all of them)."""
        key = f"{self.objective_name}:{self.items_hash[:16]}:{bias_hash(bias)[:16]}"
        return key if n_items is None or n_items >= self.n else f"{key}@{n_items}"

    def limit(self, n_items: int | None) -> int:
        """The items a candidate asked to be scored on its first n_items items is scored on: whole chunks."""
        if n_items is None:
            return self.n
        return min(self.n, math.ceil(n_items / self.chunk_size) * self.chunk_size)

    def seen(self, bias: np.ndarray) -> bool:
        return self.key(bias) in self.log

    def evaluate(
        self, bias: np.ndarray, description: str, reference: Evaluation | None, *, n_items: int | None = None
    ) -> Evaluation:
        """One candidate, raced against reference (None: not raced)."""
        return self.evaluate_batch([(bias, description)], reference, chain=False, n_items=n_items)[0]

    def evaluate_batch(
        self,
        cands: Sequence[tuple[np.ndarray, str]],
        start: Evaluation | None,
        *,
        chain: bool,
        n_items: int | None = None,
    ) -> list[Evaluation]:
        """Candidates that do not depend on each other, scored over the pool; the same Evaluations as scoring
        them one after the other.

        n_items: score each candidate on the first n_items items only, rounded up to whole chunks (None: all);
        such records have their own keys (see :meth:`key`) and are raced within those items.

        Candidate i is raced against start (chain=False), or against the best of start and candidates 0..i-1
        (chain=True: the best-so-far rule of the grid and the ascent). A candidate whose reference is not
        known yet (an earlier one is still being scored) is scored ahead; once its reference is known, the
        race is replayed over the chunks it has, chunk by chunk in order, so it stops where a sequential run
        would have stopped, and the chunks scored beyond that point are dropped (they count in RunStats only).
        With one worker, candidates and chunks are scored in exactly the sequential order."""
        return _Batch(self, cands, start, chain, self.limit(n_items)).run()

    # --- for _Batch ---

    def chunk_items(self, c: int) -> list[Item]:
        return self.items[c * self.chunk_size : (c + 1) * self.chunk_size]

    def from_checkpoint(self, key: str) -> Evaluation | None:
        """The checkpoint's evaluation of key when this search can reuse it."""
        rec = self.state.evaluations.get(key)
        if rec is not None and (not rec.stopped_early or (self.racing and rec.race == self.race_tag)):
            return rec
        return None

    def submit(self, batch: _Batch, i: int, c: int, bias: np.ndarray) -> None:
        """Chunk c of the batch's candidate i to the pool."""
        self.job_id += 1
        self.jobs[self.job_id] = (batch, i, c)
        start = c * self.chunk_size
        self.pool.submit(self.job_id, bias.copy(), start, min(start + self.chunk_size, self.n))

    def wait(self) -> tuple[_Batch, int, int, list[Scores], float]:
        """The next job the pool completes: (batch, slot, chunk, scores, seconds); counted in RunStats."""
        job_id, scores, seconds = self.pool.wait()
        batch, i, c = self.jobs.pop(job_id)
        start = c * self.chunk_size
        self.run.scorer_calls += 1
        self.run.items_scored += min(start + self.chunk_size, self.n) - start
        return batch, i, c, scores, seconds

    def complete(
        self, key: str, bias: np.ndarray, description: str, results: list[Any], m: int, n: int, stopped: bool
    ) -> Evaluation:
        """A candidate asked for the first n items, scored on its first m (stopped early or not): recorded in
        the checkpoint."""
        rec = self._evaluation(key, bias, description, results, m, n, stopped)
        self.state.evaluations[key] = rec
        if self.checkpoint is not None:
            self.state.save(self.checkpoint)
        self.events.done(description)
        return rec

    def _evaluation(
        self, key: str, bias: np.ndarray, description: str, results: list[Any], m: int, n: int, stopped: bool
    ) -> Evaluation:
        evaluated = self.items[:m]
        per_item = self.objective.per_item
        values = per_item(results, evaluated).tolist() if per_item is not None else None
        return Evaluation(
            key=key,
            description=description,
            stage=self.progress.stage,
            objective=float(self.objective.fn(results, evaluated)),
            n_items_evaluated=m,
            n_items=n,
            stopped_early=stopped,
            norm=float(np.sum(np.abs(bias.astype(np.float64)))),
            values=values,
            summary=summarize(results, evaluated).to_dict(),
            race=self.race_tag if stopped else None,
        )


@dataclass(eq=False)
class _Slot:
    """One candidate of a batch while it is being scored."""

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

    def results(self, n_chunks: int) -> list[Any]:
        """The ItemResults of the first n_chunks chunks, in order."""
        return [r for c in range(n_chunks) for r in self.chunks[c]]


class _Batch:
    """One Evaluator.evaluate_batch call: slot i is candidate i, out[i] its Evaluation once known."""

    def __init__(
        self,
        ev: Evaluator,
        cands: Sequence[tuple[np.ndarray, str]],
        start: Evaluation | None,
        chain: bool,
        n: int,
    ) -> None:
        self.ev = ev
        self.n = n  # the items each candidate is scored on: the first n (whole chunks, or all)
        self.n_chunks = math.ceil(n / ev.chunk_size)
        self.slots = [_Slot(ev.key(b, n), b.copy(), d) for b, d in cands]
        self.out: list[Evaluation | None] = [None] * len(self.slots)
        self.start = start
        self.chain = chain
        self.first_of_key: dict[str, int] = {}

    def run(self) -> list[Evaluation]:
        ev = self.ev
        while True:
            self._resolve()
            left = self._n_left()
            if not left:
                break
            self._fill_pool()
            if not ev.jobs:
                self._resolve()  # _next_job resolved some (log, checkpoint, an alias) without scoring
                if self._n_left() == left:
                    raise AssertionError("candidates left that can neither be scored nor resolved")
                continue
            batch, i, c, scores, seconds = ev.wait()
            if batch is self:  # else scored ahead for a candidate of an earlier batch that the race stopped
                self._receive(i, c, scores, seconds)
        return self._remember()

    def _n_left(self) -> int:
        return sum(o is None for o in self.out)

    def _fill_pool(self) -> None:
        ev = self.ev
        while len(ev.jobs) < ev.pool.n_workers:
            job = self._next_job()
            if job is None:
                break
            i, c = job
            s = self.slots[i]
            s.next_chunk += 1
            s.in_flight.add(c)
            ev.submit(self, i, c, s.bias)

    def _next_job(self) -> tuple[int, int] | None:
        """(slot, chunk): first the lowest candidate with nothing in flight, then more chunks of one that has.
        Starts the candidates it reaches, in order."""
        for busy_ok in (False, True):
            for i, s in enumerate(self.slots):
                if self.out[i] is not None or s.alias is not None:
                    continue
                if not s.started:
                    if busy_ok:
                        break
                    self._begin(i)
                    if self.out[i] is not None or s.alias is not None:
                        continue
                if s.next_chunk < self.n_chunks and (busy_ok or not s.in_flight):
                    return i, s.next_chunk
        return None

    def _begin(self, i: int) -> None:
        """What a sequential search does before scoring a candidate: the log, the event, the checkpoint."""
        ev, s = self.ev, self.slots[i]
        s.started = True
        if s.key in ev.log:
            self.out[i] = ev.log[s.key]
            ev.progress.tick(self.n)
            return
        if s.key in self.first_of_key:  # the same bias earlier in this batch
            s.alias = self.first_of_key[s.key]
            return
        self.first_of_key[s.key] = i
        ev.events.candidate(s.description)
        rec = ev.from_checkpoint(s.key)
        if rec is not None:
            ev.run.evaluations_from_checkpoint += 1
            ev.progress.tick(self.n)
            self.out[i] = rec

    def _receive(self, i: int, c: int, scores: list[Scores], seconds: float) -> None:
        """The scores of chunk c of candidate i."""
        ev, s = self.ev, self.slots[i]
        s.in_flight.discard(c)
        chunk = ev.chunk_items(c)
        if len(scores) != len(chunk):
            raise SearchError(f"the scorer returned {len(scores)} scores for {len(chunk)} items")
        if self.out[i] is not None:
            return  # scored ahead beyond where the race stopped it
        s.chunks[c] = item_results(scores, chunk)
        if c == 0:
            per_item = ev.objective.per_item
            first = per_item(s.chunks[0], chunk) if per_item is not None else None
            ev.events.first_chunk(first, seconds, ev.pool.n_workers)
        while s.prefix in s.chunks:
            s.prefix += 1
        s.ticked += len(chunk)
        ev.progress.tick(len(chunk))

    def _resolve(self) -> None:
        """Every started candidate as far as its chunks and its reference allow."""
        for i, s in enumerate(self.slots):
            if self.out[i] is not None or not s.started:
                continue
            if s.alias is not None:
                if self.out[s.alias] is not None:
                    self.out[i] = self.out[s.alias]
                    self.ev.progress.tick(self.n)
                continue
            self._advance(i)

    def _reference(self, i: int) -> tuple[bool, Evaluation | None]:
        """(known, reference) of candidate i: unknown while an earlier candidate of a chain is not done."""
        if not self.chain:
            return True, self.start
        before = self.out[:i]
        if any(rec is None for rec in before):
            return False, None
        done: list[Evaluation] = [rec for rec in before if rec is not None]
        j = best_index(self.start, done)
        return True, self.start if j is None else done[j]

    def _advance(self, i: int) -> None:
        """Race checks over the chunks scored in order, once the reference is known."""
        ev, s = self.ev, self.slots[i]
        known, ref = self._reference(i)
        if not known:
            return
        if s.ref_values is None and ev.racing and ref is not None and ref.values is not None:
            if ref.stopped_early or len(ref.values) < self.n:
                raise AssertionError("the racing reference must be scored on every item the candidate is")
            s.ref_values = np.asarray(ref.values, dtype=np.float64)
        while s.checked < s.prefix:
            s.checked += 1
            m = min(s.checked * ev.chunk_size, self.n)
            if self._race_stops(s, m):
                self._finish(i, m, True)
                return
        if s.prefix == self.n_chunks:
            self._finish(i, self.n, False)

    def _race_stops(self, s: _Slot, m: int) -> bool:
        """Whether the race stops s after its first s.checked chunks (m items)."""
        per_item = self.ev.objective.per_item
        if s.ref_values is None or per_item is None or s.checked < RACE_MIN_CHUNKS or m >= self.n:
            return False
        d = per_item(s.results(s.checked), self.ev.items[:m]) - s.ref_values[:m]
        return clearly_worse(d)

    def _finish(self, i: int, m: int, stopped: bool) -> None:
        ev, s = self.ev, self.slots[i]
        results = s.results(math.ceil(m / ev.chunk_size))
        self.out[i] = ev.complete(s.key, s.bias, s.description, results, m, self.n, stopped)
        ev.progress.tick(self.n - s.ticked)
        s.ticked = self.n

    def _remember(self) -> list[Evaluation]:
        """The batch's Evaluations, in order; the new ones enter the search's log."""
        recs: list[Evaluation] = []
        for s, rec in zip(self.slots, self.out):
            assert rec is not None
            if s.key not in self.ev.log:
                self.ev.log[s.key] = rec
                self.ev.biases[s.key] = s.bias.copy()
            recs.append(rec)
        return recs
