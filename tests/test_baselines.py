"""The output-side baselines (zt_gguf.corrections, zt_gguf.comparison) against plain re-computations and
constructed cases.

Scores are made with a known label prior: S[i, j] = margin * [j == y_i] + noise + skew[j], so that the skew is
the prior every method must remove, and accuracy without it is known. The references below are loops over
items with math.log/exp, written from the papers' formulas (output-calibration.md section 5), not calls into
the module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from zt_gguf import corrections as B
from zt_gguf import metrics, objectives
from zt_gguf.comparison import TUNED, UNTUNED, Arm, RowKey, compare, run_comparison, verdict
from zt_gguf.tasks import Item


def _skewed(
    n: int, k: int, skew: np.ndarray, seed: int, margin: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    s = rng.normal(0.0, 1.0, (n, k)) + margin * np.eye(k)[y] + skew[None, :]
    return s - 3.0, y  # log-likelihoods are negative; the shift changes no method


def _ref_log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    z = math.log(sum(math.exp(x - m) for x in row)) + m
    return [x - z for x in row]


def test_batch_calibration_matches_the_formula_and_removes_the_prior() -> None:
    skew = np.array([0.0, 3.0, -1.0])
    s, y = _skewed(600, 3, skew, seed=1)
    c = B.batch_calibration(s, "test")
    # reference: p_bar = mean of log-softmax rows; prediction argmax(L - p_bar)
    rows = [_ref_log_softmax(list(r)) for r in s]
    p_bar = [sum(r[j] for r in rows) / len(rows) for j in range(3)]
    ref_pred = [max(range(3), key=lambda j: r[j] - p_bar[j]) for r in rows]
    assert c.predict(s).tolist() == ref_pred
    np.testing.assert_allclose(c.offset, -(np.array(p_bar) - np.mean(p_bar)), atol=1e-12)
    plain = np.mean(np.argmax(s, axis=1) == y)
    unskewed = np.mean(np.argmax(s - skew, axis=1) == y)
    calibrated = np.mean(c.predict(s) == y)
    assert plain < 0.6 and unskewed > 0.75  # the skew costs accuracy ...
    assert calibrated > unskewed - 0.05  # ... and the correction gives it back
    assert not c.uses_labels


def test_contextual_calibration_matches_the_reference_code() -> None:
    skew = np.array([2.0, -0.5])
    s, y = _skewed(400, 2, skew, seed=2)
    cf = np.array([[-1.0, 1.2], [-0.7, 1.9], [-1.4, 1.0]]) - 2.0  # three content-free prompts
    c = B.contextual_calibration(cf)
    # reference (CBU's get_p_content_free): mean of the raw probabilities over the cf inputs, renormalised
    raw = [[math.exp(x) for x in r] for r in cf]
    mean = [sum(r[j] for r in raw) / 3 for j in range(2)]
    p_cf = [m / sum(mean) for m in mean]
    ref_pred = [max(range(2), key=lambda j: _ref_log_softmax(list(r))[j] - math.log(p_cf[j])) for r in s]
    assert c.predict(s).tolist() == ref_pred
    # the diag(p_cf)^-1 rule on probabilities gives the same argmax (CBU eq. 1 with b = 0)
    probs = np.exp(s - s.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    assert np.argmax(probs / np.array(p_cf), axis=1).tolist() == ref_pred


def test_label_offset_is_the_likelihood_optimum_and_recovers_the_skew() -> None:
    skew = np.array([0.0, 2.5, -1.5, 0.5])
    s, y = _skewed(4000, 4, skew, seed=3)
    c = B.fit_label_offset(s, y, "test", l2=1e-6)

    def loglik(b: np.ndarray) -> float:
        total = 0.0
        for row, label in zip(s, y):
            total += _ref_log_softmax([x + bj for x, bj in zip(_ref_log_softmax(list(row)), b)])[label]
        return total

    # a maximum: no coordinate step in either direction improves the likelihood (independent check)
    f0 = loglik(c.offset)
    for j in range(4):
        for h in (1e-3, -1e-3):
            b = c.offset.copy()
            b[j] += h
            assert loglik(b) <= f0 + 1e-6
    # with many items the offset undoes the skew (up to a constant)
    np.testing.assert_allclose(c.offset, -(skew - skew.mean()), atol=0.15)
    assert c.uses_labels


def test_offsets_are_invariant_to_the_rows_normaliser() -> None:
    """Adding a per-item constant (a longer prompt, say) changes no prediction of any method."""
    s, y = _skewed(200, 3, np.array([1.0, 0.0, -1.0]), seed=4)
    shifted = s + np.random.default_rng(5).normal(0, 5, (200, 1))
    for make in (
        lambda m: B.batch_calibration(m, ""),
        lambda m: B.fit_label_offset(m, y, ""),
    ):
        assert make(s).predict(s).tolist() == make(shifted).predict(shifted).tolist()


def test_score_matrix_refuses_unaligned_items() -> None:
    with pytest.raises(ValueError, match="different numbers of choices"):
        B.score_matrix([[0.0, 1.0], [0.0, 1.0, 2.0]])


def test_compare_rows_and_verdict_against_recomputation() -> None:
    skew = np.array([0.0, 2.0])
    s_cal, y_cal = _skewed(100, 2, skew, seed=6)
    s_held, y_held = _skewed(200, 2, skew, seed=7)
    # the "tuned" model: a weaker skew but also a weaker signal
    t_cal, _ = _skewed(100, 2, skew / 4, seed=6, margin=1.0)
    t_held, _ = _skewed(200, 2, skew / 4, seed=7, margin=1.0)
    rows = compare(Arm(s_cal, s_held), Arm(t_cal, t_held), y_held, y_cal, seed=0)
    by = {r.key: r for r in rows}
    corrections = (None, "batch-heldout", "batch-calibration", "label-offset")
    assert set(by) == {RowKey(m, c) for m in (UNTUNED, TUNED) for c in corrections}
    untuned, tuned, bc_held = RowKey(UNTUNED), RowKey(TUNED), RowKey(UNTUNED, "batch-heldout")
    prior = np.mean([_ref_log_softmax(list(r)) for r in s_held], axis=0)
    ref_bc = np.mean(
        [np.argmax(np.array(_ref_log_softmax(list(r))) - prior) == t for r, t in zip(s_held, y_held)]
    )
    assert by[bc_held].accuracy == pytest.approx(ref_bc)
    assert by[untuned].accuracy == pytest.approx(np.mean(np.argmax(s_held, axis=1) == y_held))
    assert by[tuned].delta_vs_tuned["delta"] == 0.0
    d = by[bc_held].delta_vs_tuned
    assert d["delta"] == pytest.approx(by[bc_held].accuracy - by[tuned].accuracy)
    assert d["lo"] <= d["delta"] <= d["hi"]
    assert sum(by[untuned].pred_counts) == 200
    # the skewed untuned model, corrected for free, beats this "tuned" model: the verdict says so
    v = verdict(rows, tuned, seed=0)
    assert not v.beats and v.best_free.model == UNTUNED and v.best_free.key.correction is not None
    assert v.best_free.accuracy == max(r.accuracy for r in rows if r.free)


def test_row_key_text_form() -> None:
    """The text form report.json and the GGUF provenance store, and its parser (a second route: RowKey.parse
    of str(key) gives the key back; unknown models and corrections are refused)."""
    key = RowKey("tuned", "label-offset")
    assert str(key) == "tuned+label-offset" and str(RowKey("untuned")) == "untuned"
    for k in (key, RowKey("untuned"), RowKey("untuned", "contextual"), RowKey("tuned", "stored")):
        assert RowKey.parse(str(k)) == k
    assert RowKey.parse("untuned+batch-heldout").free and not key.free
    for bad in ("tuned+nonsense", "other", "other+label-offset", ""):
        with pytest.raises(ValueError, match="not a comparison row"):
            RowKey.parse(bad)


def test_logit_bias_fit_on_a_constructed_case() -> None:
    """Labels A/B whose first tokens lose to another token ("\\n") unless biased; label B is favoured."""
    rng = np.random.default_rng(8)
    n = 300
    y = rng.integers(0, 2, n)
    first = np.stack([np.where(y == 0, -1.0, -3.0), np.where(y == 1, -2.0, -1.5)], axis=1)
    first += rng.normal(0, 0.2, (n, 2))
    other = np.full(n, -0.5)  # the newline beats both labels: every greedy continuation is invalid
    gen_pred = [None] * n
    lb = B.fit_logit_bias(first, other, gen_pred, list(y), [11, 22], [[0], [1]], "test")
    pred = B.simulate_first_token(first, other, gen_pred, [[0], [1]], np.array(lb.bias))
    acc = np.mean([p == t for p, t in zip(pred, y)])
    # the best achievable: argmax of first + (b0, b1) with both above the newline; B needs ~+0.75 over A
    assert acc > 0.95
    assert all(b > 0.5 for b in lb.bias)
    assert lb.cli_args() == ["--logit-bias", f"11+{lb.bias[0]:g}", "--logit-bias", f"22+{lb.bias[1]:g}"]
    assert B.LogitBias.from_dict(lb.to_dict()) == lb


@dataclass
class _R:
    choice_probs: np.ndarray


def test_bc_objectives_against_recomputation() -> None:
    s, y = _skewed(80, 3, np.array([0.0, 2.0, 0.0]), seed=9)
    probs = np.exp(s - s.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    results = [
        metrics.ItemResult(int(np.argmax(p)), int(np.argmax(p)), None, None, 1.0, 1.0, p) for p in probs
    ]
    items = [Item(prompt=f"p{i}", choices=("a", "b", "c"), answer=int(t), id=str(i)) for i, t in enumerate(y)]
    lp = np.log(probs)
    prior = lp.mean(axis=0)
    corrected = lp - prior
    corrected = corrected - np.log(np.exp(corrected).sum(axis=1, keepdims=True))
    acc = objectives.get_objective("bc-accuracy-choice").fn(results, items)
    assert acc == pytest.approx(np.mean(np.argmax(corrected, axis=1) == y))
    ll = objectives.get_objective("bc-logprob").fn(results, items)
    assert ll == pytest.approx(np.mean(corrected[np.arange(80), y]))
    mi = objectives.get_objective("bc-mutual-information").fn(results, items)
    p = np.exp(corrected)

    def h(q: np.ndarray) -> float:
        return float(-np.sum(q * np.log(q)))

    assert mi == pytest.approx(h(p.mean(axis=0)) - np.mean([h(r) for r in p]))
    for name in ("bc-accuracy-choice", "bc-logprob", "bc-mutual-information"):
        assert objectives.get_objective(name).per_item is None  # the prior depends on the batch: no racing


# --- end to end on the tiny model: the report's rows against a second route ---------------------------------


def test_calibrate_reports_the_baselines_on_the_tiny_model(tmp_path) -> None:  # noqa: ANN001
    """zt-gguf calibrate --json on a {text} task: every baseline row, recomputed from a fresh engine's scores
    of the same held-out items with NumPy; the file is written only when the verdict says ZeroTuning wins."""
    import json
    import subprocess

    from zt_gguf.engine import Context, Model
    from zt_gguf.tasks import load_task, split_items
    from zt_gguf.testing import _WORD_PIECES, make_tiny_llama

    model = make_tiny_llama(tmp_path / "m.gguf", n_layer=2, seed=11).path
    words = [w.lstrip("▁") for w in _WORD_PIECES]
    rng = np.random.default_rng(12)
    task = tmp_path / "task.jsonl"
    with task.open("w") as f:
        for i in range(60):
            text = " ".join(rng.choice(words, size=int(rng.integers(2, 6))))
            f.write(json.dumps({"text": text, "label": ["cat", "dog"][i % 2]}) + "\n")
    out = tmp_path / "tuned.gguf"
    res = subprocess.run(
        ["zt-gguf", "calibrate", str(model), "--task", str(task), "--template", "the {text} is",
         "--choices", "cat,dog", "--scoring", "choice", "--objective", "logprob", "--threads", "1",
         "-o", str(out), "--json", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    b = rep["baselines"]
    keys = [r["key"] for r in b["rows"]]
    for k in ("untuned", "untuned+batch-heldout", "untuned+batch-calibration", "untuned+contextual",
              "untuned+label-offset", "tuned", "tuned+batch-heldout", "tuned+label-offset"):  # fmt: skip
        assert k in keys, keys
    v = b["verdict"]
    assert v["beats"] == (v["shipped_accuracy"] > v["best_free_accuracy"])
    assert out.exists() == v["beats"]
    if not v["beats"]:
        assert "at least as good" in rep["written"]["reason"]

    # the second route: the untuned model's held-out scores from a fresh context, Batch Calibration in NumPy
    loaded = load_task(task, template="the {text} is", choices=[" cat", " dog"])
    _, held = split_items(loaded.items, 0.3, 42)
    ctx = Context(Model(model), n_threads=1)
    ctx.set_bias(None)
    s = np.array([sc.choice_logprob for sc in ctx.score(held, n_gen=1)])
    y = np.array([it.answer for it in held])
    lp = s - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True)) - s.max(1, keepdims=True)
    rows = {r["key"]: r for r in b["rows"]}
    assert rows["untuned"]["accuracy"] == pytest.approx(np.mean(np.argmax(s, 1) == y), abs=1e-9)
    bc = np.argmax(lp - lp.mean(0), 1)
    assert rows["untuned+batch-heldout"]["accuracy"] == pytest.approx(np.mean(bc == y), abs=1e-9)
    # Contextual Calibration: the template with the input slot filled by "N/A", "" and "[MASK]"
    cf = [
        Item(prompt=f"the {x} is", choices=(" cat", " dog"), answer=None, id=x) for x in ("N/A", "", "[MASK]")
    ]
    scf = np.array([sc.choice_logprob for sc in ctx.score(cf, n_gen=1)])
    p_cf = np.exp(scf).mean(0)
    cc = np.argmax(lp - np.log(p_cf / p_cf.sum()), 1)
    assert rows["untuned+contextual"]["accuracy"] == pytest.approx(np.mean(cc == y), abs=1e-9)


@dataclass
class _Scores:
    """The field of engine.Scores that choice-scored comparisons read."""

    choice_logprob: list[float]


def _perfect(y: np.ndarray, skew: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Two-choice scores with margin 2 for the answer plus a skew: (0, 0) is right on every item; (0, 3)
    picks choice 1 on every item (right on half), and only an offset that favours choice 0 fixes it."""
    return 2.0 * np.eye(2)[y] + np.array(skew) - 5.0


