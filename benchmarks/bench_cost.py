#!/usr/bin/env python3
"""The cost model of a calibration (issue 23, item 4): seconds per candidate per 100 items, per model,
against llama-bench pp512 of the same model, and what that predicts for larger models.

    python benchmarks/bench_cost.py [--models smollm2-135m,gemma-3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b]
                                    [--tasks sst2,arc_easy,boolq] [--items 48] [--threads 2]
    python benchmarks/bench_cost.py --table-only

For each model: llama-bench -p 512 -n 0 (prompt tokens a second, pp512), then for each task the first
--items items of a seeded sample (tasks.load_task, choice scoring, the task's own template) scored under a
nonzero candidate bias after a one-chunk warm-up, timed by the wall clock; the engine's own counters give the
tokens it decoded. Per task:

- s_per_100: seconds per candidate per 100 items (the search's unit of work: a candidate scored on items);
- tokens_per_item: the tokens decoded per item (prompt once, then each choice's tokens);
- predicted_s_per_100 = 100 * tokens_per_item / pp512, and measured / predicted (how close the engine comes
  to llama.cpp's prompt rate on the same number of tokens; the output rows over a large vocabulary make it
  cost more than pp512, which computes one output row per 512 tokens).

A paper search scores 1 + 2 * n_head + 9 candidates (the baseline, two probes a query head, the larger
grid) on the calibration items, so its time is about that times s_per_100 times n_items / 100 (less where
racing stops candidates). The scaling rule the table checks: pp512 * parameters (without the token
embedding) is about constant for one machine and quantisation, so an unseen model's pp512 on this machine
is predicted from its size; a user with a llama-bench figure of their own machine replaces it.

Records results/cost.json and cost.md (command, machine, date).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from _common import machine, utc_now, write_record
from bench_accuracy import DATA, FILES
from bench_engine import llama_bench_pp

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODELS = ("smollm2-135m", "gemma-3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
# an 8B Q4_K_M (Llama 3.1 8B: 32 layers, 32 query heads, 7.50e9 parameters without the token embedding)
TARGET = {"name": "8B Q4_K_M (Llama-3.1-8B shape)", "params": 7.50e9, "n_head": 32}
GRID = 9  # the larger of the paper's two gamma grids


def params_without_embedding(path: Path) -> int:
    """Elements of every tensor but the token embedding (an embedding row is a lookup, not a product)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return int(sum(int(t.n_elements) for t in reader.tensors if t.name != "token_embd.weight"))


