#!/usr/bin/env python3
"""The calibration search on Ray workers against the single-process search, side by side (issue 16).

    python benchmarks/bench_distributed.py [--model smollm2-135m] [--task sst2] [--n-items 100]
                                           [--workers 1,2] [--cores 2] [--method paper]

One search (choice scoring, objective logprob, the paper method by default) over the same seeded items:
first in this process with --cores threads, then for each W of --workers on a local Ray cluster of W workers
with cores // W threads each (so every run has the same cores). For each: the search's wall time (the
workers' start-up and model load timed apart), the items scored (with several workers, candidates after an
unfinished one are scored ahead, and what the race drops of them is extra work), and whether the pick and
every candidate's figures equal the single-process run's. Records: benchmarks/results/distributed.json/.md.

On one machine the workers share its cores, so the figure is the overhead of the fan-out (Ray's per-job cost,
the work scored ahead, threads per process), not a speed-up; the speed-up comes from machines added.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from _common import machine, utc_now, write_record
from bench_accuracy import DATA, FILES, REPO

RESULTS = REPO / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--n-items", type=int, default=100)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--method", default="paper")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    from zt_gguf import models
    from zt_gguf.distributed import RayPool, WorkerSpec
    from zt_gguf.engine import Context, Model, fit_n_ctx
    from zt_gguf.search import SearchConfig, context_scorer, search
    from zt_gguf.tasks import load_task

    loaded = load_task(DATA / FILES[args.task], allow_duplicate_choices=True)
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.choice(len(loaded.items), size=min(args.n_items, len(loaded.items)), replace=False))
    items = [loaded.items[i] for i in idx]
    path = models.get(args.model)
    config = SearchConfig(method=args.method, objective="logprob")
    model = Model(path, gpu_layers=0)
    n_ctx = fit_n_ctx(model, items, config.chunk_size, 1)
    meta = {"command": " ".join(["python", "benchmarks/bench_distributed.py", *(argv or sys.argv[1:])]),
            "machine": machine(), "date": utc_now(), "model": args.model, "task": args.task,
            "n_items": len(items), "method": args.method, "cores": args.cores}  # fmt: skip
    print(json.dumps(meta), flush=True)

    ctx = Context(model, n_threads=args.cores, n_ctx=n_ctx)
    t0 = time.monotonic()
    single = search(context_scorer(ctx), items, model.bias_shape, config)
    runs = [{"mode": f"single process, {args.cores} threads", "workers": 0, "threads": args.cores,
             "start_s": 0.0, "search_s": time.monotonic() - t0, "items_scored": single.run.items_scored,
             "same_as_single": True}]  # fmt: skip
    print(json.dumps(runs[-1]), flush=True)
    reference = json.dumps(single.to_dict(include_run=False), sort_keys=True)
    del ctx

    for w in (int(x) for x in args.workers.split(",")):
        threads = max(1, args.cores // w)
        spec = WorkerSpec(str(path), path.stat().st_size, threads, n_ctx, 1, gpu_layers=0)
        t0 = time.monotonic()
        pool = RayPool(spec, w)
        start_s = time.monotonic() - t0
        try:
            t0 = time.monotonic()
            res = search(None, items, model.bias_shape, config, pool=pool)
            search_s = time.monotonic() - t0
        finally:
            pool.close()
        same = json.dumps(res.to_dict(include_run=False), sort_keys=True) == reference
        runs.append({"mode": f"Ray, {w} worker(s) x {threads} thread(s)", "workers": w, "threads": threads,
                     "start_s": start_s, "search_s": search_s, "items_scored": res.run.items_scored,
                     "same_as_single": same})  # fmt: skip
        print(json.dumps(runs[-1]), flush=True)

    base = runs[0]
    lines = [
        "# Calibration search on Ray workers vs one process (issue 16)",
        "",
        f"`{meta['command']}` on {meta['date']}, {meta['machine']['cpu']} "
        f"({meta['machine']['cores']} cores).",
        f"{args.model}, {args.task}: {len(items)} items, search {args.method}, objective logprob, "
        f"{single.n_evaluations} candidates, {single.items_scored} item scorings after early stopping.",
        "",
        "| run | workers' start-up s | search s | search time / single | items scored | same result |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        ratio = r["search_s"] / base["search_s"]
        lines.append(
            f"| {r['mode']} | {r['start_s']:.1f} | {r['search_s']:.1f} | {ratio:.2f} "
            f"| {r['items_scored']} ({r['items_scored'] / base['items_scored']:.2f}x) | "
            f"{'yes' if r['same_as_single'] else 'NO'} |"
        )
    lines += [
        "",
        "Same cores in every run: on one machine the table is the cost of the fan-out (Ray per job, the "
        "work scored ahead of an unfinished reference, fewer threads per process), not a speed-up. Workers "
        "on more machines should divide the search time by up to their number, less that cost; not "
        "measured here (one machine).",
        "",
    ]
    md = "\n".join(lines)
    write_record(RESULTS, "distributed", {**meta, "runs": runs}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
