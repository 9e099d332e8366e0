"""Where the search's chunks are scored: the :data:`Scorer` (set a bias matrix, score items), the
:class:`ChunkPool` protocol and the :class:`LocalPool` of one. See "Pools" in zt_gguf.search."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .tasks import Item

if TYPE_CHECKING:
    from .engine import Scores

__all__ = ["ChunkPool", "LocalPool", "Scorer", "context_scorer"]

# sets the bias matrix, then scores the items: one Scores per item, in order
Scorer = Callable[[np.ndarray, Sequence[Item]], "list[Scores]"]


def context_scorer(ctx: Any, *, n_gen: int = 1, gen_stop: Sequence[str] = ()) -> Scorer:
    """A Scorer over an engine.Context (duck-typed: set_bias(bias), score(items, n_gen=, gen_stop=))."""

    def score(bias: np.ndarray, items: Sequence[Item]) -> list[Scores]:
        ctx.set_bias(bias)
        return ctx.score(items, n_gen=n_gen, gen_stop=gen_stop)

    return score


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
