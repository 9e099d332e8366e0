"""The zt-gguf command line end to end: on a tiny generated model and on SmolLM2-135M with an SST-2 slice."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from zt_gguf import cli, engine, gguf_meta, metrics, tasks
from zt_gguf.testing import make_tiny_llama, write_tiny_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonl"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _task(path: Path, n: int, seed: int = 0) -> Path:
    return write_tiny_task(path, n, seed=seed)


def _run(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli.main, list(args), catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("cli") / "tiny.gguf", n_layer=3, seed=11).path


def test_help_has_examples() -> None:
    for cmd in ("calibrate", "eval", "show", "apply", "strip", "demo", "tools"):
        code, out, _ = _run(cmd, "--help")
        assert code == 0 and "Example" in out, cmd


def test_calibrate_writes_a_tuned_model_that_reproduces_the_report(tiny: Path, tmp_path: Path) -> None:
    task = _task(tmp_path / "task.jsonl", 60)
    out = tmp_path / "tuned.gguf"
    before = _sha(tiny)
    code, stdout, stderr = _run(
        "calibrate",
        str(tiny),
        "--task",
        str(task),
        "-o",
        str(out),
        "--force",
        "--scoring",
        "choice",
        "--objective",
        "logprob",
        "--threads",
        "1",
        "--grid-up",
        "2,4",
        "--grid-down",
        "0.25,0.5",
        "--json",
        "--quiet",
    )
    assert code == 0, stderr
    rep = json.loads(stdout)
    assert _sha(tiny) == before  # the input is never modified
    assert rep["task"]["n_calibration"] + rep["task"]["n_heldout"] == 60
    assert Path(rep["report_files"]["heatmap"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # with --force the file is written exactly when the search moved off the baseline (both outcomes are
    # checked: which one a random model gives is not known in advance)
    moved = rep["chosen"]["type"] != "none"
    assert out.exists() == moved and (rep["written"]["path"] is not None) == moved, rep["written"]
    if moved:
        info = gguf_meta.read_model_info(out)
        assert info.biases is not None and np.any(info.biases)
        assert info.provenance["mode"] == "supervised"
        assert info.provenance["task_sha256"] == _sha(task)
    else:
        assert "kept the baseline" in rep["written"]["reason"]

    # the tuned file loaded as it is (the untuned model when the search kept the baseline) reproduces the
    # reported held-out accuracy
    items = tasks.load_task(task).items
    _, held = tasks.split_items(items, rep["task"]["holdout"], rep["task"]["seed"])
    ctx = engine.Context(engine.Model(out if moved else tiny), n_threads=1)
    results = metrics.item_results(ctx.score(held, n_gen=4), held)
    summary = metrics.summarize(results, held)
    assert summary.accuracy_choice == pytest.approx(rep["tuned"]["accuracy_choice"], abs=1e-9)


def test_calibrate_probe_items_scores_the_probes_on_the_first_items(tiny: Path, tmp_path: Path) -> None:
    task = _task(tmp_path / "task.jsonl", 100)  # 70 calibration items: chunks of 32, 32 and 6

    def run(*extra: str) -> dict:
        code, stdout, stderr = _run(
            "calibrate", str(tiny), "--task", str(task), "-o", str(tmp_path / "t.gguf"),
            "--scoring", "choice", "--objective", "logprob", "--threads", "1",
            "--grid-up", "2,4", "--grid-down", "0.25,0.5", "--no-early-stop", "--no-resume",
            "--json", "--quiet", *extra,
        )  # fmt: skip
        assert code == 0, stderr
        return json.loads(stdout)

    full, cheap = run(), run("--probe-items", "20")
    n_head = gguf_meta.read_model_info(tiny).n_head
    n_cal = full["task"]["n_calibration"]
    assert n_cal == 70 and cheap["search"]["settings"]["probe_items"] == 20
    # 2 probes per head on the first 32 items (20 rounded up to a chunk) instead of all 70
    saved = 2 * n_head * (n_cal - 32)
    assert cheap["evaluations"]["items_scored"] == full["evaluations"]["items_scored"] - saved


def test_apply_show_strip_round_trip_on_a_known_bias(tiny: Path, tmp_path: Path) -> None:
    """A tuned file made from a known bias matrix (apply --from a JSON file), then show / strip / apply
    checked against that matrix, read a second way with the gguf package's own reader."""
    from gguf import GGUFReader

    before = _sha(tiny)
    known = np.random.default_rng(3).normal(0.0, 0.7, (3, 4)).astype(np.float32)  # tiny: 3 layers x 4 heads
    bias_json = tmp_path / "bias.json"
    bias_json.write_text(json.dumps({"first_token_bias": known.tolist()}))
    tuned = tmp_path / "tuned.gguf"
    code, _, stderr = _run("apply", str(tiny), "--from", str(bias_json), "-o", str(tuned))
    assert code == 0, stderr
    field = GGUFReader(tuned).get_field("llama.attention.first_token_bias")
    assert field is not None
    np.testing.assert_array_equal(
        np.array([field.parts[i][0] for i in field.data], np.float32), known.ravel()
    )

    code, stdout, _ = _run("show", str(tuned), "--json")
    shown = json.loads(stdout)
    assert code == 0 and (shown["n_layer"], shown["n_head"]) == known.shape
    np.testing.assert_array_equal(np.array(shown["biases"], np.float32), known)
    np.testing.assert_allclose(shown["gamma"], np.exp(known.astype(np.float64)), rtol=1e-6)
    assert shown["provenance"]["applied_from"] == "bias.json"

    code, _, _ = _run("strip", str(tuned), "-o", str(tmp_path / "stripped.gguf"))
    assert code == 0 and _sha(tmp_path / "stripped.gguf") == before  # byte for byte the untuned model

    code, _, _ = _run("apply", str(tiny), "--from", str(tuned), "-o", str(tmp_path / "applied.gguf"))
    assert code == 0
    applied = GGUFReader(tmp_path / "applied.gguf").get_field("llama.attention.first_token_bias")
    assert applied is not None
    np.testing.assert_array_equal(
        np.array([applied.parts[i][0] for i in applied.data], np.float32), known.ravel()
    )
    assert _sha(tiny) == before  # the input is never modified


