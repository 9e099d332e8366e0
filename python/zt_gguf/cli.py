"""zt-gguf: calibrate ZeroTuning first-token attention biases for a GGUF model and write a tuned copy.

Commands: calibrate, eval, show, apply, strip, demo, tools. Every error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import __version__, gguf_meta, metrics, report, tasks
from .calibrate import CalibrateOptions, CalibrationError, Outcome, calibrate
from .search import SearchConfig, SearchError
from .tools import TOOLS, ToolError, bin_dir, tool_path

EXIT_USAGE = 2
EVAL_CHUNK = 64  # eval scores this many items a call (the fitted KV cache holds them)


class UserError(click.ClickException):
    """A one-line error for the user; exit code 2."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        click.echo(f"zt-gguf: error: {self.format_message()}", err=True)


def _fail(e: BaseException) -> UserError:
    return UserError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def _progress_factory(enabled: bool) -> Callable[[str, int], Callable[[int, str | None], None]] | None:
    """tqdm bars (with the time left) on stderr, one per stage; the note (current candidate) as postfix."""
    if not enabled:
        return None
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def make(stage: str, total: int) -> Callable[[int], None]:
        for b in bars.values():
            b.close()
        bars.clear()
        # disable=None: no bar when stderr is not a terminal (a log or a pipe gets the error lines only)
        bar = tqdm(total=total, desc=f"{stage:>9}", unit="it", leave=False, dynamic_ncols=True, disable=None)
        bars[stage] = bar

        shown: list[str | None] = [None]

        def update(done: int, note: str | None = None) -> None:
            if note is not None and note != shown[0] and not bar.disable:
                shown[0] = note
                bar.set_postfix_str(note, refresh=False)
            bar.update(max(0, done - bar.n))

        return update

    return make


def _load_task(
    path: Path, template: str | None, choices: str | None, max_items: int | None, allow_dup: bool
) -> tasks.Task:
    words = [w if w.startswith(" ") else " " + w for w in choices.split(",")] if choices else None
    return tasks.load_task(
        path, template=template, choices=words, max_items=max_items, allow_duplicate_choices=allow_dup
    )


def _check_model(path: Path) -> gguf_meta.ModelInfo:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    return gguf_meta.read_model_info(path)


def _default_output(model: Path) -> Path:
    stem = model.name[: -len(".gguf")] if model.name.endswith(".gguf") else model.name
    return model.with_name(f"{stem}.zt.gguf")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(report.to_jsonable(obj), indent=2))


task_options = [
    click.option(
        "--task",
        "task_path",
        type=click.Path(path_type=Path),
        required=True,
        help="JSONL file: {prompt, choices, answer?} or {text, label} per line.",
    ),
    click.option(
        "--template", help='For {text, label} lines: the prompt template, e.g. "Review: {text}\\nSentiment:".'
    ),
    click.option(
        "--choices", "choice_words", help='For {text, label} lines: label words, e.g. "negative,positive".'
    ),
    click.option("--max-items", type=click.IntRange(min=1), help="Use only the first N items."),
    click.option("--allow-duplicate-choices", is_flag=True, help="Accept items that repeat a choice."),
    click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="CPU threads."),
    click.option(
        "--gpu-layers",
        type=click.IntRange(min=0),
        help="Layers offloaded to a GPU backend (llama.cpp's -ngl; default: all when zt-gguf was built with "
        "Vulkan or CUDA and a device is present; 0: CPU only).",
    ),
    click.option(
        "--ctx",
        "n_ctx",
        type=click.IntRange(min=64),
        help="KV cells shared by the items scored together (default: fitted to the items, 512 to 4096).",
    ),
    click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout."),
]


