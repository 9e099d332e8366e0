"""ZeroTuning against the free output-side baselines, on the same held-out items (the comparison stage).

Every row is one method's held-out accuracy: the untuned or the tuned model, plain or with one of the
output-side corrections of corrections.py, with a Wilson interval and a paired bootstrap delta against the
tuned model. A row's identity is a typed :class:`RowKey` (model, correction); its text form
("tuned+label-offset") is only for report.json and the GGUF provenance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .corrections import (
    Correction,
    LogitBias,
    batch_calibration,
    contextual_calibration,
    fit_label_offset,
    fit_logit_bias,
    score_matrix,
)
from .metrics import item_results
from .stats import paired_bootstrap_delta, wilson_interval

UNTUNED = "untuned"
TUNED = "tuned"

CORRECTION_NAMES = {
    "batch-heldout": "Batch Calibration (held-out batch)",
    "batch-calibration": "Batch Calibration (calibration inputs)",
    "contextual": "Contextual Calibration (content-free inputs)",
    "label-offset": "per-label offset (calibration labels)",
    "logit-bias": "logit bias on the label words' first tokens (calibration labels)",
    "stored": "the correction stored in the file",
}


class RowKey(NamedTuple):
    """Which method a row measures: a model (UNTUNED or TUNED) and an output correction (None: none)."""

    model: str
    correction: str | None = None

    def __str__(self) -> str:
        return self.model + (f"+{self.correction}" if self.correction else "")

    @classmethod
    def parse(cls, text: str) -> RowKey:
        """The key of a row's text form, as report.json and the GGUF provenance store it."""
        model, _, corr = text.partition("+")
        if model not in (UNTUNED, TUNED) or (corr and corr not in CORRECTION_NAMES):
            raise ValueError(f"not a comparison row: {text!r}")
        return cls(model, corr or None)

    @property
    def free(self) -> bool:
        """A baseline that needs no ZeroTuning."""
        return self.model == UNTUNED

    def describe(self) -> str:
        name = "untuned" if self.model == UNTUNED else "ZeroTuning"
        return name + (f" + {CORRECTION_NAMES[self.correction]}" if self.correction else "")


def describe(key: RowKey | str) -> str:
    """A row's name for people: "ZeroTuning + per-label offset (calibration labels)"."""
    return (key if isinstance(key, RowKey) else RowKey.parse(key)).describe()


@dataclass
class Arm:
    """The choice scores of one model (untuned or tuned) on the calibration and held-out items."""

    s_cal: np.ndarray | None  # [N_cal, K]; None: no calibration items (eval)
    s_held: np.ndarray  # [N_held, K]
    s_cf: np.ndarray | None = None  # [n_cf, K], the content-free prompts (Contextual Calibration)


@dataclass
class Row:
    """One method on the held-out items: accuracy, Wilson interval, paired delta against ZeroTuning."""

    key: RowKey
    correction: Correction | LogitBias | None
    accuracy: float
    interval: tuple[float, float]
    correct: np.ndarray  # 0/1 per held-out item
    pred_counts: list[int]  # predictions per choice index
    macro_f1: float
    delta_vs_tuned: dict[str, float] | None = None  # this - tuned: delta, lo, hi

    @property
    def model(self) -> str:
        return self.key.model

    @property
    def free(self) -> bool:
        return self.key.free

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": str(self.key),
            "model": self.model,
            "free": self.free,
            "correction": None if self.correction is None else self.correction.to_dict(),
            "accuracy": self.accuracy,
            "interval": list(self.interval),
            "pred_counts": self.pred_counts,
            "macro_f1": self.macro_f1,
            "delta_vs_tuned": self.delta_vs_tuned,
        }


