#!/usr/bin/env python3
"""Held-out accuracy before and after tuning, per model, task and calibration mode.

    python benchmarks/bench_accuracy.py [--models gemma-3-270m,smollm2-135m] [--tasks sst2,agnews,...]
                                        [--modes choice,generate,unsup-mi,unsup-entropy] [--items 150]

Each run is `zt-gguf calibrate --search paper --holdout H --force` on a seeded sample of --items items of
../shared/data/jsonl/<task>.jsonl; results (baseline and tuned held-out accuracy of both scorings with 95%
intervals, the chosen heads and gamma, the invalid-output rate, calibration size and time) are appended to
benchmarks/results/accuracy.jsonl, one line per run, and tabulated in benchmarks/results/accuracy.md.
Modes: choice = supervised, objective logprob, scoring choice; generate = supervised, accuracy of the first
label in a 4-token greedy continuation; unsup-mi / unsup-entropy = unsupervised (the labels are used only on
the held-out part) with the mutual-information or the paper's full-vocabulary entropy objective.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import utc_now

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "jsonl"
FILES = {
    "sst2": "sst2.dev.jsonl",
    "agnews": "agnews.test.jsonl",
    "trec": "trec.test.jsonl",
    "boolq": "boolq.dev.jsonl",
    "arc_easy": "arc_easy.test.jsonl",
    "commonsense_qa": "commonsense_qa.dev.jsonl",
}
MODES = {
    "choice": ["--mode", "supervised", "--scoring", "choice", "--objective", "logprob"],
    "generate": ["--mode", "supervised", "--scoring", "generate", "--n-gen", "4"],
    "unsup-mi": ["--mode", "unsupervised", "--scoring", "choice", "--objective", "mutual-information"],
    "unsup-entropy": ["--mode", "unsupervised", "--scoring", "choice", "--objective", "neg-entropy-full"],
}


def sample(task: str, n: int, out: Path, seed: int = 7) -> Path:
    """n items spread over the file (a seeded sample: some files are sorted by label)."""
    import numpy as np

    lines = (DATA / FILES[task]).read_text().splitlines(keepends=True)
    idx = np.sort(np.random.default_rng(seed).choice(len(lines), size=min(n, len(lines)), replace=False))
    out.write_text("".join(lines[i] for i in idx))
    return out


def table(rows: list[dict]) -> str:
    head = (
        "| model | task | mode | n cal/held | baseline choice | tuned choice | baseline gen (invalid) "
        "| tuned gen (invalid) | chosen | time |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        b, t = r["baseline"], r["tuned"]

        def pct(d: dict, k: str) -> str:
            v, iv = d.get(k), (d.get("intervals") or {}).get(k)
            return "-" if v is None else f"{100 * v:.1f} [{100 * iv[0]:.0f}, {100 * iv[1]:.0f}]"

        c = r["chosen"]
        chosen = "none" if c["type"] == "none" else f"{c['type']} H{c['heads']} g={c['gamma']:.2f}"
        cells = [
            r["model"], r["task"], r["mode"], f"{r['n_cal']}/{r['n_held']}",
            pct(b, "accuracy_choice"), pct(t, "accuracy_choice"),
            f"{pct(b, 'accuracy_generate')} ({100 * b['invalid_rate']:.0f}%)",
            f"{pct(t, 'accuracy_generate')} ({100 * t['invalid_rate']:.0f}%)",
            chosen, f"{r['seconds']:.0f} s",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> str:
    """Per model and mode: the mean change of held-out choice accuracy over the tasks, and how many tasks went
    up, down or stayed, and how many changes a paired bootstrap 95% interval puts away from 0."""
    lines = [
        "| model | mode | tasks | mean change (choice) | up / same / down | significant up / down |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["model"], r["mode"]) for r in rows}, key=lambda k: (k[0], list(MODES).index(k[1])))
    for model, mode in keys:
        sel = [r for r in rows if r["model"] == model and r["mode"] == mode]
        deltas = [r["delta"]["accuracy_choice"] for r in sel]
        d = [x["delta"] for x in deltas]
        up, down = sum(x > 1e-9 for x in d), sum(x < -1e-9 for x in d)
        sig_up = sum(x["interval"][0] > 0 for x in deltas)
        sig_down = sum(x["interval"][1] < 0 for x in deltas)
        cells = [
            model, mode, str(len(sel)), f"{100 * sum(d) / len(d):+.1f} points",
            f"{up} / {len(d) - up - down} / {down}", f"{sig_up} / {sig_down}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(out_jsonl: Path) -> Path:
    rows = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    tasks, modes = list(FILES), list(MODES)
    rows.sort(key=lambda r: (r["model"], tasks.index(r["task"]), modes.index(r["mode"])))
    md = out_jsonl.with_suffix(".md")
    md.write_text(
        "# Held-out accuracy before and after tuning\n\n`python benchmarks/bench_accuracy.py` "
        "(see its docstring); one row per run. Times are wall times on the shared 2-core "
        "machine (two runs at a time, one thread each), not speed figures.\n\n## By model and mode\n\n"
        + summary(rows)
        + "\n## Every run\n\n"
        + table(rows)
    )
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gemma-3-270m,smollm2-135m")
    ap.add_argument("--tasks", default=",".join(FILES))
    ap.add_argument("--modes", default="choice,generate")
    ap.add_argument("--items", type=int, default=150)
    ap.add_argument("--holdout", type=float, default=0.4, help="held-out fraction of the items")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table-only", action="store_true", help="only rewrite accuracy.md from accuracy.jsonl")
    args = ap.parse_args()

    from zt_gguf import models

    out_jsonl = REPO / "benchmarks" / "results" / "accuracy.jsonl"
    if args.table_only:
        print(f"wrote {write_markdown(out_jsonl)}")
        return 0
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="zt-acc-"))
    for model_name in args.models.split(","):
        model = models.get(model_name)
        for task in args.tasks.split(","):
            data = sample(task, args.items, tmp / f"{task}.jsonl")
            for mode in args.modes.split(","):
                cmd = [
                    shutil.which("zt-gguf") or "zt-gguf",
                    "calibrate",
                    str(model),
                    "--task",
                    str(data),
                    "-o",
                    str(tmp / "t.gguf"),
                    "--report",
                    str(tmp / "rep"),
                    "--no-resume",
                    "--force",
                    "--holdout",
                    str(args.holdout),
                    "--threads",
                    str(args.threads),
                    "--json",
                    "--quiet",
                    "--allow-duplicate-choices",
                    *MODES[mode],
                ]
                t0 = time.monotonic()
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
                if res.returncode != 0:
                    print(f"{model_name} {task} {mode}: {res.stderr.strip()[-300:]}", file=sys.stderr)
                    continue
                rep = json.loads(res.stdout)
                row = {
                    "model": model_name,
                    "task": task,
                    "mode": mode,
                    "n_cal": rep["task"]["n_calibration"],
                    "n_held": rep["task"]["n_heldout"],
                    "baseline": rep["baseline"],
                    "tuned": rep["tuned"],
                    "delta": rep["delta"],
                    "chosen": rep["chosen"],
                    "evaluations": rep["evaluations"],
                    "seconds": time.monotonic() - t0,
                    "threads": args.threads,
                    "warnings": rep["warnings"],
                    "date": utc_now(),
                    "command": "zt-gguf " + " ".join(cmd[2:]).replace(str(tmp), "$TMP"),
                }
                with out_jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(table([row]).splitlines()[-1], flush=True)
    write_markdown(out_jsonl)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
