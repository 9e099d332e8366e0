"""zt-gguf: calibrate ZeroTuning first-token attention biases for a GGUF model and write a tuned copy.

A client of the library: each command parses its options, calls zt_gguf's API (calibrate, evaluate, gguf_meta,
profiles, lmeval, tools) and renders the result. What a user can fix (zt_gguf.errors.UserError) is one line
on stderr and exit code 2; anything else is a bug and shows its traceback; Ctrl-C exits 130.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import __version__, gguf_meta, objectives, report, tasks
from .calibrate import CalibrateOptions, calibrate
from .errors import UserError
from .evaluate import evaluate
from .matching import RULES as MATCH_RULES
from .models import MODELS
from .options import EvaluateOptions
from .outputs import Outputs
from .results import Calibration, Evaluation
from .search import METHODS, SearchConfig
from .tools import TOOLS, bin_dir, tool_path

EXIT_USAGE = 2
MAX_N_GEN = 2048
EXIT_INTERRUPTED = 130


class CliError(click.ClickException):
    """A one-line error for the user; exit code 2."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        click.echo(f"zt-gguf: error: {self.format_message()}", err=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A UserError from the library becomes one line and exit 2; every other exception propagates."""
    try:
        yield
    except UserError as e:
        text = str(e).strip()
        raise CliError(text.splitlines()[0] if text else type(e).__name__) from None


# --- option types ---------------------------------------------------------------------------------------


class GridType(click.ParamType):
    """Comma-separated gammas, e.g. 1.25,1.5,2."""

    name = "GAMMAS"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(x) for x in str(value).split(","))
        except ValueError:
            self.fail(f"a grid is comma-separated numbers, got {value!r}", param, ctx)


class LayerRangeType(click.ParamType):
    """START:END (end exclusive; either may be left out)."""

    name = "START:END"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int, int | None]:
        if isinstance(value, tuple):
            return value
        a, _, b = str(value).partition(":")
        try:
            return int(a or 0), (int(b) if b else None)
        except ValueError:
            self.fail(f"takes START:END, got {value!r}", param, ctx)


GRID = GridType()
LAYERS = LayerRangeType()


def _progress_factory(enabled: bool) -> Callable[[str, int], Callable[[int, str | None], None]] | None:
    """tqdm bars (with the time left) on stderr, one per stage; the note (current candidate) as postfix."""
    if not enabled:
        return None
    from tqdm import tqdm

    bars: list[Any] = []

    def make(stage: str, total: int) -> Callable[[int, str | None], None]:
        while bars:
            bars.pop().close()
        # disable=None: no bar when stderr is not a terminal (a log or a pipe gets the error lines only)
        bar = tqdm(total=total, desc=f"{stage:>9}", unit="it", leave=False, dynamic_ncols=True, disable=None)
        bars.append(bar)
        shown: list[str | None] = [None]

        def update(done: int, note: str | None = None) -> None:
            if note is not None and note != shown[0] and not bar.disable:
                shown[0] = note
                bar.set_postfix_str(note, refresh=False)
            bar.update(max(0, done - bar.n))

        return update

    return make


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(report.to_jsonable(obj), indent=2))


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return a.resolve() == b.resolve() or (b.exists() and a.samefile(b))
    return False


