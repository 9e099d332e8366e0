from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from zt_gguf.metrics import (
    ItemResult,
    item_results,
    mutual_information,
    parse_generation,
    summarize,
)
from zt_gguf.objectives import OBJECTIVES, get_objective
from zt_gguf.stats import paired_bootstrap_delta, wilson_interval
from zt_gguf.tasks import Item


@dataclass
class FakeScores:
    """The fields of engine.Scores (engine imports the compiled module; metrics needs only the fields)."""

    choice_logprob: np.ndarray
    choice_n_tokens: np.ndarray
    gen_text: str
    entropy_full: float
    entropy_choices: float
    choice_first_logprob: np.ndarray = field(default_factory=lambda: np.zeros(0))
    gen_tokens: list[int] = field(default_factory=list)


SENTIMENT = (" negative", " positive")
ARC = ("the sun", "the moon", "the sun and the moon", "stars")


@pytest.mark.parametrize(
    ("text", "choices", "expected"),
    [
        (" Positive.", SENTIMENT, 1),
        ("\n\nnegative", SENTIMENT, 0),
        ("", SENTIMENT, None),
        (" I am not sure", SENTIMENT, None),
        (" POSITIVE", SENTIMENT, 1),
        (" negatively", SENTIMENT, None),  # not a whole word
        ("non-positive", SENTIMENT, 1),  # "-" is a word boundary
        (" positive or negative", SENTIMENT, 1),  # the first one named
        (" negative, not positive", SENTIMENT, 0),
        ("Answer: B", (" A", " B", " C", " D"), 1),  # "A" of "Answer" is not a whole word
        (" a.", (" A", " B"), 0),
        ("(C) is right", ("A", "B", "C"), 2),
        ("It is the sun and the moon.", ARC, 2),  # same position: the longest
        ("It is the Sun.", ARC, 0),
        ("the  moon\nand the sun", ARC, 1),  # whitespace runs collapsed; earliest wins
        ("sunshine", ARC, None),
        (" Yes", (" Yes", " No", " Maybe"), 0),
        (" maybe so", (" Yes", " No", " Maybe"), 2),
        (" no", (" Yes", " no", " No"), 1),  # duplicate (case-insensitive): the lowest index
    ],
)
def test_parse_generation(text: str, choices: tuple[str, ...], expected: int | None) -> None:
    assert parse_generation(text, choices) == expected


def _item(answer: int | None, choices: tuple[str, ...] = SENTIMENT, i: int = 0) -> Item:
    return Item(prompt=f"p{i}", choices=choices, answer=answer, id=f"id{i}")


def test_item_results_predictions() -> None:
    items = [_item(1, i=0), _item(0, i=1), _item(None, i=2)]
    scores = [
        # total favours choice 0, per token favours choice 1 (3 tokens vs 1)
        FakeScores(np.array([-2.0, -3.0]), np.array([1, 3]), " positive", 1.5, 0.4),
        FakeScores(np.array([-0.1, -2.5]), np.array([1, 1]), " maybe", 2.0, 0.3),
        FakeScores(np.array([-1.0, -1.0]), np.array([1, 1]), "negative", 1.0, 0.69),
    ]
    r = item_results(scores, items)
    assert [x.choice_pred for x in r] == [0, 0, 0]
    assert [x.choice_pred_norm for x in r] == [1, 0, 0]
    assert [x.gen_pred for x in r] == [1, None, 0]
    p0 = np.exp(-2.0) / (np.exp(-2.0) + np.exp(-3.0))
    assert r[0].correct_logprob == pytest.approx(math.log(1 - p0))
    assert r[1].correct_logprob == pytest.approx(-0.1 - math.log(math.exp(-0.1) + math.exp(-2.5)))
    assert r[2].correct_logprob is None
    np.testing.assert_allclose(r[0].choice_probs, [p0, 1 - p0])
    np.testing.assert_allclose(r[2].choice_probs, [0.5, 0.5])
    assert r[1].entropy_full == 2.0 and r[1].entropy_choices == 0.3

    with pytest.raises(ValueError, match="3 choice scores for 2 choices"):
        item_results([FakeScores(np.zeros(3), np.ones(3), "", 0.0, 0.0)], [_item(0)])


