"""report.html: one self-contained page of a report (inline CSS, the pictures as data URIs, nothing fetched),
which a browser opens from disk."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from .data import Report
from .text import format_chosen, format_summary, format_verdict, heatmap_text, row_name

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #555; }
.verdict { padding: .6em .9em; border-left: 5px solid #999; background: #f4f4f4; }
.verdict.beats { border-color: #2e8b57; background: #eef7f1; }
.verdict.loses { border-color: #c0392b; background: #fbefee; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { padding: .25em .8em; text-align: left; border-bottom: 1px solid #e4e4e4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.ships { background: #fdecea; font-weight: bold; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: 13px; }
"""


def data_uri(png: bytes) -> str:
    """A PNG as a data: URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _pct(p: Any) -> str:
    return "n/a" if p is None else f"{100 * float(p):.1f}%"


def _interval(iv: Sequence[float] | None) -> str:
    return "" if iv is None else f"[{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"


def _rows_table(rows: Sequence[Mapping[str, Any]], shipped: str | None) -> str:
    out = [
        "<table><tr><th>method</th><th>accuracy</th><th>95% Wilson interval</th>"
        "<th>vs ZeroTuning (paired 95%)</th><th></th></tr>"
    ]
    for r in rows:
        d = r.get("delta_vs_tuned") or {}
        delta = (
            f"{100 * d['delta']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
            if d and r["key"] != "tuned"
            else ""
        )
        ships = r["key"] == shipped
        cls = ' class="ships"' if ships else ""
        out.append(
            f"<tr{cls}><td>{escape(row_name(r['key']))}</td>"
            f"<td class=num>{_pct(r['accuracy'])}</td><td class=num>{_interval(r['interval'])}</td>"
            f"<td class=num>{escape(delta)}</td><td>{'ships' if ships else ''}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _verdict(report: Report) -> str:
    b = report.baselines
    parts = []
    if b.get("verdict"):
        v = b["verdict"]
        parts.append(
            f'<p class="verdict {"beats" if v["beats"] else "loses"}">{escape(format_verdict(v))}</p>'
        )
    else:
        parts.append(
            '<p class="verdict">no comparison with the free baselines (no labelled held-out items)</p>'
        )
    w = report.written
    written = f"written: {w.path}" if w.path else f"not written: {w.reason or 'no output asked for'}"
    parts.append(f"<p>{escape(written)}</p>")
    base, tuned = report.baseline, report.tuned
    if base is not None and tuned is not None:
        items = []
        for key, label in (("accuracy_generate", "generate"), ("accuracy_choice", "choice")):
            star = " (the primary scoring)" if report.scoring.primary == label else ""
            before, after = getattr(base, key), getattr(tuned, key)
            items.append(
                f"<li>{label}{star}: {_pct(before)} {_interval(getattr(base.intervals, key))} &rarr; "
                f"{_pct(after)} {_interval(getattr(tuned.intervals, key))}</li>"
            )
        parts.append(
            f"<p>held-out accuracy, untuned &rarr; tuned (n = {tuned.n}):</p><ul>{''.join(items)}</ul>"
        )
    return "\n".join(parts)


def render_html(
    report: Report, biases: np.ndarray, heatmap_png: bytes, accuracy_png: bytes | None, *, title: str
) -> str:
    """The page: the verdict, the comparison table and chart, the chosen biases and their heat map, the
    warnings and the terminal summary; every text HTML-escaped."""
    m, t, s = report.model, report.task, report.search
    meta = (
        f"model {Path(m.path).name} ({m.n_layer} layers x {m.n_head} query heads), task {Path(t.path).name} "
        f"({t.n_calibration} calibration / {t.n_heldout} held-out items); {report.mode} search {s.method} "
        f"on {s.objective}, {report.scoring.primary} scoring; zt-gguf {report.version}, {report.date}"
    )
    b = report.baselines
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">{escape(meta)}</p>',
        "<h2>Verdict</h2>",
        _verdict(report),
        "<h2>Held-out accuracy per method</h2>",
    ]
    if b.get("rows"):
        body.append(f"<p>{escape(str(b.get('scoring', '')))} accuracy on the held-out items:</p>")
        body.append(_rows_table(b["rows"], b.get("shipped")))
        if b.get("choice_rows"):
            body.append("<p>the same items, choice accuracy:</p>")
            body.append(_rows_table(b["choice_rows"], None))
    body.extend(f"<p>{escape(str(n))}</p>" for n in b.get("notes", []))
    if accuracy_png is not None:
        body.append(f'<p><img alt="held-out accuracy per method" src="{data_uri(accuracy_png)}"></p>')
    body += [
        "<h2>Chosen biases</h2>",
        f"<p>{escape(format_chosen(report.chosen))}</p>",
        f'<p><img alt="gamma per layer and query head" src="{data_uri(heatmap_png)}"></p>',
        f"<details><summary>gamma table</summary><pre>{escape(heatmap_text(biases, color=False))}</pre>"
        "</details>",
    ]
    if report.warnings:
        body.append("<h2>Warnings</h2><ul>")
        body.extend(f"<li>{escape(w)}</li>" for w in report.warnings)
        body.append("</ul>")
    body.append(
        f"<details><summary>summary as printed</summary><pre>{escape(format_summary(report))}</pre></details>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
