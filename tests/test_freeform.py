"""Open-ended tasks ({"prompt", "answers"}) end to end on a tiny random-weight model.

References: the answer log-likelihood is recomputed in NumPy from single-sequence logits (Context.logits);
exact match is recomputed from the engine's own greedy continuations (Context.score) and the match rules,
whose hand-checked cases are in test_matching.py; the held-out split is tasks.split_items(items, 0.3, 42), as
calibrate documents it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from zt_gguf import cli, metrics, objectives
from zt_gguf.calibrate import decide, heldout_check
from zt_gguf.engine import Context, Model
from zt_gguf.gguf_meta import read_model_info
from zt_gguf.matching import MatchRule, last_number, normalize
from zt_gguf.results import Delta, HeldOut
from zt_gguf.tasks import Item, load_task, split_items
from zt_gguf.testing import make_tiny_llama, write_tiny_task

ATOL = 2e-4  # as tests/test_engine.py: one float32 computation against another batch shape
WORDS = "the a of and to in is it that was for on hello world cat dog sat mat one two three".split()
WRONG = "zebra crossing"  # no tiny-model continuation starts with it (checked in each test)


# --- helpers ------------------------------------------------------------------------------------------------


def _run(*args: Any) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def _write(path: Path, rows: list[dict[str, Any]], header: dict[str, Any] | None = None) -> Path:
    lines = ([json.dumps({"zt_task": header})] if header is not None else []) + [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 8)))) for _ in range(n)]


def _first_line(text: str) -> str:
    """The first non-blank-led line, written out here rather than taken from zt_gguf.matching."""
    while text.startswith("\n"):
        text = text[1:]
    return text.split("\n")[0]


def _context(model_path: Path) -> Context:
    return Context(Model(model_path, gpu_layers=0), n_threads=1, n_ctx=2048)


def _greedy(ctx: Context, prompts: list[str], n_gen: int, stops: list[str]) -> list[str]:
    items = [Item(prompt=p, choices=(" x",), answer=0, id=str(i)) for i, p in enumerate(prompts)]
    return [s.gen_text for s in ctx.score(items, n_gen=n_gen, gen_stop=stops)]


def _correct(ctx: Context, items: list[Item], n_gen: int, stops: list[str]) -> list[bool]:
    """Each item's greedy continuation (the engine's) judged by its match rule (in this test's loop)."""
    scores = ctx.score(items, n_gen=n_gen, gen_stop=stops)
    out = []
    for it, s in zip(items, scores):
        assert it.match is not None
        out.append(it.match.matches(s.gen_text, it.references))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("open") / "tiny.gguf", n_layer=2, seed=7).path


# --- loading ------------------------------------------------------------------------------------------------


def test_open_ended_lines_load_with_their_rule(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Q: capital of France?\nA:", "answers": [" Paris", "paris, france"], "id": "a"},
        {"prompt": "Q: 2 + 2?\nA:", "answer": " 4"},
    ]
    task = load_task(_write(tmp_path / "t.jsonl", rows, {"match": "number"}))
    assert task.kind == "open" and task.has_answers and task.content_free is None
    first, second = task.items
    assert first.references == (" Paris", "paris, france") and first.choices == (" Paris",)
    assert second.references == (" 4",) and second.choices == (" 4",) and second.id == "t:3"
    assert first.answer == second.answer == 0
    assert task.match == first.match == MatchRule("number")
    # the arguments win over the header; the regex rule follows from an answer regex alone
    assert load_task(tmp_path / "t.jsonl", match="contains").match == MatchRule("contains")
    assert load_task(tmp_path / "t.jsonl", answer_regex=r"is (\d+)").match == MatchRule("regex", r"is (\d+)")
    assert load_task(_write(tmp_path / "u.jsonl", rows)).match == MatchRule("exact")  # the default


# --- answer-logprob: teacher forcing against NumPy ----------------------------------------------------------