@pytest.mark.parametrize(
    ("objective", "supervised", "tuned_skew", "shipped", "accuracy"),
    [
        ("bc-logprob", True, (0.0, 0.0), "batch-calibration", 1.0),  # a bc- objective ships Batch Calibration
        ("logprob", True, (0.0, 3.0), "label-offset", 1.0),  # the offset raises calibration accuracy to 100%
        ("logprob", True, (0.0, 0.0), None, 1.0),  # 100% already: the offset cannot raise it, nothing ships
        ("logprob", False, (0.0, 3.0), None, 0.5),  # no labels: no label offset, and no better than free
    ],
)
def test_run_comparison_ships_what_its_rules_pick(
    objective: str, supervised: bool, tuned_skew: tuple[float, float], shipped: str | None, accuracy: float
) -> None:
    """run_comparison on fixed score matrices whose pick is determined: the untuned model scores every choice
    alike (so every free method predicts one label for all items: 50% on balanced labels), the tuned one has
    the answer's margin plus tuned_skew. The shipped row and its correction, recomputed in NumPy, and the
    provenance calibrate stores from it, read back by correction_from_provenance."""
    from zt_gguf.outputs import comparison_provenance

    y_cal, y_held = np.arange(20) % 2, np.arange(30) % 2
    calib = [Item(f"c{i}", ("a", "b"), int(t), f"c{i}") for i, t in enumerate(y_cal)]
    held = [Item(f"h{i}", ("a", "b"), int(t), f"h{i}") for i, t in enumerate(y_held)]
    tuned_bias = np.full((2, 4), 0.5)
    table = {it.id: _perfect(np.array([it.answer]), tuned_skew)[0] for it in calib + held}

    def score(bias: np.ndarray | None, items: list[Item], pairs: tuple) -> list[_Scores]:
        assert pairs == () and (bias is None or bias is tuned_bias)
        return [_Scores([-5.0, -5.0] if bias is None else list(table[it.id])) for it in items]

    comp = run_comparison(
        score,
        calib,
        held,
        [],
        tuned_bias,
        supervised=supervised,
        scoring="choice",
        objective=objective,
        seed=0,
    )
    assert comp is not None and comp.verdict is not None
    assert comp.shipped == RowKey(TUNED, shipped)
    t_cal = _perfect(y_cal, tuned_skew)
    if shipped is None:
        assert comp.shipped_correction is None
    else:
        c = comp.shipped_correction
        assert isinstance(c, B.Correction)
        if shipped == "batch-calibration":  # minus the mean log-softmax over the calibration inputs
            lp = np.array([_ref_log_softmax(list(r)) for r in t_cal])
            np.testing.assert_allclose(c.offset, -(lp.mean(0) - lp.mean()), atol=1e-12)
        else:  # an offset that favours choice 0 by more than the skew's 3 minus the margin's 2
            assert c.offset[0] - c.offset[1] > 1.0 and np.all(c.predict(t_cal) == y_cal)
        stored = B.correction_from_provenance(comparison_provenance(comp))
        assert isinstance(stored, B.Correction) and stored.method == c.method
        np.testing.assert_allclose(stored.offset, c.offset, atol=1e-12)
    v = comp.verdict
    assert v.shipped.key == comp.shipped and v.shipped.accuracy == accuracy
    assert v.best_free.free and v.best_free.accuracy == 0.5 and v.beats == (accuracy > 0.5)
    assert {r.key for r in comp.rows if r.free} >= {RowKey(UNTUNED), RowKey(UNTUNED, "batch-heldout")}


