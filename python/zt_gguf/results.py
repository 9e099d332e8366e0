"""The typed results of the library's two jobs: :class:`Calibration` (calibrate) and :class:`Evaluation`
(evaluate), and the records their stages pass along. Plain data: nothing here scores or writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .comparison import Comparison
from .corrections import Correction, LogitBias
from .metrics import Summary
from .report import Workers  # the report records the workers as they are
from .search import SearchResult
from .tasks import Item


class Delta(NamedTuple):
    """tuned - baseline on the same items, with its paired bootstrap 95% interval."""

    delta: float
    lo: float
    hi: float

    def to_dict(self) -> dict[str, float]:
        return {"delta": self.delta, "lo": self.lo, "hi": self.hi}


@dataclass(frozen=True)
class Plan:
    """What a calibration will do, decided before any model is opened (calibrate.plan_calibration)."""

    mode: str  # "supervised" | "unsupervised"
    calib: list[Item]  # the items the search sees
    held: list[Item]  # the labelled items that check the pick (empty: unverified)
    stops: list[str]  # stop strings for generation (the label words; a newline for open-ended tasks)
    warnings: list[str]
    kind: str = "choice"  # the task's kind (tasks.KINDS)
    n_gen: int = 4  # tokens generated per item under generate scoring
    content_free: list[Item] = field(default_factory=list)  # Contextual Calibration's prompts


@dataclass(frozen=True)
class HeldOut:
    """The untuned and the tuned model on the held-out items, under both scorings."""

    n: int
    baseline: Summary
    tuned: Summary
    delta: dict[str, Delta]  # per scoring ("generate", "choice")


@dataclass(frozen=True)
class Decision:
    """Whether the tuned file is written, and why not (calibrate.decide)."""

    improved: bool | None  # None: not verifiable (no labelled held-out items)
    write: bool
    reason: str | None  # why it is not written (None when it is)
    warning: str | None = None  # a free output-side correction does as well: use it instead


@dataclass(frozen=True)
class Written:
    """The files a calibration wrote (all in calibrate.write_outputs)."""

    tuned: Path | None = None
    profile: Path | None = None
    report_files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Calibration:
    """Everything calibrate() found, decided and wrote."""

    mode: str
    scoring: str  # "generate" | "choice"
    scoring_reason: str  # why this scoring (the user's choice, or what auto measured)
    objective: str
    result: SearchResult
    heldout: HeldOut | None
    n_calibration: int
    decision: Decision
    warnings: list[str]
    timings: dict[str, float]  # search_s, heldout_s, total_s
    comparison: Comparison | None = None  # the output-side baselines on the held-out items
    attention: str = ""  # where attention ran with the chosen biases (engine.describe_attention)
    gpu_layers: int = 0  # layers offloaded to a GPU backend
    workers: Workers | None = None
    written: Written = field(default_factory=Written)
    report: Any = None  # the report.Report written to the report folder (None: none requested)
    kind: str = "choice"  # the task's kind (tasks.KINDS)
    n_gen: int = 4  # tokens generated per item under generate scoring

    @property
    def improved(self) -> bool | None:
        return self.decision.improved

    @property
    def not_written_reason(self) -> str | None:
        if self.written.tuned is not None:
            return None
        return self.decision.reason or "no output requested"


class Example(NamedTuple):
    """One item of an open-ended evaluation: what the model continued the prompt with, and the verdict."""

    id: str
    prompt: str
    continuation: str
    references: list[str]
    correct: bool


@dataclass(frozen=True)
class Evaluation:
    """A model on a task (evaluate): both scorings, the stored correction and the label-free baselines."""

    model: Path
    task: Path
    n_items: int
    bias: str  # "off" | "stored" | "file"
    summary: Summary
    corrected: Summary | None  # with the stored logit bias (generate scoring), when there is one
    correction: Correction | LogitBias | None  # the output correction applied
    baselines: dict[str, Any] | None  # comparison rows as report.json writes them (None: not asked)
    attention: str
    gpu_layers: int
    seconds: float  # scoring the items once
    kind: str = "choice"  # the task's kind (tasks.KINDS)
    match: str | None = None  # open-ended: the match rule (summary.accuracy_generate is the exact match)
    n_gen: int = 4
    examples: list[Example] = field(default_factory=list)  # open-ended: a few items with continuations
    warnings: list[str] = field(default_factory=list)
