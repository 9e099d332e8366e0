"""What the search tells its caller while it runs: progress per stage (:data:`Progress`) and events
(:data:`Events`; names in the ``EVENT_*`` constants, payloads described in "Events" in zt_gguf.search)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import numpy as np

__all__ = [
    "EQUAL_PROBE_CHECK",
    "EVENT_CANDIDATE",
    "EVENT_DONE",
    "EVENT_ESTIMATE",
    "EVENT_NO_DISCRIMINATION",
    "EVENT_PLAN",
    "Events",
    "Progress",
    "SearchEvents",
    "StageProgress",
]

# (stage name, done, total), in items scored (or skipped) within the stage
Progress = Callable[[str, int, int], None]
# (event name, data): see "Events" in the zt_gguf.search docstring
Events = Callable[[str, dict[str, Any]], None]

EVENT_PLAN: Final = "plan"  # n_candidates, n_items, chunk_size, n_chunks
EVENT_ESTIMATE: Final = "estimate"  # chunk_s, estimate_s, n_candidates, n_workers
EVENT_CANDIDATE: Final = "candidate"  # description, index
EVENT_DONE: Final = "done"  # description, n_done
EVENT_NO_DISCRIMINATION: Final = "no_discrimination"  # n_candidates, n_items

EQUAL_PROBE_CHECK = 4  # probes compared with the baseline on the first chunk for "no_discrimination"


class StageProgress:
    """Progress within the current stage, counted in items: each candidate of the stage is worth n_items."""

    def __init__(self, progress: Progress | None, n_items: int) -> None:
        self.progress = progress
        self.n_items = n_items
        self.stage = ""
        self.done = 0
        self.total = 0

    def begin(self, stage: str, n_candidates: int, n_items: int | None = None) -> None:
        """A stage of n_candidates, each scored on n_items items (None: all the calibration items)."""
        per = self.n_items if n_items is None else n_items
        self.stage, self.done, self.total = stage, 0, n_candidates * per
        self.tick(0)

    def tick(self, n: int) -> None:
        self.done = min(self.done + n, self.total)
        if self.progress is not None:
            self.progress(self.stage, self.done, self.total)

    def end(self) -> None:
        self.tick(self.total - self.done)


class SearchEvents:
    """Sends the events of one search: n_candidates is the plan's count, n_chunks the chunks per candidate,
    n_jobs the most chunks the plan scores (default: every candidate on every chunk)."""

    def __init__(
        self, events: Events | None, n_candidates: int, n_chunks: int, n_jobs: int | None = None
    ) -> None:
        self.events = events
        self.n_candidates = n_candidates
        self.n_chunks = n_chunks
        self.n_jobs = n_candidates * n_chunks if n_jobs is None else n_jobs
        self.n_started = 0  # candidates announced by the "candidate" event
        self.n_done = 0  # candidates scored by this run ("done" event)
        self.estimated = False
        self.first_chunks: list[tuple[float, ...]] = []  # per-item values of the first chunk, per candidate
        self.checked_equal = False

    def send(self, name: str, **data: Any) -> None:
        if self.events is not None:
            self.events(name, data)

    def candidate(self, description: str) -> None:
        self.n_started += 1
        self.send(EVENT_CANDIDATE, description=description, index=self.n_started)

    def done(self, description: str) -> None:
        self.n_done += 1
        self.send(EVENT_DONE, description=description, n_done=self.n_done)

    def first_chunk(self, values: np.ndarray | None, seconds: float, n_workers: int) -> None:
        """After a candidate's first chunk: the time estimate (once) and the discrimination check (once)."""
        if not self.estimated:
            self.estimated = True
            self.send(
                EVENT_ESTIMATE,
                chunk_s=seconds,
                estimate_s=seconds * self.n_jobs / n_workers,
                n_candidates=self.n_candidates,
                n_workers=n_workers,
            )
        if values is None or self.checked_equal:
            return
        self.first_chunks.append(tuple(float(v) for v in values))
        if len(self.first_chunks) == 1 + EQUAL_PROBE_CHECK:
            self.checked_equal = True
            if len(set(self.first_chunks)) == 1:
                self.send(EVENT_NO_DISCRIMINATION, n_candidates=len(self.first_chunks), n_items=len(values))
