from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.colors import LogNorm
from PIL import Image

from zt_gguf import comparison
from zt_gguf.report import (
    ChosenSection,
    Delta,
    EvaluationsSection,
    HeldoutMetrics,
    ModelSection,
    Report,
    ReportError,
    ScoringSection,
    SearchSection,
    TaskSection,
    Workers,
    WrittenSection,
    format_summary,
    gamma_table,
    heatmap_text,
    heldout_metrics,
    write_report,
)
from zt_gguf.report.pictures import accuracy_figure, heatmap_figure, png_bytes

ANSI = re.compile(r"\x1b\[[0-9;]*m")
CHROMIUM = "/usr/bin/chromium"


def wilson(k: np.ndarray, n: int, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval of k/n, vectorised: (centre -+ half) / (1 + z^2/n)."""
    p = np.asarray(k, dtype=np.float64) / n
    centre = p + z**2 / (2 * n)
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return (centre - half) / (1 + z**2 / n), (centre + half) / (1 + z**2 / n)


def decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# --- gamma and the heat map ---------------------------------------------------------------------------------


def test_gamma_table():
    b = np.array([[0.0, math.log(2.0)], [-math.log(4.0), 1.0]], dtype=np.float32)
    g = gamma_table(b)
    assert g.dtype == np.float64 and g.shape == (2, 2)
    np.testing.assert_allclose(g, [[1.0, 2.0], [0.25, math.e]], rtol=1e-6)


def test_heatmap_image_is_gamma_per_layer_and_head():
    rng = np.random.default_rng(3)
    b = rng.normal(0.0, 0.3, size=(5, 7))
    b[1, 2] = np.nan
    fig = heatmap_figure(b, title="test map")
    ax = next(a for a in fig.axes if a.images)
    (image,) = ax.images
    data = image.get_array()
    assert data.shape == (5, 7)  # rows: layers, columns: heads
    np.testing.assert_allclose(np.ma.filled(data, np.nan), np.exp(b), rtol=1e-12)
    assert ax.get_xlabel() == "query head" and ax.get_ylabel() == "layer"
    assert ax.get_title() == "test map"
    # the colour bar: a second axes, labelled in gamma, on a log scale symmetric around gamma = 1
    (bar,) = [a for a in fig.axes if a is not ax]
    assert "gamma" in bar.get_ylabel()
    span = np.nanmax(np.abs(b))
    assert isinstance(image.norm, LogNorm)
    assert image.norm.vmin == pytest.approx(math.exp(-span))
    assert image.norm.vmax == pytest.approx(math.exp(span))
    assert image.norm(1.0) == pytest.approx(0.5)
    red, blue = image.cmap(image.norm(math.exp(span))), image.cmap(image.norm(math.exp(-span)))
    assert red[0] > 2 * max(red[1], red[2]) and blue[2] > 2 * max(blue[0], blue[1])
    mid = image.cmap(0.5)
    assert min(mid[:3]) > 0.9  # gamma = 1 is (nearly) white


def test_heatmap_scale_has_a_floor():
    fig = heatmap_figure(np.zeros((3, 2)))
    image = next(a for a in fig.axes if a.images).images[0]
    assert image.norm.vmax == pytest.approx(1.25) and image.norm.vmin == pytest.approx(1 / 1.25)


def test_heatmap_png_decodes():
    b = np.zeros((4, 3))
    b[0, 1], b[2, 2] = math.log(2.0), -math.log(2.0)
    img = decode_png(png_bytes(heatmap_figure(b)))
    assert img.shape[0] > 100 and img.shape[1] > 100
    r, g, bl = (img[..., i].astype(int) for i in range(3))
    assert ((r > bl + 100) & (r > g + 50)).sum() > 500  # the gamma = 2 cell
    assert ((bl > r + 100) & (bl > g + 30)).sum() > 500  # the gamma = 1/2 cell


def test_heatmap_rejects_bad_shapes():
    with pytest.raises(ValueError):
        heatmap_figure(np.zeros(5))
    with pytest.raises(ValueError):
        heatmap_figure(np.zeros((0, 3)))


# --- the accuracy chart -------------------------------------------------------------------------------------

N_HELD = 40
CORRECT = {  # correct answers out of N_HELD per method
    comparison.RowKey("untuned"): 20,
    comparison.RowKey("untuned", "label-offset"): 26,
    comparison.RowKey("tuned"): 31,
    comparison.RowKey("tuned", "label-offset"): 33,
}
SHIPPED = comparison.RowKey("tuned", "label-offset")


def make_comparison() -> dict:
    """A comparison as calibrate records it: rows from per-item predictions with CORRECT[key] right."""
    y = np.random.default_rng(0).integers(0, 2, N_HELD)
    rows = []
    for key, k in CORRECT.items():
        pred = y.copy()
        pred[k:] = 1 - pred[k:]
        rows.append(comparison.make_row(key, None, pred.tolist(), y, 2))
    comparison.with_deltas(rows, seed=0)
    verdict = comparison.verdict(rows, SHIPPED, seed=0)
    return comparison.Comparison("choice", rows, rows, SHIPPED, None, verdict, ["a note"]).to_dict()


def test_accuracy_chart_bars_and_wilson_intervals():
    fig = accuracy_figure(make_comparison())
    assert fig is not None
    ax = fig.axes[0]
    bars = next(c for c in ax.containers if hasattr(c, "patches") and c.patches)
    k = np.array(list(CORRECT.values()))
    widths = np.array([p.get_width() for p in bars.patches])
    np.testing.assert_allclose(widths, 100 * k / N_HELD, rtol=1e-12)
    errorbars = next(c for c in ax.containers if not hasattr(c, "patches"))
    segments = errorbars.lines[2][0].get_segments()
    ends = np.array([[s[0][0], s[1][0]] for s in segments])
    lo, hi = wilson(k, N_HELD)
    np.testing.assert_allclose(ends, 100 * np.stack([lo, hi], axis=1), rtol=1e-9)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    names = [comparison.describe(key) for key in CORRECT]
    assert labels[:3] == names[:3] and labels[3] == names[3] + "  (ships)"
    colours = [p.get_facecolor() for p in bars.patches]
    assert colours[3] not in colours[:3]  # the shipped row stands out
    assert "accuracy" in ax.get_xlabel() and "Wilson" in ax.get_xlabel()


def test_accuracy_chart_none_without_rows():
    assert accuracy_figure({}) is None
    assert accuracy_figure({"rows": [], "notes": ["no labels"]}) is None


# --- terminal -----------------------------------------------------------------------------------------------


def test_heatmap_text_plain():
    b = np.log(np.array([[1.0, 1.5, 0.5], [2.0, 1.0, 0.8]]))
    text = heatmap_text(b, color=False)
    lines = text.split("\n")
    assert len(lines) == 1 + 2
    assert "\x1b" not in text
    assert lines[0].split() == ["H0", "H1", "H2"]
    assert lines[1].split() == ["L0", "·", "1.50", "0.50"]
    assert lines[2].split() == ["L1", "2.00", "·", "0.80"]
    # cells line up under the header
    assert lines[0].index("H2") + 1 == lines[1].index("0.50") + 3


def test_heatmap_text_color():
    b = np.log(np.array([[1.0, 3.0], [0.3, 1.1]]))
    text = heatmap_text(b, color=True)
    assert "\x1b[48;5;" in text and "\x1b[0m" in text
    plain = ANSI.sub("", text)
    assert plain.split("\n") == heatmap_text(b, color=False).split("\n")
    assert "3.00" in plain and "0.30" in plain and "1.10" in plain


def test_heatmap_text_auto_color(monkeypatch):
    b = np.full((2, 2), 0.5)
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b" not in heatmap_text(b)
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert "\x1b[" in heatmap_text(b)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert "\x1b" not in heatmap_text(b)


# --- the report ---------------------------------------------------------------------------------------------


def make_report(**changes) -> Report:
    base = HeldoutMetrics.from_summary(
        {"n": 100, "accuracy_generate": 0.52, "accuracy_choice": np.float32(0.61), "invalid_rate": 0.03}
    )
    tuned = HeldoutMetrics.from_summary(
        {"n": 100, "accuracy_generate": 0.6, "accuracy_choice": 0.64, "invalid_rate": 0.01}
    )
    fields = dict(
        command=["zt-gguf", "calibrate", "model.gguf"],
        model=ModelSection(path="/m/model.gguf", n_layer=3, n_head=4, attention="CPU"),
        task=TaskSection(
            path="sst2.jsonl",
            sha256="ab" * 32,
            n_items=200,
            n_calibration=100,
            n_heldout=100,
            seed=0,
            holdout=0.5,
        ),
        search=SearchSection(method="paper", objective="accuracy-generate", settings={"grid": (1.25, 1.5)}),
        scoring=ScoringSection(primary="generate", reason="asked for", asked="generate", n_gen=4),
        baseline=base,
        tuned=tuned,
        delta={"accuracy_generate": Delta(delta=np.float64(0.08), interval=(0.02, 0.14))},
        chosen=ChosenSection(type="up", heads=[1, 3], gamma=np.float32(1.5), layers=(0, 3)),
        evaluations=EvaluationsSection(
            candidates=15, items_scored=1200, items_saved=np.int64(300), savings=0.2
        ),
        timings={"total": 12.5, "search": np.float64(10.0), "bad": float("nan")},
        warnings=["only 100 held-out items", "head 2 never selected"],
        written=WrittenSection(reason="no improvement"),
        baselines=make_comparison(),
    )
    fields.update(changes)
    return Report(**fields)


# report.json as zt-gguf wrote it before the output-side baselines, --scoring auto, --gpu-layers and Ray
# workers (commit 320cf5c), with the older single-metric delta
OLD_REPORT = {
    "version": "0.1.0",
    "command": ["zt-gguf", "calibrate", "m.gguf"],
    "model": {"path": "m.gguf", "n_layer": 2, "n_head": 4, "arch": "llama"},
    "task": {
        "path": "t.jsonl",
        "sha256": "cd" * 32,
        "n_items": 60,
        "n_calibration": 30,
        "n_heldout": 30,
        "seed": 0,
        "holdout": 0.5,
    },
    "mode": "supervised",
    "search": {"method": "paper", "objective": "accuracy-choice", "settings": {"probe_up": 1.5}},
    "scoring": {"primary": "choice", "n_gen": 4},
    "baseline": {
        "n": 30,
        "accuracy_generate": None,
        "accuracy_choice": 0.5,
        "invalid_rate": 0.1,
        "intervals": {"accuracy_generate": None, "accuracy_choice": [0.33, 0.67]},
    },
    "tuned": {
        "n": 30,
        "accuracy_generate": None,
        "accuracy_choice": 0.6,
        "invalid_rate": 0.1,
        "intervals": {"accuracy_generate": None, "accuracy_choice": [0.42, 0.75]},
    },
    "delta": {"metric": "accuracy_choice", "delta": 0.1, "interval": [-0.03, 0.2], "level": 0.95},
    "chosen": {
        "type": "down",
        "heads": [[0, 1], [1, 2]],
        "gamma": 0.8,
        "layers": [0, 2],
        "table": [[1.0, 0.8, 1.0, 1.0], [1.0, 1.0, 0.8, 1.0]],
    },
    "evaluations": {"candidates": 9, "items_scored": 270, "items_saved": 0, "savings": 0.0},
    "timings": {"total": 4.0},
    "warnings": [],
    "written": {"path": "out.gguf", "reason": None},
    "date": "2025-01-31T12:00:00Z",
    "biases": [[0.0, -0.22, 0.0, 0.0], [0.0, 0.0, -0.22, 0.0]],
}


def test_heldout_metrics_wilson():
    m = heldout_metrics({"n": 50, "accuracy_generate": 0.5, "accuracy_choice": None, "invalid_rate": 0.0})
    assert m["n"] == 50 and m["accuracy_choice"] is None and m["intervals"]["accuracy_choice"] is None
    lo, hi = wilson(np.array([25]), 50)
    assert m["intervals"]["accuracy_generate"] == pytest.approx([lo[0], hi[0]], rel=1e-12)
    assert list(m) == ["n", "accuracy_generate", "accuracy_choice", "invalid_rate", "intervals"]


def test_write_report_round_trip(tmp_path):
    r = make_report()
    b = np.zeros((3, 4), dtype=np.float32)
    b[:, 1] = b[:, 3] = np.float32(math.log(1.5))
    paths = write_report(tmp_path / "out" / "run1", r, b)
    folder = tmp_path / "out" / "run1"
    assert paths == {
        "report": folder / "report.json",
        "heatmap": folder / "heatmap.png",
        "accuracy": folder / "accuracy.png",
        "html": folder / "report.html",
    }
    assert sorted(p.name for p in folder.iterdir()) == [
        "accuracy.png",
        "heatmap.png",
        "report.html",
        "report.json",
    ]

    text = paths["report"].read_text("utf-8")
    data = json.loads(text)
    assert text.startswith('{\n  "version"')  # indent 2, field order kept
    assert list(data) == [
        "version", "command", "model", "task", "mode", "search", "scoring", "baseline", "tuned", "delta",
        "chosen", "evaluations", "timings", "warnings", "written", "baselines", "date", "biases",
    ]  # fmt: skip
    assert data["model"] == {
        "path": "/m/model.gguf",
        "n_layer": 3,
        "n_head": 4,
        "gpu_layers": 0,
        "attention": "CPU",
    }
    assert data["scoring"] == {"primary": "generate", "reason": "asked for", "asked": "generate", "n_gen": 4}
    assert data["search"]["workers"] is None and data["search"]["settings"]["grid"] == [1.25, 1.5]
    assert data["baseline"]["n"] == 100 and isinstance(data["baseline"]["n"], int)
    assert data["baseline"]["accuracy_choice"] == pytest.approx(0.61)
    lo, hi = wilson(np.array([61]), 100)
    assert data["baseline"]["intervals"]["accuracy_choice"] == pytest.approx([lo[0], hi[0]])
    assert data["delta"] == {"accuracy_generate": {"delta": pytest.approx(0.08), "interval": [0.02, 0.14]}}
    assert data["chosen"] == {"type": "up", "heads": [1, 3], "gamma": 1.5, "layers": [0, 3]}  # no "table"
    assert data["evaluations"]["items_saved"] == 300
    assert data["timings"]["bad"] is None  # strict JSON: NaN -> null
    assert data["written"] == {"path": None, "reason": "no improvement"}
    assert data["warnings"] == r.warnings
    assert data["baselines"]["shipped"] == str(SHIPPED) and len(data["baselines"]["rows"]) == 4
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["date"])
    np.testing.assert_allclose(data["biases"], b, rtol=1e-6)

    back = Report.from_dict(data)
    assert back.to_dict() == {k: v for k, v in data.items() if k != "biases"}
    assert back.chosen.layers == (0, 3) and back.tuned is not None and back.tuned.n == 100
    assert decode_png(paths["heatmap"].read_bytes()).size and decode_png(paths["accuracy"].read_bytes()).size


def test_report_without_heldout_items_writes_empty_sections(tmp_path):
    r = make_report(baseline=None, tuned=None, delta={}, baselines={})
    paths = write_report(tmp_path, r, np.zeros((3, 4)))
    data = json.loads(paths["report"].read_text())
    assert data["baseline"] == {} and data["tuned"] == {} and data["delta"] == {} and data["baselines"] == {}
    assert "accuracy" not in paths and not (tmp_path / "accuracy.png").exists()
    back = Report.from_dict(data)
    assert back.baseline is None and back.tuned is None and back.to_dict() == r.to_dict()


def test_old_report_json_loads():
    r = Report.from_dict(json.loads(json.dumps(OLD_REPORT)))
    assert r.model == ModelSection(path="m.gguf", n_layer=2, n_head=4)  # "arch" dropped, new keys default
    assert r.scoring == ScoringSection(primary="choice", n_gen=4) and r.scoring.reason is None
    assert r.search.workers is None and r.baselines == {}
    assert r.delta == {"accuracy_choice": Delta(delta=0.1, interval=(-0.03, 0.2))}
    assert r.chosen.heads == [(0, 1), (1, 2)] and r.chosen.table == OLD_REPORT["chosen"]["table"]
    assert r.tuned is not None and r.tuned.intervals.accuracy_choice == (0.42, 0.75)
    assert r.date == "2025-01-31T12:00:00Z"
    s = format_summary(r)
    assert "delta (choice): +10.0 points [-3.0, +20.0]" in s
    assert (
        "chosen: down 2 heads (L0.H1, L1.H2), layers 0-1, gamma 0.80, per-head table: 2 entries changed" in s
    )


def test_report_with_workers_round_trips():
    w = Workers(n=2, threads=1, nodes=["a", "b"], replaced=0)
    r = make_report(search=SearchSection(method="paper", objective="accuracy-choice", workers=w))
    data = json.loads(json.dumps(r.to_dict()))
    assert data["search"]["workers"] == {
        "n": 2,
        "threads": 1,
        "nodes": ["a", "b"],
        "replaced": 0,
        "address": None,
    }
    assert Report.from_dict(data).search.workers == w


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("model"), "no 'model' section"),
        (lambda d: d["task"].pop("n_items"), "task has no 'n_items'"),
        (lambda d: d.update(search=[1]), "search is not an object"),
        (lambda d: d["tuned"]["intervals"].update(accuracy_choice="x"), "tuned.intervals.accuracy_choice"),
    ],
)
def test_malformed_report_names_the_key(change, message):
    data = json.loads(json.dumps(OLD_REPORT))
    change(data)
    with pytest.raises(ReportError, match=re.escape(message)):
        Report.from_dict(data)


def test_write_report_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("no space")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_report(tmp_path / "r", make_report(), np.zeros((3, 4)))
    assert list((tmp_path / "r").iterdir()) == []


def test_format_summary():
    s = format_summary(make_report())
    lines = s.split("\n")
    assert all(line.strip() for line in lines)
    assert lines[0] == "zt-gguf 0.1.0: model.gguf (3 layers x 4 heads); attention on CPU, task sst2.jsonl"
    gen = next(line for line in lines if line.startswith("held-out accuracy (generate"))
    assert "52.0% [42.3, 61.5]" in gen and "-> 60.0%" in gen and "n=100" in gen
    choice = next(line for line in lines if line.startswith("held-out accuracy (choice"))
    assert "61.0% [51.2, 70.0]" in choice and "64.0%" in choice
    delta = next(line for line in lines if line.startswith("delta"))
    assert "+8.0 points" in delta and "[+2.0, +14.0]" in delta and "95%" in delta
    row = next(line for line in lines if "<- ships" in line)
    assert "ZeroTuning + per-label offset" in row and "82.5% [68.0, 91.3]" in row
    assert any(line.startswith("verdict: ZeroTuning + per-label offset") for line in lines)
    chosen = next(line for line in lines if line.startswith("chosen"))
    assert "up" in chosen and "H1" in chosen and "H3" in chosen and "gamma 1.50" in chosen
    assert "evaluations: 15 candidates, 1200 items scored (300 saved by early stopping)" in lines
    assert "time: 12.5 s" in lines
    assert "not written: no improvement" in lines
    assert "warning: only 100 held-out items" in lines and "warning: head 2 never selected" in lines


def test_format_summary_unlabelled_and_table():
    unlabelled = {"n": 40, "accuracy_generate": None, "accuracy_choice": None}
    r = make_report(
        mode="unsupervised",
        baseline=HeldoutMetrics.from_summary({**unlabelled, "invalid_rate": 0.1}),
        tuned=HeldoutMetrics.from_summary({**unlabelled, "invalid_rate": 0.05}),
        delta={"accuracy_generate": Delta(delta=0.05, interval=(-0.01, 0.1))},
        chosen=ChosenSection(type="table", heads=[], gamma=1.0, table=[[1.0, 1.5], [0.8, 1.0]]),
        written=WrittenSection(path="/tmp/out.gguf"),
        baselines={},
    )
    s = format_summary(r)
    assert "held-out accuracy (generate *): n/a -> n/a (n=40)" in s
    assert "invalid generations: 10.0% -> 5.0%" in s
    assert "+5.0 points" in s
    assert "2 entries changed" in s and "0.80-1.50" in s
    assert "written: /tmp/out.gguf" in s
    none = make_report(chosen=ChosenSection(type="none", heads=[], gamma=1.0))
    assert format_summary(none).count("chosen: none") == 1


# --- report.html --------------------------------------------------------------------------------------------


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_html_is_self_contained_and_escaped(tmp_path):
    r = make_report(warnings=["<script>alert(1)</script> & more"])
    paths = write_report(tmp_path, r, np.zeros((3, 4)), title="a <title>")
    page = paths["html"].read_text("utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert "<title>a &lt;title&gt;</title>" in page
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page) and "<link" not in page
    assert embedded_pngs(page) == [paths["accuracy"].read_bytes(), paths["heatmap"].read_bytes()]
    assert "ZeroTuning + per-label offset (calibration labels)" in page and "82.5%" in page
    assert "verdict: ZeroTuning + per-label offset" in page


def test_html_opens_in_a_headless_browser(tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    b = np.zeros((3, 4))
    b[0, 1], b[2, 2] = math.log(2.0), -math.log(2.0)
    paths = write_report(tmp_path / "rep", make_report(), b)
    page = paths["html"].read_text("utf-8")
    pictures = [decode_png(p) for p in embedded_pngs(page)]
    assert len(pictures) == 2 and all(p.shape[0] > 100 and p.shape[1] > 100 for p in pictures)

    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
           f"--screenshot={shot}", "--window-size=1200,1600", paths["html"].resolve().as_uri()]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    img = decode_png(shot.read_bytes()).astype(int)
    assert img.shape[:2] == (1600, 1200)
    not_white = (img < 245).any(axis=2)
    assert not_white.mean() > 0.05
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    # the browser drew both pictures: the chart's ZeroTuning bar and the heat map's deepest red (gamma = 2)
    tuned_blue = np.abs(img - [0x4C, 0x78, 0xA8]).sum(axis=2) < 12
    deep_red = (img[..., 0] > 80) & (img[..., 0] < 140) & (img[..., 1] < 20) & (img[..., 2] < 50)
    assert tuned_blue.sum() > 2000 and deep_red.sum() > 2000, (tuned_blue.sum(), deep_red.sum())