def _reference_logprobs(model: Model, alone: Context, prompt: str, answer: str) -> tuple[float, int, float]:
    """log p(answer tokens | prompt) from one sequence's logits, the number of answer tokens (the tokens of
    prompt + answer after the longest common prefix with the prompt's: a merged boundary token counts) and
    the log-probability of the first of them."""
    p, w = model.tokenize(prompt), model.tokenize(prompt + answer)
    branch = next((i for i, (a, b) in enumerate(zip(p, w)) if a != b), min(len(p), len(w)))
    x = alone.logits(w).astype(np.float64)
    lp = x - x.max(axis=1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
    total = float(sum(lp[j - 1, w[j]] for j in range(branch, len(w))))
    return total, len(w) - branch, float(lp[branch - 1, w[branch]])


def _reference_logprob(model: Model, alone: Context, prompt: str, answer: str) -> tuple[float, int]:
    total, n, _ = _reference_logprobs(model, alone, prompt, answer)
    return total, n


@pytest.mark.parametrize("biased", [False, True])
def test_answer_logprob_is_the_first_reference_log_likelihood_per_token(
    tiny: Path, tmp_path: Path, biased: bool
) -> None:
    prompts = _prompts(10, seed=1)
    rows: list[dict[str, Any]] = [
        {"prompt": p, "answers": [" " + " ".join(WORDS[i : i + 1 + i % 3]), " cat"]}
        for i, p in enumerate(prompts)
    ]
    rows.append({"prompt": "hello wor", "answer": "ld is one"})  # "▁wor" + "ld": a merged boundary token
    rows.append({"prompt": "the dog sat on the", "answer": " mat"})
    task = load_task(_write(tmp_path / "open.jsonl", rows))
    model = Model(tiny, gpu_layers=0)
    ctx = Context(model, n_threads=1, n_ctx=1024)
    alone = Context(model, n_threads=1, n_ctx=512, n_seq_max=2)
    bias = np.random.default_rng(2).uniform(-1.5, 1.5, model.bias_shape) if biased else None
    ctx.set_bias(bias)
    alone.set_bias(bias)

    scores = ctx.score(task.items, n_gen=0)
    results = metrics.item_results(scores, task.items)
    want, want_first = [], []
    for item, s, r in zip(task.items, scores, results):
        total, n, first = _reference_logprobs(model, alone, item.prompt, item.references[0])
        assert int(s.choice_n_tokens[0]) == n
        np.testing.assert_allclose(s.choice_logprob[0], total, atol=4 * ATOL, rtol=0)
        assert r.answer_logprob == pytest.approx(total / n, abs=4 * ATOL)
        assert r.answer_first_logprob == pytest.approx(first, abs=4 * ATOL)
        want.append(total / n)
        want_first.append(first)
    assert np.std(want) > 0.1  # the items differ: the comparison is not of one constant
    assert max(abs(a - b) for a, b in zip(want, want_first)) > 0.1  # the first token is not the whole answer
    obj = objectives.get_objective("answer-logprob")
    assert obj.fn(results, task.items) == pytest.approx(float(np.mean(want)), abs=4 * ATOL)
    first_obj = objectives.get_objective("answer-first-logprob")
    assert first_obj.fn(results, task.items) == pytest.approx(float(np.mean(want_first)), abs=4 * ATOL)
    assert metrics.summarize(results, task.items).mean_correct_logprob == pytest.approx(
        np.mean(want), abs=4 * ATOL
    )
    if (
        biased
    ):  # the bias moves the likelihoods (so the biased case tests something the unbiased one does not)
        alone.set_bias(None)
        plain = [_reference_logprob(model, alone, it.prompt, it.references[0]) for it in task.items]
        assert max(abs(w - t / n) for w, (t, n) in zip(want, plain)) > 1e-2


# --- exact match by real generation -------------------------------------------------------------------------


def test_eval_exact_match_equals_the_engine_continuations(tiny: Path, tmp_path: Path) -> None:
    """eval's exact match and examples against each item's greedy continuation (8 tokens, stop at a
    newline) judged by the exact rule; half the references are the untuned model's first line, so both
    verdicts occur."""
    prompts = _prompts(24, seed=3)
    ctx = _context(tiny)
    gens = _greedy(ctx, prompts, 8, ["\n"])
    rows, expected = [], []
    for i, (p, g) in enumerate(zip(prompts, gens)):
        line = _first_line(g)
        right = i % 2 == 0 and normalize(line) != ""
        rows.append({"prompt": p, "answers": [WRONG, line] if right else [WRONG], "id": f"q{i}"})
        expected.append(right)
    path = _write(tmp_path / "open.jsonl", rows)
    task = load_task(path)

    code, stdout, stderr = _run(
        "eval", tiny, "--task", path, "--json", "--n-gen", 8, "--threads", 1, "--gpu-layers", 0
    )
    assert code == 0, stderr
    out = json.loads(stdout)
    correct = _correct(ctx, task.items, 8, ["\n"])
    assert correct == expected and any(correct) and not all(correct)
    assert out["kind"] == "open" and out["match"] == "exact" and out["n_gen"] == 8 and out["n"] == 24
    assert out["accuracy_generate"] == pytest.approx(np.mean(correct))
    assert "no output-side baseline" in out["baselines"]["notes"][0]
    scores = ctx.score(task.items, n_gen=8, gen_stop=["\n"])
    assert [e["id"] for e in out["examples"]] == [f"q{i}" for i in range(5)]
    for e, it, s, c in zip(out["examples"], task.items, scores, correct):
        assert (
            e["continuation"] == s.gen_text and e["correct"] == c and e["references"] == list(it.references)
        )
        assert e["prompt"] == it.prompt


def test_eval_number_rule_on_controlled_continuations(tiny: Path, tmp_path: Path) -> None:
    """The number rule (--match, over the file header's exact) on 24-token continuations without a stop
    string: an item whose continuation holds a number gets it as the reference (with thousands commas) or
    that number plus one; an item without a number gets "7", which nothing can match."""
    prompts = _prompts(30, seed=4)
    ctx = _context(tiny)
    gens = _greedy(ctx, prompts, 24, [])
    rows, expected = [], []
    for i, (p, g) in enumerate(zip(prompts, gens)):
        n = last_number(g)
        if n is None:
            ref = "7"
        else:
            n = n if i % 2 == 0 else n + 1
            ref = f"{int(n):,}" if float(n).is_integer() else repr(n)
        rows.append({"prompt": p, "answers": [ref], "id": f"n{i}"})
        expected.append(n is not None and i % 2 == 0)
    path = _write(tmp_path / "numbers.jsonl", rows, {"match": "exact"})
    task = load_task(path, match="number")

    code, stdout, stderr = _run(
        "eval", tiny, "--task", path, "--match", "number", "--stop", "", "--n-gen", 24, "--json",
        "--threads", 1, "--gpu-layers", 0,
    )  # fmt: skip
    assert code == 0, stderr
    out = json.loads(stdout)
    correct = _correct(ctx, task.items, 24, [])
    assert correct == expected and sum(correct) >= 2 and not all(correct)
    assert out["match"] == "number" and out["n_gen"] == 24
    assert out["accuracy_generate"] == pytest.approx(np.mean(correct))
    assert [e["correct"] for e in out["examples"]] == correct[:5]
    assert [e["continuation"] for e in out["examples"]] == gens[:5]


# --- the decision rule -------------------------------------------------------------------------------------


def _summary(accuracy: float) -> metrics.Summary:
    return metrics.Summary(
        n=200,
        accuracy_choice=None,
        accuracy_choice_norm=None,
        accuracy_generate=accuracy,
        invalid_rate=1 - accuracy,
        mean_correct_logprob=-3.0,
        mean_entropy_full=2.0,
        mean_entropy_choices=0.0,
        mutual_information=0.0,
    )


def _heldout(delta: Delta) -> HeldOut:
    return HeldOut(200, _summary(0.05), _summary(0.05 + delta.delta), {"generate": delta})


BIAS = np.full((2, 4), 0.3, np.float32)


@pytest.mark.parametrize(
    ("delta", "force", "write"),
    [
        (Delta(0.035, 0.005, 0.07), False, True),  # interval above 0
        (Delta(0.035, 0.0, 0.075), False, False),  # touches 0: not above it (the SmolLM2 figure)
        (Delta(0.02, -0.01, 0.05), False, False),  # straddles 0
        (Delta(-0.01, -0.04, 0.015), False, False),
        (Delta(0.02, -0.01, 0.05), True, True),  # force
        (Delta(-0.01, -0.04, 0.015), True, True),
    ],
)
def test_decide_open_needs_the_paired_interval_above_zero(delta: Delta, force: bool, write: bool) -> None:
    d = decide(BIAS, _heldout(delta), None, "generate", force, "open")
    assert d.write is write
    assert d.improved is (delta.lo > 0)
    assert d.warning is None
    if write:
        assert d.reason is None
    else:
        assert "exact match" in d.reason and "interval above 0" in d.reason and "--force" in d.reason


def test_decide_open_is_stricter_than_multiple_choice() -> None:
    """A positive delta whose interval straddles 0 writes a multiple-choice file but not an open-ended one."""
    straddle = _heldout(Delta(0.02, -0.01, 0.05))
    assert decide(BIAS, straddle, None, "generate", False, "choice").write
    assert not decide(BIAS, straddle, None, "generate", False, "open").write


@pytest.mark.parametrize("force", [False, True])
def test_decide_never_writes_an_all_zero_bias(force: bool) -> None:
    zero = np.zeros((2, 4), np.float32)
    d = decide(zero, _heldout(Delta(0.1, 0.05, 0.15)), None, "generate", force, "open")
    assert not d.write and "kept the baseline" in d.reason


def _fake_scores(texts: list[str]) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(
            choice_logprob=np.array([-2.0]),
            choice_n_tokens=np.array([2]),
            choice_first_logprob=np.array([-1.5]),
            gen_text=t,
            entropy_full=1.0,
            entropy_choices=0.0,
        )  # fmt: skip
        for t in texts
    ]