def with_options(options: Sequence[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def wrap(f: Any) -> Any:
        for opt in reversed(options):
            f = opt(f)
        return f

    return wrap


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="zt-gguf")
def main() -> None:
    """ZeroTuning for GGUF models: tune per-head first-token attention biases on a task, write a tuned GGUF
    that the patched llama.cpp tools and llama-cpp-python apply (stock llama.cpp ignores them).

    \b
    Example:
      zt-gguf calibrate model.Q4_K_M.gguf --task data.jsonl
      zt-gguf demo
    """


# --- calibrate


def _grid(value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        g = tuple(float(x) for x in value.split(","))
    except ValueError:
        raise UserError(f"a grid is comma-separated numbers, got {value!r}") from None
    return g


def _layers(value: str | None) -> tuple[int, int | None]:
    if not value:
        return 0, None
    try:
        a, _, b = value.partition(":")
        return int(a or 0), (int(b) if b else None)
    except ValueError:
        raise UserError(f"--layers takes START:END, got {value!r}") from None


@main.command("calibrate")
@click.argument("model", type=click.Path(path_type=Path))
@with_options(task_options)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="The tuned GGUF (default: MODEL with .zt.gguf next to it).",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path),
    help="Report folder (default: OUTPUT without .gguf + .report).",
)
@click.option(
    "--mode",
    type=click.Choice(["auto", "supervised", "unsupervised"]),
    default="auto",
    show_default=True,
    help="auto: supervised when every item has an answer.",
)
@click.option(
    "--scoring",
    type=click.Choice(["auto", "generate", "choice"]),
    default="auto",
    show_default=True,
    help="generate: the first label word in a greedy continuation (what llama-cli gives); "
    "choice: the most likely choice; auto: generate when the untuned model names a label in most of its "
    "continuations of the first chunk, else choice.",
)
@click.option(
    "--n-gen",
    type=click.IntRange(min=1, max=64),
    default=4,
    show_default=True,
    help="Greedy tokens generated per item for --scoring generate (1: the paper's first token).",
)
@click.option(
    "--objective",
    type=click.Choice(list(metrics.OBJECTIVES)),
    help="What the search maximises (default: logprob for choice scoring, accuracy-generate for generate "
    "scoring, mutual-information unsupervised; bc-*: judged after Batch Calibration, shipped with it).",
)
@click.option(
    "--search",
    "method",
    type=click.Choice(["paper", "bands", "heads"]),
    default="paper",
    show_default=True,
    help="paper: the paper's procedure; bands/heads: finer searches on top of it.",
)
@click.option("--head-fraction", type=click.FloatRange(0.01, 1.0), default=0.4, show_default=True)
@click.option("--grid-up", help="Gammas tried for up-type heads, e.g. 1.25,1.5,2,2.5,3,3.5,4.")
@click.option("--grid-down", help="Gammas tried for down-type heads, e.g. 0.1,0.2,...,0.9.")
@click.option("--layers", help="Layer range START:END (end exclusive) the biases apply to.")
@click.option(
    "--budget",
    type=click.IntRange(min=1),
    default=60,
    show_default=True,
    help="Extra candidates for --search bands/heads.",
)
@click.option(
    "--holdout",
    type=click.FloatRange(0.0, 0.9),
    default=0.3,
    show_default=True,
    help="Share of labelled items kept out of the search to check the result.",
)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--no-early-stop", is_flag=True, help="Score every candidate on every calibration item.")
@click.option(
    "--check",
    "check_path",
    type=click.Path(path_type=Path),
    help="Labelled items to check an unsupervised pick.",
)
@click.option(
    "--force", is_flag=True, help="Write the biases even if they do not beat the baseline on held-out items."
)
@click.option("--no-resume", is_flag=True, help="Ignore the checkpoint of an interrupted run.")
@click.option(
    "--profile-out",
    type=click.Path(path_type=Path),
    help="Also write the tuned biases as a profile (a small GGUF, or JSON for a .json name) for serving "
    "several tunings of one model (zt_gguf.profiles).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Score the search's candidates on N Ray workers on this machine (--threads each; with "
    "--ray-address: N workers on that cluster). Needs pip install 'zt-gguf[ray]'.",
)
@click.option(
    "--ray-address",
    help="Join this Ray cluster (e.g. 10.0.0.5:6379, or auto) and score the candidates on its nodes; the "
    "model must be readable there at the same path, or at --worker-model.",
)
@click.option(
    "--worker-model",
    help="The model's path on the Ray workers, when it differs from MODEL's (a shared file system mounted "
    "elsewhere); checked by size.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def calibrate_cmd(
    model: Path,
    task_path: Path,
    template: str | None,
    choice_words: str | None,
    max_items: int | None,
    allow_duplicate_choices: bool,
    threads: int,
    gpu_layers: int | None,
    n_ctx: int | None,
    as_json: bool,
    output: Path | None,
    report_dir: Path | None,
    mode: str,
    scoring: str,
    n_gen: int,
    objective: str | None,
    method: str,
    head_fraction: float,
    grid_up: str | None,
    grid_down: str | None,
    layers: str | None,
    budget: int,
    holdout: float,
    seed: int,
    no_early_stop: bool,
    check_path: Path | None,
    force: bool,
    no_resume: bool,
    profile_out: Path | None,
    workers: int | None,
    ray_address: str | None,
    worker_model: str | None,
    quiet: bool,
) -> None:
    """Find first-token biases for a task and write a tuned GGUF plus a report.

    \b
    Example:
      zt-gguf calibrate model.Q4_K_M.gguf --task data.jsonl
      zt-gguf calibrate model.gguf --task sst2.jsonl --scoring choice --search bands -o tuned.gguf
      zt-gguf calibrate model.gguf --task sst2.jsonl --profile-out sst2.profile.gguf
      zt-gguf calibrate model.gguf --task sst2.jsonl --workers 4 --threads 2
    """
    try:
        _check_model(model)
        out = output or _default_output(model)
        if _same_file(model, out):
            raise UserError(f"{out}: the output would overwrite the input model; choose another -o")
        if profile_out is not None and (_same_file(model, profile_out) or _same_file(out, profile_out)):
            raise UserError(f"{profile_out}: --profile-out would overwrite the model or the tuned file")
        rdir = report_dir or out.with_name(
            out.name[: -len(".gguf")] + ".report" if out.name.endswith(".gguf") else out.name + ".report"
        )
        task = _load_task(task_path, template, choice_words, max_items, allow_duplicate_choices)
        check_items = None
        if check_path is not None:
            check = _load_task(check_path, template, choice_words, None, allow_duplicate_choices)
            if not check.has_answers:
                raise UserError(f"{check_path}: --check needs an answer on every item")
            check_items = check.items
        lstart, lend = _layers(layers)
        cfg = SearchConfig(
            method=method,
            head_fraction=head_fraction,
            layer_start=lstart,
            layer_end=lend,
            budget=budget,
            early_stop=not no_early_stop,
            seed=seed,
        )
        if (g := _grid(grid_up)) is not None:
            cfg.grid_up = g
        if (g := _grid(grid_down)) is not None:
            cfg.grid_down = g
        opts = CalibrateOptions(
            mode=mode,
            scoring=scoring,
            objective=objective,
            n_gen=n_gen,
            holdout=holdout,
            seed=seed,
            search=cfg,
            n_threads=threads,
            gpu_layers=gpu_layers,
            n_ctx=n_ctx,
            force=force,
            check_items=check_items,
            workers=workers,
            ray_address=ray_address,
            worker_model=Path(worker_model) if worker_model else None,
        )
        if worker_model and not (workers or ray_address):
            raise UserError("--worker-model needs --workers or --ray-address")
        if opts.distributed:
            from .distributed import require_ray

            require_ray(ray_address)
        rdir.mkdir(parents=True, exist_ok=True)
        checkpoint = rdir / "checkpoint.json"
        if no_resume:
            checkpoint.unlink(missing_ok=True)
        logged_early: list[str] = []

        def log_line(line: str) -> None:
            logged_early.append(line.removeprefix("warning: "))
            click.echo(f"zt-gguf: {line}", err=True)

        t0 = time.monotonic()
        outcome = calibrate(
            model,
            task,
            opts,
            output=out,
            checkpoint=checkpoint,
            progress=_progress_factory(not quiet and not as_json),
            log=None if quiet else log_line,
        )
        rep = _report(model, task, opts, outcome, time.monotonic() - t0)
        paths = report.write_report(rdir, rep, outcome.result.bias, title=f"{model.name}: gamma")
        profile_written = None
        if profile_out is not None and outcome.written is not None:
            from . import profiles

            profile_written = profiles.export_profile(outcome.written, profile_out)
    except (
        tasks.TaskError,
        gguf_meta.GGUFMetaError,
        CalibrationError,
        SearchError,
        ValueError,
        OSError,
        RuntimeError,
    ) as e:
        raise _fail(e) from None
    if as_json:
        extra = {"profile": None if profile_written is None else str(profile_written)}
        _emit_json({**rep.to_dict(), "report_files": {k: str(v) for k, v in paths.items()}, **extra})
    else:
        click.echo(report.format_summary(rep))
        click.echo(f"report: {paths['report']}")
    if profile_out is not None:
        click.echo(
            f"zt-gguf: profile: {profile_written}"
            if profile_written is not None
            else f"zt-gguf: no profile written to {profile_out}: no tuned file was written",
            err=True,
        )
    for w in outcome.warnings:
        if quiet or w not in logged_early:
            click.echo(f"zt-gguf: warning: {w}", err=True)


