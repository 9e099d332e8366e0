"""A report for the terminal: the summary of calibrate, the comparison table, the gamma table of show."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .data import ACCURACY_CHOICE, ACCURACY_GENERATE, ChosenSection, Delta, HeldoutMetrics, Report
from .gamma import as_matrix, ln_span


def _pct(p: Any) -> str:
    return "n/a" if p is None or not math.isfinite(float(p)) else f"{100 * float(p):.1f}%"


def _interval_pct(iv: tuple[float, float] | None) -> str:
    return "" if iv is None else f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"


def _metric_pct(m: HeldoutMetrics | None, key: str) -> str:
    value = None if m is None else getattr(m, key)
    if m is None or value is None:
        return "n/a"
    return _pct(value) + _interval_pct(getattr(m.intervals, key))


def _fmt_delta(name: str, d: Delta) -> str:
    line = f"delta ({name.removeprefix('accuracy_')}): {100 * d.delta:+.1f} points"
    if d.interval is not None:
        line += f" [{100 * d.interval[0]:+.1f}, {100 * d.interval[1]:+.1f}] paired bootstrap 95%"
    return line


def _fmt_head(h: int | tuple[int, int]) -> str:
    if isinstance(h, (tuple, list)):
        return f"L{int(h[0])}.H{int(h[1])}"
    return f"H{int(h)}"


def format_chosen(chosen: ChosenSection) -> str:
    """One line: the chosen head set, its gamma and layers, or how much of a per-head table changed."""
    heads = list(chosen.heads)
    if chosen.type in ("none", "baseline") and chosen.table is None and not heads:
        return "chosen: none (the baseline, gamma = 1 everywhere)"
    parts = [f"chosen: {chosen.type}"]
    if heads:
        shown = ", ".join(_fmt_head(h) for h in heads[:8])
        more = f", ... (+{len(heads) - 8})" if len(heads) > 8 else ""
        parts.append(f"{len(heads)} head{'s' if len(heads) != 1 else ''} ({shown}{more})")
    if chosen.layers is not None:
        parts.append(f"layers {chosen.layers[0]}-{chosen.layers[1] - 1}")
    parts.append(f"gamma {chosen.gamma:.2f}")
    if chosen.table is not None:
        g = np.asarray(chosen.table, dtype=np.float64)
        changed = g[np.isfinite(g) & (g != 1.0)]
        if changed.size:
            parts.append(
                f"per-head table: {changed.size} entries changed, "
                f"gamma {changed.min():.2f}-{changed.max():.2f}"
            )
        else:
            parts.append("per-head table: no entry changed")
    return parts[0] + " " + ", ".join(parts[1:])


def row_name(key: str) -> str:
    """A comparison row's name for people ("ZeroTuning + per-label offset (calibration labels)"); an unknown
    key (from a newer report) as it is."""
    from ..comparison import describe

    try:
        return describe(key)
    except (KeyError, ValueError):
        return key


def format_verdict(v: Mapping[str, Any]) -> str:
    """The comparison's verdict in plain words: what ships against the best free baseline."""
    d = v["delta"]
    gap = f"{100 * d['delta']:+.1f} points [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
    if v["beats"]:
        return (
            f"verdict: {row_name(v['shipped'])} beats the best free baseline "
            f"({row_name(v['best_free'])}) by {gap}"
        )
    return (
        f"verdict: a free output-side correction is as good or better: {row_name(v['best_free'])} "
        f"{100 * v['best_free_accuracy']:.1f}% vs {row_name(v['shipped'])} "
        f"{100 * v['shipped_accuracy']:.1f}% ({gap})"
    )


