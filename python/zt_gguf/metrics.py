"""Per-item results, summaries and calibration objectives (pure functions; intervals are in stats.py).

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .corrections import batch_calibration
from .tasks import Item

if TYPE_CHECKING:
    from .engine import Scores

__all__ = [
    "OBJECTIVES",
    "ItemResult",
    "Objective",
    "Summary",
    "get_objective",
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


def item_results(scores: Sequence[Scores], items: Sequence[Item]) -> list[ItemResult]:
    """One ItemResult per (scores, item) pair, in order."""
    if len(scores) != len(items):
        raise ValueError(f"{len(scores)} scores for {len(items)} items")
    out: list[ItemResult] = []
    for s, item in zip(scores, items, strict=True):
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
    """Means over the items; the accuracy and log-prob fields are None unless every item has an answer."""
    if len(results) != len(items):
        raise ValueError(f"{len(results)} results for {len(items)} items")
    n = len(results)

    def mean(values: Sequence[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    labelled = _has_answers(items)
    answers = [item.answer for item in items]
    return Summary(
        n=n,
        accuracy_choice=mean([r.choice_pred == a for r, a in zip(results, answers)]) if labelled else None,
        accuracy_choice_norm=(
            mean([r.choice_pred_norm == a for r, a in zip(results, answers)]) if labelled else None
        ),
        accuracy_generate=mean([r.gen_pred == a for r, a in zip(results, answers)]) if labelled else None,
        invalid_rate=mean([r.gen_pred is None for r in results]),
        mean_correct_logprob=mean([r.correct_logprob for r in results]) if labelled else None,  # type: ignore[misc]
        mean_entropy_full=mean([r.entropy_full for r in results]),
        mean_entropy_choices=mean([r.entropy_choices for r in results]),
        mutual_information=mutual_information(results),
    )


# --- objectives ---------------------------------------------------------------------------------------------

PerItem = Callable[[Sequence[ItemResult], Sequence[Item]], np.ndarray]


class Objective(NamedTuple):
    """A calibration objective: fn(results, items) -> value to maximise."""

    fn: Callable[[Sequence[ItemResult], Sequence[Item]], float]
    needs_labels: bool
    description: str
    # per-item values whose mean is fn (for paired comparisons); None: fn is not a mean of per-item values
    per_item: PerItem | None = None


def _require_answers(items: Sequence[Item]) -> list[int]:
    answers = [item.answer for item in items]
    if any(a is None for a in answers):
        raise ValueError("this objective needs an answer for every item")
    return answers  # type: ignore[return-value]


def _correct_choice(results: Sequence[ItemResult], items: Sequence[Item]) -> np.ndarray:
    answers = _require_answers(items)
    return np.array([r.choice_pred == a for r, a in zip(results, answers)], dtype=np.float64)


def _correct_choice_norm(results: Sequence[ItemResult], items: Sequence[Item]) -> np.ndarray:
    answers = _require_answers(items)
    return np.array([r.choice_pred_norm == a for r, a in zip(results, answers)], dtype=np.float64)


def _correct_generate(results: Sequence[ItemResult], items: Sequence[Item]) -> np.ndarray:
    answers = _require_answers(items)
    return np.array([r.gen_pred == a for r, a in zip(results, answers)], dtype=np.float64)


def _correct_logprob(results: Sequence[ItemResult], items: Sequence[Item]) -> np.ndarray:
    _require_answers(items)
    return np.array([r.correct_logprob for r in results], dtype=np.float64)


def _neg_entropy_full(results: Sequence[ItemResult], items: Sequence[Item]) -> np.ndarray:
    return -np.array([r.entropy_full for r in results], dtype=np.float64)


def _neg_entropy_choices(results: Sequence[ItemResult], items: Sequence[Item]) -> np.ndarray:
    return -np.array([r.entropy_choices for r in results], dtype=np.float64)


def _batch_calibrated(results: Sequence[ItemResult]) -> np.ndarray | None:
    """The choice log-probabilities after Batch Calibration on these results' own batch, [N, K].

    None when the items have different numbers of choices (no common label prior)."""
    if not results or len({len(r.choice_probs) for r in results}) != 1:
        return None
    with np.errstate(divide="ignore"):
        s = np.log(np.stack([r.choice_probs for r in results]))
    return batch_calibration(s, "the batch").log_probs(s)


def _bc_accuracy_choice(results: Sequence[ItemResult], items: Sequence[Item]) -> float:
    answers = _require_answers(items)
    lp = _batch_calibrated(results)
    if lp is None:
        return float(np.mean(_correct_choice(results, items))) if results else float("nan")
    return float(np.mean(np.argmax(lp, axis=1) == np.asarray(answers)))


def _bc_logprob(results: Sequence[ItemResult], items: Sequence[Item]) -> float:
    answers = _require_answers(items)
    lp = _batch_calibrated(results)
    if lp is None:
        return float(np.mean(_correct_logprob(results, items))) if results else float("nan")
    return float(np.mean(lp[np.arange(len(answers)), answers]))


def _bc_mutual_information(results: Sequence[ItemResult], items: Sequence[Item]) -> float:
    lp = _batch_calibrated(results)
    if lp is None:
        return mutual_information(results)
    calibrated = [ItemResult(**{**asdict(r), "choice_probs": np.exp(row)}) for r, row in zip(results, lp)]
    return mutual_information(calibrated)


def _mean_of(per_item: PerItem) -> Callable[[Sequence[ItemResult], Sequence[Item]], float]:
    def fn(results: Sequence[ItemResult], items: Sequence[Item]) -> float:
        values = per_item(results, items)
        return float(np.mean(values)) if len(values) else float("nan")

    return fn


def _per_item_objective(per_item: PerItem, needs_labels: bool, description: str) -> Objective:
    return Objective(_mean_of(per_item), needs_labels, description, per_item)


OBJECTIVES: dict[str, Objective] = {
    "accuracy-generate": _per_item_objective(
        _correct_generate,
        True,
        "accuracy of the label named by the greedy continuation (invalid = wrong), as in the released code",
    ),
    "accuracy-choice": _per_item_objective(
        _correct_choice, True, "accuracy of the argmax of the choices' total log-likelihoods"
    ),
    "accuracy-choice-norm": _per_item_objective(
        _correct_choice_norm, True, "accuracy of the argmax of the choices' log-likelihoods per token"
    ),
    "logprob": _per_item_objective(
        _correct_logprob, True, "mean log-probability of the answer, softmax over the choices (smooth)"
    ),
    "neg-entropy-full": _per_item_objective(
        _neg_entropy_full,
        False,
        "minus the mean full-vocabulary next-token entropy after the prompt (the paper's unsupervised mode)",
    ),
    "neg-entropy-choices": _per_item_objective(
        _neg_entropy_choices, False, "minus the mean next-token entropy renormalised over the choices"
    ),
    "mutual-information": Objective(
        lambda results, items: mutual_information(results),
        False,
        "H(mean choice distribution) - mean H(choice distribution): confident, not collapsed on one label",
        None,
    ),
    # what a label-prior shift cannot give: each candidate is judged after Batch Calibration on its own
    # calibration batch (the prior is re-estimated per candidate, so these are not per-item means: no racing)
    "bc-accuracy-choice": Objective(
        _bc_accuracy_choice, True, "choice accuracy after Batch Calibration on the calibration batch", None
    ),
    "bc-logprob": Objective(
        _bc_logprob, True, "mean log-probability of the answer after Batch Calibration (smooth)", None
    ),
    "bc-mutual-information": Objective(
        _bc_mutual_information,
        False,
        "mutual information of the choice distributions after Batch Calibration (label-free)",
        None,
    ),
}


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}") from None
