"""Calibration objectives: what a candidate's biases are judged by on the calibration items (values to
MAXIMISE). Every one except the mutual information and the bc- objectives is the mean of a per-item value
(``Objective.per_item``), which lets the search compare two candidates item by item (racing).

Multiple-choice tasks are judged by their choices (accuracy, the answer's log-probability over the choices,
entropies, mutual information, and the same after Batch Calibration); open-ended tasks by their reference
answers (the teacher-forced answer log-likelihood, exact match of the greedy continuation) or, without
labels, by the entropy of the first generated token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import NamedTuple

import numpy as np

from .corrections import batch_calibration
from .metrics import ItemResult, mutual_information
from .tasks import Item

__all__ = ["OBJECTIVES", "Objective", "get_objective", "objectives_for"]

PerItem = Callable[[Sequence[ItemResult], Sequence[Item]], np.ndarray]


class Objective(NamedTuple):
    """A calibration objective: fn(results, items) -> value to maximise."""

    fn: Callable[[Sequence[ItemResult], Sequence[Item]], float]
    needs_labels: bool
    description: str
    # per-item values whose mean is fn (for paired comparisons); None: fn is not a mean of per-item values
    per_item: PerItem | None = None
    kinds: tuple[str, ...] = ("choice",)  # the task kinds it applies to (tasks.KINDS)
    generates: bool = False  # reads the greedy continuation (so the search must generate)


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


def _per_item_objective(
    per_item: PerItem,
    needs_labels: bool,
    description: str,
    kinds: tuple[str, ...] = ("choice",),
    generates: bool = False,
) -> Objective:
    return Objective(_mean_of(per_item), needs_labels, description, per_item, kinds, generates)


def _answer_logprob(results: Sequence[ItemResult], items: Sequence[Item]) -> np.ndarray:
    _require_answers(items)
    return np.array([r.answer_logprob for r in results], dtype=np.float64)


def _answer_first_logprob(results: Sequence[ItemResult], items: Sequence[Item]) -> np.ndarray:
    _require_answers(items)
    return np.array([r.answer_first_logprob for r in results], dtype=np.float64)


OBJECTIVES: dict[str, Objective] = {
    "accuracy-generate": _per_item_objective(
        _correct_generate,
        True,
        "accuracy of the label named by the greedy continuation (invalid = wrong), as in the released code",
        generates=True,
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
        ("choice", "open"),
    ),
    # open-ended tasks
    "answer-logprob": _per_item_objective(
        _answer_logprob,
        True,
        "mean log-likelihood per token of the first reference answer after the prompt (teacher forcing: "
        "one decode per item, no generation; smooth)",
        ("open",),
    ),
    "answer-first-logprob": _per_item_objective(
        _answer_first_logprob,
        True,
        "mean log-probability of the first token of the first reference answer after the prompt (teacher "
        "forcing): whether the answer starts right, as the greedy continuation's first token must",
        ("open",),
    ),
    "exact-match": _per_item_objective(
        _correct_generate,
        True,
        "share of greedy continuations that give a reference answer under the task's match rule",
        ("open",),
        generates=True,
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


def objectives_for(kind: str) -> list[str]:
    """The names of the objectives that apply to a task kind."""
    return [name for name, o in OBJECTIVES.items() if kind in o.kinds]