@pytest.mark.parametrize(("n_gained", "write"), [(20, True), (1, False)])
def test_heldout_check_with_a_fake_scorer_feeds_the_decision(n_gained: int, write: bool) -> None:
    """A fake scorer: the untuned model answers 5 of 40 items right, the tuned one n_gained more. The
    held-out exact match and its delta are those counts; 20 more items is an interval above 0 (written), 1
    more is not."""
    rule = MatchRule("exact")
    held = [Item(f"q{i}", (" a",), 0, f"i{i}", references=(" a",), match=rule) for i in range(40)]

    def score(bias: np.ndarray | None, items: list[Item]) -> list[SimpleNamespace]:
        n_right = 5 if bias is None or not np.any(bias) else 5 + n_gained  # the untuned model: zeros
        return _fake_scores(["A." if i < n_right else "b" for i in range(len(items))])

    h = heldout_check(score, held, BIAS, seed=42, scored_by=("generate",))
    assert h is not None and set(h.delta) == {"generate"}
    assert h.baseline.accuracy_generate == pytest.approx(5 / 40)
    assert h.tuned.accuracy_generate == pytest.approx((5 + n_gained) / 40)
    assert h.delta["generate"].delta == pytest.approx(n_gained / 40)
    assert decide(BIAS, h, None, "generate", False, "open").write is write