def macro_f1(pred: np.ndarray, y: np.ndarray, k: int) -> float:
    f1s = []
    for j in range(k):
        tp = float(np.sum((pred == j) & (y == j)))
        fp = float(np.sum((pred == j) & (y != j)))
        fn = float(np.sum((pred != j) & (y == j)))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def corrections_for(arm: Arm, y_cal: np.ndarray | None, model: str) -> dict[str, Correction]:
    """The output-side corrections of one model: Batch Calibration (held-out batch, calibration inputs),
    Contextual Calibration (given content-free scores) and, given calibration labels, the label offset."""
    out = {
        "batch-heldout": batch_calibration(arm.s_held, f"the {model} model's held-out batch (label-free)"),
    }
    if arm.s_cal is not None and len(arm.s_cal):
        out["batch-calibration"] = batch_calibration(
            arm.s_cal, f"the {model} model's calibration inputs (label-free)"
        )
    if arm.s_cf is not None and len(arm.s_cf):
        out["contextual"] = contextual_calibration(arm.s_cf, f"the {model} model's content-free prompts")
    if y_cal is not None and len(y_cal):
        out["label-offset"] = fit_label_offset(
            arm.s_cal, y_cal, f"the {model} model's {len(y_cal)} calibration labels"
        )
    return out


def compare(
    untuned: Arm,
    tuned: Arm | None,
    y_held: np.ndarray,
    y_cal: np.ndarray | None,
    seed: int,
) -> list[Row]:
    """Every method's held-out accuracy on the same items, with paired deltas against the tuned model (the
    untuned one when tuned is None).

    y_cal: the calibration labels (None: a label-free comparison, no label offset)."""
    y_held = np.asarray(y_held, dtype=np.int64)
    k = untuned.s_held.shape[1]
    rows: list[Row] = []
    arms = [(UNTUNED, untuned)] + ([(TUNED, tuned)] if tuned is not None else [])
    for model, arm in arms:
        variants: list[tuple[RowKey, Correction | None]] = [(RowKey(model), None)]
        variants += [(RowKey(model, name), c) for name, c in corrections_for(arm, y_cal, model).items()]
        for key, corr in variants:
            pred = np.argmax(arm.s_held, axis=1) if corr is None else corr.predict(arm.s_held)
            rows.append(make_row(key, corr, [int(p) for p in pred], y_held, k))
    return with_deltas(rows, seed, RowKey(TUNED if tuned is not None else UNTUNED))


def make_row(
    key: RowKey, correction: Correction | LogitBias | None, pred: Sequence[int | None], y: np.ndarray, k: int
) -> Row:
    """A Row from per-item predictions (None: no label, i.e. an invalid generation, counted wrong)."""
    y = np.asarray(y, dtype=np.int64)
    p = np.array([-1 if x is None else x for x in pred], dtype=np.int64)
    correct = (p == y).astype(np.float64)
    return Row(
        key=key,
        correction=correction,
        accuracy=float(correct.mean()) if len(correct) else float("nan"),
        interval=wilson_interval(int(correct.sum()), len(correct)),
        correct=correct,
        pred_counts=np.bincount(p[p >= 0], minlength=k).tolist(),
        macro_f1=macro_f1(p, y, k),
    )


def with_deltas(rows: list[Row], seed: int, ref_key: RowKey | None = None) -> list[Row]:
    """Fill each row's paired bootstrap delta against the ref_key row (default: the tuned model's; same
    items, same order)."""
    ref_key = RowKey(TUNED) if ref_key is None else ref_key
    ref = next(r for r in rows if r.key == ref_key).correct
    for r in rows:
        d, lo, hi = paired_bootstrap_delta(ref, r.correct, seed=seed)
        r.delta_vs_tuned = {"delta": d, "lo": lo, "hi": hi}
    return rows


@dataclass
class Verdict:
    """What ships and whether it beats the best free baseline on the held-out items."""

    shipped: Row  # ZeroTuning, with or without its correction
    best_free: Row  # the best baseline without ZeroTuning (the untuned model, plain or corrected)
    delta: dict[str, float]  # shipped - best_free: delta, lo, hi (paired bootstrap)
    beats: bool  # shipped accuracy > best free accuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            "shipped": str(self.shipped.key),
            "best_free": str(self.best_free.key),
            "shipped_accuracy": self.shipped.accuracy,
            "best_free_accuracy": self.best_free.accuracy,
            "delta": self.delta,
            "beats": self.beats,
        }


def verdict(rows: Sequence[Row], shipped_key: RowKey, seed: int) -> Verdict:
    """Compare the shipped row with the best free row (highest held-out accuracy; ties: the simplest, i.e.
    the first listed). Choosing the best baseline on the held-out items favours the baselines."""
    shipped = next(r for r in rows if r.key == shipped_key)
    free = [r for r in rows if r.free]
    best = max(free, key=lambda r: (r.accuracy, -free.index(r)))
    d, lo, hi = paired_bootstrap_delta(best.correct, shipped.correct, seed=seed)
    return Verdict(shipped, best, {"delta": d, "lo": lo, "hi": hi}, shipped.accuracy > best.accuracy)