def _report(
    model: Path, task: tasks.Task, opts: CalibrateOptions, o: Outcome, seconds: float
) -> report.Report:
    r = o.result
    rep = report.Report(
        command=sys.argv[:],
        model={
            "path": str(model),
            "n_layer": int(r.bias.shape[0]),
            "n_head": int(r.bias.shape[1]),
            "gpu_layers": o.gpu_layers,
            "attention": o.attention,
        },
        task={
            "path": str(task.path),
            "sha256": task.sha256,
            "n_items": len(task.items),
            "n_calibration": o.n_calibration,
            "n_heldout": o.heldout.n if o.heldout else 0,
            "seed": opts.seed,
            "holdout": opts.holdout,
        },
        mode=o.mode,
        search={"method": r.method, "objective": o.objective, "settings": r.config, "workers": o.workers},
        scoring={
            "primary": o.scoring,
            "reason": o.scoring_reason,
            "asked": opts.scoring,
            "n_gen": opts.n_gen,
        },
        chosen={
            "type": r.head_type if np.any(r.bias) else "none",
            "heads": r.heads,
            "gamma": r.best_gamma,
            "layers": [opts.search.layer_start, opts.search.layer_end or int(r.bias.shape[0])],
        },
        evaluations={
            "candidates": r.n_evaluations,
            "items_scored": r.items_scored,
            "items_saved": r.items_full - r.items_scored,
            "savings": r.savings,
        },
        timings={**o.timings, "total": seconds},
        warnings=list(o.warnings),
        written={
            "path": str(o.written) if o.written else None,
            "reason": o.not_written_reason if not o.written else None,
        },
    )
    if o.comparison is not None:
        rep.baselines = o.comparison.to_dict()
    if o.heldout is not None:
        rep.baseline = report.heldout_metrics(o.heldout.baseline)
        rep.tuned = report.heldout_metrics(o.heldout.tuned)
        rep.delta = {
            f"accuracy_{k}": {"delta": v["delta"], "interval": [v["lo"], v["hi"]]}
            for k, v in o.heldout.delta.items()
        }
    if r.method != "paper":
        rep.chosen["table"] = np.exp(r.bias).round(4).tolist()
    return rep