# --- calibrate and eval end to end --------------------------------------------------------------------------


def test_calibrate_and_eval_an_open_ended_file(tiny: Path, tmp_path: Path) -> None:
    prompts = _prompts(30, seed=5)
    ctx = _context(tiny)
    gens = _greedy(ctx, prompts, 32, ["\n"])  # the defaults: 32 tokens, a newline stops
    rows = []
    for i, (p, g) in enumerate(zip(prompts, gens)):
        line = _first_line(g)
        rows.append(
            {"prompt": p, "answers": [line] if i % 2 == 0 and normalize(line) else [WRONG], "id": f"c{i}"}
        )
    path = _write(tmp_path / "open.jsonl", rows)
    out = tmp_path / "out.gguf"
    code, stdout, stderr = _run(
        "calibrate", tiny, "--task", path, "--force", "-o", out, "--json", "--threads", 1, "--gpu-layers", 0,
        "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    printed = json.loads(stdout)
    rep = json.loads(Path(printed["report_files"]["report"]).read_text())
    assert rep["scoring"]["match"] == "exact" and rep["scoring"]["n_gen"] == 32
    assert rep["search"]["objective"] == "answer-logprob"
    assert rep["written"]["path"] == str(out) and out.exists()
    assert "no output-side baseline" in rep["baselines"]["notes"][0]

    task = load_task(path)
    _, held = split_items(task.items, 0.3, 42)
    bias = read_model_info(out).biases
    assert bias is not None and np.any(bias)
    base = _correct(ctx, held, 32, ["\n"])
    ctx.set_bias(bias)
    tuned = _correct(ctx, held, 32, ["\n"])
    assert any(base)  # the untuned model answers some held-out items: the figures are not all zero
    assert rep["baseline"]["n"] == rep["tuned"]["n"] == len(held) == 9
    assert rep["baseline"]["accuracy_generate"] == pytest.approx(np.mean(base))
    assert rep["tuned"]["accuracy_generate"] == pytest.approx(np.mean(tuned))
    assert rep["delta"]["accuracy_generate"]["delta"] == pytest.approx(np.mean(tuned) - np.mean(base))

    code, stdout, stderr = _run(
        "eval", out, "--task", path, "--json", "--threads", 1, "--gpu-layers", 0
    )  # the tuned file, its stored biases
    assert code == 0, stderr
    ev = json.loads(stdout)
    everything = _correct(ctx, task.items, 32, ["\n"])
    assert ev["bias"] == "stored" and ev["match"] == "exact" and ev["n_gen"] == 32
    assert ev["accuracy_generate"] == pytest.approx(np.mean(everything))
    assert [e["correct"] for e in ev["examples"]] == everything[:5]


# --- bad open-ended files -----------------------------------------------------------------------------------

OPEN = {"prompt": "Q: capital of France?\nA:", "answers": [" Paris"]}
CHOICE = {"prompt": "the cat is", "choices": [" cat", " dog"], "answer": 0}


@pytest.mark.parametrize(
    ("case", "rows", "header", "args", "where", "message"),
    [
        ("no-answer", [{"prompt": "x"}], None, [], 1, 'missing "choices" (multiple choice) or "answers"'),
        ("no-answer-later", [OPEN, {"prompt": "x"}], None, [], 2, 'missing "answers"'),
        ("number-answer", [OPEN, {"prompt": "x", "answer": 18}], None, [], 2, '"answer" must be a string'),
        ("empty-answers", [OPEN, {"prompt": "x", "answers": []}], None, [], 2, '"answers" is empty'),
        ("empty-answer", [{"prompt": "x", "answer": "  "}], None, [], 1, '"answer" is empty'),
        (
            "empty-reference",
            [{"prompt": "x", "answers": ["Paris", ""]}],
            None,
            [],
            1,
            '"answers"[1] is empty',
        ),
        ("header-regex", [OPEN], {"answer_regex": r"is \w+"}, [], 1, "exactly one group, has 0"),
        ("option-regex", [OPEN], None, ["--answer-regex", r"(\w+) (\w+)"], None, "exactly one group, has 2"),
        ("mixed", [OPEN, CHOICE], None, [], 2, "mixed formats"),
        ("mixed-other-way", [CHOICE, OPEN], None, [], 2, "mixed formats"),
        (
            "match-on-choices",
            [CHOICE],
            None,
            ["--match", "number"],
            1,
            "match rule applies only to open-ended",
        ),
    ],
)
@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_bad_open_ended_files_are_one_line_errors(
    tiny: Path,
    tmp_path: Path,
    command: str,
    case: str,
    rows: list[dict[str, Any]],
    header: dict[str, Any] | None,
    args: list[str],
    where: int | None,
    message: str,
) -> None:
    path = _write(tmp_path / f"{case}.jsonl", rows, header)
    out = tmp_path / "out.gguf"
    extra = ["-o", out, "--quiet"] if command == "calibrate" else []
    code, stdout, stderr = _run(command, tiny, "--task", path, *args, *extra)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    place = f"{path}:{where}: " if where is not None else f"{path}: "
    assert lines[0].startswith(f"zt-gguf: error: {place}") and message in lines[0], lines[0]
    assert "Traceback" not in stdout + stderr
    assert not out.exists()


@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_chat_on_a_model_without_a_template_is_one_line(tiny: Path, tmp_path: Path, command: str) -> None:
    assert "tokenizer.chat_template" not in gguf.GGUFReader(tiny).fields
    path = _write(tmp_path / "open.jsonl", [dict(OPEN, id=f"o{i}") for i in range(24)])
    out = tmp_path / "out.gguf"
    extra = ["-o", out, "--quiet"] if command == "calibrate" else []
    code, stdout, stderr = _run(
        command, tiny, "--task", path, "--chat", "--threads", 1, "--gpu-layers", 0, *extra
    )
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"zt-gguf: error: {tiny}: ") and "no chat template" in lines[0], lines[0]
    assert "Traceback" not in stdout + stderr
    assert not out.exists()