def test_eval_applies_the_stored_correction(tmp_path) -> None:  # noqa: ANN001
    """A tuned file whose provenance stores a known choice offset (written with gguf_meta.write_tuned, as
    calibrate writes it): eval applies it to the evaluated model's choice scores (recomputed here from a
    fresh engine, and chosen so that it changes about half of the predictions) and reports the label-free
    baselines of the untuned model on the same items."""
    import json
    import subprocess

    from zt_gguf import gguf_meta
    from zt_gguf.engine import Context, Model
    from zt_gguf.tasks import load_task
    from zt_gguf.testing import make_tiny_llama, write_tiny_task

    tiny = make_tiny_llama(tmp_path / "m.gguf", n_layer=2, seed=13)
    test = write_tiny_task(tmp_path / "test.jsonl", 30, seed=15)
    bias = np.log(np.where(np.arange(2 * 4).reshape(2, 4) % 2 == 0, 2.0, 0.5))
    items = load_task(test).items
    plain = tmp_path / "plain.gguf"
    gguf_meta.write_tuned(tiny.path, plain, bias)
    s = np.array([sc.choice_logprob for sc in Context(Model(plain), n_threads=1).score(items, n_gen=1)])
    lp = s - s.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    # an offset at the median margin: it flips the prediction of about half of the items
    shift = float(np.median(lp[:, 0] - lp[:, 1]))
    stored = B.Correction("batch", np.array([-shift / 2, shift / 2]), "test: the median margin", False)
    want = np.argmax(lp + stored.offset, 1)
    assert np.any(want != np.argmax(lp, 1))  # the fixture: applying the offset changes predictions
    out = tmp_path / "tuned.gguf"
    prov = {"shipped": "tuned+batch-calibration", "choice_correction": json.dumps(stored.to_dict())}
    gguf_meta.write_tuned(tiny.path, out, bias, prov)
    assert gguf_meta.read_model_info(out).provenance["shipped"] == "tuned+batch-calibration"

    res = subprocess.run(
        ["zt-gguf", "eval", str(out), "--task", str(test), "--threads", "1", "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    ev = json.loads(res.stdout)
    assert ev["correction"]["method"] == "batch"
    np.testing.assert_allclose(ev["correction"]["offset"], stored.offset, atol=1e-12)
    rows = {r["key"]: r for r in ev["baselines"]["rows"]}
    assert {"untuned", "untuned+batch-heldout", "tuned", "tuned+batch-heldout", "tuned+stored"} <= set(rows)
    y = np.array([it.answer for it in items])
    assert rows["tuned+stored"]["accuracy"] == pytest.approx(np.mean(want == y), abs=1e-9)
    assert rows["tuned+stored"]["pred_counts"] == np.bincount(want, minlength=2).tolist()
    assert rows["tuned"]["accuracy"] == pytest.approx(np.mean(np.argmax(s, 1) == y), abs=1e-9)
    assert rows["tuned"]["accuracy"] == pytest.approx(ev["accuracy_choice"], abs=1e-9)