def test_summarize() -> None:
    items = [_item(1, i=0), _item(0, i=1), _item(0, i=2), _item(1, i=3)]
    scores = [
        FakeScores(np.array([-2.0, -0.5]), np.array([1, 1]), " positive", 1.0, 0.2),  # all right
        FakeScores(np.array([-0.5, -2.0]), np.array([1, 1]), " ???", 2.0, 0.4),  # gen invalid
        FakeScores(np.array([-2.0, -0.5]), np.array([1, 1]), " positive", 3.0, 0.6),  # all wrong
        FakeScores(np.array([-0.5, -2.0]), np.array([1, 8]), " positive", 4.0, 0.8),  # norm right
    ]
    results = item_results(scores, items)
    s = summarize(results, items)
    assert s.n == 4
    assert s.accuracy_choice == 0.5
    assert s.accuracy_choice_norm == 0.75
    assert s.accuracy_generate == 0.5
    assert s.invalid_rate == 0.25
    assert s.mean_entropy_full == 2.5
    assert s.mean_entropy_choices == pytest.approx(0.5)
    assert s.mean_correct_logprob == pytest.approx(np.mean([r.correct_logprob for r in results]))
    assert OBJECTIVES["accuracy-choice"].fn(results, items) == 0.5
    assert OBJECTIVES["accuracy-choice-norm"].fn(results, items) == 0.75
    assert OBJECTIVES["accuracy-generate"].fn(results, items) == 0.5
    assert OBJECTIVES["logprob"].fn(results, items) == pytest.approx(s.mean_correct_logprob)
    assert OBJECTIVES["neg-entropy-full"].fn(results, items) == -2.5
    assert OBJECTIVES["neg-entropy-choices"].fn(results, items) == pytest.approx(-0.5)
    assert OBJECTIVES["mutual-information"].fn(results, items) == pytest.approx(s.mutual_information)

    unlabelled = [_item(None, i=i) for i in range(4)]
    u = summarize(item_results(scores, unlabelled), unlabelled)
    assert u.accuracy_choice is None and u.accuracy_generate is None and u.mean_correct_logprob is None
    assert u.invalid_rate == 0.25 and u.mean_entropy_full == 2.5
    with pytest.raises(ValueError, match="needs an answer"):
        OBJECTIVES["accuracy-choice"].fn(item_results(scores, unlabelled), unlabelled)


def test_objective_registry() -> None:
    assert set(OBJECTIVES) == {
        "accuracy-generate",
        "accuracy-choice",
        "accuracy-choice-norm",
        "logprob",
        "neg-entropy-full",
        "neg-entropy-choices",
        "mutual-information",
        "bc-accuracy-choice",
        "bc-logprob",
        "bc-mutual-information",
        "answer-logprob",
        "answer-first-logprob",
        "exact-match",
    }
    for name, obj in OBJECTIVES.items():
        fn, needs_labels, description = obj[:3]
        assert callable(fn) and description
        plain = name.removeprefix("bc-")
        labelled = plain.startswith("accuracy") or plain in (
            "logprob",
            "answer-logprob",
            "answer-first-logprob",
            "exact-match",
        )
        assert needs_labels == labelled
        # not a mean of per-item values: mutual information, and everything judged after Batch Calibration
        assert (obj.per_item is None) == (name == "mutual-information" or name.startswith("bc-"))
    with pytest.raises(ValueError, match="unknown objective"):
        get_objective("accuracy")


def _result(probs: list[float], entropy_full: float) -> ItemResult:
    p = np.array(probs)
    return ItemResult(
        choice_pred=int(np.argmax(p)),
        choice_pred_norm=int(np.argmax(p)),
        gen_pred=int(np.argmax(p)),
        correct_logprob=None,
        entropy_full=entropy_full,
        entropy_choices=float(-np.sum(p * np.log(p))),
        choice_probs=p,
    )


def test_mutual_information_vs_entropy_on_collapse() -> None:
    items = [_item(None, i=i) for i in range(10)]
    collapsed = [_result([0.99, 0.01], 0.5) for _ in range(10)]
    balanced = [_result([0.9, 0.1] if i % 2 else [0.1, 0.9], 1.0) for i in range(10)]
    mi = OBJECTIVES["mutual-information"].fn
    ent = OBJECTIVES["neg-entropy-choices"].fn
    ent_full = OBJECTIVES["neg-entropy-full"].fn
    # collapse onto one label: lower (better) entropy, but lower mutual information
    assert ent(collapsed, items) > ent(balanced, items)
    assert ent_full(collapsed, items) > ent_full(balanced, items)
    assert mi(collapsed, items) < mi(balanced, items)
    assert mutual_information(collapsed) == pytest.approx(0.0, abs=1e-12)
    h = lambda p: -p * math.log(p) - (1 - p) * math.log(1 - p)  # noqa: E731
    assert mutual_information(balanced) == pytest.approx(math.log(2) - h(0.9))
    # different numbers of choices are aligned by index
    mixed = [_result([0.5, 0.5], 1.0), _result([1 / 3, 1 / 3, 1 / 3], 1.0)]
    assert mutual_information(mixed) >= 0.0
    assert mutual_information([]) == 0.0


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    lo, hi = wilson_interval(81, 100)  # a textbook value: (0.7222, 0.8749)
    assert lo == pytest.approx(0.7222, abs=1e-4) and hi == pytest.approx(0.8749, abs=1e-4)
    lo, hi = wilson_interval(3, 20, z=2.576)
    assert 0.0 < lo < 0.15 < hi < 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_paired_bootstrap_delta() -> None:
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.6
    b = a.copy()
    flip = rng.random(400) < 0.15
    b[flip] = True  # b = a, plus some items fixed
    delta, lo, hi = paired_bootstrap_delta(a, b, seed=3)
    assert delta == pytest.approx(b.mean() - a.mean())
    assert 0 < lo <= delta <= hi
    assert paired_bootstrap_delta(a, b, seed=3) == (delta, lo, hi)  # seeded: reproducible
    d2, lo2, hi2 = paired_bootstrap_delta(b, a, seed=3)
    assert d2 == pytest.approx(-delta) and hi2 < 0
    assert paired_bootstrap_delta(a, a, seed=0) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap_delta([1, 0], [1], seed=0)
