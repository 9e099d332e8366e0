"""The main job: choose ZeroTuning biases for a task, check them on held-out items, write the tuned GGUF.

    split (calibration / held-out) -> search on the calibration part -> baseline and tuned scores of the
    held-out part -> write the tuned file only if it is better there (or --force) -> report

A gain is never reported on the items used to choose: the held-out part is scored only after the search.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, gguf_meta, metrics
from .engine import Context, Model, fit_n_ctx
from .search import SearchConfig, SearchResult, context_scorer, search
from .tasks import Item, Task, split_items

MIN_SUPERVISED_ITEMS = 20
MIN_CHECK_ITEMS = 24  # labelled items for a held-out check of an unsupervised pick

# which objective a mode and scoring calibrate for, unless one is named. Unsupervised: mutual information,
# measured against the paper's full-vocabulary entropy on 6 tasks x 2 models (benchmarks/results/accuracy.md):
# mean held-out change +1.2 / +10.0 points (Gemma / SmolLM2) vs -1.2 / -5.1; it can hurt a task with skewed
# labels
DEFAULT_OBJECTIVE = {
    ("supervised", "generate"): "accuracy-generate",
    ("supervised", "choice"): "accuracy-choice",
    ("unsupervised", "generate"): "mutual-information",
    ("unsupervised", "choice"): "mutual-information",
}


class CalibrationError(ValueError):
    pass


ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass
class CalibrateOptions:
    mode: str = "auto"  # auto | supervised | unsupervised
    scoring: str = "generate"  # generate | choice
    objective: str | None = None  # None: DEFAULT_OBJECTIVE
    n_gen: int = 4  # greedy tokens generated for the "generate" scoring
    holdout: float = 0.3
    seed: int = 42
    max_items: int | None = None
    search: SearchConfig = field(default_factory=SearchConfig)
    n_threads: int = 2
    n_ctx: int | None = None  # None: fitted to the items (engine.fit_n_ctx)
    flash_attn: bool | None = None
    force: bool = False
    check_items: Sequence[Item] | None = None  # labelled items to check an unsupervised pick


@dataclass
class HeldOut:
    n: int
    baseline: dict[str, Any]  # metrics.Summary of the held-out items, untuned
    tuned: dict[str, Any]  # the same with the chosen biases
    delta: dict[str, Any]  # per scoring: delta, lo, hi (tuned - baseline, paired bootstrap)


@dataclass
class Outcome:
    mode: str
    scoring: str
    objective: str
    result: SearchResult
    heldout: HeldOut | None
    n_calibration: int
    improved: bool | None  # None: not verifiable (unsupervised without labelled items)
    written: Path | None
    not_written_reason: str | None
    warnings: list[str]
    timings: dict[str, float]


def _label_words(items: Sequence[Item]) -> list[str]:
    """Stop strings for generation: the labels, when the items share a small label set."""
    words = {c.strip() for it in items for c in it.choices}
    return sorted(w for w in words if w) if 0 < len(words) <= 32 else []


def _summaries(scores: list, items: Sequence[Item]) -> tuple[dict[str, Any], list[metrics.ItemResult]]:
    results = metrics.item_results(scores, items)
    return metrics.summarize(results, items).to_dict(), results


def _correct(results: list[metrics.ItemResult], items: Sequence[Item], scoring: str) -> np.ndarray:
    if scoring == "generate":
        return np.array([r.gen_pred == it.answer for r, it in zip(results, items)], dtype=np.float64)
    return np.array([r.choice_pred == it.answer for r, it in zip(results, items)], dtype=np.float64)


def scorer_id(model_path: Path, scoring: str, n_gen: int) -> str:
    st = model_path.stat()
    h = hashlib.sha256(f"{model_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{h}|{scoring}|{n_gen}|{__version__}"


def calibrate(
    model_path: Path,
    task: Task,
    options: CalibrateOptions,
    *,
    output: Path | None,
    checkpoint: Path | None = None,
    progress: ProgressFactory | None = None,
) -> Outcome:
    """Run the calibration; write the tuned GGUF to output when it is better on held-out items (or forced)."""
    t0 = time.monotonic()
    warnings: list[str] = []
    info = gguf_meta.read_model_info(model_path)
    if info.bias_problem:
        warnings.append(f"{model_path}: its stored first-token bias is ignored: {info.bias_problem}")

    items = list(task.items if options.max_items is None else task.items[: options.max_items])
    mode = options.mode
    if mode == "auto":
        mode = "supervised" if task.has_answers else "unsupervised"
    if mode not in ("supervised", "unsupervised"):
        raise CalibrationError(f"unknown mode {mode!r}")
    if options.scoring not in ("generate", "choice"):
        raise CalibrationError(f"unknown scoring {options.scoring!r}")
    objective = options.objective or DEFAULT_OBJECTIVE[(mode, options.scoring)]
    obj = metrics.get_objective(objective)
    if mode == "unsupervised" and obj.needs_labels:
        raise CalibrationError(f"objective {objective!r} needs labels; unsupervised mode cannot use it")

    if mode == "supervised":
        if not task.has_answers:
            raise CalibrationError(f"{task.path}: supervised mode needs an answer on every item")
        if len(items) < MIN_SUPERVISED_ITEMS:
            raise CalibrationError(
                f"{task.path}: {len(items)} usable items; supervised calibration needs at least "
                f"{MIN_SUPERVISED_ITEMS} (more is better: the held-out check needs them too)"
            )
        calib, held = split_items(items, options.holdout, options.seed)
    else:
        if task.has_answers and options.holdout > 0:
            # labels exist: choose without them, check with them
            calib, held = split_items(items, options.holdout, options.seed)
        else:
            calib, held = items, list(options.check_items or [])
        if len(held) < MIN_CHECK_ITEMS:
            warnings.append(
                "unsupervised pick NOT verified: no labelled items checked it (pass --check FILE with a few "
                "dozen labelled items); on our data the unsupervised objectives sometimes lower accuracy"
            )
            held = held if len(held) else []
    if not calib:
        raise CalibrationError(f"{task.path}: no items left for calibration")

    model = Model(model_path)
    n_gen = options.n_gen if options.scoring == "generate" else 1
    n_ctx = options.n_ctx or fit_n_ctx(model, [*calib, *held], options.search.chunk_size, n_gen)
    ctx = Context(model, n_threads=options.n_threads, n_ctx=n_ctx, flash_attn=options.flash_attn)
    stops = _label_words(items)
    scorer = context_scorer(ctx, n_gen=n_gen, gen_stop=stops)

    def search_progress(stage: str, done: int, total: int) -> None:
        if progress is not None:
            nonlocal current
            if current is None or current[0] != stage:
                current = (stage, progress(stage, total))
            current[1](done)

    current: tuple[str, Callable[[int], None]] | None = None
    config = SearchConfig(**{**options.search.__dict__, "objective": objective})
    t1 = time.monotonic()
    result = search(
        scorer,
        calib,
        model.bias_shape,
        config,
        checkpoint=checkpoint,
        progress=search_progress,
        scorer_id=scorer_id(model_path, options.scoring, n_gen),
    )
    t_search = time.monotonic() - t1

    heldout: HeldOut | None = None
    improved: bool | None = None
    t2 = time.monotonic()
    if held:
        tick = progress("held-out", 2) if progress else None
        base_scores = scorer(np.zeros(model.bias_shape, np.float32), held)
        if tick:
            tick(1)
        tuned_scores = scorer(result.bias, held)
        if tick:
            tick(2)
        base_sum, base_res = _summaries(base_scores, held)
        tuned_sum, tuned_res = _summaries(tuned_scores, held)
        base_c = {s: _correct(base_res, held, s) for s in ("generate", "choice")}
        tuned_c = {s: _correct(tuned_res, held, s) for s in ("generate", "choice")}
        delta = {}
        for s in ("generate", "choice"):
            d, lo, hi = metrics.paired_bootstrap_delta(base_c[s], tuned_c[s], seed=options.seed)
            delta[s] = {"delta": d, "lo": lo, "hi": hi}
        heldout = HeldOut(n=len(held), baseline=base_sum, tuned=tuned_sum, delta=delta)
        improved = bool(delta[options.scoring]["delta"] > 0)
        other = "choice" if options.scoring == "generate" else "generate"
        if delta[other]["delta"] < 0:
            warnings.append(
                f"the tuned biases LOWER held-out {other} accuracy by "
                f"{-100 * delta[other]['delta']:.1f} points (calibrated for {options.scoring})"
            )
    t_heldout = time.monotonic() - t2

    tuned_is_baseline = not np.any(result.bias)
    written: Path | None = None
    reason: str | None = None
    if tuned_is_baseline:
        reason = "the search kept the baseline (no candidate beat it on the calibration items)"
    elif improved is False and not options.force:
        reason = (
            "the tuned model is not better than the baseline on the held-out items (use --force to write it)"
        )
    if output is not None and reason is None:
        provenance = provenance_of(task, mode, options, objective, result, heldout, len(calib))
        written = gguf_meta.write_tuned(model_path, output, result.bias, provenance)

    return Outcome(
        mode=mode,
        scoring=options.scoring,
        objective=objective,
        result=result,
        heldout=heldout,
        n_calibration=len(calib),
        improved=improved,
        written=written,
        not_written_reason=reason if output is not None else "no output requested",
        warnings=warnings,
        timings={"search_s": t_search, "heldout_s": t_heldout, "total_s": time.monotonic() - t0},
    )


def provenance_of(
    task: Task,
    mode: str,
    options: CalibrateOptions,
    objective: str,
    result: SearchResult,
    heldout: HeldOut | None,
    n_calibration: int,
) -> dict[str, str | int | float | bool]:
    prov: dict[str, str | int | float | bool] = {
        "version": __version__,
        "mode": mode,
        "search": result.method,
        "objective": objective,
        "scoring": options.scoring,
        "task_file": task.path.name,
        "task_sha256": task.sha256,
        "n_calibration": n_calibration,
        "n_heldout": heldout.n if heldout else 0,
        "seed": options.seed,
        "head_type": result.head_type,
        "heads": ",".join(str(h) for h in result.heads),
        "gamma": float(result.best_gamma),
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }
    if heldout is not None:
        key = f"accuracy_{options.scoring}"
        prov["baseline_accuracy"] = float(heldout.baseline[key])
        prov["tuned_accuracy"] = float(heldout.tuned[key])
    return prov