def measure_model(name: str, tasks: list[str], n_items: int, threads: int) -> dict:
    from zt_gguf import models
    from zt_gguf.engine import Context, Model, fit_n_ctx
    from zt_gguf.tasks import load_task

    path = models.get(name)
    pp = llama_bench_pp(path, threads)
    model = Model(path)
    n_layer, n_head = model.bias_shape
    rows = []
    for task in tasks:
        loaded = load_task(DATA / FILES[task], allow_duplicate_choices=True)
        rng = np.random.default_rng(1)
        idx = rng.choice(len(loaded.items), size=min(n_items + 8, len(loaded.items)), replace=False)
        items = [loaded.items[i] for i in idx]
        warm, timed = items[:8], items[8:]
        ctx = Context(model, n_threads=threads, n_ctx=fit_n_ctx(model, items, 32, 1))
        bias = np.zeros((n_layer, n_head), np.float32)
        bias[:, : max(1, n_head // 3)] = np.log(2.0)  # a probe-like candidate
        ctx.set_bias(bias)
        ctx.score(warm, n_gen=1)
        ctx.reset_stats()
        t0 = time.perf_counter()
        for k in range(0, len(timed), 32):  # the search's chunks
            ctx.score(timed[k : k + 32], n_gen=1)
        wall = time.perf_counter() - t0
        st = ctx.stats
        tokens_per_item = st["n_decoded"] / len(timed)
        s100 = 100 * wall / len(timed)
        pred = 100 * tokens_per_item / pp
        rows.append(
            {
                "task": task,
                "n_items": len(timed),
                "wall_s": wall,
                "s_per_100": s100,
                "tokens_per_item": tokens_per_item,
                "outputs_per_item": st["n_outputs"] / len(timed),
                "predicted_s_per_100": pred,
                "measured_over_predicted": s100 / pred,
            }
        )
        print(f"{name} {task}: {s100:.1f} s/candidate/100 items ({tokens_per_item:.0f} tokens/item, "
              f"{s100 / pred:.2f}x pp512's time)", flush=True)  # fmt: skip
        del ctx
    n_params = params_without_embedding(path)
    return {
        "model": name,
        "file": path.name,
        "n_layer": n_layer,
        "n_head": n_head,
        "params_no_embedding": n_params,
        "pp512_ts": pp,
        "paper_candidates": 1 + 2 * n_head + GRID,
        "tasks": rows,
    }


# llama-bench pp512 of Llama 3.1 8B Q4_K_M on laptop CPUs (CPU backend), as published by their owners:
# github.com/brand-o/normiebench issues 46, 42 and 41
LAPTOPS = (
    ("Intel Core i5-1135G7 (4 cores, 2020)", 25.52),
    ("Intel Core i7-7820HQ (4 cores, 2017)", 22.53),
    ("Intel Core i7-8550U (4 cores, 2017)", 13.07),
)


def predict(recs: list[dict]) -> dict:
    """The target's pp512 on this machine from the largest measured model's pp512 x parameters (the smaller
    models' vocabularies and embeddings weigh more, see pp_times_params), then per task its seconds per
    candidate per 100 items (the measured models' mean tokens per item, times the median measured/pp512
    factor) and a paper search's hours on 200 calibration items, here and on the laptops of LAPTOPS."""
    anchor = max(recs, key=lambda r: r["params_no_embedding"])
    pp_target = anchor["pp512_ts"] * anchor["params_no_embedding"] / TARGET["params"]
    by_task: dict[str, list[dict]] = {}
    for r in recs:
        for t in r["tasks"]:
            by_task.setdefault(t["task"], []).append(t)
    n_cand = 1 + 2 * TARGET["n_head"] + GRID
    machines = [("this machine (2 cores)", pp_target)] + [(f"laptop: {n}", pp) for n, pp in LAPTOPS]
    per_task = {}
    for task, ts in by_task.items():
        tokens = float(np.mean([t["tokens_per_item"] for t in ts]))
        over = float(np.median([t["measured_over_predicted"] for t in ts]))
        per_task[task] = {
            name: {
                "s_per_100": 100 * tokens / pp * over,
                "paper_search_h_200": n_cand * 2 * 100 * tokens / pp * over / 3600,
            }
            for name, pp in machines
        }
    return {
        "target": TARGET,
        "anchor": anchor["model"],
        "pp512_ts_this_machine": pp_target,
        "pp_times_params": {r["model"]: r["pp512_ts"] * r["params_no_embedding"] for r in recs},
        "paper_candidates": n_cand,
        "per_task": per_task,
    }


def table(rec: dict) -> str:
    lines = [
        "| model | params (no embedding) | pp512 t/s | task | tokens/item | s/candidate/100 items "
        "| pp512 prediction | measured / prediction | paper search, 100 items |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rec["models"]:
        for t in r["tasks"]:
            lines.append(
                f"| {r['model']} | {r['params_no_embedding'] / 1e6:.0f} M | {r['pp512_ts']:.0f} "
                f"| {t['task']} | {t['tokens_per_item']:.0f} | {t['s_per_100']:.1f} "
                f"| {t['predicted_s_per_100']:.1f} | {t['measured_over_predicted']:.2f} "
                f"| {r['paper_candidates'] * t['s_per_100'] / 60:.1f} min "
                f"({r['paper_candidates']} candidates) |"
            )
    p = predict(rec["models"])
    k = ", ".join(f"{m} {v:.3g}" for m, v in p["pp_times_params"].items())
    lines += [
        "",
        f"pp512 x parameters (without the embedding): {k}.",
        "",
        f"Predicted for {p['target']['name']}: pp512 {p['pp512_ts_this_machine']:.1f} t/s on this machine "
        f"(from {p['anchor']}); a paper search scores {p['paper_candidates']} candidates. Seconds per "
        "candidate per 100 items / hours of a paper search on 200 calibration items (no racing):",
        "",
        "| machine | " + " | ".join(p["per_task"]) + " |",
        "|---|" + "---|" * len(p["per_task"]),
    ]
    for name in next(iter(p["per_task"].values())):
        cells = [
            f"{v[name]['s_per_100']:.0f} s / {v[name]['paper_search_h_200']:.1f} h"
            for v in p["per_task"].values()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "On another machine: time = this machine's x (pp512 here / pp512 there) of the same model; the "
        "laptops' rows use their published llama-bench pp512 of Llama 3.1 8B Q4_K_M "
        "(github.com/brand-o/normiebench issues 46, 42, 41).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tasks", default="sst2,arc_easy,boolq")
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--merge", action="store_true", help="replace only these models' records in cost.json")
    args = ap.parse_args(argv)
    json_path = RESULTS / "cost.json"
    if args.table_only:
        rec = json.loads(json_path.read_text())
    else:
        recs = [
            measure_model(m, args.tasks.split(","), args.items, args.threads) for m in args.models.split(",")
        ]
        if args.merge and json_path.exists():  # keep the other models' records, in their order
            new = {r["model"]: r for r in recs}
            old = json.loads(json_path.read_text())["models"]
            recs = [new.pop(r["model"], r) for r in old] + list(new.values())
        rec = {
            "command": "python benchmarks/bench_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine(),
            "date": utc_now(),
            "threads": args.threads,
            "models": recs,
        }
    md = (
        "# Cost model: seconds per candidate per 100 items (issue 23)\n\n"
        + f"`{rec['command']}`, {rec['date']}.\n\n"
        + table(rec)
    )
    write_record(RESULTS, "cost", rec, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
