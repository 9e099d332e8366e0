#!/usr/bin/env python3
"""ZeroTuning against the free output-side baselines, and ZeroTuning searched on top of them (issue 12).

    python benchmarks/bench_baselines.py [--models gemma-3-270m,smollm2-135m] [--tasks sst2,agnews,trec]
                                         [--seeds 1,2] [--n-cal 100] [--n-held 200] [--threads 2]
                                         [--objectives logprob,bc-logprob,...]
    python benchmarks/bench_baselines.py --table-only

For each model, task and seed: a seeded sample of n_cal + n_held items of ../shared/data/jsonl/<task>.jsonl,
split into calibration and held-out items (tasks.split_items); then, choice scoring, the paper search
(zt_gguf.search) with four objectives:

* supervised: ``logprob`` (plain ZeroTuning, the default of calibrate for choice scoring) and ``bc-logprob``
  (each candidate judged after Batch Calibration on its own calibration batch);
* unsupervised: ``mutual-information`` and ``bc-mutual-information``;

and for each pick the held-out comparison of ``zt_gguf.comparison.run_comparison`` (what calibrate reports):
untuned, Batch Calibration (held-out batch, calibration inputs), Contextual Calibration (tasks with a
template), the per-label offset (supervised), and each of them on top of the tuned model. All four searches
share one scorer cache (a candidate scored under two objectives is scored once: the probes, for instance).

``--generate``: generate scoring instead (the first label word of a 4-token greedy continuation, supervised,
objective accuracy-generate), where the output-side correction is a logit bias on the label words' first
tokens fitted on the calibration items, measured on the held-out items by real generation: untuned, untuned
+ logit bias, ZeroTuning, ZeroTuning + logit bias (records: baselines-generate.jsonl / .md).

The question it answers: does ZeroTuning + calibration beat calibration alone, and by how much? The fair
pairs (same information at deployment): supervised, ZeroTuning + offset vs the untuned model + offset (the
same calibration labels); unsupervised, ZeroTuning (bc-MI) + Batch Calibration on the calibration inputs vs
the untuned model + the same (no labels). Records: benchmarks/results/baselines.jsonl (one line per model,
task, seed and objective) and baselines.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from _common import machine, utc_now
from bench_accuracy import DATA, FILES, REPO

RESULTS = REPO / "benchmarks" / "results"
OBJECTIVES = (
    ("supervised", "logprob"),
    ("supervised", "bc-logprob"),
    ("unsupervised", "mutual-information"),
    ("unsupervised", "bc-mutual-information"),
)
# (ZeroTuning arm, the calibration-only arm it must beat): same information at deployment
PAIRS = {
    "logprob": ("tuned+label-offset", "untuned+label-offset"),
    "accuracy-generate": ("tuned+logit-bias", "untuned+logit-bias"),
    "bc-logprob": ("tuned+batch-calibration", "untuned+batch-calibration"),
    "mutual-information": ("tuned+batch-calibration", "untuned+batch-calibration"),
    "bc-mutual-information": ("tuned+batch-calibration", "untuned+batch-calibration"),
}


def run_one(model_name: str, task: str, seed: int, args: argparse.Namespace, out: Path) -> None:
    from zt_gguf import models
    from zt_gguf.engine import Context, Model, fit_n_ctx
    from zt_gguf.scoring import MemoScorer, content_free_items
    from zt_gguf.search import SearchConfig, search
    from zt_gguf.tasks import load_task, split_items

    loaded = load_task(DATA / FILES[task], allow_duplicate_choices=True)
    rng = np.random.default_rng(seed)
    n = min(args.n_cal + args.n_held, len(loaded.items))
    idx = np.sort(rng.choice(len(loaded.items), size=n, replace=False))
    items = [loaded.items[i] for i in idx]
    calib, held = split_items(items, args.n_held / n, seed)
    path = models.get(model_name)
    model = Model(path)
    n_gen = 4 if args.generate else 1
    ctx = Context(model, n_threads=args.threads, n_ctx=fit_n_ctx(model, items, 32, n_gen))
    stops = sorted({c.strip() for it in items for c in it.choices}) if args.generate else []
    memo = MemoScorer(ctx, n_gen, stops)
    cf = content_free_items(loaded, items)
    runs = [("supervised", "accuracy-generate")] if args.generate else OBJECTIVES
    if args.objectives:
        runs = tuple(r for r in runs if r[1] in args.objectives.split(","))
    for mode, objective in runs:
        t0 = time.monotonic()
        res = search(lambda b, c: memo(b, c), calib, model.bias_shape, SearchConfig(objective=objective))
        rec = record(model_name, task, seed, mode, objective, memo, calib, held, cf, res, args.generate)
        rec["seconds"] = time.monotonic() - t0
        write_line(out, rec)


def record(
    model_name: str,
    task: str,
    seed: int,
    mode: str,
    objective: str,
    memo,  # noqa: ANN001
    calib: list,
    held: list,
    cf: list,
    res,  # noqa: ANN001
    generate: bool = False,
) -> dict:
    """The baselines.jsonl line of one search result: the held-out comparison of its pick (what calibrate
    reports), scored through memo; "seconds" is left to the caller."""
    from zt_gguf.comparison import run_comparison

    cmp = run_comparison(
        memo, calib, held, cf, res.bias, supervised=mode == "supervised",
        scoring="generate" if generate else "choice", objective=objective, seed=seed,
    )  # fmt: skip
    assert cmp is not None
    return {
        "model": model_name,
        "task": task,
        "seed": seed,
        "mode": mode,
        "objective": objective,
        "n_cal": len(calib),
        "n_held": len(held),
        "chosen": {"type": res.head_type, "heads": res.heads, "gamma": res.best_gamma},
        "candidates": res.n_evaluations,
        "seconds": None,
        "rows": {str(r.key): {"accuracy": r.accuracy, "delta_vs_tuned": r.delta_vs_tuned} for r in cmp.rows},
        "choice_rows": {str(r.key): r.accuracy for r in cmp.choice_rows},
        "invalid": {
            k: float(np.mean([x is None for x in v]))
            for k, v in (
                ("untuned", _gen_preds(memo, None, held)),
                ("tuned", _gen_preds(memo, res.bias, held)),
            )
        }
        if generate
        else None,
        "logit_bias": {
            str(r.key): r.correction.to_dict() for r in cmp.rows if r.key.correction == "logit-bias"
        },
        "correct": {str(r.key): r.correct.astype(int).tolist() for r in cmp.rows},
        "shipped": str(cmp.shipped),
        "verdict": cmp.verdict.to_dict() if cmp.verdict else None,
        "notes": cmp.notes,
        "date": utc_now(),
    }


def write_line(out: Path, rec: dict) -> None:
    """Append rec to out and print its summary line."""
    with out.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    v = rec["verdict"]
    print(
        f"{rec['model']} {rec['task']} seed {rec['seed']} {rec['objective']}: "
        f"untuned {100 * rec['rows']['untuned']['accuracy']:.1f} "
        f"tuned {100 * rec['rows']['tuned']['accuracy']:.1f} best free {v['best_free']} "
        f"{100 * v['best_free_accuracy']:.1f} shipped {v['shipped']} {100 * v['shipped_accuracy']:.1f} "
        f"({rec['seconds']:.0f} s)",
        flush=True,
    )


def _gen_preds(memo, bias, held):  # noqa: ANN001, ANN202
    from zt_gguf.metrics import item_results

    return [r.gen_pred for r in item_results(memo(bias, held), held)]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table(recs: list[dict]) -> str:
    """Means over seeds per model, task and objective, and the pooled paired delta of each fair pair."""
    from zt_gguf.stats import paired_bootstrap_delta

    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in recs:
        groups.setdefault((r["model"], r["task"], r["objective"]), []).append(r)
    generate = any(r["objective"] == "accuracy-generate" for r in recs)
    cols = (
        ["untuned", "untuned+logit-bias", "tuned", "tuned+logit-bias"]
        if generate
        else [
            "untuned",
            "untuned+batch-heldout",
            "untuned+batch-calibration",
            "untuned+contextual",
            "untuned+label-offset",
            "tuned",
            "tuned+batch-calibration",
            "tuned+label-offset",
        ]
    )
    head = (
        "| model | task | objective | seeds | n cal/held | "
        + " | ".join(cols)
        + " | ZT arm - calibration arm "
        "(pooled paired 95%) |"
    )
    lines = [head, "|" + "---|" * (len(cols) + 6)]
    for (model, task, objective), rs in sorted(groups.items()):
        cells = []
        for c in cols:
            vals = [r["rows"][c]["accuracy"] for r in rs if c in r["rows"]]
            cells.append(_pct(float(np.mean(vals))) if vals else "n/a")
        zt, cal = PAIRS[objective]
        a = np.concatenate([r["correct"][cal] for r in rs if cal in r["correct"]] or [np.zeros(0)])
        b = np.concatenate([r["correct"][zt] for r in rs if zt in r["correct"]] or [np.zeros(0)])
        if len(a) and len(a) == len(b):
            d, lo, hi = paired_bootstrap_delta(a, b, seed=0)
            pair = f"{zt} vs {cal}: {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        else:
            pair = "n/a"
        seeds = ",".join(str(r["seed"]) for r in rs)
        ncal = f"{rs[0]['n_cal']}/{rs[0]['n_held']}"
        lines.append(
            f"| {model} | {task} | {objective} | {seeds} | {ncal} | " + " | ".join(cells) + f" | {pair} |"
        )
    return "\n".join(lines) + "\n"


# the models in order of size, for the scaling table
SIZES = ("smollm2-135m", "gemma-3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def _arms(rs: list[dict], key: str, acc: str) -> str:
    """The verdict's arm names over seeds and their mean held-out accuracy."""
    names = sorted({r["verdict"][key] for r in rs})
    return f"{'/'.join(names)}: {_pct(float(np.mean([r['verdict'][acc] for r in rs])))}"


