#!/usr/bin/env python3
"""A cheaper search (issue 23, item 4): the paper search with its head probes scored on the first
``--probe-items`` calibration items only, against the paper search, on real models and the dev tasks.

    python benchmarks/bench_search_cost.py [--model qwen2.5-coder-0.5b] [--tasks sst2,trec,...]
                                           [--objectives logprob,mutual-information] [--probe-items 32]
                                           [--seed 1] [--n-cal 100] [--n-held 200]
    python benchmarks/bench_search_cost.py --table-only

Per task: the seeded sample and calibration/held-out split of bench_baselines.py (same seed, same items),
choice scoring; for each objective the paper search (SearchConfig defaults: racing on, chunks of 32), then
the same search with probe_items. All searches of a task share one MemoScorer, so a (candidate, chunk) pair
is scored by the engine once: the cheap search's probes are the first chunk of the full search's, scored in
the same call, so its picks are exactly those of a run of its own. Each paper search's pick also gets its
bench_baselines.py line (the held-out comparison with the free baselines; --baselines, default
results/baselines.jsonl), so the paper searches serve issue 23's baselines table too. The search's own count
of item-scorings (SearchResult.items_scored: what it asked the scorer for) is the cost compared; the
engine's seconds are recorded beside it. Where the two picks differ, both are scored on the held-out items.

Records results/search_cost.jsonl (one line per model, task, objective) and search_cost.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine, utc_now
from bench_accuracy import DATA, FILES, REPO
from bench_baselines import record, write_line

RESULTS = REPO / "benchmarks" / "results"


def pick(res) -> dict:  # noqa: ANN001
    return {"type": res.head_type, "heads": res.heads, "gamma": res.best_gamma, "best": res.best_description}


def selection_stability(state, res, n_boot: int, seed: int = 0) -> dict | None:  # noqa: ANN001
    """How stable the paper search's own head selection is: the probe gains recomputed on n_boot bootstrap
    resamples of the calibration items (from the checkpoint's per-item values; a probe stopped early uses the
    resampled items among those it was scored on), then the paper's rule (dominant type, top heads). Returns
    the share of resamples that select the same type, and the same type and heads, as the search did; None
    when the objective has no per-item values."""
    from zt_gguf.search_rules import dominant_type, top_heads

    by_desc = {e.description: e for e in state.evaluations.values()}
    base = by_desc["baseline"]
    if base.values is None:
        return None
    cfg = res.config
    n_head = len(res.gains_up)
    b = np.asarray(base.values)
    probes = {
        (h, kind): np.asarray(by_desc[f"probe head {h} gamma={g:g}"].values)
        for h in range(n_head)
        for kind, g in (("up", cfg["probe_up"]), ("down", cfg["probe_down"]))
    }
    rng = np.random.default_rng(seed)
    same_type = same = 0
    for _ in range(n_boot):
        idx = rng.integers(0, len(b), len(b))
        gains: dict[str, list[float]] = {"up": [], "down": []}
        for (_h, kind), v in probes.items():
            sel = idx[idx < len(v)]
            sel = sel if len(sel) else np.arange(len(v))
            gains[kind].append(float(np.mean(v[sel] - b[sel])))
        t = dominant_type(gains["up"], gains["down"])
        heads = top_heads(gains[t], cfg["head_fraction"])
        same_type += t == res.head_type
        same += t == res.head_type and heads == res.heads
    return {"n_boot": n_boot, "same_type": same_type / n_boot, "same_type_and_heads": same / n_boot}


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def run_task(model_name: str, task: str, args: argparse.Namespace, out: Path) -> None:
    from zt_gguf import models
    from zt_gguf.engine import Context, Model, fit_n_ctx
    from zt_gguf.metrics import item_results
    from zt_gguf.objectives import get_objective
    from zt_gguf.scoring import MemoScorer, content_free_items
    from zt_gguf.search import SearchConfig, SearchState, search
    from zt_gguf.tasks import load_task, split_items

    loaded = load_task(DATA / FILES[task], allow_duplicate_choices=True)
    rng = np.random.default_rng(args.seed)  # bench_baselines.run_one's sample and split
    n = min(args.n_cal + args.n_held, len(loaded.items))
    idx = np.sort(rng.choice(len(loaded.items), size=n, replace=False))
    items = [loaded.items[i] for i in idx]
    calib, held = split_items(items, args.n_held / n, args.seed)
    model = Model(models.get(model_name))
    ctx = Context(model, n_threads=args.threads, n_ctx=fit_n_ctx(model, items, 32, 1))
    memo = MemoScorer(ctx, 1, [])

    def accuracy(bias: np.ndarray | None) -> float:
        res = item_results(memo(bias, held), held)
        return float(np.mean([r.choice_pred == it.answer for r, it in zip(res, held)]))

    cf = content_free_items(loaded, items)

    def summary(res, t0: float, e0: float) -> dict:  # noqa: ANN001
        return {
            "pick": pick(res),
            "items_scored": res.items_scored,
            "candidates": res.n_evaluations,
            "best_objective": res.best_objective,
            "gains_up": res.gains_up,
            "gains_down": res.gains_down,
            "wall_s": time.monotonic() - t0,  # a cheap search's probes are mostly memo hits
            "engine_s": ctx.stats["t_score_s"] - e0,
        }

    for objective in args.objectives.split(","):
        t0, e0 = time.monotonic(), ctx.stats["t_score_s"]
        with tempfile.TemporaryDirectory() as tmp:  # the checkpoint keeps every candidate's per-item values
            ckpt = Path(tmp) / "search.json"
            full = search(
                lambda b, c: memo(b, c),
                calib,
                model.bias_shape,
                SearchConfig(objective=objective),
                checkpoint=ckpt,
            )
            stability = selection_stability(SearchState.load(ckpt), full, args.bootstrap)
        paper = summary(full, t0, e0)
        paper["stability"] = stability
        print(
            f"{model_name} {task} {objective}: the paper's own selection under resampling: {stability}",
            flush=True,
        )
        if args.baselines and not any(
            (r["model"], r["task"], r["seed"], r["objective"]) == (model_name, task, args.seed, objective)
            for r in _read(args.baselines)
        ):  # bench_baselines' line of the paper search's pick
            mode = "supervised" if get_objective(objective).needs_labels else "unsupervised"
            rec = record(model_name, task, args.seed, mode, objective, memo, calib, held, cf, full)
            rec["seconds"] = time.monotonic() - t0
            write_line(args.baselines, rec)
        for m in (int(x) for x in args.probe_items.split(",")):
            t0, e0 = time.monotonic(), ctx.stats["t_score_s"]
            config = SearchConfig(objective=objective, probe_items=m)
            cheap = search(lambda b, c: memo(b, c), calib, model.bias_shape, config)
            row: dict = {"model": model_name, "task": task, "seed": args.seed, "objective": objective}
            row.update(paper=paper, probe_items=summary(cheap, t0, e0), probe_n=m)
            row["same_pick"] = bool(np.array_equal(full.bias, cheap.bias))
            row["ratio"] = cheap.items_scored / full.items_scored
            if not row["same_pick"]:
                row["heldout"] = {
                    "untuned": accuracy(None),
                    "paper": accuracy(full.bias),
                    "probe_items": accuracy(cheap.bias),
                }
            row.update(n_cal=len(calib), n_held=len(held), machine=machine(), date=utc_now())
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{model_name} {task} {objective}: paper {full.items_scored} item-scorings, "
                f"pick {pick(full)}; "
                f"probe_items={m}: {cheap.items_scored} ({row['ratio']:.2f}), pick {pick(cheap)}; "
                f"same pick: {row['same_pick']}",
                flush=True,
            )


def table(recs: list[dict]) -> str:
    lines = [
        "| model | task | objective | n cal | paper: item-scorings | pick | probe_items | item-scorings "
        "| ratio | pick | same pick | held-out accuracy untuned / paper / probe_items (where they differ) "
        "| the paper's own type / type and heads under resampling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    last = {(r["model"], r["task"], r["objective"], r["probe_n"]): r for r in recs}  # a rerun replaces a row
    recs = list(last.values())

    def stab(r: dict) -> str:
        st = r["paper"].get("stability")
        return f"{100 * st['same_type']:.0f}% / {100 * st['same_type_and_heads']:.0f}%" if st else "n/a"

    def fmt(p: dict) -> str:
        return "baseline" if p["gamma"] == 1.0 else f"{p['type']} {p['heads']} gamma {p['gamma']:g}"

    for r in recs:
        h = r.get("heldout")
        held = (
            " / ".join(f"{100 * h[k]:.1f}" for k in ("untuned", "paper", "probe_items")) if h else "same pick"
        )
        lines.append(
            f"| {r['model']} | {r['task']} | {r['objective']} | {r['n_cal']} | {r['paper']['items_scored']} "
            f"| {fmt(r['paper']['pick'])} | {r['probe_n']} | {r['probe_items']['items_scored']} "
            f"| {r['ratio']:.2f} "
            f"| {fmt(r['probe_items']['pick'])} | {'yes' if r['same_pick'] else 'no'} | {held} | {stab(r)} |"
        )
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in recs:
        groups.setdefault((r["objective"], r["probe_n"]), []).append(r)
    lines.append("")
    for (obj, m), rs in sorted(groups.items()):
        cheap = sum(r["probe_items"]["items_scored"] for r in rs)
        full = sum(r["paper"]["items_scored"] for r in rs)
        same = sum(r["same_pick"] for r in rs)
        lines.append(
            f"- {obj}, probe_items {m}: same pick on {same} of {len(rs)} tasks; item-scorings "
            f"{cheap} / {full} = {cheap / full:.2f} of the paper search's."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--tasks", default="sst2,trec,agnews,commonsense_qa,arc_easy,boolq")
    ap.add_argument("--objectives", default="logprob,mutual-information")
    ap.add_argument("--probe-items", default="32,64", help="the cheap searches' probe_items, comma-separated")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bootstrap", type=int, default=1000, help="resamples for the selection's stability")
    ap.add_argument("--n-cal", type=int, default=100)
    ap.add_argument("--n-held", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "search_cost.jsonl")
    ap.add_argument(
        "--baselines",
        default=str(RESULTS / "baselines.jsonl"),
        help="also append bench_baselines.py's line of each paper search here (empty: do not)",
    )
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    args.baselines = Path(args.baselines) if args.baselines else None
    if not args.table_only:
        for task in args.tasks.split(","):
            run_task(args.model, task, args, args.out)
    recs = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    md = (
        "# A cheaper search: head probes on a subsample (issue 23)\n\n"
        f"Generated by `python benchmarks/bench_search_cost.py` from {args.out.name} ({len(recs)} rows). "
        "Item-scorings: what each search asked its scorer for (candidates x items, less what racing "
        "stopped). "
        "Same pick: the same bias matrix.\n\n" + table(recs)
    )
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
