"""Output-side calibration of the label prior: the free baselines ZeroTuning must beat (pure NumPy).

Every method here (../shared/design/output-calibration.md) corrects the choice scores of an item by one
offset vector per task: with S[i, j] the total log-likelihood of choice j after prompt i and
L = log_softmax(S) over the choices, the corrected prediction is argmax_j (L[i, j] + c[j]). They differ only
in where c comes from:

* ``batch``: Batch Calibration (Zhou et al., arXiv 2309.17249), c = -mean_i L[i, :] over a batch of
  unlabelled inputs: the held-out batch itself (transductive, what the paper does) or the calibration inputs
  (inductive: what a deployment has before it sees its traffic). No labels.
* ``contextual``: Contextual Calibration (Zhao et al., arXiv 2102.09690), c = -log p_cf with p_cf the label
  probabilities after the content-free prompts ("N/A", "", "[MASK]" in the input slots): the mean of their raw
  probabilities, renormalised over the labels (as the reference code does). No labels, no task inputs.
* ``label-offset``: a per-label offset fitted on labelled calibration items by maximum likelihood
  (multinomial logistic regression whose only parameters are the K offsets, a small L2 penalty, Newton's
  method), the supervised control.

Choices must be aligned: choice j means the same thing in every item (label words; or the option position of
a multiple-choice task, where the prior is a position prior). Items with different numbers of choices have no
common offset: :func:`score_matrix` refuses them.

For generate scoring the same idea is a logit bias on the label words' first tokens (:func:`fit_logit_bias`):
llama.cpp's ``--logit-bias TOKEN+BIAS`` and the server's ``logit_bias`` apply it to what a user gets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "CONTENT_FREE_MIN",
    "Correction",
    "LogitBias",
    "batch_calibration",
    "contextual_calibration",
    "fit_label_offset",
    "fit_logit_bias",
    "log_softmax_rows",
    "score_matrix",
    "simulate_first_token",
]

CONTENT_FREE_MIN = 1  # content-free prompts needed for Contextual Calibration


def log_softmax_rows(s: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis; a row of -inf only (no finite score) becomes uniform."""
    s = np.asarray(s, dtype=np.float64)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    z = s - m
    with np.errstate(divide="ignore"):
        lse = np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
    out = z - lse
    bad = ~np.isfinite(lse[..., 0])
    if np.any(bad):
        out[bad] = -math.log(s.shape[-1])
    return out


def score_matrix(choice_logprobs: Sequence[Sequence[float]]) -> np.ndarray:
    """[N, K] from per-item choice log-likelihoods; ValueError when the items have different K."""
    widths = {len(row) for row in choice_logprobs}
    if len(widths) != 1:
        raise ValueError(
            f"the items have different numbers of choices ({', '.join(map(str, sorted(widths)))}): "
            "no common label offset"
        )
    return np.asarray([list(row) for row in choice_logprobs], dtype=np.float64)


