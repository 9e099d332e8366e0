"""Reports of a calibration run: report.json, a heat map of the biases (PNG and terminal), a short summary.

A bias matrix is float ``[n_layer, n_head]`` in logit units: ``b = ln(gamma)`` is added to the attention
logit of the first token, per layer and query head. ``gamma = 1`` (b = 0) leaves a head untouched.

* :func:`gamma_table`: ``exp(b)``.
* :func:`heatmap_png`: an RGB PNG heat map of ln(gamma) (rows: layers, columns: heads), diverging colours
  centred at 0 (white: gamma = 1; red: gamma > 1; blue: gamma < 1), symmetric scale ``max |b|`` with a floor
  of ln 1.25, a colour bar labelled in gamma, row/column ticks and labels ("L0", "H0"). Pure numpy + zlib:
  the PNG is encoded by hand (IHDR, IDAT, IEND with CRCs). :func:`heatmap_layout` gives the geometry.
* :func:`heatmap_text`: the same table for a terminal (gamma with 2 decimals, optional ANSI colours).
* :class:`Report`, :func:`write_report` (report.json + heatmap.png, atomic writes), :func:`format_summary`.

Shapes of the :class:`Report` dict fields (conventions; :func:`format_summary` tolerates missing keys):

* ``model``: path, arch, n_layer, n_head, sha256 (optional).
* ``task``: path, sha256, n_items, n_calibration, n_heldout, seed, holdout.
* ``search``: method, objective, settings (dict), workers (the Ray workers: n, threads, nodes, replaced,
  address; None in one process).
* ``scoring``: primary ("generate" | "choice"), n_gen.
* ``baseline`` / ``tuned``: held-out metrics, see :func:`heldout_metrics`: n, accuracy_generate,
  accuracy_choice, invalid_rate, intervals {"accuracy_generate": [lo, hi], "accuracy_choice": [lo, hi]}.
  Proportions are in [0, 1]; an accuracy is None when the items have no answers.
* ``delta``: tuned - baseline on the same held-out items with a paired bootstrap interval, either one
  ``{"metric": "accuracy_generate", "delta": d, "interval": [lo, hi], "level": 0.95, ...}`` or a mapping
  metric -> ``{"delta": d, "interval": [lo, hi]}``.
* ``chosen``: type ("up" | "down" | "table" | "none"), heads (head indices, or [layer, head] pairs), gamma,
  layers ([start, end), optional), table (per-(layer, head) gamma, for the finer searches; optional).
* ``evaluations``: candidates, items_scored, items_saved (by early stopping).
* ``timings``: seconds per stage, "total" for the whole run.
* ``written``: path (the output GGUF, or None) and reason (why nothing was written, or None).
* ``baselines``: the output-side baselines on the same held-out items (``baselines.Comparison.to_dict``):
  scoring, rows (key, model, free, correction, accuracy, interval, pred_counts, macro_f1, delta_vs_tuned),
  choice_rows (the choice-score rows under generate scoring, else None), shipped (the key of what ships),
  shipped_correction, verdict (shipped, best_free, their accuracies, delta with its interval, beats), notes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .fsutil import atomic_write_bytes

__all__ = [
    "GAMMA_FLOOR",
    "HeatmapLayout",
    "Report",
    "format_summary",
    "gamma_table",
    "heatmap_layout",
    "heatmap_png",
    "heatmap_text",
    "heldout_metrics",
    "to_jsonable",
    "utc_now",
    "write_report",
]

GAMMA_FLOOR = 1.25  # the colour scale spans at least gamma in [1/1.25, 1.25]


# --- the bias matrix ----------------------------------------------------------------------------------------


def _as_matrix(biases: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    b = np.asarray(biases, dtype=np.float64)
    if b.ndim != 2:
        raise ValueError(f"biases must be a 2-D [n_layer, n_head] matrix, got shape {b.shape}")
    return b


def gamma_table(biases: np.ndarray) -> np.ndarray:
    """gamma = exp(b), float64, same shape."""
    return np.exp(np.asarray(biases, dtype=np.float64))


def _scale(b: np.ndarray) -> float:
    """The symmetric colour scale: max |b| over the finite entries, at least ln(GAMMA_FLOOR)."""
    finite = np.abs(b[np.isfinite(b)])
    vmax = float(finite.max()) if finite.size else 0.0
    return max(vmax, math.log(GAMMA_FLOOR))


# --- colours ------------------------------------------------------------------------------------------------

# diverging stops from white (t = 0) to the saturated end (|t| = 1), after ColorBrewer RdBu
_RED_STOPS = np.array(
    [[255, 255, 255], [253, 219, 199], [244, 165, 130], [214, 96, 77], [178, 24, 43]], dtype=np.float64
)
_BLUE_STOPS = np.array(
    [[255, 255, 255], [209, 229, 240], [146, 197, 222], [67, 147, 195], [33, 102, 172]], dtype=np.float64
)
_NAN_RGB = (150, 150, 150)
_BG = (255, 255, 255)
_INK = (40, 40, 40)
_GRID = (215, 215, 215)
_FRAME = (110, 110, 110)


def _colormap(t: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] for t in [-1, 1] (clipped); NaN -> gray. t = 0 is exactly white."""
    t = np.asarray(t, dtype=np.float64)
    nan = np.isnan(t)
    tc = np.clip(np.where(nan, 0.0, t), -1.0, 1.0)
    pos = np.abs(tc) * (len(_RED_STOPS) - 1)
    i0 = np.minimum(np.floor(pos).astype(int), len(_RED_STOPS) - 2)
    frac = (pos - i0)[..., None]
    red = _RED_STOPS[i0] * (1 - frac) + _RED_STOPS[i0 + 1] * frac
    blue = _BLUE_STOPS[i0] * (1 - frac) + _BLUE_STOPS[i0 + 1] * frac
    rgb = np.where((tc >= 0)[..., None], red, blue)
    rgb[nan] = _NAN_RGB
    return np.rint(rgb).astype(np.uint8)


