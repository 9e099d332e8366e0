"""Output-side corrections of the label prior: the free baselines ZeroTuning must beat (pure NumPy).

This module only computes corrections; comparison.py scores them against ZeroTuning on held-out items.

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

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "CONTENT_FREE_MIN",
    "Correction",
    "LogitBias",
    "batch_calibration",
    "contextual_calibration",
    "correction_from_provenance",
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


def correction_from_provenance(prov: dict[str, Any]) -> Correction | LogitBias | None:
    """The output correction stored with a tuned file (zerotuning.choice_correction or .logit_bias)."""
    try:
        if "logit_bias" in prov:
            return LogitBias.from_dict(json.loads(str(prov["logit_bias"])))
        if "choice_correction" in prov:
            return Correction.from_dict(json.loads(str(prov["choice_correction"])))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"the stored output correction cannot be read: {e}") from None
    return None
