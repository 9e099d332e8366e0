"""How items are scored during a calibration: the memoised engine scorer and the choice of scoring.

``generate`` scoring counts the first label word in a greedy continuation (what a user of llama-cli gets);
``choice`` scoring takes the most likely choice. ``--scoring auto`` measures which one the untuned model can
be judged by (:func:`choose_scoring`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import __version__, metrics
from .search import bias_hash
from .tasks import Item, Task

SCORINGS = ("auto", "generate", "choice")
# --scoring auto takes "generate" when the untuned model names a label in more than this share of its greedy
# continuations of the first chunk of calibration items, else "choice" (a base model that continues with
# anything but a label word would score 0 on every candidate: Gemma 3 270M names none on 5 of our 6 tasks)
AUTO_MIN_VALID = 0.5
MAX_STOP_WORDS = 32  # label words used as stop strings when the items share at most this many


class ScoringChoice(NamedTuple):
    scoring: str  # "generate" | "choice"
    reason: str  # why: the user's choice, or what auto measured
    valid_share: float | None = None  # auto: the share of continuations that name a label


def label_words(items: Sequence[Item]) -> list[str]:
    """Stop strings for generation: the labels, when the items share a small label set."""
    words = {c.strip() for it in items for c in it.choices}
    return sorted(w for w in words if w) if 0 < len(words) <= MAX_STOP_WORDS else []


def scoring_from_valid_share(valid: float, n: int, max_valid: float = AUTO_MIN_VALID) -> ScoringChoice:
    """--scoring auto's rule, given the share of greedy continuations that name a label."""
    what = f"the untuned model names a label in {100 * valid:.0f}% of {n} greedy continuations"
    if valid > max_valid:
        return ScoringChoice("generate", f"{what} (> {100 * max_valid:.0f}%)", valid)
    return ScoringChoice(
        "choice",
        f"{what}; generate scoring would count the rest as wrong, so the most likely choice is scored",
        valid,
    )


def choose_scoring(
    ctx: Any, items: Sequence[Item], n_gen: int, stops: Sequence[str], max_valid: float = AUTO_MIN_VALID
) -> ScoringChoice:
    """--scoring auto: generate greedily for the items with the bias off, then apply the rule."""
    ctx.set_bias(None)
    res = metrics.item_results(ctx.score(items, n_gen=n_gen, gen_stop=stops), items)
    valid = float(np.mean([r.gen_pred is not None for r in res])) if res else 0.0
    return scoring_from_valid_share(valid, len(res), max_valid)


class MemoScorer:
    """Scores items under a bias (None or zeros: off) and a logit bias, each (bias, item) once per run.

    The search, the held-out check and the baselines ask for the same (bias, item) pairs again (the baseline
    and the pick on the calibration items, for instance); the cache answers those. An item of a group (the
    search's chunks, see :meth:`group`) is always scored with its whole group in one call, as the search
    scores it: llama.cpp's results depend slightly on what shares a batch, so an item's scores are then the
    same whichever stage asks first (the search here or on Ray workers, a resumed run, the comparison)."""

    def __init__(self, ctx: Any, n_gen: int, stops: Sequence[str]) -> None:
        self.ctx, self.n_gen, self.stops = ctx, n_gen, list(stops)
        self.cache: dict[tuple[str, tuple[tuple[int, float], ...], str, str], Any] = {}
        self.groups: dict[tuple[str, str], tuple[Item, ...]] = {}

    def group(self, chunks: Sequence[Sequence[Item]]) -> None:
        """Score each chunk's items together whenever one of them is asked for."""
        for chunk in chunks:
            for it in chunk:
                self.groups[(it.id, it.prompt)] = tuple(chunk)

    def __call__(
        self, bias: np.ndarray | None, items: Sequence[Item], logit_bias: Sequence[tuple[int, float]] = ()
    ) -> list[Any]:
        bkey = "off" if bias is None or not np.any(bias) else bias_hash(bias)
        lb = tuple((int(t), float(b)) for t, b in logit_bias)
        keys = [(bkey, lb, it.id, it.prompt) for it in items]
        missing = [it for it, k in zip(items, keys) if k not in self.cache]
        calls: dict[tuple[Item, ...], None] = {}  # the groups to score, in order, each once
        loose = []
        for it in missing:
            group = self.groups.get((it.id, it.prompt))
            if group is None:
                loose.append(it)
            else:
                calls[group] = None
        if missing:
            self.ctx.set_bias(None if bias is None else np.asarray(bias, np.float32))
        for batch in [*calls, tuple(loose)]:
            if batch:
                out = self.ctx.score(list(batch), n_gen=self.n_gen, gen_stop=self.stops, logit_bias=lb)
                for it, sc in zip(batch, out):
                    self.cache[(bkey, lb, it.id, it.prompt)] = sc
        return [self.cache[k] for k in keys]


def content_free_items(task: Task, items: Sequence[Item]) -> list[Item]:
    """Contextual Calibration's prompts, with the task's shared choices (none without a shared template)."""
    if not task.content_free or not items:
        return []
    return [
        Item(prompt=p, choices=items[0].choices, answer=None, id=f"content-free:{cf}")
        for cf, p in task.content_free.items()
    ]


def scorer_id(model_path: Path, scoring: str, n_gen: int) -> str:
    """What a search checkpoint's scores depend on besides the items: the model file, scoring, n_gen."""
    st = model_path.stat()
    h = hashlib.sha256(f"{model_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{h}|{scoring}|{n_gen}|{__version__}"
