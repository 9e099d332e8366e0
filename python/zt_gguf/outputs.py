"""The one place a calibration writes files: the tuned GGUF (with its provenance), its profile, the report.

Every write is atomic (gguf_meta and fsutil write a temporary file and rename it), and happens after the
decision: an interrupted run leaves each output either absent or complete, and the input is never touched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, gguf_meta, profiles, report
from .comparison import Comparison
from .corrections import Correction, LogitBias
from .errors import UserError
from .options import CalibrateOptions
from .results import Calibration, Written
from .tasks import Task

CHECKPOINT_NAME = "checkpoint.json"


class OutputError(UserError, OSError):
    """An output that cannot be written where the user asked (a folder that cannot be made, no space)."""


@dataclass(frozen=True)
class Outputs:
    """Where a calibration writes. None: not written."""

    tuned: Path | None = None  # the tuned GGUF, written only when the decision says so
    report_dir: Path | None = None  # report.json, pictures, report.html, and the search's checkpoint
    profile: Path | None = None  # the tuned biases as a profile (a small GGUF, or JSON for a .json name)
    resume: bool = True  # continue from the checkpoint of an interrupted run with the same arguments
    command: tuple[str, ...] = ()  # the command line, recorded in the report

    @property
    def checkpoint(self) -> Path | None:
        return None if self.report_dir is None else self.report_dir / CHECKPOINT_NAME

    @classmethod
    def beside(
        cls, model: Path, tuned: Path | None = None, report_dir: Path | None = None, **kw: Any
    ) -> Outputs:
        """The defaults: MODEL.zt.gguf next to the model, and its report folder next to that."""
        tuned = tuned or model.with_name(f"{_stem(model)}.zt.gguf")
        return cls(tuned=tuned, report_dir=report_dir or tuned.with_name(f"{_stem(tuned)}.report"), **kw)


def _stem(path: Path) -> str:
    return path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name


def prepare(outputs: Outputs) -> None:
    """Make the report folder (it holds the checkpoint during the search); drop the checkpoint of an earlier
    run unless resuming."""
    if outputs.report_dir is None:
        return
    try:
        outputs.report_dir.mkdir(parents=True, exist_ok=True)
        if not outputs.resume and outputs.checkpoint is not None:
            outputs.checkpoint.unlink(missing_ok=True)
    except OSError as e:
        raise OutputError(
            f"{outputs.report_dir}: cannot use as the report folder: {e.strerror or e}"
        ) from None


def write_outputs(
    model_path: Path, task: Task, options: CalibrateOptions, outputs: Outputs, cal: Calibration
) -> Calibration:
    """Write what the decision allows: the tuned GGUF and its profile, then the report (which names them).
    Returns cal with what was written."""
    tuned = profile = None
    if cal.decision.write and outputs.tuned is not None:
        prov = provenance_of(task, options, cal)
        tuned = gguf_meta.write_tuned(model_path, outputs.tuned, cal.result.bias, prov)
        if outputs.profile is not None:
            profile = profiles.export_profile(tuned, outputs.profile)
    cal = replace(cal, written=Written(tuned=tuned, profile=profile))
    if outputs.report_dir is None:
        return cal
    rep = build_report(model_path, task, options, outputs, cal)
    try:
        files = report.write_report(
            outputs.report_dir, rep, cal.result.bias, title=f"{model_path.name}: gamma"
        )
    except OSError as e:
        raise OutputError(f"{outputs.report_dir}: cannot write the report: {e.strerror or e}") from None
    return replace(cal, report=rep, written=replace(cal.written, report_files=files))


Provenance = dict[str, str | int | float | bool]


def provenance_of(task: Task, options: CalibrateOptions, cal: Calibration) -> Provenance:
    """The zerotuning.* keys of a tuned file: what was searched, on what, and how it did held out."""
    r = cal.result
    prov: Provenance = {
        "version": __version__,
        "mode": cal.mode,
        "search": r.method,
        "objective": cal.objective,
        "scoring": cal.scoring,
        "kind": cal.kind,
        "task_file": task.path.name,
        "task_sha256": task.sha256,
        "n_calibration": cal.n_calibration,
        "n_heldout": cal.heldout.n if cal.heldout else 0,
        "seed": options.seed,
        "head_type": r.head_type,
        "heads": ",".join(str(h) for h in r.heads),
        "gamma": float(r.best_gamma),
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }
    if task.match is not None:
        prov["match"] = str(task.match)
    if options.chat:
        prov["chat"] = True
        if options.system:
            prov["system"] = options.system
    if cal.heldout is not None:
        prov["baseline_accuracy"] = float(getattr(cal.heldout.baseline, f"accuracy_{cal.scoring}"))
        prov["tuned_accuracy"] = float(getattr(cal.heldout.tuned, f"accuracy_{cal.scoring}"))
    prov.update(comparison_provenance(cal.comparison))
    return prov


def comparison_provenance(comparison: Comparison | None) -> dict[str, str | float]:
    """The zerotuning.* keys of the shipped output correction and the best free baseline."""
    if comparison is None or comparison.verdict is None:
        return {}
    v = comparison.verdict
    out: dict[str, str | float] = {
        "shipped": str(comparison.shipped),
        "best_free_baseline": str(v.best_free.key),
        "best_free_accuracy": float(v.best_free.accuracy),
        "shipped_accuracy": float(v.shipped.accuracy),
    }
    c = comparison.shipped_correction
    if isinstance(c, LogitBias):
        out["logit_bias"] = json.dumps(c.to_dict())
        out["logit_bias_args"] = " ".join(c.cli_args())
    elif isinstance(c, Correction):
        out["choice_correction"] = json.dumps(c.to_dict())
    return out


NO_BASELINE_OPEN = (
    "no output-side baseline applies to free-form answers (there is no label prior to correct): the untuned "
    "model is the baseline"
)


def _baselines_section(cal: Calibration) -> dict[str, Any]:
    if cal.comparison is not None:
        return cal.comparison.to_dict()
    return {"notes": [NO_BASELINE_OPEN]} if cal.kind == "open" else {}


def build_report(
    model_path: Path, task: Task, options: CalibrateOptions, outputs: Outputs, cal: Calibration
) -> report.Report:
    """The report of a calibration (report.json's content)."""
    r = cal.result
    n_layer, n_head = (int(x) for x in r.bias.shape)
    held = cal.heldout
    return report.Report(
        command=list(outputs.command),
        model=report.ModelSection(
            path=str(model_path),
            n_layer=n_layer,
            n_head=n_head,
            gpu_layers=cal.gpu_layers,
            attention=cal.attention,
        ),
        task=report.TaskSection(
            path=str(task.path),
            sha256=task.sha256,
            n_items=len(task.items),
            n_calibration=cal.n_calibration,
            n_heldout=held.n if held else 0,
            seed=options.seed,
            holdout=options.holdout,
        ),
        mode=cal.mode,
        search=report.SearchSection(
            method=r.method,
            objective=cal.objective,
            settings=r.config,
            workers=cal.workers,
        ),
        scoring=report.ScoringSection(
            primary=cal.scoring,
            reason=cal.scoring_reason,
            asked=options.scoring,
            n_gen=cal.n_gen,
            match=None if task.match is None else str(task.match),
            chat=options.chat,
            system=options.system,
        ),
        baseline=None if held is None else report.HeldoutMetrics.from_summary(held.baseline),
        tuned=None if held is None else report.HeldoutMetrics.from_summary(held.tuned),
        delta={}
        if held is None
        else {
            f"accuracy_{k}": report.Delta(delta=v.delta, interval=(v.lo, v.hi)) for k, v in held.delta.items()
        },
        chosen=report.ChosenSection(
            type=r.head_type if np.any(r.bias) else "none",
            heads=r.heads,
            gamma=r.best_gamma,
            layers=(options.search.layer_start, options.search.layer_end or n_layer),
            table=None if r.method == "paper" else np.exp(r.bias).round(4).tolist(),
        ),
        evaluations=report.EvaluationsSection(
            candidates=r.n_evaluations,
            items_scored=r.items_scored,
            items_saved=r.items_full - r.items_scored,
            savings=r.savings,
        ),
        timings={**cal.timings, "total": cal.timings["total_s"]},
        warnings=list(cal.warnings),
        written=report.WrittenSection(
            path=str(cal.written.tuned) if cal.written.tuned else None, reason=cal.not_written_reason
        ),
        baselines=_baselines_section(cal),
    )
