"""The report folder of a calibration: report.json, the two pictures and report.html, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write_bytes
from .data import Report, to_jsonable
from .gamma import as_matrix
from .html import render_html
from .pictures import accuracy_figure, heatmap_figure, png_bytes

REPORT_JSON = "report.json"
HEATMAP_PNG = "heatmap.png"
ACCURACY_PNG = "accuracy.png"
REPORT_HTML = "report.html"

# the keys of write_report's answer
REPORT, HEATMAP, ACCURACY, HTML = "report", "heatmap", "accuracy", "html"


def write_report(
    folder: str | os.PathLike[str], report: Report, biases: np.ndarray, *, title: str | None = None
) -> dict[str, Path]:
    """Create folder and write in it report.json (the report + "biases": the ln gamma matrix), heatmap.png,
    accuracy.png (when the report has a comparison to draw) and report.html, each atomically; returns their
    paths under the keys REPORT, HEATMAP, ACCURACY (when written) and HTML."""
    out = Path(folder)
    b = as_matrix(biases)
    data = report.to_dict()
    data["biases"] = to_jsonable(b)
    text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    if title is None:
        name = Path(report.model.path).name
        title = f"{name}: first-token gamma" if name else "first-token gamma"
    heatmap = png_bytes(heatmap_figure(b, title=title))
    n = f" (n = {report.tuned.n})" if report.tuned is not None else ""
    chart = accuracy_figure(report.baselines, title=f"held-out accuracy per method{n}")
    accuracy = None if chart is None else png_bytes(chart)
    page = render_html(report, b, heatmap, accuracy, title=title)

    out.mkdir(parents=True, exist_ok=True)
    files = {REPORT: (REPORT_JSON, text.encode("utf-8")), HEATMAP: (HEATMAP_PNG, heatmap)}
    if accuracy is not None:
        files[ACCURACY] = (ACCURACY_PNG, accuracy)
    files[HTML] = (REPORT_HTML, page.encode("utf-8"))
    paths = {}
    for key, (name, content) in files.items():
        paths[key] = out / name
        atomic_write_bytes(paths[key], content)
    return paths
