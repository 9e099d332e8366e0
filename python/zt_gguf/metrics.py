"""Per-item results and summaries (pure functions; objectives are in objectives.py, intervals in stats.py).

The inputs are the engine's per-item scores (anything with the fields of ``engine.Scores``: choice_logprob,
choice_n_tokens, gen_text, entropy_full, entropy_choices) and the items (``tasks.Item``); nothing here imports
the engine.

Predictions of one item:

* ``choice_pred``: argmax of the choices' total log-likelihoods (the first choice wins a tie);
* ``choice_pred_norm``: argmax of the log-likelihood per choice token;
* ``gen_pred``: the choice found in the greedy continuation by :func:`parse_generation` (None: invalid).

Objectives (:data:`OBJECTIVES`) are values to MAXIMISE. Every one except "mutual-information" is the mean of a
per-item value (``Objective.per_item``), which lets the search compare two candidates item by item (paired).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .tasks import Item

if TYPE_CHECKING:
    from .engine import Scores

__all__ = [
    "ItemResult",
    "Summary",
    "item_results",
    "mutual_information",
    "parse_generation",
    "summarize",
]


# --- parsing a generation -----------------------------------------------------------------------------------


def _normalize(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, no leading/trailing whitespace."""
    return " ".join(text.split()).lower()


def parse_generation(text: str, choices: Sequence[str]) -> int | None:
    """The index of the choice that the generated text names first, or None when it names none.

    Choices and text are compared case-insensitively with whitespace stripped (and runs of whitespace
    collapsed). A one-word choice must appear as a whole word (no letter, digit or underscore right before
    or after it), so the choice "A" is not found in "Answer"; a choice of several words is found as a
    substring. The choice found at the earliest position wins; at the same position the longest one wins
    (then the lowest index).
    """
    haystack = _normalize(text)
    best: tuple[int, int, int] | None = None  # (position, -length, index)
    for index, choice in enumerate(choices):
        needle = _normalize(choice)
        if not needle:
            continue
        if " " in needle:
            pos = haystack.find(needle)
        else:
            before = r"(?<!\w)" if re.match(r"\w", needle[0]) else ""
            after = r"(?!\w)" if re.match(r"\w", needle[-1]) else ""
            m = re.search(before + re.escape(needle) + after, haystack)
            pos = m.start() if m else -1
        if pos < 0:
            continue
        key = (pos, -len(needle), index)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


# --- per-item results ---------------------------------------------------------------------------------------


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x)
    if not np.isfinite(m):  # all -inf: uniform
        return np.full(x.shape, -math.log(len(x)))
    z = x - m
    return z - math.log(float(np.sum(np.exp(z))))


@dataclass
class ItemResult:
    choice_pred: int  # argmax of choice_logprob
    choice_pred_norm: int  # argmax of choice_logprob / choice_n_tokens
    gen_pred: int | None  # parse_generation(gen_text); None: the text names no choice
    correct_logprob: float | None  # log softmax-over-choices probability of the answer; None: no answer
    entropy_full: float
    entropy_choices: float
    choice_probs: np.ndarray  # softmax over the choices' total log-likelihoods
    # open-ended items: the first reference's log-likelihood per token after the prompt (teacher forcing)
    answer_logprob: float | None = None
    # ... and the log-probability of its first token alone
    answer_first_logprob: float | None = None


def item_results(scores: Sequence[Scores], items: Sequence[Item]) -> list[ItemResult]:
    """One ItemResult per (scores, item) pair, in order."""
    if len(scores) != len(items):
        raise ValueError(f"{len(scores)} scores for {len(items)} items")
    out: list[ItemResult] = []
    for s, item in zip(scores, items, strict=True):
        if item.open:
            out.append(_open_result(s, item))
            continue
        lp = np.asarray(s.choice_logprob, dtype=np.float64)
        if lp.shape != (len(item.choices),):
            raise ValueError(f"item {item.id}: {lp.shape[0]} choice scores for {len(item.choices)} choices")
        n_tok = np.maximum(np.asarray(s.choice_n_tokens, dtype=np.float64), 1.0)
        log_probs = _log_softmax(lp)
        out.append(
            ItemResult(
                choice_pred=int(np.argmax(lp)),
                choice_pred_norm=int(np.argmax(lp / n_tok)),
                gen_pred=parse_generation(s.gen_text, item.choices),
                correct_logprob=None if item.answer is None else float(log_probs[item.answer]),
                entropy_full=float(s.entropy_full),
                entropy_choices=float(s.entropy_choices),
                choice_probs=np.exp(log_probs),
            )
        )
    return out