# --- eval


@main.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@with_options(task_options)
@click.option("--no-bias", is_flag=True, help="Turn off the biases stored in MODEL (the untuned model).")
@click.option(
    "--bias",
    "bias_file",
    type=click.Path(path_type=Path),
    help="Apply these biases instead (a tuned GGUF, a bias GGUF or JSON).",
)
@click.option("--n-gen", type=click.IntRange(min=1, max=64), default=4, show_default=True)
@click.option(
    "--no-correction",
    is_flag=True,
    help="Do not apply the output correction stored with a tuned file (a logit bias or a choice offset).",
)
@click.option(
    "--no-baselines",
    is_flag=True,
    help="Skip the output-side baselines (and the untuned model's pass they need when biases are applied).",
)
@click.option("--seed", type=int, default=42, show_default=True, help="Of the paired bootstrap intervals.")
def eval_cmd(
    model: Path,
    task_path: Path,
    template: str | None,
    choice_words: str | None,
    max_items: int | None,
    allow_duplicate_choices: bool,
    threads: int,
    gpu_layers: int | None,
    n_ctx: int | None,
    as_json: bool,
    no_bias: bool,
    bias_file: Path | None,
    n_gen: int,
    no_correction: bool,
    no_baselines: bool,
    seed: int,
) -> None:
    """Accuracy of MODEL on a task (both scorings), with 95% intervals, invalid-output rate and items/s,
    the output correction stored with a tuned file applied, and the output-side baselines on the same items.

    \b
    Example:
      zt-gguf eval tuned.gguf --task data.jsonl
      zt-gguf eval tuned.gguf --task data.jsonl --no-bias --json
    """
    from . import baselines as bl
    from .calibrate import content_free_items
    from .engine import Context, Model, describe_attention, fit_n_ctx

    try:
        info = _check_model(model)
        task = _load_task(task_path, template, choice_words, max_items, allow_duplicate_choices)
        bias = gguf_meta.read_bias_file(bias_file, info) if bias_file else None
        prov: dict[str, Any] = dict(info.provenance)
        if bias_file is not None:
            try:  # the corrections stored with the biases applied (none in a bias-only GGUF or JSON)
                prov = (
                    dict(gguf_meta.read_model_info(bias_file).provenance)
                    if bias_file.suffix == ".gguf"
                    else {}
                )
            except gguf_meta.GGUFMetaError:
                prov = {}
        m = Model(model, gpu_layers=gpu_layers)
        ctx = Context(m, n_threads=threads, n_ctx=n_ctx or fit_n_ctx(m, task.items, EVAL_CHUNK, n_gen))
        if no_bias:
            ctx.set_bias(None)
        elif bias is not None:
            ctx.set_bias(bias)
        applied = ctx.get_bias()
        correction = None
        if applied is not None and not no_correction:
            correction = bl.correction_from_provenance(prov)
        stops = sorted({c.strip() for it in task.items for c in it.choices})
        stops = stops if len(stops) <= 32 else []
        bar = _progress_factory(not as_json)
        passes = 1 + isinstance(correction, bl.LogitBias) + (applied is not None and not no_baselines)
        tick = bar("eval", passes * len(task.items)) if bar else None
        done = [0]

        def score_all(items: Sequence[tasks.Item], logit_bias: Sequence[tuple[int, float]] = ()) -> list[Any]:
            out: list[Any] = []
            for i in range(0, len(items), EVAL_CHUNK):
                out += ctx.score(
                    items[i : i + EVAL_CHUNK], n_gen=n_gen, gen_stop=stops, logit_bias=logit_bias
                )
                done[0] += len(items[i : i + EVAL_CHUNK])
                if tick:
                    tick(done[0], None)
            return out

        t0 = time.monotonic()
        scores = score_all(task.items)
        seconds = time.monotonic() - t0
        attention = describe_attention(m, ctx.attention_devices())
        cf_items = content_free_items(task, task.items)
        cf_scores = ctx.score(cf_items, n_gen=1) if cf_items else []
        corrected = (
            score_all(task.items, correction.pairs()) if isinstance(correction, bl.LogitBias) else None
        )
        untuned = untuned_cf = None
        if applied is not None and not no_baselines:
            ctx.set_bias(None)
            untuned = score_all(task.items)
            untuned_cf = ctx.score(cf_items, n_gen=1) if cf_items else []
    except (tasks.TaskError, gguf_meta.GGUFMetaError, ValueError, OSError, RuntimeError) as e:
        raise _fail(e) from None
    summary = metrics.summarize(metrics.item_results(scores, task.items), task.items)
    out = {
        "model": str(model),
        "task": str(task.path),
        "bias": "off" if applied is None else ("file" if bias is not None else "stored"),
        "gpu_layers": m.n_gpu_layers,
        "attention": attention,
        **report.heldout_metrics(summary),
        "mean_entropy_full": summary.mean_entropy_full,
        "mutual_information": summary.mutual_information,
        "items_per_s": len(task.items) / seconds if seconds > 0 else None,
        "seconds": seconds,
        "correction": None if correction is None else correction.to_dict(),
    }
    if corrected is not None:
        cs = metrics.summarize(metrics.item_results(corrected, task.items), task.items)
        out["corrected"] = report.heldout_metrics(cs)
    if task.has_answers and not no_baselines:
        out["baselines"] = _eval_baselines(
            task.items, scores, cf_scores, untuned, untuned_cf, correction, seed
        )
    if as_json:
        _emit_json(out)
        return
    click.echo(f"{model.name} on {task.path.name} ({len(task.items)} items, bias {out['bias']})")
    click.echo(f"  attention on {attention}")
    for key in ("accuracy_generate", "accuracy_choice"):
        acc, iv = out[key], out["intervals"][key]
        if acc is not None:
            click.echo(f"  {key:<18} {100 * acc:5.1f}%  [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]")
    if corrected is not None and out["corrected"]["accuracy_generate"] is not None:
        c, iv = out["corrected"]["accuracy_generate"], out["corrected"]["intervals"]["accuracy_generate"]
        click.echo(
            f"  {'generate + stored logit bias':<18} {100 * c:5.1f}%  [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"
            f"  ({' '.join(correction.cli_args())})"  # type: ignore[union-attr]
        )
    click.echo(f"  {'invalid outputs':<18} {100 * out['invalid_rate']:5.1f}%")
    click.echo(f"  {'items/s':<18} {out['items_per_s']:.1f}")
    for line in report.format_baselines(out.get("baselines") or {}, items="these items,"):
        click.echo(f"  {line}")


