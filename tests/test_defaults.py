"""The defaults on the embedded default model (Gemma 3 270M Q4_K_M) and the demo's label-word task.

`zt-gguf calibrate MODEL --task FILE` with no other option: the scoring is chosen from what the untuned model
generates (this base model names no label word in its greedy continuations, so generate scoring would score
every candidate 0), and the run says so, with the number of candidates and a time estimate, before the
search. With generate scoring forced, the early warning comes before the search is over. A 40-item slice of
the demo task keeps it to a minute or so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from zt_gguf import models, tasks


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model, linked into a folder of its own (the tuned file and report go next to it)."""
    d = tmp_path_factory.mktemp("gemma")
    link = d / "gemma-3-270m-q4_k_m.gguf"
    link.symlink_to(models.get("gemma-3-270m"))
    return link


def _slice(folder: Path, n: int) -> Path:
    lines = tasks.demo_task_path().read_text().splitlines(keepends=True)
    path = folder / "slice.jsonl"
    path.write_text("".join(lines[:n]))
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("zt-gguf")
    assert exe, "the zt-gguf console script is not on PATH"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=900)


def test_calibrate_with_no_options_on_the_default_model(gemma: Path) -> None:
    task = _slice(gemma.parent, 40)
    res = _run("calibrate", str(gemma), "--task", str(task))
    assert res.returncode == 0, res.stderr[-3000:]
    err = res.stderr
    m = re.search(r"scoring: (\w+) \(the untuned model names a label in (\d+)% of (\d+) greedy", err)
    assert m, err[-3000:]
    assert m.group(1) == "choice" and int(m.group(2)) <= 50  # Gemma 270M base names no label word
    # before the search: the number of candidates and a time estimate (from the first chunk)
    plan = re.search(r"search paper: up to (\d+) candidates on (\d+) calibration items", err)
    est = re.search(r"first chunk scored in [\d.]+ s: the search takes up to \d+ (s|min)", err)
    assert plan and est, err[-3000:]
    assert err.index(plan.group(0)) < err.index(est.group(0))
    assert int(plan.group(1)) == 1 + 2 * 4 + 9  # baseline, 2 probes per head (4 heads), the larger grid
    assert "cannot tell them apart" not in err
    rep = json.loads((gemma.parent / "gemma-3-270m-q4_k_m.zt.report" / "report.json").read_text())
    assert rep["scoring"]["primary"] == "choice" and rep["scoring"]["asked"] == "auto"
    # the candidates differ on the calibration items: the search had something to choose from
    assert rep["evaluations"]["candidates"] >= 10
    rows = {r["key"]: r for r in rep["baselines"]["rows"]}
    assert {"untuned", "tuned", "untuned+batch-heldout", "untuned+contextual"} <= set(rows)
    # written exactly when the verdict says ZeroTuning beats the best free baseline
    assert bool(rep["written"]["path"]) == rep["baselines"]["verdict"]["beats"]


def test_forced_generate_scoring_warns_early(gemma: Path, tmp_path: Path) -> None:
    task = _slice(tmp_path, 40)
    res = _run(
        "calibrate", str(gemma), "--task", str(task), "--scoring", "generate", "-o", str(tmp_path / "t.gguf")
    )
    assert res.returncode == 0, res.stderr[-3000:]
    err = res.stderr
    warn = err.find("cannot tell them apart")
    assert warn > 0, err[-3000:]
    # early: before the held-out check and the summary
    assert "first chunk scored in" in err[:warn]
    assert "held-out accuracy" in res.stdout