def _open_result(s: Scores, item: Item) -> ItemResult:
    """An open-ended item: its one "choice" is the first reference, scored by teacher forcing; gen_pred is 0
    (the reference) when the greedy continuation gives a reference under the item's match rule."""
    assert item.match is not None
    n_tok = max(1, int(s.choice_n_tokens[0]))
    return ItemResult(
        choice_pred=0,
        choice_pred_norm=0,
        gen_pred=0 if item.match.matches(s.gen_text, item.references) else None,
        correct_logprob=None,
        entropy_full=float(s.entropy_full),
        entropy_choices=float(s.entropy_choices),
        choice_probs=np.ones(1),
        answer_logprob=float(s.choice_logprob[0]) / n_tok,
        answer_first_logprob=float(s.choice_first_logprob[0]),
    )


# --- summaries ----------------------------------------------------------------------------------------------


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def mutual_information(results: Sequence[ItemResult]) -> float:
    """I(item; predicted choice) = H(mean choice distribution) - mean H(choice distribution), in nats.

    High when every item is confident AND the items do not all pick the same choice; a prediction set that
    collapses onto one label has (near) zero mutual information however confident it is. Items with fewer
    choices are padded with zeros (choices are aligned by index: labels or letters A, B, ...).
    """
    if not results:
        return 0.0
    width = max(len(r.choice_probs) for r in results)
    probs = np.zeros((len(results), width))
    for i, r in enumerate(results):
        probs[i, : len(r.choice_probs)] = r.choice_probs
    mean_h = float(np.mean([_entropy(row) for row in probs]))
    return max(0.0, _entropy(probs.mean(axis=0)) - mean_h)


@dataclass
class Summary:
    n: int
    accuracy_choice: float | None  # None unless every item has an answer
    accuracy_choice_norm: float | None
    accuracy_generate: float | None  # an invalid generation counts as wrong
    invalid_rate: float  # share of generations that name no choice
    mean_correct_logprob: float | None
    mean_entropy_full: float
    mean_entropy_choices: float
    mutual_information: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _has_answers(items: Sequence[Item]) -> bool:
    return len(items) > 0 and all(item.answer is not None for item in items)


def summarize(results: Sequence[ItemResult], items: Sequence[Item]) -> Summary:
    """Means over the items; the accuracy and log-prob fields are None unless every item has an answer.

    Open-ended items: accuracy_generate is the exact match of the greedy continuations (under each item's
    match rule), mean_correct_logprob the mean answer log-likelihood per token; the choice accuracies are
    None (there is one "choice", the reference)."""
    if len(results) != len(items):
        raise ValueError(f"{len(results)} results for {len(items)} items")
    n = len(results)

    def mean(values: Sequence[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    labelled = _has_answers(items)
    choice = labelled and not any(item.open for item in items)
    answers = [item.answer for item in items]
    logprobs = [r.correct_logprob if r.answer_logprob is None else r.answer_logprob for r in results]
    return Summary(
        n=n,
        accuracy_choice=mean([r.choice_pred == a for r, a in zip(results, answers)]) if choice else None,
        accuracy_choice_norm=(
            mean([r.choice_pred_norm == a for r, a in zip(results, answers)]) if choice else None
        ),
        accuracy_generate=mean([r.gen_pred == a for r, a in zip(results, answers)]) if labelled else None,
        invalid_rate=mean([r.gen_pred is None for r in results]),
        mean_correct_logprob=mean(logprobs) if labelled else None,  # type: ignore[arg-type]
        mean_entropy_full=mean([r.entropy_full for r in results]),
        mean_entropy_choices=mean([r.entropy_choices for r in results]),
        mutual_information=mutual_information(results),
    )