# --- a 3x5 bitmap font --------------------------------------------------------------------------------------

_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": ("###", "#.#", "#.#", "#.#", "###"),
    "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"),
    "3": ("###", "..#", ".##", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"),
    "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"),
    "7": ("###", "..#", "..#", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"),
    "9": ("###", "#.#", "###", "..#", "###"),
    "A": (".#.", "#.#", "###", "#.#", "#.#"),
    "B": ("##.", "#.#", "##.", "#.#", "##."),
    "C": (".##", "#..", "#..", "#..", ".##"),
    "D": ("##.", "#.#", "#.#", "#.#", "##."),
    "E": ("###", "#..", "##.", "#..", "###"),
    "F": ("###", "#..", "##.", "#..", "#.."),
    "G": (".##", "#..", "#.#", "#.#", ".##"),
    "H": ("#.#", "#.#", "###", "#.#", "#.#"),
    "I": ("###", ".#.", ".#.", ".#.", "###"),
    "J": ("..#", "..#", "..#", "#.#", ".#."),
    "K": ("#.#", "#.#", "##.", "#.#", "#.#"),
    "L": ("#..", "#..", "#..", "#..", "###"),
    "M": ("#.#", "###", "###", "#.#", "#.#"),
    "N": ("##.", "#.#", "#.#", "#.#", "#.#"),
    "O": (".#.", "#.#", "#.#", "#.#", ".#."),
    "P": ("##.", "#.#", "##.", "#..", "#.."),
    "Q": (".#.", "#.#", "#.#", "##.", ".##"),
    "R": ("##.", "#.#", "##.", "#.#", "#.#"),
    "S": (".##", "#..", ".#.", "..#", "##."),
    "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "U": ("#.#", "#.#", "#.#", "#.#", "###"),
    "V": ("#.#", "#.#", "#.#", "#.#", ".#."),
    "W": ("#.#", "#.#", "###", "###", "#.#"),
    "X": ("#.#", "#.#", ".#.", "#.#", "#.#"),
    "Y": ("#.#", "#.#", ".#.", ".#.", ".#."),
    "Z": ("###", "..#", ".#.", "#..", "###"),
    " ": ("...", "...", "...", "...", "..."),
    ".": ("...", "...", "...", "...", ".#."),
    ",": ("...", "...", "...", ".#.", "#.."),
    ":": ("...", ".#.", "...", ".#.", "..."),
    "-": ("...", "...", "###", "...", "..."),
    "+": ("...", ".#.", "###", ".#.", "..."),
    "=": ("...", "###", "...", "###", "..."),
    "_": ("...", "...", "...", "...", "###"),
    "/": ("..#", "..#", ".#.", "#..", "#.."),
    "(": (".#.", "#..", "#..", "#..", ".#."),
    ")": (".#.", "..#", "..#", "..#", ".#."),
    "[": ("##.", "#..", "#..", "#..", "##."),
    "]": (".##", "..#", "..#", "..#", ".##"),
    "<": ("..#", ".#.", "#..", ".#.", "..#"),
    ">": ("#..", ".#.", "..#", ".#.", "#.."),
    "%": ("#.#", "..#", ".#.", "#..", "#.#"),
    "'": (".#.", ".#.", "...", "...", "..."),
    "?": ("###", "..#", ".#.", "...", ".#."),
}
_GLYPH_BITS = {ch: np.array([[c == "#" for c in row] for row in rows]) for ch, rows in _GLYPHS.items()}