def format_baselines(b: Mapping[str, Any], items: str = "held-out") -> list[str]:
    """The baselines table (a ``comparison.Comparison.to_dict()``): every method's held-out accuracy and its
    paired delta against ZeroTuning, and the verdict (what ships against the best free baseline)."""
    if not b or not b.get("rows"):
        return [f"baselines: {n}" for n in (b or {}).get("notes", [])]
    lines = [f"{items} {b['scoring']} accuracy of each method (delta vs ZeroTuning, paired 95%):"]
    tables = [b["rows"]] + ([b["choice_rows"]] if b.get("choice_rows") else [])
    for t, rows in enumerate(tables):
        if t == 1:
            lines.append("the same items, choice accuracy:")
        width = max(len(row_name(r["key"])) for r in rows)
        for r in rows:
            d = r.get("delta_vs_tuned") or {}
            mark = " <- ships" if t == 0 and r["key"] == b.get("shipped") else ""
            delta = (
                f"  {100 * d['delta']:+5.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
                if d and r["key"] != "tuned"
                else ""
            )
            iv = r["interval"]
            lines.append(
                f"  {row_name(r['key']):<{width}}  {100 * r['accuracy']:5.1f}% "
                f"[{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]{delta}{mark}"
            )
    if b.get("verdict"):
        lines.append(format_verdict(b["verdict"]))
    lines.extend(f"baselines: {n}" for n in b.get("notes", []))
    return lines


def _heldout_lines(report: Report) -> list[str]:
    """Held-out accuracy untuned -> tuned for each scoring (an open-ended task: its exact match alone)."""
    base, tuned = report.baseline, report.tuned
    lines: list[str] = []
    match = report.scoring.match
    if base is not None or tuned is not None:
        n = tuned.n if tuned is not None else base.n if base is not None else None
        scorings = [(ACCURACY_GENERATE, "generate"), (ACCURACY_CHOICE, "choice")]
        if match is not None:
            scorings = [(ACCURACY_GENERATE, f"exact match, {match} rule")]
        for key, label in scorings:
            star = " *" if report.scoring.primary == label or match is not None else ""
            lines.append(
                f"held-out accuracy ({label}{star}): {_metric_pct(base, key)} -> {_metric_pct(tuned, key)}"
                + (f" (n={n})" if n is not None else "")
            )
        if match is None:
            inv_base = None if base is None else base.invalid_rate
            inv_tuned = None if tuned is None else tuned.invalid_rate
            lines.append(f"invalid generations: {_pct(inv_base)} -> {_pct(inv_tuned)}")
    lines.extend(_fmt_delta(name, d) for name, d in report.delta.items())
    return lines


def format_summary(report: Report) -> str:
    """A short summary for the terminal, one fact per line: held-out accuracy baseline -> tuned for both
    scorings (95% intervals, in percent), the delta(s), the comparison, the chosen heads and gamma, the
    output, the warnings."""
    model, task, search = report.model, report.task, report.search
    head = f"zt-gguf {report.version}: {Path(model.path).name or 'model'}"
    head += f" ({model.n_layer} layers x {model.n_head} heads)"
    if model.attention:
        head += f"; attention on {model.attention}"
    head += f", task {Path(task.path).name or '?'}"
    lines = [head]
    bits = [report.mode, f"search {search.method} on {search.objective}"]
    if report.scoring.primary:
        bits.append(f"{report.scoring.primary} scoring" + (" (chat template)" if report.scoring.chat else ""))
    bits.append(f"{task.n_calibration} calibration / {task.n_heldout} held-out items")
    lines.append(", ".join(bits))

    lines.extend(_heldout_lines(report))
    lines.extend(format_baselines(report.baselines))
    lines.append(format_chosen(report.chosen))

    ev = report.evaluations
    bit = f"evaluations: {ev.candidates} candidates, {ev.items_scored} items scored"
    if ev.items_saved:
        bit += f" ({ev.items_saved} saved by early stopping)"
    lines.append(bit)
    if report.timings:
        seconds = [float(v) for v in report.timings.values() if v is not None]
        total = report.timings.get("total")
        lines.append(f"time: {float(total if total is not None else sum(seconds)):.1f} s")
    if report.written.path:
        lines.append(f"written: {report.written.path}")
    elif report.written.reason:
        lines.append(f"not written: {report.written.reason}")
    lines.extend(f"warning: {w}" for w in report.warnings)
    return "\n".join(lines)


# --- the gamma table of `zt-gguf show` ----------------------------------------------------------------------

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
    b = as_matrix(biases)
    n_layer, n_head = b.shape
    use = _use_color(color)
    vmax = ln_span(b)
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
