"""The typed report of one calibration run, and its report.json form.

A :class:`Report` is made of small section dataclasses whose fields are report.json's keys, in report.json's
order; ``Report.to_dict()`` is report.json (less "biases", which write_report adds) and ``Report.from_dict``
reads it back, report.json files of older versions included (a key they lack takes its default, a key this
version does not know is ignored). A section that was not recorded (no held-out items: no baseline, tuned)
is written as ``{}``, as report.json always had it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

import numpy as np

from .. import __version__
from ..stats import wilson_interval

Pair = tuple[float, float]  # (lo, hi) of an interval

# the two held-out accuracies of a report, as its keys name them
ACCURACY_GENERATE = "accuracy_generate"
ACCURACY_CHOICE = "accuracy_choice"


class ReportError(ValueError):
    """A report.json (or its dict) that cannot be read as a Report; the message names the section and key."""


def utc_now() -> str:
    """The current time, ISO 8601 UTC to the second ("2025-01-31T12:00:00Z")."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def to_jsonable(obj: Any) -> Any:
    """obj with numpy scalars/arrays, tuples, sets, paths and dataclasses turned into plain JSON values;
    non-finite floats become None (report.json is strict JSON)."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.bool_):
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


def _pair(value: Any, where: str) -> Pair | None:
    """(lo, hi) from a JSON [lo, hi] (None stays None)."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ReportError(f"report: {where} is not a [lo, hi] pair: {value!r}") from None
    return lo, hi


S = TypeVar("S", bound="_Section")


