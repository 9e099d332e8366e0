"""evaluate(): a model on a task, as it ships: its biases (stored, from a file, or off) and the output
correction stored with them, both scorings, and the label-free output-side baselines on the same items.

    open the engine -> score (the model, its stored logit bias, the untuned model) -> summarise -> compare
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import comparison as cmp
from . import gguf_meta, metrics, scoring
from .chat import chat_task
from .corrections import Correction, LogitBias, correction_from_provenance, score_matrix
from .engine import Context, Model, describe_attention, first_token_warning, fit_n_ctx
from .errors import UserError
from .options import STOP_OPEN, EvaluateOptions, n_gen_for
from .outputs import NO_BASELINE_OPEN
from .results import Evaluation, Example
from .tasks import Item, Task

EVAL_CHUNK = 64  # items a call (the fitted KV cache holds them)
N_EXAMPLES = 5  # items of an open-ended task shown with their continuations
BIAS_MODES = ("stored", "off", "file")

ProgressFactory = Callable[[str, int], Callable[[int, str | None], None]]


class EvaluateError(UserError, ValueError):
    """An evaluation that cannot run as asked."""


@dataclass
class _Run:
    """The engine of one evaluation and its progress bar across every pass over the items."""

    ctx: Context
    n_gen: int
    stops: list[str]
    tick: Callable[[int, str | None], None] | None
    done: int = 0

    def score_all(self, items: Sequence[Item], logit_bias: Sequence[tuple[int, float]] = ()) -> list[Any]:
        out: list[Any] = []
        for i in range(0, len(items), EVAL_CHUNK):
            chunk = items[i : i + EVAL_CHUNK]
            out += self.ctx.score(chunk, n_gen=self.n_gen, gen_stop=self.stops, logit_bias=logit_bias)
            self.done += len(chunk)
            if self.tick:
                self.tick(self.done, None)
        return out


def stored_correction_source(model_path: Path, options: EvaluateOptions) -> dict[str, Any]:
    """The provenance whose output correction applies: the model's own, or that of the bias file (none in a
    bias-only GGUF or JSON)."""
    if options.bias != "file":
        return dict(gguf_meta.read_model_info(model_path).provenance)
    assert options.bias_file is not None
    if options.bias_file.suffix != ".gguf":
        return {}
    try:
        return dict(gguf_meta.read_model_info(options.bias_file).provenance)
    except gguf_meta.GGUFMetaError:
        return {}  # a bias-only GGUF (no model hyperparameters)


def evaluate(
    model_path: Path, task: Task, options: EvaluateOptions, *, progress: ProgressFactory | None = None
) -> Evaluation:
    if options.bias not in BIAS_MODES:
        raise EvaluateError(f"unknown bias mode {options.bias!r}; choose from {', '.join(BIAS_MODES)}")
    if (options.bias == "file") != (options.bias_file is not None):
        raise EvaluateError("a bias file goes with bias mode 'file', and only with it")
    info = gguf_meta.read_model_info(model_path)
    file_bias = gguf_meta.read_bias_file(options.bias_file, info) if options.bias_file else None
    prov = stored_correction_source(model_path, options)
    model = Model(model_path, gpu_layers=options.gpu_layers)
    if options.chat:
        task = chat_task(model, task, options.system)
    no_bos = first_token_warning(model, task.items)
    n_gen = n_gen_for(task.kind, options.n_gen)
    n_ctx = options.n_ctx or fit_n_ctx(model, task.items, EVAL_CHUNK, n_gen)
    ctx = Context(model, n_threads=options.n_threads, n_ctx=n_ctx)
    if options.bias == "off":
        ctx.set_bias(None)
    elif file_bias is not None:
        ctx.set_bias(file_bias)
    applied = ctx.get_bias()
    correction = correction_from_provenance(prov) if applied is not None and options.correction else None
    # the untuned pass feeds the output-side baselines, which an open-ended task has none of
    untuned_pass = applied is not None and options.baselines and task.kind != "open"
    passes = 1 + isinstance(correction, LogitBias) + untuned_pass
    stops = list(options.stop) if options.stop is not None else None
    if stops is None:
        stops = list(STOP_OPEN) if task.kind == "open" else scoring.label_words(task.items)
    run = _Run(ctx, n_gen, stops, None)
    run.tick = progress("eval", passes * len(task.items)) if progress else None

    t0 = time.monotonic()
    scores = run.score_all(task.items)
    seconds = time.monotonic() - t0
    attention = describe_attention(model, ctx.attention_devices())
    cf_items = scoring.content_free_items(task, task.items)
    cf_scores = ctx.score(cf_items, n_gen=1) if cf_items else []
    corrected = run.score_all(task.items, correction.pairs()) if isinstance(correction, LogitBias) else None
    untuned = untuned_cf = None
    if untuned_pass:
        ctx.set_bias(None)
        untuned = run.score_all(task.items)
        untuned_cf = ctx.score(cf_items, n_gen=1) if cf_items else []

    baselines = None
    if task.kind == "open":
        baselines = {"notes": [NO_BASELINE_OPEN]} if options.baselines else None
    elif task.has_answers and options.baselines:
        stored = correction if isinstance(correction, Correction) else None
        baselines = label_free_baselines(
            task.items, scores, cf_scores, untuned, untuned_cf, stored, options.seed
        )
    return Evaluation(
        model=model_path,
        task=task.path,
        n_items=len(task.items),
        bias="off" if applied is None else ("file" if file_bias is not None else "stored"),
        summary=_summary(scores, task.items),
        corrected=None if corrected is None else _summary(corrected, task.items),
        correction=correction,
        baselines=baselines,
        attention=attention,
        gpu_layers=model.n_gpu_layers,
        seconds=seconds,
        kind=task.kind,
        match=None if task.match is None else str(task.match),
        n_gen=n_gen,
        examples=examples(task.items, scores) if task.kind == "open" else [],
        warnings=[no_bos] if no_bos else [],
    )


def examples(items: Sequence[Item], scores: Sequence[Any], n: int = N_EXAMPLES) -> list[Example]:
    """A few items of an open-ended task with their continuations (the first n, right or wrong)."""
    out = []
    for it, sc in zip(items[:n], scores[:n]):
        assert it.match is not None
        out.append(
            Example(
                it.id,
                it.prompt,
                sc.gen_text,
                list(it.references),
                it.match.matches(sc.gen_text, it.references),
            )
        )
    return out


def _summary(scores: Sequence[Any], items: Sequence[Item]) -> metrics.Summary:
    return metrics.summarize(metrics.item_results(scores, items), items)


def _choices(scores: Sequence[Any]) -> np.ndarray:
    return score_matrix([s.choice_logprob for s in scores])


def label_free_baselines(
    items: Sequence[Item],
    scores: Sequence[Any],
    cf: Sequence[Any],
    untuned: Sequence[Any] | None,
    untuned_cf: Sequence[Any] | None,
    stored: Correction | None,
    seed: int,
) -> dict[str, Any]:
    """The choice-score baselines of eval: label-free ones on this batch (Batch Calibration, Contextual
    Calibration), for the evaluated model and, when it has biases, the untuned one; the stored offset."""
    y = np.array([it.answer for it in items])
    try:
        arm = cmp.Arm(None, _choices(scores), _choices(cf) if cf else None)
        if untuned is None:
            rows = cmp.compare(arm, None, y, None, seed)
        else:
            base = cmp.Arm(None, _choices(untuned), _choices(untuned_cf) if untuned_cf else None)
            rows = cmp.compare(base, arm, y, None, seed)
            if stored is not None:
                pred = [int(p) for p in stored.predict(arm.s_held)]
                key = cmp.RowKey(cmp.TUNED, "stored")
                rows.append(cmp.make_row(key, stored, pred, y, arm.s_held.shape[1]))
                cmp.with_deltas(rows, seed)
    except ValueError as e:
        return {"rows": [], "notes": [str(e)]}
    return {"scoring": "choice", "rows": [r.to_dict() for r in rows], "notes": []}