def scaling_table(recs: list[dict], objectives: tuple[str, ...] = ("logprob", "mutual-information")) -> str:
    """Issue 23's scaling table: per model (by size), objective and task, what ships (ZeroTuning with the
    correction it ships) against the best free output-side baseline (the best untuned arm on the held-out
    items, which favours the baselines), pooled over seeds: accuracies and the paired bootstrap 95% interval
    of shipped - best free; then per model and objective the mean over its tasks."""
    from zt_gguf.stats import paired_bootstrap_delta

    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in recs:
        if r["objective"] in objectives and r.get("verdict"):
            groups.setdefault((r["model"], r["objective"], r["task"]), []).append(r)
    order = {m: i for i, m in enumerate(SIZES)}
    lines = [
        "| model | objective | task | seeds | untuned | best free (arm: accuracy) | shipped (arm: accuracy) "
        "| shipped - best free, pooled paired 95% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    means: dict[tuple[str, str], list[float]] = {}
    for (model, objective, task), rs in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0])
    ):
        best = np.concatenate([r["correct"][r["verdict"]["best_free"]] for r in rs])
        ship = np.concatenate([r["correct"][r["verdict"]["shipped"]] for r in rs])
        d, lo, hi = paired_bootstrap_delta(best, ship, seed=0)
        means.setdefault((model, objective), []).append(d)

        untuned = _pct(float(np.mean([r["rows"]["untuned"]["accuracy"] for r in rs])))
        lines.append(
            f"| {model} | {objective} | {task} | {','.join(str(r['seed']) for r in rs)} | {untuned} "
            f"| {_arms(rs, 'best_free', 'best_free_accuracy')} | {_arms(rs, 'shipped', 'shipped_accuracy')} "
            f"| {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |"
        )
    lines += ["", "| model | objective | tasks | mean of shipped - best free (points) |", "|---|---|---|---|"]
    for (model, objective), ds in sorted(means.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0])):
        lines.append(f"| {model} | {objective} | {len(ds)} | {100 * float(np.mean(ds)):+.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gemma-3-270m,smollm2-135m")
    ap.add_argument("--tasks", default="sst2,agnews")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--n-cal", type=int, default=100)
    ap.add_argument("--n-held", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "baselines.jsonl")
    ap.add_argument("--objectives", help="only these of the objectives, e.g. bc-logprob,mutual-information")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--generate", action="store_true", help="generate scoring and the logit bias")
    args = ap.parse_args(argv)
    if args.generate and args.out == RESULTS / "baselines.jsonl":
        args.out = RESULTS / "baselines-generate.jsonl"
    if not args.table_only:
        if not DATA.is_dir():
            print(f"bench_baselines: no task data at {DATA}", file=sys.stderr)
            return 2
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(sys.argv), "machine": machine(), "started": utc_now()}
        print(json.dumps(meta), flush=True)
        for seed in (int(s) for s in args.seeds.split(",")):
            for task in args.tasks.split(","):
                for model_name in args.models.split(","):
                    run_one(model_name, task, seed, args, args.out)
    recs = [json.loads(x) for x in args.out.read_text().splitlines() if x.strip()]
    md = (
        f"# ZeroTuning vs output-side calibration ({'generate' if args.generate else 'choice'} scoring, "
        "held-out accuracy %, mean over seeds)\n\n"
        f"Generated by `python benchmarks/bench_baselines.py` from {args.out.name} ({len(recs)} runs).\n\n"
        + table(recs)
    )
    if not args.generate:
        md += (
            "\n## Scaling: what ZeroTuning ships against the best free baseline, by model size (issue 23)\n\n"
            + scaling_table(recs)
        )
    (args.out.with_suffix(".md")).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
