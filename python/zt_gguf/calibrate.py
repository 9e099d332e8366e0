"""calibrate(): choose ZeroTuning biases for a task, check them on held-out items, write the tuned GGUF.

A short pipeline of named stages:

    plan (pure) -> open the engine -> choose the scoring -> search -> held-out check
                -> compare with the free baselines -> decide (pure) -> write the outputs (one place)

A gain is never reported on the items used to choose: the held-out part is scored only after the search.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import comparison as cmp
from . import metrics, objectives, scoring, stats
from .chat import chat_items
from .engine import Context, Model, first_token_warning, fit_n_ctx
from .errors import UserError
from .gguf_meta import ModelInfo, read_model_info
from .options import STOP_OPEN, CalibrateOptions, n_gen_for
from .outputs import Outputs, prepare, write_outputs
from .report import Workers
from .results import Calibration, Decision, Delta, HeldOut, Plan
from .search import SearchResult, search, search_chunks
from .search_events import (
    EVENT_CANDIDATE,
    EVENT_DONE,
    EVENT_ESTIMATE,
    EVENT_NO_DISCRIMINATION,
    EVENT_PLAN,
)
from .tasks import Item, Task, split_items

MIN_SUPERVISED_ITEMS = 20
MIN_CHECK_ITEMS = 24  # labelled items for a held-out check of an unsupervised pick
MODES = ("auto", "supervised", "unsupervised")
SCORINGS = scoring.SCORINGS

# which objective a mode and scoring calibrate for, unless one is named. Unsupervised: mutual information,
# measured against the paper's full-vocabulary entropy on 6 tasks x 2 models (benchmarks/results/accuracy.md):
# mean held-out change +1.2 / +10.0 points (Gemma / SmolLM2) vs -1.2 / -5.1; it can hurt a task with skewed
# labels. Supervised choice scoring: the answer's log-probability, smooth where accuracy is a step function of
# the biases (on the demo slice, Gemma 270M, held-out: accuracy-choice 63.3 -> 67.8, logprob 63.3 -> 82.2)
# Open-ended tasks: the answer's log-likelihood under teacher forcing (one decode per item, smooth), checked
# held out by exact match of real greedy generation; unsupervised, the paper's first-token entropy.
DEFAULT_OBJECTIVE = {
    ("choice", "supervised", "generate"): "accuracy-generate",
    ("choice", "supervised", "choice"): "logprob",
    ("choice", "unsupervised", "generate"): "mutual-information",
    ("choice", "unsupervised", "choice"): "mutual-information",
    ("open", "supervised", "generate"): "answer-logprob",
    ("open", "unsupervised", "generate"): "neg-entropy-full",
}
SCORED_BY = ("generate", "choice")  # the held-out check reports both scorings
_KIND_NAMES = {"choice": "multiple-choice", "open": "open-ended"}


class CalibrationError(UserError, ValueError):
    """A calibration that cannot run as asked (too few items, a mode without labels, ...)."""


# progress(stage, total) -> update(done, note): one bar per stage; note names the current candidate
ProgressFactory = Callable[[str, int], Callable[[int, str | None], None]]
Log = Callable[[str], None]  # an informational line for the user (stderr in the CLI)


# --- the pipeline ---------------------------------------------------------------------------------------


def calibrate(
    model_path: Path,
    task: Task,
    options: CalibrateOptions,
    outputs: Outputs | None = None,
    *,
    progress: ProgressFactory | None = None,
    log: Log | None = None,
) -> Calibration:
    """Run the calibration; write the tuned GGUF (when it beats the baseline and the free corrections on the
    held-out items, or with force), its profile and the report, as outputs asks.

    log(line), when given, receives what the run decided and expects before the search (the scoring and
    why, the number of candidates, the time estimate from the first chunk) and early warnings."""
    t0 = time.monotonic()
    outputs = outputs or Outputs()
    check_outputs(model_path, outputs)
    notes = _Notes(log)
    plan = plan_calibration(task, options, read_model_info(model_path))
    prepare(outputs)
    notes.warnings += plan.warnings
    engine, plan = open_engine(model_path, plan, options)
    if (w := first_token_warning(engine.model, [*plan.calib, *plan.held])) is not None:
        notes.warn(w)
    chosen = choose_scoring(engine, plan, options)
    notes.say(f"scoring: {chosen.scoring} ({chosen.reason})")
    objective = options.objective or DEFAULT_OBJECTIVE[(plan.kind, plan.mode, chosen.scoring)]
    memo, search_memo = _scorers(engine, plan, chosen.scoring, objective, options)

    t1 = time.monotonic()
    result, workers = run_search(model_path, engine, plan, search_memo, options, outputs, chosen.scoring,
                                 objective, notes, progress)  # fmt: skip
    t2 = time.monotonic()
    heldout = heldout_check(memo, plan.held, result.bias, options.seed, progress, _scored_by(plan))
    if heldout is not None and (lower := lowered_other_scoring(heldout, chosen.scoring)) is not None:
        notes.warnings.append(lower)
    comparison = compare_with_free_baselines(memo, plan, result.bias, chosen.scoring, objective, options.seed)
    t3 = time.monotonic()
    decision = decide(result.bias, heldout, comparison, chosen.scoring, options.force, plan.kind)
    if decision.warning is not None:
        notes.warn(decision.warning)
    attention = engine.ctx.probe_attention(result.bias if np.any(result.bias) else None, plan.calib[0])
    cal = Calibration(
        mode=plan.mode,
        scoring=chosen.scoring,
        scoring_reason=chosen.reason,
        objective=objective,
        result=result,
        heldout=heldout,
        n_calibration=len(plan.calib),
        decision=decision,
        warnings=notes.warnings,
        timings={"search_s": t2 - t1, "heldout_s": t3 - t2, "total_s": time.monotonic() - t0},
        comparison=comparison,
        attention=attention,
        gpu_layers=engine.model.n_gpu_layers,
        workers=workers,
        kind=plan.kind,
        n_gen=plan.n_gen,
    )
    return write_outputs(model_path, task, options, outputs, cal)


def _scorers(
    engine: Engine, plan: Plan, scoring_name: str, objective: str, options: CalibrateOptions
) -> tuple[scoring.MemoScorer, scoring.MemoScorer]:
    """The scorer of the held-out check and the comparison, and the search's. They are one, except for an
    open-ended task whose objective reads no generation (the answer's log-likelihood): its search then
    generates nothing, one decode per item."""
    n_gen = 1 if scoring_name == "choice" else plan.n_gen
    memo = scoring.MemoScorer(engine.ctx, n_gen, plan.stops)
    search_memo = memo
    if plan.kind == "open" and not objectives.get_objective(objective).generates:
        search_memo = scoring.MemoScorer(engine.ctx, 0, plan.stops)
    chunks = search_chunks(plan.calib, replace(options.search, seed=options.seed))
    for m in {id(memo): memo, id(search_memo): search_memo}.values():
        m.group(chunks)
    return memo, search_memo


def _scored_by(plan: Plan) -> tuple[str, ...]:
    """The scorings the held-out check reports: an open-ended task's is its exact match alone."""
    return ("generate",) if plan.kind == "open" else SCORED_BY


# --- stage: plan (pure) ---------------------------------------------------------------------------------


def _items(task: Task, options: CalibrateOptions) -> list[Item]:
    return list(task.items if options.max_items is None else task.items[: options.max_items])


def plan_calibration(task: Task, options: CalibrateOptions, info: ModelInfo) -> Plan:
    """The mode, the calibration / held-out split and the warnings known before any scoring; raises
    CalibrationError for a calibration that cannot run as asked."""
    warnings: list[str] = []
    if info.bias_problem:
        warnings.append(f"{info.path}: its stored first-token bias is ignored: {info.bias_problem}")
    items = _items(task, options)
    mode = options.mode
    if mode == "auto":
        mode = "supervised" if task.has_answers else "unsupervised"
    if mode not in MODES:
        raise CalibrationError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if options.scoring not in SCORINGS:
        raise CalibrationError(f"unknown scoring {options.scoring!r}; choose from {', '.join(SCORINGS)}")
    if options.objective is not None:
        try:
            obj = objectives.get_objective(options.objective)
        except ValueError as e:
            raise CalibrationError(str(e)) from None
        if mode == "unsupervised" and obj.needs_labels:
            raise CalibrationError(
                f"objective {options.objective!r} needs labels; unsupervised mode cannot use it"
            )
        if task.kind not in obj.kinds:
            fit = ", ".join(objectives.objectives_for(task.kind))
            raise CalibrationError(
                f"objective {options.objective!r} does not apply to a {_KIND_NAMES[task.kind]} task; "
                f"choose from {fit}"
            )
    if task.kind == "open" and options.scoring == "choice":
        raise CalibrationError(
            f"{task.path}: an open-ended task is scored by generation (exact match), not --scoring choice"
        )
    if mode == "supervised":
        if not task.has_answers:
            raise CalibrationError(f"{task.path}: supervised mode needs an answer on every item")
        if len(items) < MIN_SUPERVISED_ITEMS:
            raise CalibrationError(
                f"{task.path}: {len(items)} usable items; supervised calibration needs at least "
                f"{MIN_SUPERVISED_ITEMS} (more is better: the held-out check needs them too)"
            )
        calib, held = split_items(items, options.holdout, options.seed)
    elif task.has_answers and options.holdout > 0:  # labels exist: choose without them, check with them
        calib, held = split_items(items, options.holdout, options.seed)
    else:
        calib, held = items, list(options.check_items or [])
    if mode == "unsupervised" and len(held) < MIN_CHECK_ITEMS:
        warnings.append(
            "unsupervised pick NOT verified: no labelled items checked it (pass --check FILE with a few "
            "dozen labelled items); on our data the unsupervised objectives sometimes lower accuracy"
        )
    if not calib:
        raise CalibrationError(f"{task.path}: no items left for calibration")
    stops = list(options.stop) if options.stop is not None else None
    if stops is None:
        stops = list(STOP_OPEN) if task.kind == "open" else scoring.label_words(items)
    return Plan(
        mode=mode,
        calib=calib,
        held=held,
        stops=stops,
        warnings=warnings,
        kind=task.kind,
        n_gen=n_gen_for(task.kind, options.n_gen),
        content_free=scoring.content_free_items(task, items),
    )


def check_outputs(model_path: Path, outputs: Outputs) -> None:
    """Refuse outputs that would overwrite the input model or each other."""
    if not model_path.exists():
        raise CalibrationError(f"{model_path}: no such file")
    for out in (outputs.tuned, outputs.profile):
        if out is not None and not out.absolute().parent.is_dir():
            raise CalibrationError(f"{out}: the directory {out.absolute().parent} does not exist")
    if outputs.tuned is not None and _same_file(model_path, outputs.tuned):
        raise CalibrationError(
            f"{outputs.tuned}: the output would overwrite the input model; choose another -o"
        )
    if outputs.profile is not None and any(
        p is not None and _same_file(p, outputs.profile) for p in (model_path, outputs.tuned)
    ):
        raise CalibrationError(
            f"{outputs.profile}: --profile-out would overwrite the model or the tuned file"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


# --- stage: open the engine -----------------------------------------------------------------------------


@dataclass
class Engine:
    """The model and the context every stage scores with."""

    model: Model
    ctx: Context
    n_ctx: int


def open_engine(model_path: Path, plan: Plan, options: CalibrateOptions) -> tuple[Engine, Plan]:
    """The model, the prompts as the model will see them (chat-formatted with --chat), the context sized
    for them; returns the plan with those prompts."""
    model = Model(model_path, gpu_layers=options.gpu_layers)
    if options.chat:
        plan = replace(
            plan,
            calib=chat_items(model, plan.calib, options.system),
            held=chat_items(model, plan.held, options.system),
            content_free=chat_items(model, plan.content_free, options.system),
        )
    n_gen = plan.n_gen if options.scoring != "choice" else 1
    n_ctx = options.n_ctx or fit_n_ctx(model, [*plan.calib, *plan.held], options.search.chunk_size, n_gen)
    ctx = Context(model, n_threads=options.n_threads, n_ctx=n_ctx, flash_attn=options.flash_attn)
    return Engine(model, ctx, n_ctx), plan


# --- stage: choose the scoring --------------------------------------------------------------------------


def choose_scoring(engine: Engine, plan: Plan, options: CalibrateOptions) -> scoring.ScoringChoice:
    """The user's scoring, or --scoring auto's measurement on the first chunk of calibration items; an
    open-ended task is always scored by generation."""
    if plan.kind == "open":
        rule = plan.calib[0].match
        return scoring.ScoringChoice(
            "generate", f"open-ended task: the greedy continuation, judged by the {rule} match rule"
        )
    if options.scoring != "auto":
        return scoring.ScoringChoice(options.scoring, "as asked (--scoring)")
    first = plan.calib[: options.search.chunk_size]
    return scoring.choose_scoring(engine.ctx, first, plan.n_gen, plan.stops)


# --- stage: search --------------------------------------------------------------------------------------


def run_search(
    model_path: Path,
    engine: Engine,
    plan: Plan,
    memo: scoring.MemoScorer,
    options: CalibrateOptions,
    outputs: Outputs,
    scoring_name: str,
    objective: str,
    notes: _Notes,
    progress: ProgressFactory | None,
) -> tuple[SearchResult, Workers | None]:
    """The search on the calibration items, in this process or over Ray workers (the same picks)."""
    config = replace(options.search, objective=objective, seed=options.seed)
    feedback = _SearchFeedback(notes, progress, options, scoring_name, objective)
    with _pool(model_path, engine, memo, options, notes) as pool:
        result = search(
            lambda bias, chunk: memo(bias, chunk),
            plan.calib,
            engine.model.bias_shape,
            config,
            checkpoint=outputs.checkpoint,
            progress=feedback.progress,
            scorer_id=scoring.scorer_id(model_path, scoring_name, memo.n_gen),
            events=feedback.event,
            pool=pool,
        )
        workers = None
        if pool is not None:
            nodes = sorted(set(pool.nodes))
            workers = Workers(
                n=pool.n_workers,
                threads=options.n_threads,
                nodes=nodes,
                replaced=pool.replacements,
                address=options.ray_address,
            )
    return result, workers


@contextlib.contextmanager
def _pool(
    model_path: Path, engine: Engine, memo: scoring.MemoScorer, options: CalibrateOptions, notes: _Notes
) -> Iterator[Any]:
    """A Ray pool of workers for --workers / --ray-address; None: the search scores in this process."""
    if not options.distributed:
        yield None
        return
    from . import distributed

    spec = distributed.WorkerSpec(
        model_path=str(options.worker_model or model_path.resolve()),
        model_size=model_path.stat().st_size,
        n_threads=options.n_threads,
        n_ctx=engine.n_ctx,
        n_gen=memo.n_gen,
        gen_stop=tuple(memo.stops),
        gpu_layers=options.gpu_layers,
        flash_attn=options.flash_attn,
    )
    where = f"on the Ray cluster at {options.ray_address}" if options.ray_address else "on this machine"
    count = options.workers or "as many Ray workers as the cluster holds,"
    notes.say(f"starting {count} Ray worker(s) {where}, {options.n_threads} thread(s) each")
    with distributed.open_pool(spec, options.workers, address=options.ray_address, log=notes.say) as pool:
        notes.say(f"{pool.n_workers} worker(s) ready on {', '.join(sorted(set(pool.nodes)))}")
        yield pool


# --- stage: held-out check ------------------------------------------------------------------------------


def heldout_check(
    score: Callable[[np.ndarray | None, Sequence[Item]], list[Any]],
    held: Sequence[Item],
    bias: np.ndarray,
    seed: int,
    progress: ProgressFactory | None = None,
    scored_by: Sequence[str] = SCORED_BY,
) -> HeldOut | None:
    """The untuned and the tuned model on the held-out items (None: there are none), under each scoring."""
    if not held:
        return None
    tick = progress("held-out", 2) if progress else None
    # the untuned model as the search scores its baseline: a bias of zeros (not no bias at all: the biased
    # attention path rounds differently, and the comparison reuses these scores)
    base = metrics.item_results(score(np.zeros_like(bias), held), held)
    if tick:
        tick(1, "baseline")
    tuned = metrics.item_results(score(bias, held), held)
    if tick:
        tick(2, "tuned")
    delta = {}
    for s in scored_by:
        d = stats.paired_bootstrap_delta(_correct(base, held, s), _correct(tuned, held, s), seed=seed)
        delta[s] = Delta(*d)
    return HeldOut(len(held), metrics.summarize(base, held), metrics.summarize(tuned, held), delta)


def _correct(results: Sequence[metrics.ItemResult], items: Sequence[Item], scoring_name: str) -> np.ndarray:
    pred = [r.gen_pred if scoring_name == "generate" else r.choice_pred for r in results]
    return np.array([p == it.answer for p, it in zip(pred, items)], dtype=np.float64)


def lowered_other_scoring(heldout: HeldOut, scoring_name: str) -> str | None:
    """A warning when the biases lower the held-out accuracy of the scoring they were not chosen for."""
    other = "choice" if scoring_name == "generate" else "generate"
    if other not in heldout.delta:
        return None
    d = heldout.delta[other].delta
    if d >= 0:
        return None
    return (
        f"the tuned biases LOWER held-out {other} accuracy by {-100 * d:.1f} points "
        f"(calibrated for {scoring_name})"
    )


# --- stage: compare with the free baselines -----------------------------------------------------------


def compare_with_free_baselines(
    memo: scoring.MemoScorer, plan: Plan, bias: np.ndarray, scoring_name: str, objective: str, seed: int
) -> cmp.Comparison | None:
    """The output-side corrections beside ZeroTuning on the held-out items (None: no labelled held-out
    items, or an open-ended task, whose free-form answers have no label prior to correct)."""
    if plan.kind == "open":
        return None
    return cmp.run_comparison(
        memo,
        plan.calib,
        plan.held,
        plan.content_free,
        bias,
        supervised=plan.mode == "supervised",
        scoring=scoring_name,
        objective=objective,
        seed=seed,
    )


# --- stage: decide (pure) -------------------------------------------------------------------------------


def decide(
    bias: np.ndarray,
    heldout: HeldOut | None,
    comparison: cmp.Comparison | None,
    scoring_name: str,
    force: bool,
    kind: str = "choice",
) -> Decision:
    """Whether the tuned file is written: only when ZeroTuning, with the correction that ships with it, beats
    the best free baseline on the held-out items (else, without a comparison, the untuned model); for an
    open-ended task, when its held-out exact match is higher with a paired 95% interval above 0; with force,
    whenever the search moved off the baseline."""
    improved: bool | None = None
    if heldout is not None:
        d = heldout.delta[scoring_name]
        improved = bool(d.lo > 0) if kind == "open" else bool(d.delta > 0)
    v = comparison.verdict if comparison is not None else None
    warning = None
    if v is not None:
        improved = v.beats
        if not v.beats:
            warning = (
                f"a free output-side correction does as well as ZeroTuning on the held-out items: "
                f"{v.best_free.key.describe()} {100 * v.best_free.accuracy:.1f}% vs "
                f"{v.shipped.key.describe()} {100 * v.shipped.accuracy:.1f}% "
                f"({_fmt_delta(v.delta)}); use {use_instead(v.best_free)}"
            )
    if not np.any(bias):
        reason = "the search kept the baseline (no candidate beat it on the calibration items)"
    elif kind == "open" and heldout is None and not force:
        reason = "no held-out items checked the tuned model's exact match (use --holdout > 0, or --force)"
    elif improved is False and not force:
        reason = (
            _not_better(kind)
            if v is None
            else f"{v.best_free.key.describe()} is at least as good on the held-out items "
            f"({100 * v.best_free.accuracy:.1f}% vs {100 * v.shipped.accuracy:.1f}%): use "
            f"{use_instead(v.best_free)} (or --force to write the tuned file)"
        )
    else:
        reason = None
    return Decision(improved=improved, write=reason is None, reason=reason, warning=warning)


def _not_better(kind: str) -> str:
    if kind == "open":
        return (
            "the tuned model's held-out exact match is not higher than the untuned model's with a paired 95% "
            "interval above 0 (use --force to write it)"
        )
    return "the tuned model is not better than the baseline on the held-out items (use --force to write it)"


def use_instead(row: cmp.Row) -> str:
    """What to use instead of a tuned file, when a free baseline row wins."""
    c = row.correction
    if c is None:
        return "the untuned model as it is"
    if hasattr(c, "cli_args"):  # a LogitBias
        return "the untuned model with " + " ".join(c.cli_args())
    name = cmp.CORRECTION_NAMES[row.key.correction] if row.key.correction else ""
    return f"the untuned model with the {name} offset on the choices"


def _fmt_delta(d: dict[str, float]) -> str:
    return f"delta {100 * d['delta']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] points"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


# --- what the user sees while it runs -------------------------------------------------------------------


class _Notes:
    """The run's lines for the user (log) and the warnings the result keeps."""

    def __init__(self, log: Log | None) -> None:
        self.log = log
        self.warnings: list[str] = []

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def warn(self, line: str) -> None:
        self.warnings.append(line)
        self.say(f"warning: {line}")


class _SearchFeedback:
    """The search's progress and events as progress bars (the current candidate as their note) and lines."""

    def __init__(
        self,
        notes: _Notes,
        progress: ProgressFactory | None,
        options: CalibrateOptions,
        scoring_name: str,
        objective: str,
    ) -> None:
        self.notes, self.factory = notes, progress
        self.method, self.distributed = options.search.method, options.distributed
        self.scoring, self.objective = scoring_name, objective
        self.stage: str | None = None
        self.update: Callable[[int, str | None], None] | None = None
        self.candidate: str | None = None
        self.n_done = 0

    def progress(self, stage: str, done: int, total: int) -> None:
        if self.factory is None:
            return
        if self.stage != stage or self.update is None:
            self.stage, self.update = stage, self.factory(stage, total)
        note = self.candidate if not self.distributed else f"{self.n_done} candidates done; {self.candidate}"
        self.update(done, note)

    def event(self, name: str, data: dict[str, Any]) -> None:
        handlers: dict[str, Callable[..., None]] = {
            EVENT_CANDIDATE: self._candidate,
            EVENT_DONE: self._done,
            EVENT_PLAN: self._plan,
            EVENT_ESTIMATE: self._estimate,
            EVENT_NO_DISCRIMINATION: self._no_discrimination,
        }
        handlers[name](**data)

    def _candidate(self, description: str, index: int) -> None:
        self.candidate = description

    def _done(self, description: str, n_done: int) -> None:
        self.n_done = n_done

    def _plan(self, n_candidates: int, n_items: int, chunk_size: int, n_chunks: int) -> None:
        self.notes.say(
            f"search {self.method}: up to {n_candidates} candidates on {n_items} calibration items "
            f"({n_chunks} chunks of {chunk_size}), objective {self.objective}"
        )

    def _estimate(self, chunk_s: float, estimate_s: float, n_candidates: int, n_workers: int = 1) -> None:
        self.notes.say(
            f"first chunk scored in {chunk_s:.1f} s: the search takes up to {_duration(estimate_s)}"
            + (f" on {n_workers} workers" if n_workers > 1 else "")
            + " (less when early stopping drops candidates)"
        )

    def _no_discrimination(self, n_candidates: int, n_items: int) -> None:
        self.notes.warn(
            f"the first {n_candidates} candidates score exactly the same on the first {n_items} items: "
            f"{self.scoring} scoring with objective {self.objective} cannot tell them apart on this model "
            "and task (try --scoring choice, or --objective logprob)"
        )