def test_a_multiple_choice_file_still_has_no_match_rule(tmp_path: Path) -> None:
    task = load_task(write_tiny_task(tmp_path / "mc.jsonl", 4))
    assert task.kind == "choice" and task.match is None and all(not it.open for it in task.items)


def test_kill_9_during_an_open_ended_calibration_then_resume(tmp_path: Path) -> None:
    """issue 25 item 5: kill -9 at random moments of an open-ended `calibrate`, rerun each time with the same
    arguments: the input is never touched, the output is absent or complete, no temporary file is left, and
    the run that completes resumes from the checkpoint to the result of an uninterrupted run."""
    import random

    from test_reliability import _check_output, _sha, _tensor_data, _zt, kill_calibrate_repeatedly

    model = make_tiny_llama(tmp_path / "mid.gguf", n_layer=4, n_head=8, n_head_kv=4, head_dim=32, n_ff=256)
    before, data = _sha(model.path), _tensor_data(model.path)
    words = ["one", "two", "three", "cat", "dog", "mat", "hello", "world"]
    prompts = _prompts(240, 4)
    rows = [{"prompt": f"the {p} sat on the", "answers": [f" {words[i % 8]}"]} for i, p in enumerate(prompts)]
    task = _write(tmp_path / "open.jsonl", rows)
    task_sha = _sha(task)
    args = ["--threads", "1", "--objective", "answer-logprob", "--grid-up", "1.5,2,3,4", "--grid-down", "0.5",
            "--no-early-stop", "--n-gen", "4", "--force", "--quiet", "--json"]  # fmt: skip
    ref_out = tmp_path / "ref" / "tuned.gguf"
    ref_out.parent.mkdir()
    t0 = time.monotonic()
    res = _zt("calibrate", model.path, "--task", task, "-o", ref_out, *args)
    t_ref = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    ref = json.loads(res.stdout)
    ref_bias = read_model_info(ref_out).biases
    assert ref_bias is not None and np.any(ref_bias)

    out_dir = tmp_path / "run"
    out_dir.mkdir()
    out, rep = out_dir / "tuned.gguf", out_dir / "tuned.report"
    run_args: list[str | Path] = ["calibrate", model.path, "--task", task, "-o", out, *args]
    allowed = ("tuned.gguf", "checkpoint.json", "report.json", "heatmap.png", "accuracy.png", "report.html")
    delays = (0.2 * t_ref, 0.7 * t_ref)
    phases = kill_calibrate_repeatedly(
        run_args, out, rep, allowed, ref_bias, data, delays, random.Random(7), 5
    )
    res = _zt(*run_args)
    assert res.returncode == 0, res.stderr[-2000:]
    final = json.loads(res.stdout)
    _check_output(out, ref_bias, data)
    for key in ("chosen", "baseline", "tuned", "delta", "scoring"):
        assert final[key] == ref[key], key
    assert _sha(model.path) == before and _sha(task) == task_sha
    assert any(p.endswith("candidates done") and not p.startswith("0 ") for p in phases), phases