# --- the whole comparison, given a scorer ---------------------------------------------------------------

# score(bias or None, items, logit_bias pairs) -> one engine.Scores per item
ComparisonScorer = Callable[[Any, Sequence[Any], Sequence[tuple[int, float]]], list[Any]]


@dataclass
class Comparison:
    """The held-out comparison of a calibration: every row on the same items, and the verdict."""

    scoring: str  # the rows' accuracy: "choice" | "generate"
    rows: list[Row]  # the primary scoring's methods
    choice_rows: list[Row]  # the choice-score methods (also reported under generate scoring)
    shipped: RowKey  # what ships with the tuned file
    shipped_correction: Correction | LogitBias | None
    verdict: Verdict | None
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "scoring": self.scoring,
            "rows": [r.to_dict() for r in self.rows],
            "choice_rows": [r.to_dict() for r in self.choice_rows]
            if self.choice_rows is not self.rows
            else None,
            "shipped": str(self.shipped),
            "shipped_correction": None
            if self.shipped_correction is None
            else self.shipped_correction.to_dict(),
            "verdict": None if self.verdict is None else self.verdict.to_dict(),
            "notes": list(self.notes),
        }


def _choice_matrix(scores: Sequence[Any]) -> np.ndarray:
    return score_matrix([s.choice_logprob for s in scores])


def label_first_tokens(scores: Sequence[Any]) -> tuple[list[int], list[list[int]]] | None:
    """The first token of each label word after the prompt, the same in every item: (distinct tokens, labels
    per token). None when a label starts differently in some item (a token merge) or K differs."""
    per_label: list[set[int]] = []
    for s in scores:
        toks = [] if s.choice_next_token is None else [int(t) for t in s.choice_next_token]
        if not per_label:
            per_label = [set() for _ in toks]
        if len(toks) != len(per_label):
            return None
        for j, t in enumerate(toks):
            per_label[j].add(t)
    if not per_label or any(len(x) != 1 or -1 in x for x in per_label):
        return None
    tokens: list[int] = []
    groups: list[list[int]] = []
    for j, x in enumerate(per_label):
        t = next(iter(x))
        if t in tokens:
            groups[tokens.index(t)].append(j)
        else:
            tokens.append(t)
            groups.append([j])
    return tokens, groups