class _Section:
    """to_dict and from_dict of a section: a dataclass whose field names are the section's keys."""

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls: type[S], data: Any, where: str) -> S:
        """The section from its report.json object; where names it in errors ("model", "search.workers")."""
        if not isinstance(data, Mapping):
            raise ReportError(f"report: {where} is not an object: {data!r}")
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        for f in fields:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in data:
                raise ReportError(f"report: {where} has no {f.name!r}")
        kwargs = {f.name: data[f.name] for f in fields if f.name in data}
        return cls(**cls._typed(kwargs, where))

    @classmethod
    def _typed(cls, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
        """The JSON values turned into the fields' types (tuples, nested sections); most are already."""
        return kwargs


@dataclass(frozen=True, kw_only=True)
class ModelSection(_Section):
    """The model that was calibrated."""

    path: str
    n_layer: int
    n_head: int  # query heads per layer
    gpu_layers: int = 0  # layers offloaded to a GPU backend
    attention: str = ""  # where attention ran with the chosen biases (engine.describe_attention)


@dataclass(frozen=True, kw_only=True)
class TaskSection(_Section):
    """The task file and its split into calibration and held-out items."""

    path: str
    sha256: str
    n_items: int
    n_calibration: int
    n_heldout: int
    seed: int  # of the split
    holdout: float  # the held-out share asked for


@dataclass(frozen=True, kw_only=True)
class Workers(_Section):
    """The Ray workers of a distributed search."""

    n: int
    threads: int  # per worker
    nodes: list[str]
    replaced: int  # workers replaced after a failure
    address: str | None = None  # the Ray cluster's address; None: workers started on this machine


@dataclass(frozen=True, kw_only=True)
class SearchSection(_Section):
    """How the biases were searched."""

    method: str  # "paper" | a finer search (search.py)
    objective: str
    # The search method's own configuration (search.SearchResult.config), kept as the search wrote it: its
    # keys differ from one method to another and follow search.py, so a typed copy here would only lag.
    settings: Mapping[str, Any] = field(default_factory=dict)
    workers: Workers | None = None  # None (JSON null): the search ran in one process

    @classmethod
    def _typed(cls, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
        if kwargs.get("workers") is not None:
            kwargs["workers"] = Workers.from_dict(kwargs["workers"], f"{where}.workers")
        return kwargs


@dataclass(frozen=True, kw_only=True)
class ScoringSection(_Section):
    """How an item was scored."""

    primary: str  # "generate" | "choice": the scoring of the search and of the verdict
    reason: str | None = None  # why this scoring (the user's choice, or what --scoring auto measured)
    asked: str | None = None  # --scoring as given ("auto" | "generate" | "choice")
    n_gen: int  # tokens generated per item under generate scoring
    match: str | None = None  # open-ended tasks: the match rule of the exact match ("exact", "number", ...)
    chat: bool = False  # the prompts went through the model's chat template (--chat)
    system: str | None = None  # with chat: the system message

    def to_dict(self) -> dict[str, Any]:
        """Without the open-ended and chat keys where they do not apply (a multiple-choice report's shape)."""
        out = to_jsonable(self)
        for key, unset in (("match", None), ("chat", False), ("system", None)):
            if out[key] == unset:
                del out[key]
        return out


@dataclass(frozen=True, kw_only=True)
class Intervals(_Section):
    """The 95% Wilson intervals of the two held-out accuracies (None where the accuracy is None)."""

    accuracy_generate: Pair | None = None
    accuracy_choice: Pair | None = None

    @classmethod
    def _typed(cls, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
        return {k: _pair(v, f"{where}.{k}") for k, v in kwargs.items()}


@dataclass(frozen=True, kw_only=True)
class HeldoutMetrics(_Section):
    """One model's accuracy on the held-out items (proportions in [0, 1]; an accuracy is None when the
    items have no answers)."""

    n: int
    accuracy_generate: float | None  # an invalid generation counts as wrong
    accuracy_choice: float | None
    invalid_rate: float | None  # share of generations that name no choice
    intervals: Intervals = field(default_factory=Intervals)

    @classmethod
    def from_summary(cls, summary: Any, z: float = 1.96) -> HeldoutMetrics:
        """From a ``metrics.Summary`` (or a mapping of its fields), with Wilson intervals (1.96: 95%)."""
        get = summary.get if isinstance(summary, Mapping) else (lambda k: getattr(summary, k, None))
        n = int(get("n") or 0)
        acc: dict[str, float | None] = {}
        intervals: dict[str, Pair | None] = {}
        for key in (ACCURACY_GENERATE, ACCURACY_CHOICE):
            value = get(key)
            acc[key] = v = None if value is None else float(value)
            if v is None or n == 0 or not math.isfinite(v):
                intervals[key] = None
            else:
                intervals[key] = wilson_interval(int(round(v * n)), n, z)
        inv = get("invalid_rate")
        return cls(
            n=n,
            accuracy_generate=acc[ACCURACY_GENERATE],
            accuracy_choice=acc[ACCURACY_CHOICE],
            invalid_rate=None if inv is None else float(inv),
            intervals=Intervals(**intervals),
        )

    @classmethod
    def _typed(cls, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
        if "intervals" in kwargs:
            kwargs["intervals"] = Intervals.from_dict(kwargs["intervals"] or {}, f"{where}.intervals")
        return kwargs


@dataclass(frozen=True, kw_only=True)
class Delta(_Section):
    """tuned - baseline accuracy on the same held-out items, with its paired bootstrap 95% interval."""

    delta: float
    interval: Pair | None = None

    @classmethod
    def _typed(cls, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
        return {**kwargs, "interval": _pair(kwargs.get("interval"), f"{where}.interval")}


@dataclass(frozen=True, kw_only=True)
class ChosenSection(_Section):
    """The biases the search chose."""

    type: str  # "up" | "down" (the paper's head set) | "table" | "none" (the baseline: gamma = 1 everywhere)
    heads: Sequence[int | tuple[int, int]]  # head indices, or (layer, head) pairs
    gamma: float  # the paper's gamma for the heads
    layers: tuple[int, int] | None = None  # the searched layers, [start, end)
    table: list[list[float]] | None = None  # gamma per (layer, head), for the finer searches; else no key

    def to_dict(self) -> dict[str, Any]:
        out = to_jsonable(self)
        if self.table is None:
            del out["table"]
        return out

    @classmethod
    def _typed(cls, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
        heads = kwargs["heads"] or []
        kwargs["heads"] = [h if isinstance(h, int) else (int(h[0]), int(h[1])) for h in heads]
        if kwargs.get("layers") is not None:
            lo, hi = _pair(kwargs["layers"], f"{where}.layers") or (0, 0)
            kwargs["layers"] = (int(lo), int(hi))
        return kwargs


@dataclass(frozen=True, kw_only=True)
class EvaluationsSection(_Section):
    """What the search cost."""

    candidates: int  # distinct candidates evaluated
    items_scored: int  # over all candidates
    items_saved: int  # item scorings that early stopping saved
    savings: float | None = None  # items_saved / (items_scored + items_saved)


@dataclass(frozen=True, kw_only=True)
class WrittenSection(_Section):
    """The tuned GGUF: its path, or why nothing was written."""

    path: str | None = None
    reason: str | None = None


@dataclass(kw_only=True)
class Report:
    """Everything about one calibration run; the fields are report.json's keys, in its order."""

    version: str = __version__
    command: list[str] = field(default_factory=list)
    model: ModelSection
    task: TaskSection
    mode: str = "supervised"  # "supervised" | "unsupervised"
    search: SearchSection
    scoring: ScoringSection
    baseline: HeldoutMetrics | None = None  # untuned, on the held-out items; None: no held-out items
    tuned: HeldoutMetrics | None = None  # with the chosen biases, on the same items
    delta: dict[str, Delta] = field(default_factory=dict)  # per metric: ACCURACY_GENERATE, ACCURACY_CHOICE
    chosen: ChosenSection
    evaluations: EvaluationsSection
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (open set), "total"
    warnings: list[str] = field(default_factory=list)
    written: WrittenSection = field(default_factory=WrittenSection)
    # comparison.Comparison.to_dict(): every method's held-out accuracy and the verdict. Its rows and
    # keys are the comparison module's record, typed there (comparison.Row, Verdict); here it stays that
    # record, as eval --json also prints it. Empty: no comparison (unlabelled held-out items).
    baselines: Mapping[str, Any] = field(default_factory=dict)
    date: str = field(default_factory=utc_now)

    def to_dict(self) -> dict[str, Any]:
        """report.json's dict (less "biases"): every section a JSON object, {} where not recorded."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Section):
                out[f.name] = value.to_dict()
            elif value is None:
                out[f.name] = {}
            else:
                out[f.name] = to_jsonable(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """A Report from report.json's dict, this version's or an older one's; unknown keys, like "biases",
        are ignored. ReportError names a missing or malformed section or key."""
        if not isinstance(data, Mapping):
            raise ReportError("report: not a JSON object")
        for name in ("model", "task", "search", "scoring", "chosen", "evaluations"):
            if name not in data:
                raise ReportError(f"report: no {name!r} section")
        plain = {k: data[k] for k in _PLAIN_FIELDS if k in data}
        return cls(
            **plain,
            model=ModelSection.from_dict(data["model"], "model"),
            task=TaskSection.from_dict(data["task"], "task"),
            search=SearchSection.from_dict(data["search"], "search"),
            scoring=ScoringSection.from_dict(data["scoring"], "scoring"),
            baseline=HeldoutMetrics.from_dict(data["baseline"], "baseline") if data.get("baseline") else None,
            tuned=HeldoutMetrics.from_dict(data["tuned"], "tuned") if data.get("tuned") else None,
            delta=_read_deltas(data.get("delta") or {}),
            chosen=ChosenSection.from_dict(data["chosen"], "chosen"),
            evaluations=EvaluationsSection.from_dict(data["evaluations"], "evaluations"),
            written=WrittenSection.from_dict(data.get("written") or {}, "written"),
            baselines=dict(data.get("baselines") or {}),
        )


_PLAIN_FIELDS = ("version", "command", "mode", "timings", "warnings", "date")  # read as they are


def _read_deltas(data: Any) -> dict[str, Delta]:
    """report.json's "delta": a mapping metric -> {delta, interval}, or the older single form
    {"metric": ..., "delta": ..., "interval": ..., "level": 0.95}."""
    if not isinstance(data, Mapping):
        raise ReportError(f"report: delta is not an object: {data!r}")
    if "delta" in data:
        metric = str(data.get("metric", ACCURACY_GENERATE))
        return {metric: Delta.from_dict(data, "delta")}
    return {str(k): Delta.from_dict(v, f"delta.{k}") for k, v in data.items()}


def heldout_metrics(summary: Any, z: float = 1.96) -> dict[str, Any]:
    """The held-out metrics of a ``metrics.Summary`` (or a dict with its fields) as report.json and
    eval --json write them: n, accuracy_generate, accuracy_choice, invalid_rate, intervals."""
    return HeldoutMetrics.from_summary(summary, z).to_dict()
