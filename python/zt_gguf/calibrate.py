"""The main job: choose ZeroTuning biases for a task, check them on held-out items, write the tuned GGUF.

    split (calibration / held-out) -> search on the calibration part -> baseline and tuned scores of the
    held-out part -> write the tuned file only if it is better there (or --force) -> report

A gain is never reported on the items used to choose: the held-out part is scored only after the search.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, baselines, gguf_meta, metrics
from .engine import Context, Model, fit_n_ctx
from .search import SearchConfig, SearchResult, bias_hash, search
from .tasks import Item, Task, split_items

MIN_SUPERVISED_ITEMS = 20
# --scoring auto takes "generate" when the untuned model names a label in more than this share of its greedy
# continuations of the first chunk of calibration items, else "choice" (a base model that continues with
# anything but a label word would score 0 on every candidate: Gemma 3 270M names none on 5 of our 6 tasks)
AUTO_MIN_VALID = 0.5
SCORINGS = ("auto", "generate", "choice")
MIN_CHECK_ITEMS = 24  # labelled items for a held-out check of an unsupervised pick

# which objective a mode and scoring calibrate for, unless one is named. Unsupervised: mutual information,
# measured against the paper's full-vocabulary entropy on 6 tasks x 2 models (benchmarks/results/accuracy.md):
# mean held-out change +1.2 / +10.0 points (Gemma / SmolLM2) vs -1.2 / -5.1; it can hurt a task with skewed
# labels. Supervised choice scoring: the answer's log-probability, smooth where accuracy is a step function of
# the biases (on the demo slice, Gemma 270M, held-out: accuracy-choice 63.3 -> 67.8, logprob 63.3 -> 82.2)
DEFAULT_OBJECTIVE = {
    ("supervised", "generate"): "accuracy-generate",
    ("supervised", "choice"): "logprob",
    ("unsupervised", "generate"): "mutual-information",
    ("unsupervised", "choice"): "mutual-information",
}


class CalibrationError(ValueError):
    pass


# progress(stage, total) -> update(done, note): one bar per stage; note names the current candidate
ProgressFactory = Callable[[str, int], Callable[[int, str | None], None]]
Log = Callable[[str], None]  # an informational line for the user (stderr in the CLI)


@dataclass
class CalibrateOptions:
    mode: str = "auto"  # auto | supervised | unsupervised
    scoring: str = "auto"  # auto | generate | choice (auto: see AUTO_MIN_VALID)
    objective: str | None = None  # None: DEFAULT_OBJECTIVE
    n_gen: int = 4  # greedy tokens generated for the "generate" scoring
    holdout: float = 0.3
    seed: int = 42
    max_items: int | None = None
    search: SearchConfig = field(default_factory=SearchConfig)
    n_threads: int = 2
    gpu_layers: int | None = None  # None: all layers on a GPU backend when there is one (engine.Model)
    n_ctx: int | None = None  # None: fitted to the items (engine.fit_n_ctx)
    flash_attn: bool | None = None
    force: bool = False
    check_items: Sequence[Item] | None = None  # labelled items to check an unsupervised pick
    # the search over Ray workers (zt_gguf.distributed): workers on this machine, or a cluster's address
    workers: int | None = None
    ray_address: str | None = None
    worker_model: Path | None = None  # the model's path on the workers (None: model_path)

    @property
    def distributed(self) -> bool:
        return self.workers is not None or self.ray_address is not None


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
    scoring_reason: str  # why this scoring (the user's choice, or what auto measured)
    objective: str
    result: SearchResult
    heldout: HeldOut | None
    n_calibration: int
    improved: bool | None  # None: not verifiable (unsupervised without labelled items)
    written: Path | None
    not_written_reason: str | None
    warnings: list[str]
    timings: dict[str, float]
    comparison: baselines.Comparison | None = None  # the output-side baselines on the held-out items
    attention: str = ""  # where attention ran with the chosen biases (engine.describe_attention)
    gpu_layers: int = 0  # layers offloaded to a GPU backend
    workers: dict[str, Any] | None = None  # the Ray workers of the search (n, nodes, replaced), None: none


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


def choose_scoring(
    ctx: Any, items: Sequence[Item], n_gen: int, stops: Sequence[str], max_valid: float = AUTO_MIN_VALID
) -> tuple[str, str, float]:
    """--scoring auto: generate greedily for the items with the bias off; (scoring, reason, valid share)."""
    ctx.set_bias(None)
    res = metrics.item_results(ctx.score(items, n_gen=n_gen, gen_stop=stops), items)
    valid = float(np.mean([r.gen_pred is not None for r in res])) if res else 0.0
    what = f"the untuned model names a label in {100 * valid:.0f}% of {len(res)} greedy continuations"
    if valid > max_valid:
        return "generate", f"{what} (> {100 * max_valid:.0f}%)", valid
    return (
        "choice",
        f"{what}; generate scoring would count the rest as wrong, so the most likely choice is scored",
        valid,
    )


class MemoScorer:
    """Scores items under a bias (None or zeros: off) and a logit bias, each (bias, item) once per run.

    The search, the held-out check and the baselines ask for the same (bias, item) pairs again (the baseline
    and the pick on the calibration items, for instance); the cache answers those."""

    def __init__(self, ctx: Any, n_gen: int, stops: Sequence[str]) -> None:
        self.ctx, self.n_gen, self.stops = ctx, n_gen, list(stops)
        self.cache: dict[tuple[str, tuple[tuple[int, float], ...], str, str], Any] = {}

    def __call__(
        self, bias: np.ndarray | None, items: Sequence[Item], logit_bias: Sequence[tuple[int, float]] = ()
    ) -> list[Any]:
        bkey = "off" if bias is None or not np.any(bias) else bias_hash(bias)
        lb = tuple((int(t), float(b)) for t, b in logit_bias)
        keys = [(bkey, lb, it.id, it.prompt) for it in items]
        missing = [it for it, k in zip(items, keys) if k not in self.cache]
        if missing:
            self.ctx.set_bias(None if bias is None else np.asarray(bias, np.float32))
            out = self.ctx.score(missing, n_gen=self.n_gen, gen_stop=self.stops, logit_bias=lb)
            for it, sc in zip(missing, out):
                self.cache[(bkey, lb, it.id, it.prompt)] = sc
        return [self.cache[k] for k in keys]

    def store(self, bias: np.ndarray | None, items: Sequence[Item], scores: Sequence[Any]) -> None:
        """Scores computed elsewhere (a worker) under bias, with no logit bias."""
        bkey = "off" if bias is None or not np.any(bias) else bias_hash(bias)
        for it, sc in zip(items, scores):
            self.cache[(bkey, (), it.id, it.prompt)] = sc


def content_free_items(task: Task, items: Sequence[Item]) -> list[Item]:
    """Contextual Calibration's prompts, with the task's shared choices (none without a shared template)."""
    if not task.content_free or not items:
        return []
    return [
        Item(prompt=p, choices=items[0].choices, answer=None, id=f"content-free:{cf}")
        for cf, p in task.content_free.items()
    ]


def _use_instead(row: baselines.Row) -> str:
    c = row.correction
    if c is None:
        return "the untuned model as it is"
    if isinstance(c, baselines.LogitBias):
        return "the untuned model with " + " ".join(c.cli_args())
    return f"the untuned model with the {baselines.describe(row.key).split(' + ')[1]} offset on the choices"


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
    log: Log | None = None,
) -> Outcome:
    """Run the calibration; write the tuned GGUF to output when it is better on held-out items (or forced).

    log(line), when given, receives what the run decided and expects before the search (the scoring and
    why, the number of candidates, the time estimate from the first chunk) and early warnings."""
    t0 = time.monotonic()
    warnings: list[str] = []

    def say(line: str) -> None:
        if log is not None:
            log(line)

    def warn(line: str) -> None:
        warnings.append(line)
        say(f"warning: {line}")

    info = gguf_meta.read_model_info(model_path)
    if info.bias_problem:
        warnings.append(f"{model_path}: its stored first-token bias is ignored: {info.bias_problem}")

    items = list(task.items if options.max_items is None else task.items[: options.max_items])
    mode = options.mode
    if mode == "auto":
        mode = "supervised" if task.has_answers else "unsupervised"
    if mode not in ("supervised", "unsupervised"):
        raise CalibrationError(f"unknown mode {mode!r}")
    if options.scoring not in SCORINGS:
        raise CalibrationError(f"unknown scoring {options.scoring!r}")
    if options.objective is not None:
        obj = metrics.get_objective(options.objective)
        if mode == "unsupervised" and obj.needs_labels:
            raise CalibrationError(
                f"objective {options.objective!r} needs labels; unsupervised mode cannot use it"
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

    model = Model(model_path, gpu_layers=options.gpu_layers)
    n_gen = options.n_gen if options.scoring != "choice" else 1
    n_ctx = options.n_ctx or fit_n_ctx(model, [*calib, *held], options.search.chunk_size, n_gen)
    ctx = Context(model, n_threads=options.n_threads, n_ctx=n_ctx, flash_attn=options.flash_attn)
    stops = _label_words(items)
    scoring, scoring_reason = options.scoring, "as asked (--scoring)"
    if scoring == "auto":
        scoring, scoring_reason, _ = choose_scoring(ctx, calib[: options.search.chunk_size], n_gen, stops)
    if scoring == "choice":
        n_gen = 1
    say(f"scoring: {scoring} ({scoring_reason})")
    objective = options.objective or DEFAULT_OBJECTIVE[(mode, scoring)]
    memo = MemoScorer(ctx, n_gen, stops)

    def scorer(bias: np.ndarray, chunk: Sequence[Item]) -> list[Any]:
        return memo(bias, chunk)

    current: list[Any] = [None, None, None, 0]  # stage, update, current candidate, candidates done

    def search_progress(stage: str, done: int, total: int) -> None:
        if progress is not None:
            if current[0] != stage:
                current[0], current[1] = stage, progress(stage, total)
            note = current[2] if not options.distributed else f"{current[3]} candidates done; {current[2]}"
            current[1](done, note)

    def on_event(name: str, data: dict[str, Any]) -> None:
        if name == "candidate":
            current[2] = data["description"]
        elif name == "done":
            current[3] = data["n_done"]
        elif name == "plan":
            say(
                f"search {options.search.method}: up to {data['n_candidates']} candidates on "
                f"{data['n_items']} calibration items ({data['n_chunks']} chunks of {data['chunk_size']}), "
                f"objective {objective}"
            )
        elif name == "estimate":
            say(
                f"first chunk scored in {data['chunk_s']:.1f} s: the search takes up to "
                f"{_duration(data['estimate_s'])}"
                + (f" on {data['n_workers']} workers" if data.get("n_workers", 1) > 1 else "")
                + " (less when early stopping drops candidates)"
            )
        elif name == "no_discrimination":
            warn(
                f"the first {data['n_candidates']} candidates score exactly the same on the first "
                f"{data['n_items']} items: {scoring} scoring with objective {objective} cannot tell them "
                "apart on this model and task (try --scoring choice, or --objective logprob)"
            )

    config = SearchConfig(**{**options.search.__dict__, "objective": objective})
    t1 = time.monotonic()
    pools: contextlib.AbstractContextManager[Any] = contextlib.nullcontext(None)
    if options.distributed:
        from . import distributed

        spec = distributed.WorkerSpec(
            model_path=str(options.worker_model or model_path.resolve()),
            model_size=model_path.stat().st_size,
            n_threads=options.n_threads,
            n_ctx=n_ctx,
            n_gen=n_gen,
            gen_stop=tuple(stops),
            gpu_layers=options.gpu_layers,
            flash_attn=options.flash_attn,
        )
        where = f"on the Ray cluster at {options.ray_address}" if options.ray_address else "on this machine"
        count = options.workers or "as many Ray workers as the cluster holds,"
        say(f"starting {count} Ray worker(s) {where}, {options.n_threads} thread(s) each")
        pools = distributed.open_pool(
            spec, options.workers, address=options.ray_address, on_scores=memo.store, log=say
        )
    workers: dict[str, Any] | None = None
    with pools as pool:
        if pool is not None:
            say(f"{pool.n_workers} worker(s) ready on {', '.join(sorted(set(pool.nodes)))}")
        result = search(
            scorer,
            calib,
            model.bias_shape,
            config,
            checkpoint=checkpoint,
            progress=search_progress,
            scorer_id=scorer_id(model_path, scoring, n_gen),
            events=on_event,
            pool=pool,
        )
        if pool is not None:
            workers = {
                "n": pool.n_workers,
                "threads": options.n_threads,
                "nodes": sorted(set(pool.nodes)),
                "replaced": pool.replacements,
                "address": options.ray_address,
            }
    t_search = time.monotonic() - t1

    heldout: HeldOut | None = None
    improved: bool | None = None
    t2 = time.monotonic()
    if held:
        tick = progress("held-out", 2) if progress else None
        base_scores = scorer(np.zeros(model.bias_shape, np.float32), held)
        if tick:
            tick(1, "baseline")
        tuned_scores = scorer(result.bias, held)
        if tick:
            tick(2, "tuned")
        base_sum, base_res = _summaries(base_scores, held)
        tuned_sum, tuned_res = _summaries(tuned_scores, held)
        base_c = {s: _correct(base_res, held, s) for s in ("generate", "choice")}
        tuned_c = {s: _correct(tuned_res, held, s) for s in ("generate", "choice")}
        delta = {}
        for s in ("generate", "choice"):
            d, lo, hi = metrics.paired_bootstrap_delta(base_c[s], tuned_c[s], seed=options.seed)
            delta[s] = {"delta": d, "lo": lo, "hi": hi}
        heldout = HeldOut(n=len(held), baseline=base_sum, tuned=tuned_sum, delta=delta)
        improved = bool(delta[scoring]["delta"] > 0)
        other = "choice" if scoring == "generate" else "generate"
        if delta[other]["delta"] < 0:
            warnings.append(
                f"the tuned biases LOWER held-out {other} accuracy by "
                f"{-100 * delta[other]['delta']:.1f} points (calibrated for {scoring})"
            )
    comparison: baselines.Comparison | None = None
    if held:
        comparison = baselines.run_comparison(
            memo,
            calib,
            held,
            content_free_items(task, items),
            result.bias,
            supervised=mode == "supervised",
            scoring=scoring,
            objective=objective,
            seed=options.seed,
        )
        v = comparison.verdict if comparison else None
        if v is not None:
            if v.beats:
                improved = True
            else:
                improved = False
                warn(
                    f"a free output-side correction does as well as ZeroTuning on the held-out items: "
                    f"{baselines.describe(v.best_free.key)} {100 * v.best_free.accuracy:.1f}% vs "
                    f"{baselines.describe(v.shipped.key)} {100 * v.shipped.accuracy:.1f}% "
                    f"({_fmt_delta(v.delta)}); use {_use_instead(v.best_free)}"
                )
    t_heldout = time.monotonic() - t2

    tuned_is_baseline = not np.any(result.bias)
    written: Path | None = None
    reason: str | None = None
    if tuned_is_baseline:
        reason = "the search kept the baseline (no candidate beat it on the calibration items)"
    elif improved is False and not options.force:
        v = comparison.verdict if comparison else None
        reason = (
            "the tuned model is not better than the baseline on the held-out items (use --force to write it)"
            if v is None
            else f"{baselines.describe(v.best_free.key)} is at least as good on the held-out items "
            f"({100 * v.best_free.accuracy:.1f}% vs {100 * v.shipped.accuracy:.1f}%): use "
            f"{_use_instead(v.best_free)} (or --force to write the tuned file)"
        )
    attention = ctx.probe_attention(result.bias if np.any(result.bias) else None, calib[0])
    if output is not None and reason is None:
        provenance = provenance_of(task, mode, options, scoring, objective, result, heldout, len(calib))
        provenance.update(comparison_provenance(comparison))
        written = gguf_meta.write_tuned(model_path, output, result.bias, provenance)

    return Outcome(
        mode=mode,
        scoring=scoring,
        scoring_reason=scoring_reason,
        objective=objective,
        result=result,
        heldout=heldout,
        n_calibration=len(calib),
        improved=improved,
        written=written,
        not_written_reason=reason if output is not None else "no output requested",
        warnings=warnings,
        timings={"search_s": t_search, "heldout_s": t_heldout, "total_s": time.monotonic() - t0},
        comparison=comparison,
        attention=attention,
        gpu_layers=model.n_gpu_layers,
        workers=workers,
    )


def comparison_provenance(comparison: baselines.Comparison | None) -> dict[str, str | float]:
    """The zerotuning.* keys of the shipped output correction and the best free baseline."""
    if comparison is None or comparison.verdict is None:
        return {}
    v = comparison.verdict
    out: dict[str, str | float] = {
        "shipped": comparison.shipped,
        "best_free_baseline": v.best_free.key,
        "best_free_accuracy": float(v.best_free.accuracy),
        "shipped_accuracy": float(v.shipped.accuracy),
    }
    c = comparison.shipped_correction
    if isinstance(c, baselines.LogitBias):
        out["logit_bias"] = json.dumps(c.to_dict())
        out["logit_bias_args"] = " ".join(c.cli_args())
    elif isinstance(c, baselines.Correction):
        out["choice_correction"] = json.dumps(c.to_dict())
    return out


def _fmt_delta(d: dict[str, float]) -> str:
    return f"delta {100 * d['delta']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] points"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def provenance_of(
    task: Task,
    mode: str,
    options: CalibrateOptions,
    scoring: str,
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
        "scoring": scoring,
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
        key = f"accuracy_{scoring}"
        prov["baseline_accuracy"] = float(heldout.baseline[key])
        prov["tuned_accuracy"] = float(heldout.tuned[key])
    return prov