def _first_token_inputs(scores: Sequence[Any], groups: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    first = np.array([[float(s.choice_next_logprob[g[0]]) for g in groups] for s in scores])
    other = np.array([float(s.other_next_logprob) for s in scores])
    return first, other


@dataclass
class _Scored:
    """The engine's scores of one model (untuned or tuned) on what the comparison needs."""

    bias: np.ndarray | None
    cal: list[Any]
    held: list[Any]
    cf: list[Any] | None


def run_comparison(
    score: ComparisonScorer,
    calib: Sequence[Any],
    held: Sequence[Any],
    cf_items: Sequence[Any],
    tuned_bias: np.ndarray,
    *,
    supervised: bool,
    scoring: str,
    objective: str,
    seed: int,
) -> Comparison | None:
    """Score what the comparison needs (the scorer may serve repeats from a cache) and compare.

    None when the held-out items are unlabelled. The shipped correction: Batch Calibration on the calibration
    inputs for the "bc-" objectives (what they assumed); otherwise, supervised, the label offset (choice) or
    the logit bias (generate) fitted on the tuned model's calibration items when it raises their accuracy;
    otherwise none."""
    if not held or any(it.answer is None for it in held):
        return None
    notes: list[str] = []
    y_held = np.array([it.answer for it in held])
    y_cal = np.array([it.answer for it in calib]) if supervised else None
    sc = {
        m: _Scored(b, score(b, calib, ()), score(b, held, ()), score(b, cf_items, ()) if cf_items else None)
        for m, b in ((UNTUNED, None), (TUNED, tuned_bias))
    }
    try:
        arms = {
            m: Arm(
                _choice_matrix(v.cal), _choice_matrix(v.held), None if v.cf is None else _choice_matrix(v.cf)
            )
            for m, v in sc.items()
        }
    except ValueError as e:
        notes.append(f"no output-side baselines: {e}")
        return Comparison(scoring, [], [], RowKey(TUNED), None, None, notes)
    if not cf_items:
        notes.append("no Contextual Calibration: the items share no template with one input slot")
    choice_rows = compare(arms[UNTUNED], arms[TUNED], y_held, y_cal, seed)
    if scoring == "choice":
        shipped = _shipped_choice_correction(choice_rows, arms[TUNED], y_cal, objective)
        row = next(r for r in choice_rows if r.key == shipped)
        verdict_ = verdict(choice_rows, shipped, seed)
        return Comparison(scoring, choice_rows, choice_rows, shipped, row.correction, verdict_, notes)
    rows, shipped, shipped_corr = _generate_rows(score, sc, calib, held, y_cal, arms, notes)
    if objective.startswith("bc-"):
        notes.append("a bc- objective with generate scoring: Batch Calibration does not apply to generations")
    with_deltas(rows, seed)
    return Comparison(scoring, rows, choice_rows, shipped, shipped_corr, verdict(rows, shipped, seed), notes)


def _shipped_choice_correction(
    rows: Sequence[Row], tuned: Arm, y_cal: np.ndarray | None, objective: str
) -> RowKey:
    """What ships with a choice-scored tuned file: Batch Calibration for a bc- objective; supervised, the
    label offset compare() fitted on the tuned model's calibration items if it raises their accuracy."""
    if objective.startswith("bc-"):
        return RowKey(TUNED, "batch-calibration")
    if y_cal is None or tuned.s_cal is None:
        return RowKey(TUNED)
    offset = next(r for r in rows if r.key == RowKey(TUNED, "label-offset")).correction
    assert isinstance(offset, Correction)
    plain = np.mean(np.argmax(tuned.s_cal, axis=1) == y_cal)
    if np.mean(offset.predict(tuned.s_cal) == y_cal) > plain:
        return RowKey(TUNED, "label-offset")
    return RowKey(TUNED)


def _generate_rows(
    score: ComparisonScorer,
    sc: dict[str, _Scored],
    calib: Sequence[Any],
    held: Sequence[Any],
    y_cal: np.ndarray | None,
    arms: dict[str, Arm],
    notes: list[str],
) -> tuple[list[Row], RowKey, LogitBias | None]:
    """Generate scoring: the label named by the greedy continuation, plain and with a logit bias on the
    label words' first tokens fitted on the calibration labels (scored by real generation)."""
    y_held = np.array([it.answer for it in held])
    k = arms[UNTUNED].s_held.shape[1]
    gen = {m: [r.gen_pred for r in item_results(v.held, held)] for m, v in sc.items()}
    rows = [make_row(RowKey(m), None, gen[m], y_held, k) for m in (UNTUNED, TUNED)]
    shipped, shipped_corr = RowKey(TUNED), None
    firsts = label_first_tokens([*sc[UNTUNED].cal, *sc[UNTUNED].held])
    if y_cal is None:
        notes.append("no logit bias: fitting it needs calibration labels (supervised mode)")
        return rows, shipped, shipped_corr
    if firsts is None:
        notes.append("no logit bias: a label word does not start with the same token in every item")
        return rows, shipped, shipped_corr
    tokens, groups = firsts
    for m, v in sc.items():
        first, other = _first_token_inputs(v.cal, groups)
        cal_gen = [r.gen_pred for r in item_results(v.cal, calib)]
        where = f"the {m} model's {len(calib)} calibration labels"
        lb = fit_logit_bias(first, other, cal_gen, list(y_cal), tokens, groups, where)
        key = RowKey(m, "logit-bias")
        if not lb.pairs():
            notes.append(f"the logit bias fitted for the {m} model is zero (no gain on calibration items)")
            rows.append(make_row(key, lb, gen[m], y_held, k))
            continue
        pred = [r.gen_pred for r in item_results(score(v.bias, held, lb.pairs()), held)]
        rows.append(make_row(key, lb, pred, y_held, k))
        if m == TUNED:
            shipped, shipped_corr = key, lb
    rows.sort(key=lambda r: (not r.free, str(r.key)))
    return rows, shipped, shipped_corr
