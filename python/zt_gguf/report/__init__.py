"""Reports of a calibration run: the typed report and report.json (data), the terminal summary and gamma
table (text), the matplotlib pictures (pictures), report.html (html), the report folder (write)."""

from .data import (
    ChosenSection,
    Delta,
    EvaluationsSection,
    HeldoutMetrics,
    Intervals,
    ModelSection,
    Report,
    ReportError,
    ScoringSection,
    SearchSection,
    TaskSection,
    Workers,
    WrittenSection,
    heldout_metrics,
    to_jsonable,
    utc_now,
)
from .gamma import GAMMA_FLOOR, gamma_table
from .text import format_baselines, format_chosen, format_summary, heatmap_text
from .write import write_report

__all__ = [
    "GAMMA_FLOOR",
    "ChosenSection",
    "Delta",
    "EvaluationsSection",
    "HeldoutMetrics",
    "Intervals",
    "ModelSection",
    "Report",
    "ReportError",
    "ScoringSection",
    "SearchSection",
    "TaskSection",
    "Workers",
    "WrittenSection",
    "format_baselines",
    "format_chosen",
    "format_summary",
    "gamma_table",
    "heatmap_text",
    "heldout_metrics",
    "to_jsonable",
    "utc_now",
    "write_report",
]