def _eval_baselines(
    items: Sequence[tasks.Item],
    scores: list[Any],
    cf: list[Any],
    untuned: list[Any] | None,
    untuned_cf: list[Any] | None,
    correction: Any,
    seed: int,
) -> dict[str, Any]:
    """The choice-score baselines of eval: label-free ones on this batch (Batch Calibration, Contextual
    Calibration), for the evaluated model and, when it has biases, the untuned one; the stored offset."""
    from . import baselines as bl

    y = np.array([it.answer for it in items])
    try:
        arm = bl.Arm(
            np.zeros((0, len(items[0].choices))), bl.score_matrix([s.choice_logprob for s in scores])
        )
        if cf:
            arm.s_cf = bl.score_matrix([s.choice_logprob for s in cf])
        if untuned is None:
            rows = bl.compare(arm, None, y, None, seed)
        else:
            u = bl.Arm(np.zeros_like(arm.s_cal), bl.score_matrix([s.choice_logprob for s in untuned]))
            if untuned_cf:
                u.s_cf = bl.score_matrix([s.choice_logprob for s in untuned_cf])
            rows = bl.compare(u, arm, y, None, seed)
            if isinstance(correction, bl.Correction):
                pred = correction.predict(arm.s_held)
                rows.append(bl.make_row("tuned+stored", correction, list(pred), y, arm.s_held.shape[1]))
                bl.with_deltas(rows, seed)
    except ValueError as e:
        return {"rows": [], "notes": [str(e)]}
    return {"scoring": "choice", "rows": [r.to_dict() for r in rows], "notes": []}