@dataclass
class Correction:
    """An additive offset on the log-softmax over the choices: pred = argmax(log_softmax(S) + offset)."""

    method: str  # "batch" | "contextual" | "label-offset"
    offset: np.ndarray  # [K], mean zero
    estimated_from: str  # what it was estimated from, in words
    uses_labels: bool

    def __post_init__(self) -> None:
        self.offset = np.asarray(self.offset, dtype=np.float64)
        self.offset = self.offset - self.offset.mean()

    def log_probs(self, s: np.ndarray) -> np.ndarray:
        """The corrected log-probabilities over the choices, [N, K]."""
        return log_softmax_rows(log_softmax_rows(s) + self.offset)

    def predict(self, s: np.ndarray) -> np.ndarray:
        return np.argmax(log_softmax_rows(s) + self.offset, axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "offset": [float(x) for x in self.offset],
            "estimated_from": self.estimated_from,
            "uses_labels": self.uses_labels,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Correction:
        return cls(
            str(d["method"]), np.asarray(d["offset"]), str(d["estimated_from"]), bool(d["uses_labels"])
        )


def batch_calibration(s_batch: np.ndarray, estimated_from: str) -> Correction:
    """Batch Calibration: the offset is minus the batch's mean log-softmax over the choices."""
    s_batch = np.asarray(s_batch, dtype=np.float64)
    if s_batch.ndim != 2 or len(s_batch) == 0:
        raise ValueError("Batch Calibration needs a non-empty [N, K] batch of scores")
    return Correction("batch", -log_softmax_rows(s_batch).mean(axis=0), estimated_from, False)


def contextual_calibration(s_cf: np.ndarray, estimated_from: str = "content-free prompts") -> Correction:
    """Contextual Calibration from the scores of the content-free prompts, [n_cf, K]."""
    s_cf = np.asarray(s_cf, dtype=np.float64)
    if s_cf.ndim != 2 or len(s_cf) < CONTENT_FREE_MIN:
        raise ValueError("Contextual Calibration needs the scores of at least one content-free prompt")
    # the mean of the raw label probabilities over the content-free inputs, then renormalised
    m = np.max(s_cf)
    mean_p = np.log(np.mean(np.exp(s_cf - m), axis=0)) + m
    return Correction("contextual", -log_softmax_rows(mean_p), estimated_from, False)


def fit_label_offset(
    s: np.ndarray, y: Sequence[int], estimated_from: str, l2: float = 1e-3, iters: int = 50
) -> Correction:
    """The per-label offset b maximising sum_i log softmax(L_i + b)[y_i] - l2/2 |b|^2 (Newton's method).

    The objective is concave (strictly, with l2 > 0), so Newton with a backtracking step converges to the
    unique optimum; b is defined up to a constant, which the penalty fixes at mean zero."""
    lp = log_softmax_rows(np.asarray(s, dtype=np.float64))
    y = np.asarray(y, dtype=np.int64)
    n, k = lp.shape
    if n == 0 or len(y) != n or np.any((y < 0) | (y >= k)):
        raise ValueError("fit_label_offset needs one answer in [0, K) per item")
    onehot = np.eye(k)[y]

    def value(b: np.ndarray) -> float:
        z = log_softmax_rows(lp + b)
        return float(np.sum(z[np.arange(n), y]) - 0.5 * l2 * n * b @ b)

    b = np.zeros(k)
    f = value(b)
    for _ in range(iters):
        p = np.exp(log_softmax_rows(lp + b))
        grad = (onehot - p).sum(axis=0) - l2 * n * b
        hess = -(np.diag(p.sum(axis=0)) - p.T @ p) - l2 * n * np.eye(k)
        step = np.linalg.solve(hess, -grad)
        t = 1.0
        while t > 1e-8:
            f_new = value(b + t * step)
            if f_new >= f - 1e-12:
                break
            t *= 0.5
        b, f_old, f = b + t * step, f, f_new
        if abs(f - f_old) < 1e-10 * max(1.0, abs(f)):
            break
    return Correction("label-offset", b, estimated_from, True)


# --- generate scoring: a logit bias on the label words' first tokens ---------------------------------------


@dataclass
class LogitBias:
    """A logit bias on the first token of each label word (labels sharing a first token share its bias)."""

    tokens: list[int]  # distinct first tokens, in label order of first appearance
    bias: list[float]  # per token, in logit units
    labels: list[list[int]] = field(default_factory=list)  # label indices per token
    estimated_from: str = ""

    def pairs(self) -> list[tuple[int, float]]:
        return [(t, b) for t, b in zip(self.tokens, self.bias) if b != 0.0]

    def cli_args(self) -> list[str]:
        """The llama.cpp tools' arguments: --logit-bias TOKEN+BIAS (or TOKEN-BIAS) per biased token."""
        out = []
        for t, b in self.pairs():
            out += ["--logit-bias", f"{t}{'+' if b >= 0 else '-'}{abs(b):g}"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": list(self.tokens),
            "bias": [float(b) for b in self.bias],
            "labels": [list(x) for x in self.labels],
            "estimated_from": self.estimated_from,
            "cli_args": " ".join(self.cli_args()),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LogitBias:
        return cls(
            [int(t) for t in d["tokens"]],
            [float(b) for b in d["bias"]],
            [list(map(int, x)) for x in d.get("labels", [])],
            str(d.get("estimated_from", "")),
        )


def simulate_first_token(
    first_lp: np.ndarray,
    other_max: np.ndarray,
    gen_pred: Sequence[int | None],
    groups: list[list[int]],
    bias: np.ndarray,
) -> list[int | None]:
    """The label a greedy continuation names under a logit bias on the label words' first tokens.

    first_lp[i, g]: log p of first token g after prompt i (groups[g] are the labels that start with it);
    other_max[i]: the largest log p of any other token. The biased greedy first token is the label token with
    the largest first_lp + bias when that beats other_max, and then the continuation is taken to name the
    token's label (the first of its group); otherwise the first token is what it was, and so is the
    prediction (gen_pred, the unbiased continuation's label). An approximation for fitting: held-out figures
    come from real generation with the bias."""
    z = first_lp + bias[None, :]
    best = np.argmax(z, axis=1)
    out: list[int | None] = []
    for i, g in enumerate(best):
        out.append(groups[g][0] if z[i, g] > other_max[i] else gen_pred[i])
    return out


def fit_logit_bias(
    first_lp: np.ndarray,
    other_max: np.ndarray,
    gen_pred: Sequence[int | None],
    answers: Sequence[int],
    tokens: list[int],
    groups: list[list[int]],
    estimated_from: str,
    grid: Sequence[float] = tuple(np.arange(-8.0, 16.01, 0.5)),
    passes: int = 3,
) -> LogitBias:
    """Coordinate ascent over a grid of biases per first token, maximising the simulated accuracy.

    Ties go to the smaller sum |bias| (toward no bias), then to the earlier grid value."""
    g = len(tokens)
    answers_arr = list(answers)

    def acc(b: np.ndarray) -> float:
        pred = simulate_first_token(first_lp, other_max, gen_pred, groups, b)
        return float(np.mean([p == a for p, a in zip(pred, answers_arr)]))

    bias = np.zeros(g)
    best = acc(bias)
    for _ in range(passes):
        moved = False
        for j in range(g):
            for v in grid:
                cand = bias.copy()
                cand[j] = v
                a = acc(cand)
                if a > best + 1e-12 or (
                    abs(a - best) <= 1e-12 and np.abs(cand).sum() < np.abs(bias).sum() - 1e-9
                ):
                    bias, best, moved = cand, a, True
        if not moved:
            break
    return LogitBias(list(tokens), [float(b) for b in bias], groups, estimated_from)


# --- the held-out comparison ------------------------------------------------------------------------------


@dataclass
class Arm:
    """The choice scores of one model (untuned or tuned) on the calibration and held-out items."""

    s_cal: np.ndarray  # [N_cal, K]
    s_held: np.ndarray  # [N_held, K]
    s_cf: np.ndarray | None = None  # [n_cf, K], the content-free prompts (Contextual Calibration)


@dataclass
class Row:
    """One method on the held-out items: accuracy, Wilson interval, paired delta against ZeroTuning."""

    key: str  # e.g. "untuned", "untuned+batch-heldout", "tuned", "tuned+label-offset"
    model: str  # "untuned" | "tuned"
    correction: Correction | LogitBias | None
    free: bool  # a baseline that needs no ZeroTuning (untuned model)
    accuracy: float
    interval: tuple[float, float]
    correct: np.ndarray  # 0/1 per held-out item
    pred_counts: list[int]  # predictions per choice index
    macro_f1: float
    delta_vs_tuned: dict[str, float] | None = None  # this - tuned: delta, lo, hi

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "model": self.model,
            "free": self.free,
            "correction": None if self.correction is None else self.correction.to_dict(),
            "accuracy": self.accuracy,
            "interval": list(self.interval),
            "pred_counts": self.pred_counts,
            "macro_f1": self.macro_f1,
            "delta_vs_tuned": self.delta_vs_tuned,
        }


CORRECTION_NAMES = {
    None: "",
    "batch-heldout": "Batch Calibration (held-out batch)",
    "batch-calibration": "Batch Calibration (calibration inputs)",
    "contextual": "Contextual Calibration (content-free inputs)",
    "label-offset": "per-label offset (calibration labels)",
    "logit-bias": "logit bias on the label words' first tokens (calibration labels)",
    "stored": "the correction stored in the file",
}


def describe(key: str) -> str:
    model, _, corr = key.partition("+")
    name = "untuned" if model == "untuned" else "ZeroTuning"
    return name + (f" + {CORRECTION_NAMES[corr]}" if corr else "")


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
    if len(arm.s_cal):
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
    arms = [("untuned", untuned)] + ([("tuned", tuned)] if tuned is not None else [])
    for model, arm in arms:
        variants: list[tuple[str, Correction | None]] = [(model, None)]
        variants += [(f"{model}+{name}", c) for name, c in corrections_for(arm, y_cal, model).items()]
        for key, corr in variants:
            pred = np.argmax(arm.s_held, axis=1) if corr is None else corr.predict(arm.s_held)
            rows.append(make_row(key, corr, [int(p) for p in pred], y_held, k))
    return with_deltas(rows, seed, "tuned" if tuned is not None else "untuned")


def make_row(
    key: str, correction: Correction | LogitBias | None, pred: Sequence[int | None], y: np.ndarray, k: int
) -> Row:
    """A Row from per-item predictions (None: no label, i.e. an invalid generation, counted wrong)."""
    from .metrics import wilson_interval

    y = np.asarray(y, dtype=np.int64)
    p = np.array([-1 if x is None else x for x in pred], dtype=np.int64)
    correct = (p == y).astype(np.float64)
    model = key.partition("+")[0]
    return Row(
        key=key,
        model=model,
        correction=correction,
        free=model == "untuned",
        accuracy=float(correct.mean()) if len(correct) else float("nan"),
        interval=wilson_interval(int(correct.sum()), len(correct)),
        correct=correct,
        pred_counts=np.bincount(p[p >= 0], minlength=k).tolist(),
        macro_f1=macro_f1(p, y, k),
    )


def with_deltas(rows: list[Row], seed: int, ref_key: str = "tuned") -> list[Row]:
    """Fill each row's paired bootstrap delta against the ref_key row (same items, same order)."""
    from .metrics import paired_bootstrap_delta

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
            "shipped": self.shipped.key,
            "best_free": self.best_free.key,
            "shipped_accuracy": self.shipped.accuracy,
            "best_free_accuracy": self.best_free.accuracy,
            "delta": self.delta,
            "beats": self.beats,
        }