def _text_width(text: str, s: int) -> int:
    """Pixel width of text at font scale s (3s per glyph + s spacing)."""
    return max(0, len(text) * 4 * s - s)


def _draw_text(img: np.ndarray, x: int, y: int, text: str, s: int, rgb: tuple[int, int, int] = _INK) -> None:
    """Draw text with its top-left corner at (x, y); lower case is drawn as upper case, unknown chars as ?."""
    h, w = img.shape[:2]
    for k, ch in enumerate(text.upper()):
        bits = _GLYPH_BITS.get(ch, _GLYPH_BITS["?"])
        gx = x + k * 4 * s
        for r, c in zip(*np.nonzero(bits)):
            y0, x0 = y + r * s, gx + c * s
            if 0 <= y0 and y0 + s <= h and 0 <= x0 and x0 + s <= w:
                img[y0 : y0 + s, x0 : x0 + s] = rgb


# --- PNG layout and rendering -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeatmapLayout:
    """Pixel geometry of :func:`heatmap_png`. Cell (layer i, head j) covers
    x in [grid_x + j*cell, grid_x + (j+1)*cell], y in [grid_y + i*cell, grid_y + (i+1)*cell], with 1 px grid
    lines on its border, so the grid is n_head*cell + 1 px wide and n_layer*cell + 1 px high."""

    n_layer: int
    n_head: int
    cell: int
    scale: int  # font scale: a glyph is 3*scale x 5*scale px
    width: int
    height: int
    title_y: int | None
    grid_x: int
    grid_y: int
    grid_w: int
    grid_h: int
    row_stride: int  # a row label every row_stride layers
    col_stride: int  # a column label every col_stride heads
    bar_x: int
    bar_y: int
    bar_w: int
    bar_h: int

    def cell_center(self, layer: int, head: int) -> tuple[int, int]:
        """(x, y) of the centre pixel of a cell."""
        return (
            self.grid_x + head * self.cell + self.cell // 2,
            self.grid_y + layer * self.cell + self.cell // 2,
        )


def _stride(needed: int, cell: int) -> int:
    """The smallest power of two k with k * cell >= needed (labels every k rows/columns)."""
    k = 1
    while k * cell < needed:
        k *= 2
    return k


def _fmt_gamma_label(g: float) -> str:
    if g >= 100:
        return f"{g:.0f}"
    if g >= 10:
        return f"{g:.1f}"
    return f"{g:.2f}"


def _bar_labels(vmax: float) -> list[str]:
    return [_fmt_gamma_label(math.exp(vmax)), "1", _fmt_gamma_label(math.exp(-vmax))]