# --- show, apply, strip


@main.command("show")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--color/--no-color", default=None, help="Colour the heat map (default: on a terminal).")
def show_cmd(model: Path, as_json: bool, color: bool | None) -> None:
    """The biases stored in MODEL (gamma per layer and head) and their provenance.

    \b
    Example:
      zt-gguf show tuned.gguf
    """
    try:
        info = _check_model(model)
    except (gguf_meta.GGUFMetaError, OSError) as e:
        raise _fail(e) from None
    if as_json:
        _emit_json(
            {
                "path": str(model),
                "arch": info.arch,
                "n_layer": info.n_layer,
                "n_head": info.n_head,
                "biases": None if info.biases is None else info.biases.tolist(),
                "gamma": None if info.biases is None else np.exp(info.biases).tolist(),
                "bias_problem": info.bias_problem,
                "provenance": info.provenance,
            }
        )
        return
    click.echo(f"{model.name}: {info.arch}, {info.n_layer} layers x {info.n_head} query heads")
    if info.biases is None:
        click.echo("no first-token biases" + (f" ({info.bias_problem})" if info.bias_problem else ""))
    else:
        click.echo("gamma = exp(bias) per layer (rows) and head (columns):")
        click.echo(report.heatmap_text(info.biases, color=color))
    for k, v in info.provenance.items():
        click.echo(f"  {k}: {v}")