def verdict(rows: Sequence[Row], shipped_key: str, seed: int) -> Verdict:
    """Compare the shipped row with the best free row (highest held-out accuracy; ties: the simplest, i.e.
    the first listed). Choosing the best baseline on the held-out items favours the baselines."""
    from .metrics import paired_bootstrap_delta

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
    shipped: str  # the key of what ships with the tuned file
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
            "shipped": self.shipped,
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
    from .metrics import item_results

    if not held or any(it.answer is None for it in held):
        return None
    notes: list[str] = []
    y_held = np.array([it.answer for it in held])
    y_cal = np.array([it.answer for it in calib]) if supervised else None
    sc = {
        m: {"cal": score(b, calib, ()), "held": score(b, held, ())}
        for m, b in (("untuned", None), ("tuned", tuned_bias))
    }
    if cf_items:
        for m, b in (("untuned", None), ("tuned", tuned_bias)):
            sc[m]["cf"] = score(b, cf_items, ())
    try:
        arms = {
            m: Arm(
                _choice_matrix(v["cal"]),
                _choice_matrix(v["held"]),
                _choice_matrix(v["cf"]) if "cf" in v else None,
            )
            for m, v in sc.items()
        }
    except ValueError as e:
        notes.append(f"no output-side baselines: {e}")
        return Comparison(scoring, [], [], "tuned", None, None, notes)
    if not cf_items:
        notes.append("no Contextual Calibration: the items share no template with one input slot")
    choice_rows = compare(arms["untuned"], arms["tuned"], y_held, y_cal, seed)

    if scoring == "choice":
        rows = choice_rows
        shipped = "tuned"
        if objective.startswith("bc-"):
            shipped = "tuned+batch-calibration"
        elif supervised:
            # the offset compare() fitted on the tuned model's calibration items, if it raises their accuracy
            offset = next(r for r in rows if r.key == "tuned+label-offset").correction
            assert isinstance(offset, Correction)
            plain = np.mean(np.argmax(arms["tuned"].s_cal, axis=1) == y_cal)
            if np.mean(offset.predict(arms["tuned"].s_cal) == y_cal) > plain:
                shipped = "tuned+label-offset"
        row = next(r for r in rows if r.key == shipped)
        return Comparison(
            scoring, rows, choice_rows, shipped, row.correction, verdict(rows, shipped, seed), notes
        )

    # generate scoring: the label named by the greedy continuation; the correction is a logit bias
    k = arms["untuned"].s_held.shape[1]
    gen = {m: [r.gen_pred for r in item_results(v["held"], held)] for m, v in sc.items()}
    rows = [make_row(m, None, gen[m], y_held, k) for m in ("untuned", "tuned")]
    shipped, shipped_corr = "tuned", None
    firsts = label_first_tokens([*sc["untuned"]["cal"], *sc["untuned"]["held"]])
    if not supervised:
        notes.append("no logit bias: fitting it needs calibration labels (supervised mode)")
    elif firsts is None:
        notes.append("no logit bias: a label word does not start with the same token in every item")
    else:
        tokens, groups = firsts
        for m, b in (("untuned", None), ("tuned", tuned_bias)):
            cal_scores = sc[m]["cal"]
            first, other = _first_token_inputs(cal_scores, groups)
            cal_gen = [r.gen_pred for r in item_results(cal_scores, calib)]
            lb = fit_logit_bias(
                first,
                other,
                cal_gen,
                list(y_cal),
                tokens,
                groups,  # type: ignore[arg-type]
                f"the {m} model's {len(calib)} calibration labels",
            )
            if not lb.pairs():
                notes.append(
                    f"the logit bias fitted for the {m} model is zero (no gain on calibration items)"
                )
                rows.append(make_row(f"{m}+logit-bias", lb, gen[m], y_held, k))
                continue
            held_lb = score(b, held, lb.pairs())
            pred = [r.gen_pred for r in item_results(held_lb, held)]
            rows.append(make_row(f"{m}+logit-bias", lb, pred, y_held, k))
            if m == "tuned":
                shipped, shipped_corr = "tuned+logit-bias", lb
        rows.sort(key=lambda r: (r.model != "untuned", r.key))
    if objective.startswith("bc-"):
        notes.append("a bc- objective with generate scoring: Batch Calibration does not apply to generations")
    with_deltas(rows, seed)
    return Comparison(scoring, rows, choice_rows, shipped, shipped_corr, verdict(rows, shipped, seed), notes)


def correction_from_provenance(prov: dict[str, Any]) -> Correction | LogitBias | None:
    """The output correction stored with a tuned file (zerotuning.choice_correction or .logit_bias)."""
    import json

    try:
        if "logit_bias" in prov:
            return LogitBias.from_dict(json.loads(str(prov["logit_bias"])))
        if "choice_correction" in prov:
            return Correction.from_dict(json.loads(str(prov["choice_correction"])))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"the stored output correction cannot be read: {e}") from None
    return None
