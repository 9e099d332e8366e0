#!/usr/bin/env python3
"""Would scoring several calibration candidates in one decode pay on a CPU? (issue 15, item 4)

    python benchmarks/bench_batching.py [--models smollm2-135m,gemma-3-270m] [--task sst2] [--chunk 32]
                                        [--k 1,2,4] [--repeats 3] [--threads 2]

Per-sequence biases (patch 0002's llama_set_attn_ftb_seq) would let the engine score K candidates' chunks in
one call: K x chunk items in the decodes, each item's sequences with its candidate's bias. The decodes such a
call runs are those of one call over K x chunk items with one bias (the same tokens, the same batch shapes;
the per-row bias itself costs nothing measurable, results/profiles.md). So this measures the gain without
building it: seconds per item of ctx.score over K x chunk items (one call) against K calls of chunk items,
side by side, the calls alternated --repeats times, the bias on (a random matrix). The figure is
(K calls of chunk) / (one call of K x chunk): above 1 batching candidates would save that factor of the
calibration's scoring time. Results: benchmarks/results/batching.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from _common import machine, utc_now, write_record
from bench_accuracy import DATA, FILES, REPO

RESULTS = REPO / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma-3-270m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--k", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from zt_gguf import models
    from zt_gguf.engine import Context, Model, fit_n_ctx
    from zt_gguf.tasks import load_task

    ks = [int(k) for k in args.k.split(",")]
    loaded = load_task(DATA / FILES[args.task], allow_duplicate_choices=True)
    items = loaded.items[: args.chunk * max(ks)]
    doc = {"command": "python benchmarks/bench_batching.py " + " ".join(argv or sys.argv[1:]),
           "machine": machine(), "date": utc_now(), "task": args.task, "chunk": args.chunk,
           "threads": args.threads, "rows": []}  # fmt: skip
    print(json.dumps({k: v for k, v in doc.items() if k != "rows"}), flush=True)
    for name in args.models.split(","):
        model = Model(models.get(name), gpu_layers=0)
        rng = np.random.default_rng(0)
        bias = rng.uniform(-1, 1, size=model.bias_shape).astype(np.float32)
        n_seq = max(64, 4 * args.chunk * max(ks))
        ctx = Context(model, n_threads=args.threads, n_ctx=fit_n_ctx(model, items, len(items), 1),
                      n_seq_max=min(n_seq, 256))  # fmt: skip
        ctx.set_bias(bias)
        ctx.score(items[: args.chunk])  # warm-up
        for k in ks:
            if k == 1:
                continue
            part = items[: args.chunk * k]
            t_sep: list[float] = []
            t_one: list[float] = []
            for _ in range(args.repeats):
                t0 = time.monotonic()
                for j in range(k):
                    ctx.score(part[j * args.chunk : (j + 1) * args.chunk])
                t_sep.append(time.monotonic() - t0)
                t0 = time.monotonic()
                ctx.score(part)
                t_one.append(time.monotonic() - t0)
            row = {"model": name, "k": k, "items": len(part), "separate_s": statistics.median(t_sep),
                   "one_call_s": statistics.median(t_one)}  # fmt: skip
            row["gain"] = row["separate_s"] / row["one_call_s"]
            doc["rows"].append(row)
            print(json.dumps(row), flush=True)
    lines = [
        "# Scoring K candidates' chunks in one call vs K calls (issue 15, item 4)",
        "",
        f"`{doc['command']}` on {doc['date']}, {doc['machine']['cpu']} ({doc['machine']['cores']} cores), "
        f"{args.threads} threads, {args.task} items, chunks of {args.chunk}, median of {args.repeats}.",
        "",
        "| model | K | items | K calls of a chunk, s | one call of K chunks, s | gain |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['model']} | {r['k']} | {r['items']} | {r['separate_s']:.2f} | {r['one_call_s']:.2f} "
            f"| {r['gain']:.3f} |"
            for r in doc["rows"]
        ],
        "",
        "gain = (K calls) / (one call): the factor by which batching K candidates would cut the scoring "
        "time.",
        "",
    ]
    md = "\n".join(lines)
    write_record(RESULTS, "batching", doc, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