def with_options(options: Sequence[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def wrap(f: Any) -> Any:
        for opt in reversed(options):
            f = opt(f)
        return f

    return wrap


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
    click.option(
        "--match",
        type=click.Choice(list(MATCH_RULES)),
        help="Open-ended tasks: how a greedy continuation is judged against the reference answers (exact: "
        "SQuAD-normalised first line; contains; number: the last number; regex: --answer-regex's group). "
        "Default: the task file's header, else exact.",
    ),
    click.option(
        "--answer-regex", help="Open-ended tasks, --match regex: a regular expression with one group."
    ),
    click.option(
        "--stop",
        multiple=True,
        help="A stop string for generation (repeatable; default: the label words, or a newline for an "
        'open-ended task). Use --stop "" for none (chain of thought: the number rule reads the last number).',
    ),
    click.option(
        "--chat",
        is_flag=True,
        help="Send every prompt as a user message through the model's own chat template (as llama-server's "
        "/v1/chat/completions does).",
    ),
    click.option("--system", help="With --chat: a system message before every prompt."),
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


def _load_task(path: Path, p: dict[str, Any], max_items: int | None) -> tasks.Task:
    words = p["choice_words"]
    choices = [w if w.startswith(" ") else " " + w for w in words.split(",")] if words else None
    if p["system"] is not None and not p["chat"]:
        raise CliError("--system goes with --chat")
    return tasks.load_task(
        path,
        template=p["template"],
        choices=choices,
        max_items=max_items,
        allow_duplicate_choices=p["allow_duplicate_choices"],
        match=p["match"],
        answer_regex=p["answer_regex"],
    )


def _stops(p: dict[str, Any]) -> tuple[str, ...] | None:
    """--stop as given (--stop "" alone: no stop string), or None for the task's default."""
    if not p["stop"]:
        return None
    return tuple(x for x in p["stop"] if x)


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


# --- calibrate ------------------------------------------------------------------------------------------

calibrate_options = [
    click.option(
        "-o",
        "--output",
        type=click.Path(path_type=Path),
        help="The tuned GGUF (default: MODEL with .zt.gguf next to it).",
    ),
    click.option(
        "--report",
        "report_dir",
        type=click.Path(path_type=Path),
        help="Report folder (default: OUTPUT without .gguf + .report).",
    ),
    click.option(
        "--mode",
        type=click.Choice(["auto", "supervised", "unsupervised"]),
        default="auto",
        show_default=True,
        help="auto: supervised when every item has an answer.",
    ),
    click.option(
        "--scoring",
        type=click.Choice(["auto", "generate", "choice"]),
        default="auto",
        show_default=True,
        help="generate: the first label word in a greedy continuation (what llama-cli gives); "
        "choice: the most likely choice; auto: generate when the untuned model names a label in most of its "
        "continuations of the first chunk, else choice.",
    ),
    click.option(
        "--n-gen",
        type=click.IntRange(min=1, max=MAX_N_GEN),
        help="Greedy tokens generated per item (default 4 for multiple choice, 1: the paper's first token; "
        "32 for open-ended answers; a few hundred for chain of thought).",
    ),
    click.option(
        "--objective",
        type=click.Choice(list(objectives.OBJECTIVES)),
        help="What the search maximises (default: logprob for choice scoring, accuracy-generate for generate "
        "scoring, mutual-information unsupervised; bc-*: judged after Batch Calibration, shipped with it).",
    ),
    click.option(
        "--search",
        "method",
        type=click.Choice(list(METHODS)),
        default="paper",
        show_default=True,
        help="paper: the paper's procedure; bands/heads: finer searches on top of it.",
    ),
    click.option("--head-fraction", type=click.FloatRange(0.01, 1.0), default=0.4, show_default=True),
    click.option("--grid-up", type=GRID, help="Gammas tried for up-type heads, e.g. 1.25,1.5,2,2.5,3,3.5,4."),
    click.option("--grid-down", type=GRID, help="Gammas tried for down-type heads, e.g. 0.1,0.2,...,0.9."),
    click.option("--layers", type=LAYERS, help="Layer range START:END (end exclusive) the biases apply to."),
    click.option(
        "--budget",
        type=click.IntRange(min=1),
        default=60,
        show_default=True,
        help="Extra candidates for --search bands/heads.",
    ),
    click.option(
        "--probe-items",
        type=click.IntRange(min=1),
        help="Score the head probes on the first N calibration items only (rounded up to whole chunks of "
        "32); the grid is still judged on every item. Cuts the search's cost; see docs/calibrate.md.",
    ),
    click.option(
        "--holdout",
        type=click.FloatRange(0.0, 0.9),
        default=0.3,
        show_default=True,
        help="Share of labelled items kept out of the search to check the result.",
    ),
    click.option("--seed", type=int, default=42, show_default=True),
    click.option("--no-early-stop", is_flag=True, help="Score every candidate on every calibration item."),
    click.option(
        "--check",
        "check_path",
        type=click.Path(path_type=Path),
        help="Labelled items to check an unsupervised pick.",
    ),
    click.option(
        "--force",
        is_flag=True,
        help="Write the biases even if they do not beat the baseline on held-out items.",
    ),
    click.option("--no-resume", is_flag=True, help="Ignore the checkpoint of an interrupted run."),
    click.option(
        "--profile-out",
        type=click.Path(path_type=Path),
        help="Also write the tuned biases as a profile (a small GGUF, or JSON for a .json name) for serving "
        "several tunings of one model (zt_gguf.profiles).",
    ),
    click.option(
        "--workers",
        type=click.IntRange(min=1),
        help="Score the search's candidates on N Ray workers on this machine (--threads each; with "
        "--ray-address: N workers on that cluster). Needs pip install 'zt-gguf[ray]'.",
    ),
    click.option(
        "--ray-address",
        help="Join this Ray cluster (e.g. 10.0.0.5:6379, or auto) and score the candidates on its nodes; the "
        "model must be readable there at the same path, or at --worker-model.",
    ),
    click.option(
        "--worker-model",
        type=click.Path(path_type=Path),
        help="The model's path on the Ray workers, when it differs from MODEL's (a shared file system "
        "mounted elsewhere); checked by size.",
    ),
    click.option("--quiet", is_flag=True, help="No progress bars."),
]


@main.command("calibrate")
@click.argument("model", type=click.Path(path_type=Path))
@with_options(task_options)
@with_options(calibrate_options)
def calibrate_cmd(model: Path, **p: Any) -> None:
    """Find first-token biases for a task and write a tuned GGUF plus a report.

    \b
    Example:
      zt-gguf calibrate model.Q4_K_M.gguf --task data.jsonl
      zt-gguf calibrate model.gguf --task sst2.jsonl --scoring choice --search bands -o tuned.gguf
      zt-gguf calibrate model.gguf --task sst2.jsonl --profile-out sst2.profile.gguf
      zt-gguf calibrate model.gguf --task sst2.jsonl --workers 4 --threads 2
    """
    if p["worker_model"] and not (p["workers"] or p["ray_address"]):
        raise CliError("--worker-model needs --workers or --ray-address")
    with user_errors():
        task = _load_task(p["task_path"], p, p["max_items"])
        options = _calibrate_options(p)
        if options.distributed:
            from .distributed import require_ray

            require_ray(options.ray_address)
        outputs = Outputs.beside(
            model,
            p["output"],
            p["report_dir"],
            profile=p["profile_out"],
            resume=not p["no_resume"],
            command=tuple(sys.argv),
        )
        _run_calibration(model, task, options, outputs, as_json=p["as_json"], quiet=p["quiet"])


def _calibrate_options(p: dict[str, Any]) -> CalibrateOptions:
    check_items = None
    if p["check_path"] is not None:
        check = _load_task(p["check_path"], p, None)
        if not check.has_answers:
            raise CliError(f"{p['check_path']}: --check needs an answer on every item")
        check_items = check.items
    layer_start, layer_end = p["layers"] or (0, None)
    grids = {k: p[f"grid_{k}"] for k in ("up", "down") if p[f"grid_{k}"] is not None}
    search = SearchConfig(
        method=p["method"],
        head_fraction=p["head_fraction"],
        layer_start=layer_start,
        layer_end=layer_end,
        budget=p["budget"],
        early_stop=not p["no_early_stop"],
        probe_items=p["probe_items"],
        **{f"grid_{k}": g for k, g in grids.items()},
    )
    return CalibrateOptions(
        mode=p["mode"],
        scoring=p["scoring"],
        objective=p["objective"],
        n_gen=p["n_gen"],
        stop=_stops(p),
        chat=p["chat"],
        system=p["system"],
        holdout=p["holdout"],
        seed=p["seed"],
        search=search,
        n_threads=p["threads"],
        gpu_layers=p["gpu_layers"],
        n_ctx=p["n_ctx"],
        force=p["force"],
        check_items=check_items,
        workers=p["workers"],
        ray_address=p["ray_address"],
        worker_model=p["worker_model"],
    )


def _run_calibration(
    model: Path, task: tasks.Task, options: CalibrateOptions, outputs: Outputs, *, as_json: bool, quiet: bool
) -> None:
    """calibrate() with progress bars and early lines on stderr, then the summary (or JSON) on stdout."""
    logged_early: list[str] = []

    def log_line(line: str) -> None:
        logged_early.append(line.removeprefix("warning: "))
        click.echo(f"zt-gguf: {line}", err=True)

    cal = calibrate(
        model,
        task,
        options,
        outputs,
        progress=_progress_factory(not quiet and not as_json),
        log=None if quiet else log_line,
    )
    _render_calibration(cal, outputs, as_json)
    for w in cal.warnings:
        if quiet or w not in logged_early:
            click.echo(f"zt-gguf: warning: {w}", err=True)


def _render_calibration(cal: Calibration, outputs: Outputs, as_json: bool) -> None:
    files = cal.written.report_files
    if as_json:
        extra = {"profile": None if cal.written.profile is None else str(cal.written.profile)}
        _emit_json({**cal.report.to_dict(), "report_files": {k: str(v) for k, v in files.items()}, **extra})
    else:
        click.echo(report.format_summary(cal.report))
        click.echo(f"report: {files['report']}")
    if outputs.profile is not None:
        click.echo(
            f"zt-gguf: profile: {cal.written.profile}"
            if cal.written.profile is not None
            else f"zt-gguf: no profile written to {outputs.profile}: no tuned file was written",
            err=True,
        )


# --- eval -----------------------------------------------------------------------------------------------


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
@click.option(
    "--n-gen",
    type=click.IntRange(min=1, max=MAX_N_GEN),
    help="Greedy tokens generated per item (default 4 for multiple choice, 32 for open-ended answers).",
)
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
def eval_cmd(model: Path, **p: Any) -> None:
    """Accuracy of MODEL on a task (both scorings), with 95% intervals, invalid-output rate and items/s,
    the output correction stored with a tuned file applied, and the output-side baselines on the same items.

    \b
    Example:
      zt-gguf eval tuned.gguf --task data.jsonl
      zt-gguf eval tuned.gguf --task data.jsonl --no-bias --json
    """
    options = EvaluateOptions(
        bias="off" if p["no_bias"] else ("file" if p["bias_file"] is not None else "stored"),
        bias_file=None if p["no_bias"] else p["bias_file"],
        correction=not p["no_correction"],
        baselines=not p["no_baselines"],
        n_gen=p["n_gen"],
        stop=_stops(p),
        chat=p["chat"],
        system=p["system"],
        seed=p["seed"],
        n_threads=p["threads"],
        gpu_layers=p["gpu_layers"],
        n_ctx=p["n_ctx"],
    )
    with user_errors():
        if not model.exists():
            raise CliError(f"{model}: no such file")
        task = _load_task(p["task_path"], p, p["max_items"])
        ev = evaluate(model, task, options, progress=_progress_factory(not p["as_json"]))
    out = _evaluation_json(ev)
    if p["as_json"]:
        _emit_json(out)
    else:
        _render_evaluation(ev, out)
    for w in ev.warnings:
        click.echo(f"zt-gguf: warning: {w}", err=True)


def _evaluation_json(ev: Evaluation) -> dict[str, Any]:
    out = {
        "model": str(ev.model),
        "task": str(ev.task),
        "bias": ev.bias,
        "gpu_layers": ev.gpu_layers,
        "attention": ev.attention,
        **report.heldout_metrics(ev.summary),
        "mean_entropy_full": ev.summary.mean_entropy_full,
        "mutual_information": ev.summary.mutual_information,
        "items_per_s": ev.n_items / ev.seconds if ev.seconds > 0 else None,
        "seconds": ev.seconds,
        "correction": None if ev.correction is None else ev.correction.to_dict(),
    }
    if ev.corrected is not None:
        out["corrected"] = report.heldout_metrics(ev.corrected)
    if ev.baselines is not None:
        out["baselines"] = ev.baselines
    out["warnings"] = ev.warnings
    if ev.kind == "open":
        out.update(kind=ev.kind, match=ev.match, n_gen=ev.n_gen, examples=[e._asdict() for e in ev.examples])
    return out


def _render_evaluation(ev: Evaluation, out: dict[str, Any]) -> None:
    click.echo(f"{ev.model.name} on {ev.task.name} ({ev.n_items} items, bias {ev.bias})")
    click.echo(f"  attention on {ev.attention}")
    if ev.kind == "open":
        _render_open_evaluation(ev, out)
        return
    for key in ("accuracy_generate", "accuracy_choice"):
        acc, iv = out[key], out["intervals"][key]
        if acc is not None:
            click.echo(f"  {key:<18} {100 * acc:5.1f}%  [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]")
    corrected = out.get("corrected")
    if corrected is not None and corrected["accuracy_generate"] is not None and ev.correction is not None:
        c, iv = corrected["accuracy_generate"], corrected["intervals"]["accuracy_generate"]
        args = " ".join(ev.correction.cli_args())  # type: ignore[union-attr]
        label = "generate + stored logit bias"
        click.echo(f"  {label:<18} {100 * c:5.1f}%  [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]  ({args})")
    click.echo(f"  {'invalid outputs':<18} {100 * out['invalid_rate']:5.1f}%")
    click.echo(f"  {'items/s':<18} {out['items_per_s']:.1f}")
    for line in report.format_baselines(out.get("baselines") or {}, items="these items,"):
        click.echo(f"  {line}")


def _render_open_evaluation(ev: Evaluation, out: dict[str, Any]) -> None:
    acc, iv = out["accuracy_generate"], out["intervals"]["accuracy_generate"]
    if acc is not None:
        click.echo(
            f"  exact match ({ev.match} rule) {100 * acc:5.1f}%  [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"
        )
    click.echo(f"  {'items/s':<18} {out['items_per_s']:.1f}")
    for e in ev.examples:
        tail = e.prompt[-60:].replace("\n", "\\n")
        verdict = "right" if e.correct else "wrong"
        click.echo(f"  {verdict}: ...{tail!s} -> {e.continuation!r} (reference {e.references[0]!r})")
    for line in report.format_baselines(out.get("baselines") or {}, items="these items,"):
        click.echo(f"  {line}")


# --- show, apply, strip ---------------------------------------------------------------------------------


def _model_info(path: Path) -> gguf_meta.ModelInfo:
    if not path.exists():
        raise CliError(f"{path}: no such file")
    return gguf_meta.read_model_info(path)


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
    with user_errors():
        info = _model_info(model)
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
    with user_errors():
        _model_info(model)
        if _same_file(model, output):
            raise CliError(f"{output}: the output would overwrite the input model")
        gguf_meta.apply_biases(model, source, output)
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
    with user_errors():
        _model_info(model)
        if _same_file(model, output):
            raise CliError(f"{output}: the output would overwrite the input model")
        gguf_meta.strip(model, output)
    click.echo(f"wrote {output}")


# --- demo -----------------------------------------------------------------------------------------------


@main.command("demo")
@click.option(
    "--model",
    "model_name",
    type=click.Choice(list(MODELS)),
    default="gemma-3-270m",
    show_default=True,
)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where the tuned model goes.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--max-items", type=click.IntRange(min=20), default=None, help="Use fewer of the 300 demo items."
)
@click.option("--json", "as_json", is_flag=True)
def demo_cmd(
    model_name: str, output: Path | None, threads: int, max_items: int | None, as_json: bool
) -> None:
    """Calibrate the embedded default model on the shipped SST-2 slice, end to end, with calibrate's defaults
    (the held-out comparison with the free output-side baselines included).

    \b
    Example:
      zt-gguf demo
    """
    from . import models

    with user_errors():
        path = models.get(model_name)
        out = output or (models.models_dir() / (path.name[: -len(".gguf")] + ".sst2-demo.zt.gguf"))
        click.echo(f"model: {path}\ntask:  {tasks.demo_task_path()}", err=True)
        task = tasks.load_task(tasks.demo_task_path(), max_items=max_items)
        options = CalibrateOptions(mode="supervised", n_threads=threads)
        outputs = Outputs.beside(path, out, command=tuple(sys.argv))
        _run_calibration(path, task, options, outputs, as_json=as_json, quiet=False)


# --- export-profile -------------------------------------------------------------------------------------


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

    with user_errors():
        if _same_file(tuned, output):
            raise CliError(f"{output}: is the input file; write the profile to another path")
        profiles.export_profile(tuned, output)
    click.echo(str(output))


# --- lm-eval --------------------------------------------------------------------------------------------


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

    with user_errors():
        rc = lmeval.run_cli(model, lm_eval_args, no_bias=no_bias, gpu_layers=gpu_layers, threads=threads)
    sys.exit(rc)


# --- tools ----------------------------------------------------------------------------------------------


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
    with user_errors():
        if show_path or name is None:
            click.echo(str(bin_dir()))
            return
        exe = tool_path(name)
    # the tool replaces this process, so that signals (a server stopped with Ctrl-C or kill) reach it and
    # no orphan is left behind; its exit code is the command's
    os.execv(str(exe), [str(exe), *args])


def run() -> None:
    """The console entry point: click's errors as one line, Ctrl-C as exit 130 with a hint."""
    try:
        rv = main.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo(
            "zt-gguf: interrupted (calibrate resumes from its checkpoint when rerun with the same arguments)",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    run()