@main.command("apply")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--from",
    "source",
    type=click.Path(path_type=Path),
    required=True,
    help="A tuned GGUF, a bias-only GGUF or a JSON file of biases.",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
def apply_cmd(model: Path, source: Path, output: Path) -> None:
    """Copy MODEL with the biases of another file (e.g. from a tuned copy of the same model).

    \b
    Example:
      zt-gguf apply model.Q8_0.gguf --from model.Q4_K_M.zt.gguf -o model.Q8_0.zt.gguf
    """
    try:
        info = _check_model(model)
        if _same_file(model, output):
            raise UserError(f"{output}: the output would overwrite the input model")
        biases = gguf_meta.read_bias_file(source, info)
        prov: dict[str, Any] = {}
        if source.suffix == ".gguf":
            try:
                prov = dict(gguf_meta.read_model_info(source).provenance)
            except gguf_meta.GGUFMetaError:
                prov = {}  # a bias-only GGUF (no model hyperparameters): its biases were read above
        prov["applied_from"] = source.name
        gguf_meta.write_tuned(model, output, biases, prov)
    except (gguf_meta.GGUFMetaError, ValueError, OSError) as e:
        raise _fail(e) from None
    click.echo(f"wrote {output}")


@main.command("strip")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
def strip_cmd(model: Path, output: Path) -> None:
    """Copy MODEL without first-token biases and zerotuning.* provenance.

    \b
    Example:
      zt-gguf strip tuned.gguf -o untuned.gguf
    """
    try:
        _check_model(model)
        if _same_file(model, output):
            raise UserError(f"{output}: the output would overwrite the input model")
        gguf_meta.strip(model, output)
    except (gguf_meta.GGUFMetaError, ValueError, OSError) as e:
        raise _fail(e) from None
    click.echo(f"wrote {output}")


# --- demo


@main.command("demo")
@click.option(
    "--model",
    "model_name",
    type=click.Choice(["gemma-3-270m", "smollm2-135m"]),
    default="gemma-3-270m",
    show_default=True,
)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where the tuned model goes.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--max-items", type=click.IntRange(min=20), default=None, help="Use fewer of the 300 demo items."
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def demo_cmd(
    ctx: click.Context,
    model_name: str,
    output: Path | None,
    threads: int,
    max_items: int | None,
    as_json: bool,
) -> None:
    """Calibrate the embedded default model on the shipped SST-2 slice, end to end, with calibrate's defaults
    (the held-out comparison with the free output-side baselines included).

    \b
    Example:
      zt-gguf demo
    """
    from . import models

    try:
        path = models.get(model_name)
    except models.ModelNotAvailable as e:
        raise _fail(e) from None
    out = output or (models.models_dir() / (path.name[: -len(".gguf")] + ".sst2-demo.zt.gguf"))
    click.echo(f"model: {path}\ntask:  {tasks.demo_task_path()}", err=True)
    ctx.invoke(
        calibrate_cmd,
        model=path,
        task_path=tasks.demo_task_path(),
        template=None,
        choice_words=None,
        max_items=max_items,
        allow_duplicate_choices=False,
        threads=threads,
        gpu_layers=None,
        n_ctx=None,
        as_json=as_json,
        output=out,
        report_dir=None,
        mode="supervised",
        scoring="auto",
        n_gen=4,
        objective=None,
        method="paper",
        head_fraction=0.4,
        grid_up=None,
        grid_down=None,
        layers=None,
        budget=60,
        holdout=0.3,
        seed=42,
        no_early_stop=False,
        check_path=None,
        force=False,
        no_resume=False,
        quiet=False,
    )