def test_calibrate_resumes_after_an_interruption(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = _task(tmp_path / "task.jsonl", 40, seed=1)
    args = [
        "calibrate",
        str(tiny),
        "--task",
        str(task),
        "-o",
        str(tmp_path / "t.gguf"),
        "--threads",
        "1",
        "--scoring",
        "choice",
        "--objective",
        "logprob",
        "--grid-up",
        "2",
        "--grid-down",
        "0.5",
        "--json",
        "--quiet",
        "--force",
        "--report",
        str(tmp_path / "rep"),
    ]
    code, stdout, _ = _run(
        *args, "--report", str(tmp_path / "straight"), "-o", str(tmp_path / "straight.gguf")
    )
    assert code == 0
    straight = json.loads(stdout)

    calls = {"n": 0}
    real = engine.Context.score

    def flaky(self: engine.Context, *a: object, **k: object) -> list[engine.Scores]:
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(engine.Context, "score", flaky)
    res = CliRunner().invoke(cli.main, args)  # click turns Ctrl-C into Abort (the entry point exits 130)
    assert res.exit_code != 0 and calls["n"] == 6
    assert (tmp_path / "rep" / "checkpoint.json").exists()
    assert not (tmp_path / "t.gguf").exists()  # nothing half-written

    calls["n"] = -(10**9)  # no more interruptions; count the calls of the resumed run
    code, stdout, _ = _run(*args)
    assert code == 0
    resumed = json.loads(stdout)
    assert resumed["chosen"] == straight["chosen"]
    assert resumed["tuned"] == straight["tuned"]
    assert calls["n"] + 10**9 < 40  # the completed candidates came from the checkpoint


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-model", "no such file"),
        ("not-gguf", "GGUF"),
        ("bad-line", ":3:"),
        ("answer-range", "out of range"),
        ("few-items", "at least 20"),
        ("output-is-input", "overwrite the input"),
    ],
)
def test_calibrate_errors_are_one_line(tiny: Path, tmp_path: Path, case: str, message: str) -> None:
    model, task = tiny, _task(tmp_path / "task.jsonl", 30)
    out = tmp_path / "out.gguf"
    if case == "missing-model":
        model = tmp_path / "nope.gguf"
    elif case == "not-gguf":
        model = tmp_path / "x.gguf"
        model.write_text("not a model")
    elif case == "bad-line":
        lines = task.read_text().splitlines()
        lines[2] = '{"prompt": "x", "choices": [" a", " b"], "answer": 0'
        task.write_text("\n".join(lines) + "\n")
    elif case == "answer-range":
        task.write_text(json.dumps({"prompt": "x", "choices": [" a", " b"], "answer": 5}) + "\n")
    elif case == "few-items":
        task = _task(tmp_path / "small.jsonl", 10)
    elif case == "output-is-input":
        out = tiny
    before = _sha(tiny)
    code, stdout, stderr = _run("calibrate", str(model), "--task", str(task), "-o", str(out), "--quiet")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zt-gguf: error: ") and message in lines[0], stderr
    assert "Traceback" not in stderr + stdout
    assert _sha(tiny) == before
    assert case == "output-is-input" or not out.exists()


def test_eval_reports_both_scorings(tiny: Path, tmp_path: Path) -> None:
    task = _task(tmp_path / "task.jsonl", 24)
    code, stdout, _ = _run(
        "eval", str(tiny), "--task", str(task), "--json", "--threads", "1", "--gpu-layers", "0"
    )
    assert code == 0
    out = json.loads(stdout)
    assert out["n"] == 24 and 0 <= out["accuracy_choice"] <= 1 and 0 <= out["invalid_rate"] <= 1
    assert out["bias"] == "off" and out["items_per_s"] > 0
    assert out["gpu_layers"] == 0 and out["attention"] == "CPU (no GPU offload)"


def test_tools_path() -> None:
    code, stdout, _ = _run("tools", "--path")
    assert code == 0 and (Path(stdout.strip()) / "libllama.so").exists()


@pytest.mark.skipif(not (DATA / "sst2.dev.jsonl").exists(), reason="../shared/data is not beside the repo")
def test_calibrate_smollm2_on_an_sst2_slice(tmp_path: Path) -> None:
    from zt_gguf import models

    model = models.smollm2_135m()
    task = tmp_path / "sst2.jsonl"
    task.write_text("".join((DATA / "sst2.dev.jsonl").read_text().splitlines(keepends=True)[:40]))
    code, stdout, stderr = _run(
        "calibrate",
        str(model),
        "--task",
        str(task),
        "-o",
        str(tmp_path / "s.gguf"),
        "--n-gen",
        "1",
        "--grid-up",
        "2",
        "--grid-down",
        "0.4",
        "--head-fraction",
        "0.4",
        "--json",
        "--quiet",
        "--force",
    )
    assert code == 0, stderr
    rep = json.loads(stdout)
    assert rep["baseline"]["n"] == 12 and rep["tuned"]["n"] == 12
    assert rep["evaluations"]["candidates"] >= 2 * 9 + 1  # baseline + two probes per head index
    if rep["written"]["path"]:
        assert gguf_meta.read_model_info(Path(rep["written"]["path"])).biases is not None
