from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from zt_gguf import report as rep
from zt_gguf.report import (
    Report,
    format_summary,
    gamma_table,
    heatmap_layout,
    heatmap_png,
    heatmap_text,
    heldout_metrics,
    write_report,
)

PNG_SIG = b"\x89PNG\r\n\x1a\n"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_png(path: Path) -> tuple[dict[str, int], np.ndarray]:
    """Parse an 8-bit RGB, non-interlaced PNG (filter types 0-4), checking the signature and every CRC."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIG
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for k, body in chunks if k == b"IDAT"))
    stride = 3 * w
    assert len(raw) == h * (stride + 1)
    img = np.zeros((h, stride), dtype=np.int64)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(h):
        ftype = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        out = line.copy() if ftype == 0 else np.zeros(stride, dtype=np.int64)
        for x in range(stride if ftype else 0):
            a = out[x - 3] if x >= 3 else 0
            b, c = prev[x], (prev[x - 3] if x >= 3 else 0)
            pred = {0: 0, 1: a, 2: b, 3: (a + b) // 2}.get(ftype)
            if ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            assert pred is not None, f"bad filter {ftype}"
            out[x] = (line[x] + pred) & 0xFF
        img[y], prev = out, out
    return {"width": w, "height": h}, img.reshape(h, w, 3).astype(np.uint8)


def pixel(img: np.ndarray, xy: tuple[int, int]) -> tuple[int, int, int]:
    x, y = xy
    return tuple(int(v) for v in img[y, x])  # type: ignore[return-value]


# --- gamma and PNG ------------------------------------------------------------------------------------------


def test_gamma_table():
    b = np.array([[0.0, math.log(2.0)], [-math.log(4.0), 1.0]], dtype=np.float32)
    g = gamma_table(b)
    assert g.dtype == np.float64 and g.shape == (2, 2)
    np.testing.assert_allclose(g, [[1.0, 2.0], [0.25, math.e]], rtol=1e-6)


def test_png_valid_layout_and_colours(tmp_path):
    b = np.zeros((4, 3), dtype=np.float32)
    b[0, 1] = math.log(2.0)
    b[2, 2] = -math.log(2.0)
    b[3, 0] = 0.01  # tiny but positive: still reddish
    out = heatmap_png(tmp_path / "h.png", b, title="test map", cell=20)
    assert out == tmp_path / "h.png"
    info, img = read_png(out)
    lay = heatmap_layout(4, 3, title="test map", cell=20, vmax=math.log(2.0))
    assert (info["width"], info["height"]) == (lay.width, lay.height)
    assert lay.grid_w == 3 * 20 + 1 and lay.grid_h == 4 * 20 + 1
    assert lay.grid_x + lay.grid_w <= lay.bar_x < lay.width and lay.grid_y + lay.grid_h <= lay.height

    assert pixel(img, lay.cell_center(0, 0)) == (255, 255, 255)
    assert pixel(img, lay.cell_center(1, 2)) == (255, 255, 255)
    r, g, bl = pixel(img, lay.cell_center(0, 1))
    assert r > bl + 100 and r > g
    r, g, bl = pixel(img, lay.cell_center(2, 2))
    assert bl > r + 100 and bl > g
    r, g, bl = pixel(img, lay.cell_center(3, 0))
    assert r > bl
    # the whole cell interior has the colour of its centre
    x, y = lay.cell_center(0, 1)
    half = lay.cell // 2 - 1
    patch = img[y - half + 1 : y + half, x - half + 1 : x + half].reshape(-1, 3)
    assert (patch == img[y, x]).all()
    # colour bar: red at the top, white in the middle, blue at the bottom (inside the frame)
    bx = lay.bar_x + lay.bar_w // 2
    top = pixel(img, (bx, lay.bar_y + 1))
    mid = pixel(img, (bx, lay.bar_y + (lay.bar_h - 1) // 2))
    bottom = pixel(img, (bx, lay.bar_y + lay.bar_h - 2))
    assert top[0] > top[2] and bottom[2] > bottom[0]
    assert min(mid) >= 250
    # some ink (labels, ticks) outside the grid
    left = img[:, : lay.grid_x - 1]
    assert (left.sum(axis=2) < 300).any()


def test_png_size_scales_with_cell(tmp_path):
    b = np.zeros((5, 7))
    sizes = {}
    for cell in (24, 26):  # same font scale: only the grid (and the bar, as tall as the grid) grow
        info, _ = read_png(heatmap_png(tmp_path / f"c{cell}.png", b, cell=cell))
        sizes[cell] = (info["width"], info["height"])
    assert sizes[26][0] - sizes[24][0] == 7 * 2 + (26 // 2 - 24 // 2) * 2
    assert sizes[26][1] - sizes[24][1] == 5 * 2


def test_png_all_zero_cells_all_white(tmp_path):
    b = np.zeros((6, 4), dtype=np.float32)
    _, img = read_png(heatmap_png(tmp_path / "z.png", b, cell=16))
    lay = heatmap_layout(6, 4, cell=16)
    for i in range(6):
        for j in range(4):
            x0, y0 = lay.grid_x + j * lay.cell + 1, lay.grid_y + i * lay.cell + 1
            interior = img[y0 : y0 + lay.cell - 1, x0 : x0 + lay.cell - 1]
            assert (interior == 255).all(), (i, j)


def test_png_nan_and_large_values(tmp_path):
    b = np.array([[np.nan, 50.0], [-50.0, 0.0]])
    info, img = read_png(heatmap_png(tmp_path / "n.png", b, cell=12))
    lay = heatmap_layout(2, 2, cell=12, vmax=50.0)
    assert (info["width"], info["height"]) == (lay.width, lay.height)
    r, g, bl = pixel(img, lay.cell_center(0, 0))
    assert r == g == bl and r < 255


def test_png_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError):
        heatmap_png(tmp_path / "x.png", np.zeros(5))
    with pytest.raises(ValueError):
        heatmap_png(tmp_path / "x.png", np.zeros((0, 3)))
    assert not (tmp_path / "x.png").exists()


def test_png_write_is_atomic(tmp_path, monkeypatch):
    b = np.ones((3, 2))
    target = tmp_path / "h.png"
    heatmap_png(target, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png"]
    before = target.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        heatmap_png(tmp_path / "new.png", b)
    with pytest.raises(OSError, match="disk full"):
        heatmap_png(target, -b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png"]  # no temp file, no new.png
    assert target.read_bytes() == before


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
    monkeypatch.setattr(rep.sys.stdout, "isatty", lambda: True, raising=False)
    assert "\x1b[" in heatmap_text(b)
    monkeypatch.setattr(rep.sys.stdout, "isatty", lambda: False, raising=False)
    assert "\x1b" not in heatmap_text(b)


# --- report -------------------------------------------------------------------------------------------------


def make_report() -> Report:
    base = {
        "n": np.int64(100),
        "accuracy_generate": np.float64(0.52),
        "accuracy_choice": np.float32(0.61),
        "invalid_rate": 0.03,
        "intervals": {"accuracy_generate": (0.423, 0.615), "accuracy_choice": np.array([0.512, 0.7])},
    }
    tuned = heldout_metrics(
        {"n": 100, "accuracy_generate": 0.6, "accuracy_choice": 0.64, "invalid_rate": 0.01}
    )
    return Report(
        command=["zt-gguf", "calibrate", "model.gguf"],
        model={"path": Path("/m/model.gguf"), "arch": "gemma3", "n_layer": np.int32(3), "n_head": 4},
        task={
            "path": "sst2.jsonl",
            "sha256": "ab" * 32,
            "n_items": 200,
            "n_calibration": 100,
            "n_heldout": 100,
            "seed": 0,
            "holdout": 0.5,
        },
        search={"method": "paper", "objective": "accuracy-generate", "settings": {"grid": (1.25, 1.5)}},
        scoring={"primary": "generate", "n_gen": 4},
        baseline=base,
        tuned=tuned,
        delta={"metric": "accuracy_generate", "delta": np.float64(0.08), "interval": [0.02, 0.14]},
        chosen={"type": "up", "heads": [1, 3], "gamma": np.float32(1.5), "layers": [0, 3]},
        evaluations={"candidates": 15, "items_scored": 1200, "items_saved": np.int64(300)},
        timings={"total": 12.5, "search": np.float64(10.0), "bad": float("nan")},
        warnings=["only 100 held-out items", "head 2 never selected"],
        written={"path": None, "reason": "no improvement"},
    )


def test_heldout_metrics_wilson():
    m = heldout_metrics({"n": 50, "accuracy_generate": 0.5, "accuracy_choice": None, "invalid_rate": 0.0})
    assert m["n"] == 50 and m["accuracy_choice"] is None and m["intervals"]["accuracy_choice"] is None
    lo, hi = m["intervals"]["accuracy_generate"]
    assert 0.35 < lo < 0.5 < hi < 0.65


def test_write_report_round_trip(tmp_path):
    r = make_report()
    b = np.zeros((3, 4), dtype=np.float32)
    b[:, 1] = b[:, 3] = np.float32(math.log(1.5))
    paths = write_report(tmp_path / "out" / "run1", r, b)
    assert set(paths) == {"report", "heatmap"}
    assert paths["report"] == tmp_path / "out" / "run1" / "report.json"
    assert sorted(p.name for p in paths["report"].parent.iterdir()) == ["heatmap.png", "report.json"]

    text = paths["report"].read_text("utf-8")
    data = json.loads(text)
    assert text.startswith('{\n  "version"')  # indent 2, field order kept
    assert list(data)[:3] == ["version", "command", "model"]
    assert data["model"] == {"path": "/m/model.gguf", "arch": "gemma3", "n_layer": 3, "n_head": 4}
    assert data["baseline"]["n"] == 100 and isinstance(data["baseline"]["n"], int)
    assert data["baseline"]["accuracy_choice"] == pytest.approx(0.61)
    assert data["baseline"]["intervals"]["accuracy_choice"] == [0.512, 0.7]
    assert data["delta"]["delta"] == pytest.approx(0.08)
    assert data["chosen"]["gamma"] == pytest.approx(1.5)
    assert data["search"]["settings"]["grid"] == [1.25, 1.5]
    assert data["timings"]["bad"] is None  # strict JSON: NaN -> null
    assert data["written"] == {"path": None, "reason": "no improvement"}
    assert data["warnings"] == r.warnings
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["date"])
    np.testing.assert_allclose(data["biases"], b, rtol=1e-6)

    back = Report.from_dict(data)
    assert back.to_dict() == {k: v for k, v in data.items() if k != "biases"}

    info, _ = read_png(paths["heatmap"])
    assert info["width"] > 0 and info["height"] > 0


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
    gen = next(line for line in lines if line.startswith("held-out accuracy (generate"))
    assert "52.0% [42.3, 61.5]" in gen and "-> 60.0%" in gen and "n=100" in gen
    choice = next(line for line in lines if line.startswith("held-out accuracy (choice"))
    assert "61.0% [51.2, 70.0]" in choice and "64.0%" in choice
    delta = next(line for line in lines if line.startswith("delta"))
    assert "+8.0 points" in delta and "[+2.0, +14.0]" in delta and "95%" in delta
    chosen = next(line for line in lines if line.startswith("chosen"))
    assert "up" in chosen and "H1" in chosen and "H3" in chosen and "gamma 1.50" in chosen
    assert "not written: no improvement" in lines
    assert "warning: only 100 held-out items" in lines and "warning: head 2 never selected" in lines


def test_format_summary_unlabelled_and_table():
    r = Report(
        mode="unsupervised",
        baseline={"n": 40, "accuracy_generate": None, "accuracy_choice": None, "invalid_rate": 0.1},
        tuned={"n": 40, "accuracy_generate": None, "accuracy_choice": None, "invalid_rate": 0.05},
        delta={"accuracy_generate": {"delta": 0.05, "interval": [-0.01, 0.1]}},
        chosen={"type": "table", "table": [[1.0, 1.5], [0.8, 1.0]]},
        written={"path": "/tmp/out.gguf", "reason": None},
    )
    s = format_summary(r)
    assert "held-out accuracy (generate): n/a -> n/a" in s
    assert "invalid generations: 10.0% -> 5.0%" in s
    assert "+5.0 points" in s
    assert "2 entries changed" in s and "0.80-1.50" in s
    assert "written: /tmp/out.gguf" in s
    assert format_summary(Report(chosen={"type": "none"})).count("chosen: none") == 1
