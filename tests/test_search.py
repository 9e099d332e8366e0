"""The calibration search against a synthetic model (no llama.cpp).

The fake model: item i has a margin m_i (log-odds of its answer) that depends on the bias through a known
function of the per-head mean of ln gamma over the layers, e_h = mean_l b[l, h]:

    m_i = mu_i + s_i * sum_h f_h(e_h) + noise_i(bias)

with f_h(x) = a x - c x^2 for the planted up-effective heads (best at gamma = exp(a / 2c)), -a x - c x^2 for
the planted down-effective heads and -c0 x^2 for the others (any change hurts). The noise is a deterministic
function of (item, bias), so that a rerun scores exactly the same. The greedy continuation names the label
of the sign of m_i when |m_i| is large enough, and is invalid otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from zt_gguf.search import (
    SearchConfig,
    SearchError,
    SearchResult,
    SearchState,
    bias_hash,
    context_scorer,
    search,
)
from zt_gguf.tasks import Item

N_LAYER, N_HEAD = 6, 8
LABELS = (" negative", " positive")


@dataclass
class FakeScores:
    """The fields of engine.Scores (engine imports the compiled module)."""

    choice_logprob: np.ndarray
    choice_n_tokens: np.ndarray
    choice_first_logprob: np.ndarray
    entropy_full: float
    entropy_choices: float
    gen_text: str
    gen_tokens: list[int] = field(default_factory=list)
    n_prompt_tokens: int = 0


class Interrupted(Exception):
    pass


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


class FakeModel:
    """A scorer whose accuracy depends on the bias through planted head effects (see the module docstring)."""

    def __init__(
        self,
        n_items: int = 192,
        *,
        up: Sequence[int] = (1, 4, 6),
        down: Sequence[int] = (2,),
        a_up: float = 1.0,
        a_down: float = 0.5,
        c: float = 0.45,
        c0: float = 0.3,
        noise: float = 0.05,
        seed: int = 0,
        labelled: bool = True,
        shape: tuple[int, int] = (N_LAYER, N_HEAD),
    ) -> None:
        rng = np.random.default_rng(seed)
        answers = rng.integers(0, 2, n_items)
        self.items = [
            Item(
                prompt=f"Review {i}\nSentiment:",
                choices=LABELS,
                answer=int(a) if labelled else None,
                id=f"r{i}",
            )
            for i, a in enumerate(answers)
        ]
        self.index = {item.id: i for i, item in enumerate(self.items)}
        self.answers = answers
        self.mu = rng.normal(-0.3, 1.0, n_items)
        self.scale = rng.uniform(0.5, 1.5, n_items)
        self.up, self.down = set(up), set(down)
        self.a_up, self.a_down, self.c, self.c0, self.noise = a_up, a_down, c, c0, noise
        self.shape = shape
        self.calls = 0
        self.items_scored = 0
        self.fail_after: int | None = None  # raise Interrupted when this many calls have been made

    def effect(self, bias: np.ndarray) -> float:
        e = np.asarray(bias, dtype=np.float64).mean(axis=0)
        total = 0.0
        for h, x in enumerate(e):
            if h in self.up:
                total += self.a_up * x - self.c * x * x
            elif h in self.down:
                total += -self.a_down * x - self.c * x * x
            else:
                total += -self.c0 * x * x
        return total

    def margins(self, bias: np.ndarray) -> np.ndarray:
        """The margins of all items under bias (the noise is seeded by the bias)."""
        seed = int.from_bytes(hashlib.sha256(bias_hash(bias).encode()).digest()[:8], "little")
        jitter = np.random.default_rng(seed).normal(0.0, self.noise, len(self.items))
        return self.mu + self.scale * self.effect(bias) + jitter

    def __call__(self, bias: np.ndarray, items: Sequence[Item]) -> list[FakeScores]:
        assert bias.shape == self.shape and bias.dtype == np.float32
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Interrupted(f"interrupted after {self.calls} calls")
        self.calls += 1
        self.items_scored += len(items)
        margins = self.margins(bias)
        out = []
        for item in items:
            i = self.index[item.id]
            m = float(margins[i])
            right, wrong = -_softplus(-m), -_softplus(m)
            lp = np.array([wrong, right] if self.answers[i] == 1 else [right, wrong])
            p = np.exp(lp)
            h_choices = float(-np.sum(p * lp))
            pred = int(np.argmax(lp))
            text = LABELS[pred].upper() + "." if abs(m) > 0.4 else " I think"
            out.append(
                FakeScores(
                    choice_logprob=lp,
                    choice_n_tokens=np.array([1, 1], dtype=np.int32),
                    choice_first_logprob=lp,
                    entropy_full=1.5 + h_choices,
                    entropy_choices=h_choices,
                    gen_text=text,
                )
            )
        return out


def _same(a: SearchResult, b: SearchResult) -> bool:
    return json.dumps(a.to_dict(include_run=False), sort_keys=True) == json.dumps(
        b.to_dict(include_run=False), sort_keys=True
    )


def _by_description(result: SearchResult) -> dict[str, object]:
    return {c.description: c for c in result.candidates}


# --- the paper procedure ------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["accuracy-choice", "accuracy-generate", "logprob"])
def test_paper_finds_up_heads(objective: str) -> None:
    model = FakeModel()
    r = search(model, model.items, model.shape, SearchConfig(objective=objective, chunk_size=32))
    assert r.head_type == "up"
    assert r.heads == [1, 4, 6]  # the planted up heads: fewer than ceil(0.4 * 8) = 4 have a positive gain
    assert 2.0 <= r.best_gamma <= 4.0  # the planted optimum is gamma = exp(1 / 0.9) = 3.04
    assert r.best_objective > r.baseline_objective
    expected = np.zeros(model.shape, np.float32)
    expected[:, [1, 4, 6]] = np.float32(math.log(r.best_gamma))
    np.testing.assert_array_equal(r.bias, expected)
    np.testing.assert_allclose(r.gamma, np.exp(expected.astype(np.float64)))
    assert all(r.gains_up[h] > 0 for h in (1, 4, 6))
    assert r.gains_down[1] < 0 and r.gains_down[4] < 0  # scaling an up head down hurts
    stages = [c.stage for c in r.candidates]
    assert stages == ["baseline"] + ["probe"] * 2 * N_HEAD + ["grid"] * 7
    assert r.n_evaluations == len(r.candidates) == 1 + 2 * N_HEAD + 7
    assert r.items_full == r.n_evaluations * len(model.items)
    assert r.items_scored == model.items_scored == r.run.items_scored


def test_paper_finds_down_heads() -> None:
    model = FakeModel(up=(7,), down=(0, 3, 5), a_up=0.3, a_down=1.0)
    r = search(model, model.items, model.shape, SearchConfig(objective="accuracy-choice"))
    assert r.head_type == "down"
    assert r.heads == [0, 3, 5]
    assert 0.2 <= r.best_gamma <= 0.5  # the planted optimum is gamma = exp(-1 / 0.9) = 0.33
    assert r.best_objective > r.baseline_objective
    assert all(c.stage != "grid" or "gamma=0." in c.description for c in r.candidates)


def test_head_fraction_caps_the_selection() -> None:
    # five up heads with a positive gain, ceil(0.4 * 8) = 4 are kept: the four with the largest gains
    model = FakeModel(up=(0, 1, 3, 4, 6), down=())
    r = search(model, model.items, model.shape, SearchConfig(objective="logprob"))
    assert r.head_type == "up"
    assert len(r.heads) == 4 and set(r.heads) <= {0, 1, 3, 4, 6}
    ranked = sorted(range(N_HEAD), key=lambda h: -r.gains_up[h])
    assert r.heads == sorted(ranked[:4])


def test_no_helpful_head_keeps_the_baseline() -> None:
    # every change hurts: one head is still selected, and the baseline wins the grid
    model = FakeModel(up=(), down=(), noise=0.0)
    r = search(model, model.items, model.shape, SearchConfig(objective="logprob"))
    assert len(r.heads) == 1
    assert r.best_description == "baseline" and r.best_gamma == 1.0
    assert not r.bias.any()
    assert r.best_objective == r.baseline_objective


def test_ties_go_to_the_baseline() -> None:
    # a model the bias does not change at all: every candidate ties with the baseline
    model = FakeModel(up=(), down=(), c0=0.0, noise=0.0)
    r = search(model, model.items, model.shape, SearchConfig(objective="accuracy-choice"))
    assert r.best_description == "baseline" and not r.bias.any()
    assert not any(c.stopped_early for c in r.candidates)  # a tie is never "clearly worse"


def test_layer_range() -> None:
    model = FakeModel()
    r = search(model, model.items, model.shape, SearchConfig(objective="logprob", layer_start=2, layer_end=5))
    assert r.head_type == "up" and r.best_gamma > 1
    assert not r.bias[:2].any() and not r.bias[5:].any()
    assert np.all(r.bias[2:5, r.heads] == np.float32(math.log(r.best_gamma)))
    with pytest.raises(SearchError, match="layer range"):
        search(model, model.items, model.shape, SearchConfig(layer_start=4, layer_end=4))


def test_unsupervised_objectives_on_unlabelled_items() -> None:
    model = FakeModel(labelled=False)
    for objective in ("neg-entropy-full", "neg-entropy-choices", "mutual-information"):
        r = search(model, model.items, model.shape, SearchConfig(objective=objective))
        assert r.best_objective >= r.baseline_objective
        assert r.baseline_summary["accuracy_choice"] is None
        if objective == "mutual-information":
            assert not any(c.stopped_early for c in r.candidates)  # MI is not per-item: no racing
    with pytest.raises(SearchError, match="needs an answer"):
        search(model, model.items, model.shape, SearchConfig(objective="accuracy-choice"))


def test_config_errors() -> None:
    model = FakeModel(n_items=8)
    bad = [
        (SearchConfig(method="grid"), "unknown method"),
        (SearchConfig(objective="accuracy"), "unknown objective"),
        (SearchConfig(probe_up=0.5), "probe_up"),
        (SearchConfig(probe_down=1.5), "probe_down"),
        (SearchConfig(head_fraction=0.0), "head_fraction"),
        (SearchConfig(grid_up=(0.5, 2.0)), "grid_up"),
        (SearchConfig(grid_down=()), "grid_down is empty"),
        (SearchConfig(chunk_size=0), "chunk_size"),
    ]
    for config, message in bad:
        with pytest.raises(SearchError, match=message):
            search(model, model.items, model.shape, config)
    with pytest.raises(SearchError, match="no calibration items"):
        search(model, [], model.shape, SearchConfig())
    assert model.calls == 0


# --- early stopping -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["accuracy-choice", "logprob", "neg-entropy-full"])
def test_early_stopping_saves_and_keeps_the_best(objective: str) -> None:
    config = SearchConfig(objective=objective, chunk_size=16)
    full_model, race_model = FakeModel(), FakeModel()
    full = search(
        full_model,
        full_model.items,
        full_model.shape,
        SearchConfig(**{**config.to_dict(), "early_stop": False}),
    )
    raced = search(race_model, race_model.items, race_model.shape, config)

    assert not any(c.stopped_early for c in full.candidates)
    stopped = [c for c in raced.candidates if c.stopped_early]
    assert stopped, "nothing was stopped early"
    assert raced.items_scored < full.items_scored == full.items_full
    assert race_model.items_scored == raced.items_scored
    assert raced.savings > 0.15 and full.savings == 0.0

    # the same best, never stopped
    np.testing.assert_array_equal(raced.bias, full.bias)
    assert raced.best_objective == full.best_objective
    assert not _by_description(raced)[full.best_description].stopped_early
    # every stopped candidate is really worse than the best over all items, and stopped after >= 2 chunks
    full_by = _by_description(full)
    for c in stopped:
        assert full_by[c.description].objective < full.best_objective
        assert 2 * config.chunk_size <= c.n_items_evaluated < len(race_model.items)
    if objective != "neg-entropy-full":
        # scaling an up-effective head down is clearly bad: stopped
        for h in (1, 4, 6):
            assert _by_description(raced)[f"probe head {h} gamma=0.5"].stopped_early
        assert raced.heads == full.heads == [1, 4, 6]


def test_no_early_stop_before_two_chunks() -> None:
    model = FakeModel(n_items=60)
    r = search(model, model.items, model.shape, SearchConfig(objective="accuracy-choice", chunk_size=32))
    assert not any(c.stopped_early for c in r.candidates)  # 60 items: the second chunk is the last


def test_stopped_probe_gain_is_the_paired_mean() -> None:
    model = FakeModel()
    r = search(model, model.items, model.shape, SearchConfig(objective="accuracy-choice", chunk_size=16))
    by = _by_description(r)
    c = by["probe head 1 gamma=0.5"]
    assert c.stopped_early
    assert r.gains_down[1] < 0
    # on the items both were scored on, the paired mean equals the accuracy difference
    assert r.gains_down[1] == pytest.approx(c.objective - _partial_accuracy(model, c.n_items_evaluated))


def _partial_accuracy(model: FakeModel, m: int) -> float:
    order = np.random.default_rng(0).permutation(len(model.items))[:m]
    zero = np.zeros(model.shape, np.float32)
    return float(np.mean(model.margins(zero)[order] > 0))


# --- checkpoint and resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["paper", "bands", "heads"])
def test_resume_after_interruption(tmp_path: Path, method: str) -> None:
    config = SearchConfig(method=method, objective="accuracy-choice", chunk_size=16, budget=12)
    straight_model = FakeModel()
    straight = search(straight_model, straight_model.items, straight_model.shape, config)

    ckpt = tmp_path / "search.json"
    model = FakeModel()
    model.fail_after = straight_model.calls // 2
    with pytest.raises(Interrupted):
        search(model, model.items, model.shape, config, checkpoint=ckpt, scorer_id="fake")
    saved = SearchState.load(ckpt, "fake")
    assert 0 < len(saved.evaluations) < straight.n_evaluations
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file

    model.fail_after = None
    calls_before = model.calls
    resumed = search(model, model.items, model.shape, config, checkpoint=ckpt, scorer_id="fake")
    assert _same(resumed, straight)
    assert 0 < model.calls - calls_before < straight_model.calls
    assert resumed.run.evaluations_from_checkpoint == len(saved.evaluations)
    assert resumed.run.items_scored < straight.run.items_scored

    # a complete checkpoint: no scoring at all
    again = FakeModel()
    done = search(again, again.items, again.shape, config, checkpoint=ckpt, scorer_id="fake")
    assert again.calls == 0 and _same(done, straight)
    assert done.run.evaluations_from_checkpoint == done.n_evaluations


def test_checkpoint_guards(tmp_path: Path) -> None:
    model = FakeModel(n_items=40)
    ckpt = tmp_path / "c.json"
    search(
        model, model.items, model.shape, SearchConfig(objective="logprob"), checkpoint=ckpt, scorer_id="m1"
    )
    # another scorer (another task's or scoring's run in the same report folder) shares the file: it uses
    # none of m1's records, and m1's records are still there afterwards
    calls = model.calls
    search(
        model,
        model.items,
        model.shape,
        SearchConfig(objective="logprob"),
        checkpoint=ckpt,
        scorer_id="m2",
    )
    assert model.calls > calls
    calls = model.calls
    search(
        model, model.items, model.shape, SearchConfig(objective="logprob"), checkpoint=ckpt, scorer_id="m1"
    )
    assert model.calls == calls
    # another objective or item set shares the file but none of its records
    search(
        model,
        model.items[:30],
        model.shape,
        SearchConfig(objective="logprob"),
        checkpoint=ckpt,
        scorer_id="m1",
    )
    assert model.calls > calls
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SearchError, match="not a valid search checkpoint"):
        search(model, model.items, model.shape, SearchConfig(), checkpoint=bad)


def test_bias_hash_is_stable() -> None:
    a = np.zeros((3, 4), np.float32)
    b = a.copy()
    b[1, 2] = 4e-7  # rounds to 0 at 1e-6
    assert bias_hash(a) == bias_hash(b) == bias_hash(-a)
    b[1, 2] = 2e-6
    assert bias_hash(a) != bias_hash(b)
    assert bias_hash(a) != bias_hash(np.zeros((4, 3), np.float32))


# --- finer methods ------------------------------------------------------------------------------------------


def test_bands_refines_per_band() -> None:
    # the up heads help only in the first layers: the band search should turn the last band off
    model = FakeModel()
    base_effect = model.effect

    def effect(bias: np.ndarray) -> float:
        b = np.asarray(bias, dtype=np.float64)
        # the planted effects act through layers 0-1 only; any bias in layers 4-5 hurts
        return base_effect(b[:2]) - 0.3 * float(np.sum(b[4:] ** 2))

    model.effect = effect  # type: ignore[method-assign]
    paper = search(model, model.items, model.shape, SearchConfig(objective="logprob"))
    config = SearchConfig(method="bands", objective="logprob", budget=30)
    r = search(model, model.items, model.shape, config)
    assert r.best_objective > paper.best_objective
    assert not r.bias[4:].any()  # the harmful last band is off
    assert r.bias[:2, r.heads].any()
    finer = [c for c in r.candidates if c.stage == "bands"]
    assert 0 < len(finer) <= config.budget


def test_heads_method_respects_budget_and_never_worsens() -> None:
    model = FakeModel()
    paper = search(model, model.items, model.shape, SearchConfig(objective="logprob"))
    for budget in (0, 5, 25):
        r = search(
            model, model.items, model.shape, SearchConfig(method="heads", objective="logprob", budget=budget)
        )
        finer = [c for c in r.candidates if c.stage == "heads"]
        assert len(finer) == budget
        assert r.best_objective >= paper.best_objective
        if budget == 0:
            np.testing.assert_array_equal(r.bias, paper.bias)


# --- progress and the context adapter -----------------------------------------------------------------------


def test_progress_reports() -> None:
    model = FakeModel(n_items=50)
    events: list[tuple[str, int, int]] = []
    search(
        model,
        model.items,
        model.shape,
        SearchConfig(method="bands", objective="accuracy-choice", budget=4, chunk_size=20),
        progress=lambda stage, done, total: events.append((stage, done, total)),
    )
    stages = list(dict.fromkeys(s for s, _, _ in events))
    assert stages == ["baseline", "probe", "grid", "bands"]
    for stage in stages:
        seq = [(d, t) for s, d, t in events if s == stage]
        totals = {t for _, t in seq}
        assert len(totals) == 1
        dones = [d for d, _ in seq]
        assert dones == sorted(dones) and dones[0] == 0 and dones[-1] == seq[0][1]
    assert ("probe", 0, 2 * N_HEAD * 50) in events


def test_context_scorer() -> None:
    model = FakeModel(n_items=4)

    class Ctx:
        def __init__(self) -> None:
            self.bias: np.ndarray | None = None

        def set_bias(self, bias: np.ndarray) -> None:
            self.bias = bias

        def score(self, items: Sequence[Item], *, n_gen: int, gen_stop: Sequence[str]) -> list[FakeScores]:
            assert n_gen == 3 and list(gen_stop) == ["\n"]
            assert self.bias is not None
            return model(self.bias, items)

    ctx = Ctx()
    scorer = context_scorer(ctx, n_gen=3, gen_stop=["\n"])
    bias = np.full(model.shape, 0.5, np.float32)
    out = scorer(bias, model.items)
    assert len(out) == 4 and ctx.bias is not None and np.all(ctx.bias == 0.5)


# --- events: the plan, the time estimate, the current candidate, no discrimination -------------------------


def _events(model: FakeModel, config: SearchConfig) -> tuple[SearchResult, list[tuple[str, dict]]]:
    events: list[tuple[str, dict]] = []
    result = search(model, model.items, model.shape, config, events=lambda n, d: events.append((n, d)))
    return result, events


def test_events_plan_estimate_and_candidates() -> None:
    model = FakeModel(n_items=50)
    cfg = SearchConfig(method="bands", objective="accuracy-choice", budget=4, chunk_size=20)
    result, events = _events(model, cfg)
    names = [n for n, _ in events]
    assert names[0] == "plan" and names[1] == "candidate" and names[2] == "estimate"
    plan = events[0][1]
    # baseline + 2 probes a head + the larger grid + the budget: never fewer than were scored
    assert plan["n_candidates"] == 1 + 2 * N_HEAD + max(len(cfg.grid_up), len(cfg.grid_down)) + 4
    assert plan["n_candidates"] >= result.n_evaluations
    assert (plan["n_items"], plan["n_chunks"], plan["chunk_size"]) == (50, 3, 20)
    est = events[2][1]
    assert est["chunk_s"] >= 0
    assert est["estimate_s"] == pytest.approx(est["chunk_s"] * 3 * plan["n_candidates"])
    assert names.count("estimate") == 1
    # every distinct candidate is announced, first the baseline, in the order the result lists them
    announced = [d["description"] for n, d in events if n == "candidate"]
    assert announced[0] == "baseline"
    assert list(dict.fromkeys(announced)) == [c.description for c in result.candidates]
    assert "no_discrimination" not in names  # the planted heads change the accuracy
    # with the probes on the first chunk only: 2 * N_HEAD probes + a baseline on 1 chunk, the rest on 3
    _, events = _events(
        FakeModel(n_items=50), SearchConfig(method="bands", budget=4, chunk_size=20, probe_items=5)
    )
    est = dict(events)["estimate"]
    others = plan["n_candidates"] - 2 * N_HEAD
    assert est["estimate_s"] == pytest.approx(est["chunk_s"] * (others * 3 + (2 * N_HEAD + 1) * 1))


def test_events_no_discrimination_when_every_candidate_scores_the_same() -> None:
    """A generation that never names a label: accuracy-generate is 0 for every candidate on every item."""
    model = FakeModel(n_items=40)

    def mute(bias: np.ndarray, items: Sequence[Item]) -> list[FakeScores]:
        out = model(bias, items)
        for s in out:
            s.gen_text = " and then"
        return out

    events: list[tuple[str, dict]] = []
    search(
        mute,
        model.items,
        model.shape,
        SearchConfig(objective="accuracy-generate", chunk_size=10),
        events=lambda n, d: events.append((n, d)),
    )
    warned = [d for n, d in events if n == "no_discrimination"]
    assert len(warned) == 1 and warned[0]["n_items"] == 10
    # it comes early: before the sixth candidate is announced
    idx = [n for n, _ in events].index("no_discrimination")
    assert sum(1 for n, _ in events[:idx] if n == "candidate") == 5

    # the same search with choice accuracy, which does discriminate: no warning
    _, events = _events(model, SearchConfig(objective="accuracy-choice", chunk_size=10))
    assert "no_discrimination" not in [n for n, _ in events]


@pytest.mark.parametrize("objective", ["bc-accuracy-choice", "bc-logprob", "bc-mutual-information"])
def test_bc_objectives_search_without_racing(objective: str) -> None:
    """The objectives judged after Batch Calibration run in the search on the fake model: never raced (the
    prior depends on the whole batch), and the pick's objective is the recomputation's on its own items."""
    from zt_gguf.metrics import item_results
    from zt_gguf.objectives import get_objective

    model = FakeModel(n_items=60)
    r = search(model, model.items, model.shape, SearchConfig(objective=objective, chunk_size=20))
    assert r.items_scored == r.items_full and r.savings == 0.0
    order = np.random.default_rng(0).permutation(len(model.items))
    items = [model.items[i] for i in order]
    want = get_objective(objective).fn(item_results(model(r.bias, items), items), items)
    assert r.best_objective == pytest.approx(want)
    assert r.best_objective >= r.baseline_objective


# --- pools: several workers give the sequential answers -----------------------------------------------------


class ShuffledPool:
    """n_workers simulated workers over a FakeModel: jobs complete in a seeded random order, each scored by
    the model only when it completes (so a job scored ahead is real work in the model's counters)."""

    def __init__(self, model: FakeModel, n_workers: int, seed: int = 0) -> None:
        self.model, self.n_workers = model, n_workers
        self.rng = np.random.default_rng(seed)
        self.items: list[Item] = []
        self.pending: list[tuple[int, np.ndarray, int, int]] = []
        self.max_in_flight = 0

    def start(self, items: Sequence[Item]) -> None:
        self.items = list(items)

    def submit(self, job: int, bias: np.ndarray, start: int, stop: int) -> None:
        self.pending.append((job, bias, start, stop))
        assert len(self.pending) <= self.n_workers
        self.max_in_flight = max(self.max_in_flight, len(self.pending))

    def wait(self) -> tuple[int, list[FakeScores], float]:
        job, bias, start, stop = self.pending.pop(int(self.rng.integers(len(self.pending))))
        return job, self.model(bias, self.items[start:stop]), 0.01


@pytest.mark.parametrize("method", ["paper", "bands", "heads"])
@pytest.mark.parametrize("objective", ["accuracy-choice", "logprob", "bc-logprob", "mutual-information"])
@pytest.mark.parametrize("n_workers", [2, 5])
def test_pool_of_workers_makes_the_sequential_picks(method: str, objective: str, n_workers: int) -> None:
    config = SearchConfig(method=method, objective=objective, chunk_size=16, budget=10)
    seq_model = FakeModel()
    sequential = search(seq_model, seq_model.items, seq_model.shape, config)
    par_model = FakeModel()
    pool = ShuffledPool(par_model, n_workers, seed=n_workers)
    events: list[str] = []
    parallel = search(
        None, par_model.items, par_model.shape, config, pool=pool, events=lambda n, d: events.append(n)
    )
    assert _same(parallel, sequential)  # every candidate: objective, items evaluated, stop, summary; the pick
    assert pool.max_in_flight == n_workers
    # scored ahead: at least the work of the sequential search, which the search reports as its cost
    assert par_model.items_scored >= seq_model.items_scored == sequential.run.items_scored
    assert parallel.run.items_scored == par_model.items_scored
    assert events.count("done") == parallel.n_evaluations
    if objective in ("accuracy-choice", "logprob"):
        assert any(c.stopped_early for c in parallel.candidates)  # racing applies with several workers too


def test_pool_checkpoint_resumes_in_either_mode(tmp_path: Path) -> None:
    config = SearchConfig(method="bands", objective="logprob", chunk_size=16, budget=10)
    straight_model = FakeModel()
    straight = search(straight_model, straight_model.items, straight_model.shape, config)

    # interrupted with 3 workers, resumed in one process
    ckpt = tmp_path / "a.json"
    model = FakeModel()
    model.fail_after = straight_model.calls // 2
    with pytest.raises(Interrupted):
        search(
            None,
            model.items,
            model.shape,
            config,
            checkpoint=ckpt,
            scorer_id="f",
            pool=ShuffledPool(model, 3),
        )
    n_saved = len(SearchState.load(ckpt, "f").evaluations)
    assert n_saved > 0
    model.fail_after = None
    resumed = search(model, model.items, model.shape, config, checkpoint=ckpt, scorer_id="f")
    assert _same(resumed, straight) and resumed.run.evaluations_from_checkpoint == n_saved

    # interrupted in one process, resumed with 4 workers
    ckpt = tmp_path / "b.json"
    model = FakeModel()
    model.fail_after = straight_model.calls // 3
    with pytest.raises(Interrupted):
        search(model, model.items, model.shape, config, checkpoint=ckpt, scorer_id="f")
    n_saved = len(SearchState.load(ckpt, "f").evaluations)
    model.fail_after = None
    resumed = search(
        None, model.items, model.shape, config, checkpoint=ckpt, scorer_id="f", pool=ShuffledPool(model, 4)
    )
    assert _same(resumed, straight) and resumed.run.evaluations_from_checkpoint == n_saved


# --- the rules, recomputed from what the search reports -----------------------------------------------------


def _reference_head_type(gains_up: Sequence[float], gains_down: Sequence[float]) -> str:
    up = float(np.sum(np.clip(gains_up, 0.0, None)))
    down = float(np.sum(np.clip(gains_down, 0.0, None)))
    return "up" if up >= down else "down"


def _reference_heads(gains: Sequence[float], head_fraction: float) -> list[int]:
    g = np.asarray(gains, dtype=np.float64)
    k = math.ceil(head_fraction * len(g))
    by_gain = list(np.lexsort((np.arange(len(g)), -g)))  # largest gain first, then the lower index
    positive = [int(h) for h in by_gain if g[h] > 0]
    if len(positive) >= k:
        return sorted(int(h) for h in by_gain[:k])
    return sorted(positive) if positive else [int(by_gain[0])]


@pytest.mark.parametrize(
    ("kw", "objective", "head_fraction"),
    [
        ({}, "accuracy-choice", 0.4),
        ({"up": (0, 1, 3, 4, 6), "down": ()}, "logprob", 0.4),
        ({"up": (7,), "down": (0, 3, 5), "a_up": 0.3, "a_down": 1.0}, "logprob", 0.25),
        ({"up": (), "down": (), "noise": 0.0}, "logprob", 0.5),
        ({"up": (2, 5), "down": (1, 6), "a_up": 0.6, "a_down": 0.6, "seed": 3}, "neg-entropy-full", 1.0),
    ],
)
def test_selected_heads_follow_the_documented_rule(kw: dict, objective: str, head_fraction: float) -> None:
    """The type and the heads S recomputed from the reported probe gains by the module docstring's rule."""
    model = FakeModel(n_items=96, **kw)
    config = SearchConfig(objective=objective, head_fraction=head_fraction, chunk_size=16)
    r = search(model, model.items, model.shape, config)
    assert r.head_type == _reference_head_type(r.gains_up, r.gains_down)
    gains = r.gains_up if r.head_type == "up" else r.gains_down
    assert r.heads == _reference_heads(gains, head_fraction)
    grid = config.grid_up if r.head_type == "up" else config.grid_down
    assert r.best_gamma == 1.0 or r.best_gamma in grid


def _racing_bound(d: np.ndarray) -> float:
    m = len(d)
    mean = float(np.sum(d)) / m
    sd = math.sqrt(float(np.sum((d - mean) ** 2)) / (m - 1))
    return mean + 2.58 * sd / math.sqrt(m)


@pytest.mark.parametrize("objective", ["accuracy-choice", "logprob"])
@pytest.mark.parametrize("n_workers", [1, 3])
def test_probes_stop_where_the_racing_bound_first_falls_below_zero(
    tmp_path: Path, objective: str, n_workers: int
) -> None:
    """Each probe's per-item values (from the checkpoint) against the baseline's: a probe is stopped at the
    first chunk boundary (from the second on, before the last) where the bound is negative, and only there."""
    model = FakeModel(n_items=150)
    chunk = 16
    ckpt = tmp_path / "race.json"
    pool = ShuffledPool(model, n_workers) if n_workers > 1 else None
    search(
        None if pool else model,
        model.items,
        model.shape,
        SearchConfig(objective=objective, chunk_size=chunk),
        checkpoint=ckpt,
        scorer_id="f",
        pool=pool,
    )
    records = {e.description: e for e in SearchState.load(ckpt, "f").evaluations.values()}
    base = records["baseline"]
    assert base.values is not None and len(base.values) == len(model.items)
    n_stopped = 0
    for desc, rec in records.items():
        if not desc.startswith("probe "):
            continue
        assert rec.values is not None
        d = np.asarray(rec.values) - np.asarray(base.values[: rec.n_items_evaluated])
        ends = [k * chunk for k in range(2, len(model.items)) if k * chunk < len(model.items)]
        ends = [m for m in ends if m <= rec.n_items_evaluated]
        bounds = [_racing_bound(d[:m]) for m in ends]
        if rec.stopped_early:
            n_stopped += 1
            assert rec.n_items_evaluated == ends[-1] and bounds[-1] < -1e-9
            assert all(b > -1e-9 for b in bounds[:-1])
        else:
            assert rec.n_items_evaluated == len(model.items)
            assert all(b > -1e-9 for b in bounds)
    assert n_stopped >= 3  # the down probes of the planted up heads, at least


def test_search_leaves_the_config_as_given() -> None:
    model = FakeModel(n_items=40)
    config = SearchConfig(objective="logprob", grid_up=[2, 3], grid_down=[0.5], chunk_size=20)
    given = copy.deepcopy(config)
    r = search(model, model.items, model.shape, config)
    assert config == given and isinstance(config.grid_up, list) and config.grid_up[0] is given.grid_up[0]
    assert r.config["grid_up"] == [2.0, 3.0] and all(type(g) is float for g in r.config["grid_up"])
    assert r.config["grid_down"] == [0.5]


def test_event_names_and_payload_keys() -> None:
    """The events calibrate and the distributed runner consume: these names with exactly these keys."""
    expected = {
        "plan": {"n_candidates", "n_items", "chunk_size", "n_chunks"},
        "estimate": {"chunk_s", "estimate_s", "n_candidates", "n_workers"},
        "candidate": {"description", "index"},
        "done": {"description", "n_done"},
        "no_discrimination": {"n_candidates", "n_items"},
    }
    model = FakeModel(n_items=40)

    def mute(bias: np.ndarray, items: Sequence[Item]) -> list[FakeScores]:
        out = model(bias, items)
        for s in out:
            s.gen_text = " and then"
        return out

    events: list[tuple[str, dict]] = []
    config = SearchConfig(method="bands", objective="accuracy-generate", chunk_size=10, budget=3)
    search(mute, model.items, model.shape, config, events=lambda n, d: events.append((n, d)))
    assert {n for n, _ in events} == set(expected)
    for name, data in events:
        assert set(data) == expected[name], name
    indices = [d["index"] for n, d in events if n == "candidate"]
    assert indices == list(range(1, len(indices) + 1))
    dones = [d["n_done"] for n, d in events if n == "done"]
    assert dones == list(range(1, len(dones) + 1)) and len(dones) == len(indices)


# --- probes on a subsample (SearchConfig.probe_items) -------------------------------------------------------


class Recorder:
    """A FakeModel scorer that remembers which items each bias was scored on."""

    def __init__(self, model: FakeModel) -> None:
        self.model = model
        self.items_of: dict[str, list[str]] = {}

    def __call__(self, bias: np.ndarray, items: Sequence[Item]) -> list[FakeScores]:
        self.items_of.setdefault(bias_hash(bias), []).extend(it.id for it in items)
        return self.model(bias, items)


def _probe_bias(model: FakeModel, h: int, gamma: float) -> np.ndarray:
    b = np.zeros(model.shape, np.float32)
    b[:, h] = np.float32(math.log(gamma))
    return b


@pytest.mark.parametrize("objective", ["accuracy-choice", "logprob"])
def test_probe_items_scores_the_probes_on_the_first_chunks_only(objective: str) -> None:
    model = FakeModel()
    rec = Recorder(model)
    config = SearchConfig(objective=objective, chunk_size=16, probe_items=40, early_stop=False)
    r = search(rec, model.items, model.shape, config)
    order = [model.items[i].id for i in np.random.default_rng(0).permutation(len(model.items))]
    first = order[:48]  # 40 items rounded up to whole chunks of 16
    zero = np.zeros(model.shape, np.float32)
    assert rec.items_of[bias_hash(zero)] == order  # the baseline: every item, once
    for h in range(N_HEAD):
        for gamma, gains in ((2.0, r.gains_up), (0.5, r.gains_down)):
            bias = _probe_bias(model, h, gamma)
            assert rec.items_of[bias_hash(bias)] == first
            # the gain: the paired mean over those items, recomputed from the fake's margins
            idx = [model.index[i] for i in first]
            if objective == "accuracy-choice":
                expected = np.mean(model.margins(bias)[idx] > 0) - np.mean(model.margins(zero)[idx] > 0)
            else:
                expected = np.mean(-np.logaddexp(0, -model.margins(bias)[idx])) - np.mean(
                    -np.logaddexp(0, -model.margins(zero)[idx])
                )
            assert gains[h] == pytest.approx(expected, abs=1e-12)
    # the grid is scored on every item
    for c in r.candidates:
        assert c.n_items_evaluated == (48 if c.stage == "probe" else len(model.items))
    assert r.heads == [1, 4, 6] and r.head_type == "up"
    full = search(
        FakeModel(),
        model.items,
        model.shape,
        SearchConfig(objective=objective, chunk_size=16, early_stop=False),
    )
    assert r.items_scored == model.items_scored == full.items_scored - 2 * N_HEAD * (len(model.items) - 48)


def test_probe_items_at_or_above_the_item_count_is_the_paper_search() -> None:
    items = FakeModel().items
    full = search(FakeModel(), items, (N_LAYER, N_HEAD), SearchConfig(objective="logprob", chunk_size=16))
    for m in (len(items), 10_000, len(items) - 5):  # 187 rounds up to 192: every item
        r = search(
            FakeModel(),
            items,
            (N_LAYER, N_HEAD),
            SearchConfig(objective="logprob", chunk_size=16, probe_items=m),
        )
        a, b = r.to_dict(include_run=False), full.to_dict(include_run=False)
        assert a.pop("config")["probe_items"] == m
        b.pop("config")
        assert a == b


def _mutual_information(model: FakeModel, bias: np.ndarray, idx: list[int]) -> float:
    """H(mean p) - mean H(p) of the fake's two-choice distributions, from its margins (NumPy)."""
    m = model.margins(bias)[idx]
    p1 = np.where(model.answers[idx] == 1, 1 / (1 + np.exp(-m)), 1 / (1 + np.exp(m)))
    p = np.stack([1 - p1, p1], axis=1)

    def h(q: np.ndarray) -> np.ndarray:
        return -np.sum(q * np.log(q), axis=-1)

    return float(max(0.0, h(p.mean(axis=0)) - np.mean(h(p))))


def test_probe_items_without_per_item_values_scores_a_baseline_on_the_same_items() -> None:
    model = FakeModel(labelled=False)
    rec = Recorder(model)
    config = SearchConfig(objective="mutual-information", chunk_size=16, probe_items=32)
    r = search(rec, model.items, model.shape, config)
    by = _by_description(r)
    assert by["baseline on 32 items"].n_items_evaluated == 32
    order = [model.items[i].id for i in np.random.default_rng(0).permutation(len(model.items))]
    idx = [model.index[i] for i in order[:32]]
    zero = np.zeros(model.shape, np.float32)
    assert rec.items_of[bias_hash(zero)] == order + order[:32]  # all items, then the probes' 32 again
    for h in range(N_HEAD):
        for gamma, gains in ((2.0, r.gains_up), (0.5, r.gains_down)):
            bias = _probe_bias(model, h, gamma)
            assert rec.items_of[bias_hash(bias)] == order[:32]
            expected = _mutual_information(model, bias, idx) - _mutual_information(model, zero, idx)
            assert gains[h] == pytest.approx(expected, abs=1e-9)
    # the pick is judged on every item: the best is the baseline or a grid candidate scored on all of them
    assert by[r.best_description].n_items_evaluated == len(model.items)


def test_probe_items_racing_resume_and_workers(tmp_path: Path) -> None:
    config = SearchConfig(method="bands", objective="logprob", chunk_size=16, budget=10, probe_items=64)
    straight_model = FakeModel()
    straight = search(straight_model, straight_model.items, straight_model.shape, config)
    assert any(c.stopped_early and c.stage == "probe" for c in straight.candidates)  # raced within 64 items
    assert all(c.n_items_evaluated <= 64 for c in straight.candidates if c.stage == "probe")
    # interrupted, then resumed from the checkpoint: the same search
    ckpt = tmp_path / "search.json"
    model = FakeModel()
    model.fail_after = straight_model.calls // 2
    with pytest.raises(Interrupted):
        search(model, model.items, model.shape, config, checkpoint=ckpt, scorer_id="fake")
    model.fail_after = None
    assert _same(search(model, model.items, model.shape, config, checkpoint=ckpt, scorer_id="fake"), straight)
    # the subsampled probes' records in the checkpoint are not taken for full evaluations
    other = FakeModel()
    full_config = SearchConfig(method="bands", objective="logprob", chunk_size=16, budget=10)
    full = search(other, other.items, other.shape, full_config, checkpoint=ckpt, scorer_id="fake")
    assert _same(full, search(FakeModel(), other.items, other.shape, full_config))
    # several workers make the same picks
    par_model = FakeModel()
    parallel = search(None, par_model.items, par_model.shape, config, pool=ShuffledPool(par_model, 3, seed=1))
    assert _same(parallel, straight)


def test_probe_items_config_error() -> None:
    model = FakeModel()
    with pytest.raises(SearchError, match="probe_items must be >= 1"):
        search(model, model.items, model.shape, SearchConfig(probe_items=0))