def heatmap_layout(
    n_layer: int, n_head: int, *, title: str = "", cell: int = 24, vmax: float | None = None
) -> HeatmapLayout:
    """The geometry of the heat map of an [n_layer, n_head] matrix (vmax: the colour scale, for the width
    of the colour-bar labels; default: the floor ln 1.25)."""
    if n_layer < 1 or n_head < 1:
        raise ValueError(f"need n_layer >= 1 and n_head >= 1, got {n_layer} x {n_head}")
    if cell < 4:
        raise ValueError(f"cell must be at least 4 px, got {cell}")
    s = max(1, round(cell / 12))
    glyph_h = 5 * s
    pad = 4 * s
    tick = 2 * s
    vmax = math.log(GAMMA_FLOOR) if vmax is None else vmax

    y = pad
    title_y = None
    if title:
        title_y = y
        y += glyph_h + 3 * s
    col_label_w = _text_width(f"H{n_head - 1}", s)
    col_stride = _stride(col_label_w + 3 * s, cell)
    grid_y = y + glyph_h + s + tick

    row_label_w = _text_width(f"L{n_layer - 1}", s)
    row_stride = _stride(glyph_h + s, cell)
    grid_x = pad + row_label_w + s + tick
    grid_w = n_head * cell + 1
    grid_h = n_layer * cell + 1

    bar_x = grid_x + grid_w + max(cell // 2, 4 * s)
    bar_w = max(cell // 2, 3 * s)
    bar_h = max(grid_h, 24 * s)
    labels_w = max(_text_width(t, s) for t in _bar_labels(vmax))
    bar_right = max(bar_x + bar_w + tick + s + labels_w, bar_x + _text_width("GAMMA", s))
    width = bar_right + pad
    if title:
        width = max(width, pad + _text_width(title, s) + pad)
    height = grid_y + max(grid_h, bar_h) + pad
    return HeatmapLayout(
        n_layer=n_layer,
        n_head=n_head,
        cell=cell,
        scale=s,
        width=width,
        height=height,
        title_y=title_y,
        grid_x=grid_x,
        grid_y=grid_y,
        grid_w=grid_w,
        grid_h=grid_h,
        row_stride=row_stride,
        col_stride=col_stride,
        bar_x=bar_x,
        bar_y=grid_y,
        bar_w=bar_w,
        bar_h=bar_h,
    )


def _render(b: np.ndarray, title: str, cell: int) -> np.ndarray:
    n_layer, n_head = b.shape
    vmax = _scale(b)
    lay = heatmap_layout(n_layer, n_head, title=title, cell=cell, vmax=vmax)
    s, tick, gh = lay.scale, 2 * lay.scale, 5 * lay.scale
    img = np.empty((lay.height, lay.width, 3), dtype=np.uint8)
    img[:] = _BG

    if title and lay.title_y is not None:
        _draw_text(img, (lay.width - _text_width(title, s)) // 2, lay.title_y, title, s)

    # cells: fill every cell (grid lines drawn over), then the lines
    colours = _colormap(b / vmax)
    x0, y0, c = lay.grid_x, lay.grid_y, cell
    block = np.repeat(np.repeat(colours, c, axis=0), c, axis=1)
    img[y0 : y0 + n_layer * c, x0 : x0 + n_head * c] = block
    for i in range(n_layer + 1):
        img[y0 + i * c, x0 : x0 + lay.grid_w] = _GRID
    for j in range(n_head + 1):
        img[y0 : y0 + lay.grid_h, x0 + j * c] = _GRID
    img[y0, x0 : x0 + lay.grid_w] = _FRAME
    img[y0 + lay.grid_h - 1, x0 : x0 + lay.grid_w] = _FRAME
    img[y0 : y0 + lay.grid_h, x0] = _FRAME
    img[y0 : y0 + lay.grid_h, x0 + lay.grid_w - 1] = _FRAME

    # row ticks and labels (left), column ticks and labels (top)
    for i in range(n_layer):
        yc = y0 + i * c + c // 2
        img[yc : yc + max(1, s // 2), x0 - tick : x0] = _FRAME
        if i % lay.row_stride == 0:
            label = f"L{i}"
            _draw_text(img, x0 - tick - s - _text_width(label, s), yc - gh // 2, label, s)
    for j in range(n_head):
        xc = x0 + j * c + c // 2
        img[y0 - tick : y0, xc : xc + max(1, s // 2)] = _FRAME
        if j % lay.col_stride == 0:
            label = f"H{j}"
            _draw_text(img, xc - _text_width(label, s) // 2, y0 - tick - s - gh, label, s)

    # colour bar: top = exp(vmax) (red), middle = 1 (white), bottom = exp(-vmax) (blue)
    bx, by, bw, bh = lay.bar_x, lay.bar_y, lay.bar_w, lay.bar_h
    t = 1.0 - 2.0 * np.arange(bh) / max(1, bh - 1)
    img[by : by + bh, bx : bx + bw] = _colormap(t)[:, None, :]
    img[by, bx : bx + bw] = _FRAME
    img[by + bh - 1, bx : bx + bw] = _FRAME
    img[by : by + bh, bx] = _FRAME
    img[by : by + bh, bx + bw - 1] = _FRAME
    _draw_text(img, bx, y0 - tick - s - gh, "GAMMA", s)
    # labels: the end ones inside the bar's span (clear of the "GAMMA" heading), the middle one centred
    ticks = (by, by + (bh - 1) // 2, by + bh - 1)
    for label, yy, ty in zip(_bar_labels(vmax), ticks, (by, ticks[1] - gh // 2, by + bh - gh)):
        img[yy : yy + max(1, s // 2), bx + bw : bx + bw + tick] = _FRAME
        _draw_text(img, bx + bw + tick + s, ty, label, s)
    return img


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _encode_png(img: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of a uint8 [height, width, 3] array (filter type 0 on every row)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError("need a uint8 [height, width, 3] array")
    h, w = img.shape[:2]
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)
    raw[:, 1:] = img.reshape(h, 3 * w)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
        + _png_chunk(b"IEND", b"")
    )


def heatmap_png(path: str | os.PathLike[str], biases: np.ndarray, *, title: str = "", cell: int = 24) -> Path:
    """Write an RGB PNG heat map of ln(gamma) = biases [n_layer, n_head] to path (atomically); returns path.

    Rows are layers ("L0" at the top), columns heads; white is gamma = 1, red gamma > 1, blue gamma < 1, on a
    symmetric scale of max |b| (at least ln 1.25); NaN cells are gray. The colour bar is labelled in gamma.
    The geometry is :func:`heatmap_layout` (with the matrix's scale).
    """
    b = _as_matrix(biases)
    out = Path(path)
    atomic_write_bytes(out, _encode_png(_render(b, title, cell)))
    return out


# --- terminal rendering -------------------------------------------------------------------------------------

# xterm-256 backgrounds, from light to saturated
_ANSI_RED = (224, 217, 210, 203, 160)
_ANSI_BLUE = (189, 153, 111, 68, 25)
_CELL_W = 6


def _use_color(color: bool | None) -> bool:
    if color is not None:
        return color
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _fmt_gamma_cell(bias: float) -> str:
    if math.isnan(bias):
        return "  nan"
    if bias == 0.0:
        return "  ·  "
    g = math.exp(bias) if bias < 700 else math.inf
    if g < 99.995:
        return f"{g:5.2f}"
    if g < 99999.5:
        return f"{g:5.0f}"
    return "  big"


def heatmap_text(biases: np.ndarray, *, color: bool | None = None) -> str:
    """The gamma table for a terminal: a header of head indices, then one line per layer ("L0" first) with
    gamma to 2 decimals per head ("·" where gamma = 1 exactly). With color (None: stdout is a terminal and
    NO_COLOR is not set) every cell gets an ANSI 256-colour background: red for gamma > 1, blue for
    gamma < 1, deeper with |ln gamma| relative to the largest (at least ln 1.25)."""
    b = _as_matrix(biases)
    n_layer, n_head = b.shape
    use = _use_color(color)
    vmax = _scale(b)
    label_w = max(3, len(f"L{n_layer - 1}"))
    header = " " * label_w + "".join(f"{'H' + str(j):>{_CELL_W}}" for j in range(n_head))
    lines = [header.rstrip()]
    for i in range(n_layer):
        cells = []
        for j in range(n_head):
            v = float(b[i, j])
            text = _fmt_gamma_cell(v)
            if not use:
                cells.append(" " + text)
            elif v == 0.0 or math.isnan(v):
                cells.append(" \x1b[2m" + text + "\x1b[0m")
            else:
                level = min(4, int(min(1.0, abs(v) / vmax) * 5 - 1e-9)) if math.isfinite(v) else 4
                bg = (_ANSI_RED if v > 0 else _ANSI_BLUE)[level]
                fg = "97" if level >= 3 else "30"
                cells.append(f" \x1b[48;5;{bg}m\x1b[{fg}m{text}\x1b[0m")
        lines.append(f"{'L' + str(i):<{label_w}}" + "".join(cells))
    return "\n".join(lines)


# --- the report ---------------------------------------------------------------------------------------------


def utc_now() -> str:
    """The current time, ISO 8601 UTC to the second ("2025-01-31T12:00:00Z")."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class Report:
    """Everything about one calibration run; see the module docstring for the keys of the dict fields."""

    version: str = __version__
    command: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    mode: str = "supervised"  # "supervised" | "unsupervised"
    search: dict[str, Any] = field(default_factory=dict)
    scoring: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    tuned: dict[str, Any] = field(default_factory=dict)
    delta: dict[str, Any] = field(default_factory=dict)
    chosen: dict[str, Any] = field(default_factory=dict)
    evaluations: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    written: dict[str, Any] = field(default_factory=lambda: {"path": None, "reason": None})
    baselines: dict[str, Any] = field(default_factory=dict)
    date: str = field(default_factory=utc_now)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (numpy values, tuples and paths converted; see :func:`to_jsonable`)."""
        return to_jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """A Report from a dict such as report.json's (unknown keys, like "biases", are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def to_jsonable(obj: Any) -> Any:
    """obj with numpy scalars/arrays, tuples, sets, paths and dataclasses turned into plain JSON values;
    non-finite floats become None (report.json is strict JSON)."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v) for v in items]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def heldout_metrics(summary: Any, z: float = 1.96) -> dict[str, Any]:
    """The held-out metrics dict of a report from a ``metrics.Summary`` (or a dict with its fields): n,
    accuracy_generate, accuracy_choice, invalid_rate and Wilson intervals of the two accuracies."""
    from .metrics import wilson_interval

    get = summary.get if isinstance(summary, Mapping) else (lambda k: getattr(summary, k, None))
    n = int(get("n") or 0)
    out: dict[str, Any] = {"n": n}
    intervals: dict[str, list[float] | None] = {}
    for key in ("accuracy_generate", "accuracy_choice"):
        acc = get(key)
        out[key] = None if acc is None else float(acc)
        if acc is None or n == 0 or not math.isfinite(acc):
            intervals[key] = None
        else:
            intervals[key] = list(wilson_interval(int(round(acc * n)), n, z))
    inv = get("invalid_rate")
    out["invalid_rate"] = None if inv is None else float(inv)
    out["intervals"] = intervals
    return out


def write_report(
    folder: str | os.PathLike[str], report: Report, biases: np.ndarray, *, title: str | None = None
) -> dict[str, Path]:
    """Create folder and write report.json (the report + "biases": the ln gamma matrix) and heatmap.png,
    each atomically; returns {"report": path, "heatmap": path}."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    b = _as_matrix(biases)
    data = report.to_dict()
    data["biases"] = to_jsonable(b)
    text = json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False, allow_nan=False) + "\n"
    report_path = out / "report.json"
    atomic_write_bytes(report_path, text.encode("utf-8"))
    if title is None:
        name = Path(str(report.model.get("path") or "")).name or str(report.model.get("arch") or "")
        title = f"{name}  first-token gamma" if name else "first-token gamma"
    png_path = heatmap_png(out / "heatmap.png", b, title=title)
    return {"report": report_path, "heatmap": png_path}


# --- the terminal summary -----------------------------------------------------------------------------------


def _pct(p: Any) -> str:
    return "n/a" if p is None or not math.isfinite(float(p)) else f"{100 * float(p):.1f}%"


def _pair(x: Any) -> tuple[float, float] | None:
    """(lo, hi) from a 2-sequence of finite numbers (list, tuple, array), else None."""
    if x is None or isinstance(x, (str, bytes, Mapping)):
        return None
    try:
        values = [float(v) for v in x]
    except (TypeError, ValueError):
        return None
    if len(values) != 2 or not all(math.isfinite(v) for v in values):
        return None
    return values[0], values[1]


def _interval_pct(iv: Any) -> str:
    pair = _pair(iv)
    return "" if pair is None else f" [{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]"


def _metric_pct(m: Mapping[str, Any], key: str) -> str:
    if m.get(key) is None:
        return "n/a"
    intervals = m.get("intervals") or {}
    return _pct(m.get(key)) + _interval_pct(intervals.get(key) if isinstance(intervals, Mapping) else None)


def _fmt_delta(name: str, d: Mapping[str, Any]) -> str | None:
    value = d.get("delta")
    if value is None:
        return None
    line = f"delta ({name.removeprefix('accuracy_')}): {100 * float(value):+.1f} points"
    iv = _pair(d.get("interval"))
    if iv is not None:
        level = float(d.get("level", 0.95))
        line += f" [{100 * iv[0]:+.1f}, {100 * iv[1]:+.1f}] paired bootstrap {100 * level:.0f}%"
    return line


def _fmt_head(h: Any) -> str:
    if isinstance(h, (list, tuple)) and len(h) == 2:
        return f"L{int(h[0])}.H{int(h[1])}"
    return f"H{int(h)}"


def _fmt_chosen(chosen: Mapping[str, Any]) -> str:
    kind = chosen.get("type")
    raw_heads = chosen.get("heads")
    heads = [] if raw_heads is None else list(raw_heads)
    table = chosen.get("table")
    if kind in (None, "none", "baseline") and table is None and not heads:
        return "chosen: none (the baseline, gamma = 1 everywhere)"
    parts = [f"chosen: {kind}" if kind else "chosen:"]
    if heads:
        shown = ", ".join(_fmt_head(h) for h in heads[:8])
        more = f", ... (+{len(heads) - 8})" if len(heads) > 8 else ""
        parts.append(f"{len(heads)} head{'s' if len(heads) != 1 else ''} ({shown}{more})")
    layers = _pair(chosen.get("layers"))
    if layers is not None:
        parts.append(f"layers {int(layers[0])}-{int(layers[1]) - 1}")
    if chosen.get("gamma") is not None:
        parts.append(f"gamma {float(chosen['gamma']):.2f}")
    if table is not None:
        g = np.asarray(table, dtype=np.float64)
        changed = g[np.isfinite(g) & (g != 1.0)]
        if changed.size:
            parts.append(
                f"per-head table: {changed.size} entries changed, "
                f"gamma {changed.min():.2f}-{changed.max():.2f}"
            )
        else:
            parts.append("per-head table: no entry changed")
    return parts[0] + (" " + ", ".join(parts[1:]) if len(parts) > 1 else "")


def _row_name(key: str) -> str:
    from .baselines import describe

    try:
        return describe(key)
    except KeyError:
        return key


def format_baselines(b: Mapping[str, Any], items: str = "held-out") -> list[str]:
    """The baselines table: every method's held-out accuracy and its paired delta against ZeroTuning, and
    the verdict (what ships against the best free baseline), in plain words."""
    if not b or not b.get("rows"):
        return [f"baselines: {n}" for n in (b or {}).get("notes", [])]
    lines = [f"{items} {b['scoring']} accuracy of each method (delta vs ZeroTuning, paired 95%):"]
    tables = [b["rows"]] + ([b["choice_rows"]] if b.get("choice_rows") else [])
    for t, rows in enumerate(tables):
        if t == 1:
            lines.append("the same items, choice accuracy:")
        width = max(len(_row_name(r["key"])) for r in rows)
        for r in rows:
            d = r.get("delta_vs_tuned") or {}
            mark = " <- ships" if t == 0 and r["key"] == b.get("shipped") else ""
            delta = (
                ""
                if r["key"] == "tuned"
                else f"  {100 * d['delta']:+5.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
                if d
                else ""
            )
            iv = r["interval"]
            lines.append(
                f"  {_row_name(r['key']):<{width}}  {100 * r['accuracy']:5.1f}% "
                f"[{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]{delta}{mark}"
            )
    v = b.get("verdict")
    if v:
        d = v["delta"]
        gap = f"{100 * d['delta']:+.1f} points [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
        if v["beats"]:
            lines.append(
                f"verdict: {_row_name(v['shipped'])} beats the best free baseline "
                f"({_row_name(v['best_free'])}) by {gap}"
            )
        else:
            lines.append(
                f"verdict: a free output-side correction is as good or better: {_row_name(v['best_free'])} "
                f"{100 * v['best_free_accuracy']:.1f}% vs {_row_name(v['shipped'])} "
                f"{100 * v['shipped_accuracy']:.1f}% ({gap})"
            )
    lines.extend(f"baselines: {n}" for n in b.get("notes", []))
    return lines


def format_summary(report: Report) -> str:
    """A short summary for the terminal, one fact per line: held-out accuracy baseline -> tuned for both
    scorings (95% intervals, in percent), the delta(s), the chosen heads and gamma, the output, warnings."""
    lines: list[str] = []
    model, task = report.model, report.task
    head = f"zt-gguf {report.version}"
    if model:
        name = Path(str(model.get("path") or "")).name or model.get("arch") or "model"
        dims = f" ({model['n_layer']} layers x {model['n_head']} heads)" if "n_layer" in model else ""
        head += f": {name}{dims}"
        if model.get("attention"):
            head += f"; attention on {model['attention']}"
    if task:
        head += f", task {Path(str(task.get('path') or '')).name or '?'}"
    lines.append(head)
    if task or report.search:
        bits = [report.mode]
        if report.search:
            bits.append(f"search {report.search.get('method', '?')} on {report.search.get('objective', '?')}")
        if report.scoring.get("primary"):
            bits.append(f"{report.scoring['primary']} scoring")
        if task.get("n_calibration") is not None:
            bits.append(f"{task['n_calibration']} calibration / {task.get('n_heldout', '?')} held-out items")
        lines.append(", ".join(bits))

    base, tuned = report.baseline, report.tuned
    n = tuned.get("n", base.get("n"))
    primary = report.scoring.get("primary")
    for key, label in (("accuracy_generate", "generate"), ("accuracy_choice", "choice")):
        if key not in base and key not in tuned:
            continue
        star = " *" if primary == label else ""
        lines.append(
            f"held-out accuracy ({label}{star}): {_metric_pct(base, key)} -> {_metric_pct(tuned, key)}"
            + (f" (n={n})" if n is not None else "")
        )
    if "invalid_rate" in base or "invalid_rate" in tuned:
        lines.append(
            f"invalid generations: {_pct(base.get('invalid_rate'))} -> {_pct(tuned.get('invalid_rate'))}"
        )

    delta = report.delta
    if "delta" in delta:
        line = _fmt_delta(str(delta.get("metric", "accuracy")), delta)
        if line:
            lines.append(line)
    else:
        for name, d in delta.items():
            if isinstance(d, Mapping) and (line := _fmt_delta(str(name), d)):
                lines.append(line)

    lines.extend(format_baselines(report.baselines))
    if report.chosen:
        lines.append(_fmt_chosen(report.chosen))
    ev = report.evaluations
    if ev:
        bit = (
            f"evaluations: {ev.get('candidates', '?')} candidates, {ev.get('items_scored', '?')} items scored"
        )
        if ev.get("items_saved"):
            bit += f" ({ev['items_saved']} saved by early stopping)"
        lines.append(bit)
    if report.timings:
        total = report.timings.get("total", sum(float(v) for v in report.timings.values()))
        lines.append(f"time: {float(total):.1f} s")
    written = report.written or {}
    if written.get("path"):
        lines.append(f"written: {written['path']}")
    elif written.get("reason"):
        lines.append(f"not written: {written['reason']}")
    lines.extend(f"warning: {w}" for w in report.warnings)
    return "\n".join(lines)