# --- export-profile


@main.command("export-profile")
@click.argument("tuned", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="a .gguf or .json file")
def export_profile_cmd(tuned: Path, output: Path) -> None:
    """Write the biases and provenance of a tuned GGUF as a profile: a small GGUF with no tensors (or JSON
    for a .json name), for serving several tunings of one base model.

    \b
    Example:
      zt-gguf export-profile sst2.zt.gguf -o sst2.profile.gguf
      zt-gguf export-profile sst2.zt.gguf -o sst2.profile.json
    """
    from . import profiles

    try:
        if _same_file(tuned, output):
            raise UserError(f"{output}: is the input file; write the profile to another path")
        profiles.export_profile(tuned, output)
    except (profiles.ProfileError, gguf_meta.GGUFMetaError, OSError) as e:
        raise _fail(e) from None
    click.echo(str(output))


# --- lm-eval


@main.command("lm-eval", context_settings={"ignore_unknown_options": True})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--no-bias", is_flag=True, help="Turn off the biases stored in MODEL (the untuned model).")
@click.option(
    "--gpu-layers",
    type=click.IntRange(min=0),
    help="Layers offloaded to a GPU backend (default: all when built with Vulkan or CUDA; 0: CPU only).",
)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="CPU threads.")
@click.argument("lm_eval_args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_cmd(
    model: Path, no_bias: bool, gpu_layers: int | None, threads: int, lm_eval_args: tuple[str, ...]
) -> None:
    """Run lm-evaluation-harness on MODEL through the batched engine (lm-eval's model "zt-gguf"); the
    arguments after -- go to lm-eval's command line as they are (it needs `pip install ".[lmeval]"`).

    \b
    Example:
      zt-gguf lm-eval tuned.gguf -- --tasks my_task --include_path tasks/ --output_path out/
      zt-gguf lm-eval tuned.gguf --no-bias -- --tasks my_task --include_path tasks/ --log_samples
    """
    from . import lmeval
    from .engine import EngineError

    try:
        rc = lmeval.run_cli(model, lm_eval_args, no_bias=no_bias, gpu_layers=gpu_layers, threads=threads)
    except (lmeval.LMEvalError, EngineError) as e:
        raise _fail(e) from None
    sys.exit(rc)


# --- tools


@main.command("tools", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name", required=False, type=click.Choice(TOOLS))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--path", "show_path", is_flag=True, help="Print the folder of the tools and libllama.")
def tools_cmd(name: str | None, args: tuple[str, ...], show_path: bool) -> None:
    """Run a llama.cpp tool built from the patched tree (they apply stored biases; --no-attn-ftb turns them
    off, --attn-ftb FILE applies others).

    \b
    Example:
      zt-gguf tools llama-completion -m tuned.gguf -p "Review: great film\\nSentiment:" -n 4
      zt-gguf tools --path
    """
    try:
        if show_path or name is None:
            click.echo(str(bin_dir()))
            return
        exe = tool_path(name)
    except ToolError as e:
        raise _fail(e) from None
    sys.exit(subprocess.call([str(exe), *args]))


def run() -> None:
    """The console entry point: click's errors as one line, Ctrl-C as exit 130 with a hint."""
    try:
        rv = main.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo(
            "zt-gguf: interrupted (calibrate resumes from its checkpoint when rerun with the same arguments)",
            err=True,
        )
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    run()
