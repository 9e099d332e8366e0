"""The pictures of a report, drawn with matplotlib: the gamma heat map and the held-out accuracy chart.

matplotlib is imported inside the functions (``import zt_gguf`` stays light) and draws on its Agg canvas,
with no pyplot state: a figure is a plain ``matplotlib.figure.Figure`` that :func:`png_bytes` encodes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .gamma import as_matrix, gamma_table, ln_span
from .text import row_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_LN_MAX = 700.0  # exp(700) is still a finite float64: the widest colour scale
_DPI = 110
_NAN_GREY = "0.6"
# the accuracy chart's bars: a method without ZeroTuning, with it, and the one that ships
_FREE_COLOUR = "#9aa5b1"
_TUNED_COLOUR = "#4c78a8"
_SHIPPED_COLOUR = "#e45756"


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure, dpi: int = _DPI) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def heatmap_figure(biases: np.ndarray | Sequence[Sequence[float]], *, title: str = "") -> Figure:
    """The heat map of gamma = exp(biases) [n_layer, n_head]: rows are layers (0 at the top), columns query
    heads. The colours diverge around gamma = 1 (white) on a log scale symmetric in ln gamma: red above 1,
    blue below, spanning the largest |ln gamma| and at least [1/GAMMA_FLOOR, GAMMA_FLOOR]; NaN is grey.
    The colour bar is labelled in gamma."""
    import matplotlib
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    b = as_matrix(biases)
    n_layer, n_head = b.shape
    span = min(ln_span(b), _LN_MAX)
    fig = _figure(min(max(4.0 + 0.3 * n_head, 6.0), 16.0), min(max(1.8 + 0.28 * n_layer, 3.5), 14.0))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad=_NAN_GREY)
    image = ax.imshow(
        gamma_table(b),
        cmap=cmap,
        norm=LogNorm(vmin=math.exp(-span), vmax=math.exp(span), clip=True),
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    # thin white lines between the cells
    ax.set_xticks(np.arange(-0.5, n_head, 1.0), minor=True)
    ax.set_yticks(np.arange(-0.5, n_layer, 1.0), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title or "first-token gamma per layer and query head")
    bar = fig.colorbar(image, ax=ax, label="gamma (log scale; 1 leaves a head as it is)")
    ticks = [math.exp(span * k / 2) for k in range(-2, 3)]
    bar.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
    bar.ax.minorticks_off()
    return fig


def accuracy_figure(comparison: Mapping[str, Any], *, title: str = "") -> Figure | None:
    """The held-out accuracy of every method of a comparison (``comparison.Comparison.to_dict()``, its
    primary scoring's rows) as horizontal bars in percent, with each row's 95% Wilson interval as error
    bars; the row that ships is red and its label says so. None when the comparison has no rows."""
    from matplotlib.patches import Patch

    rows = list(comparison.get("rows") or [])
    if not rows:
        return None
    shipped = comparison.get("shipped")
    acc = np.array([100 * float(r["accuracy"]) for r in rows])
    lo, hi = (100 * np.array([[float(v) for v in r["interval"]] for r in rows])).T
    colours = [
        _SHIPPED_COLOUR if r["key"] == shipped else _FREE_COLOUR if r.get("free") else _TUNED_COLOUR
        for r in rows
    ]
    labels = [row_name(r["key"]) + ("  (ships)" if r["key"] == shipped else "") for r in rows]

    fig = _figure(10.0, 1.6 + 0.42 * len(rows))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    ax.barh(y, acc, color=colours, height=0.65)
    ax.errorbar(acc, y, xerr=np.vstack([acc - lo, hi - acc]), fmt="none", ecolor="black", capsize=4, lw=1.2)
    ax.set_yticks(y, labels=labels)
    for label, r in zip(ax.get_yticklabels(), rows):
        if r["key"] == shipped:
            label.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"held-out {comparison.get('scoring', '')} accuracy (%), with its 95% Wilson interval")
    ax.grid(axis="x", color="0.88")
    ax.set_axisbelow(True)
    fig.legend(
        handles=[
            Patch(color=_FREE_COLOUR, label="without ZeroTuning"),
            Patch(color=_TUNED_COLOUR, label="with ZeroTuning"),
            Patch(color=_SHIPPED_COLOUR, label="ships"),
        ],
        loc="outside lower center",
        ncols=3,
        fontsize="small",
        frameon=False,
    )
    ax.set_title(title or "held-out accuracy per method")
    return fig
