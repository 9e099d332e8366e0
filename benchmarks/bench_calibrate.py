#!/usr/bin/env python3
"""Wall time and peak memory of `zt-gguf calibrate --search paper` with 200 calibration items of SST-2.

    python benchmarks/bench_calibrate.py [--model gemma-3-270m] [--threads 2]

286 items of ../shared/data/jsonl/sst2.dev.jsonl with --holdout 0.3 give 200 calibration and 86 held-out
items. gemma-3-270m is a base model whose greedy continuation starts with a space or newline token, so it is
calibrated for --scoring choice (objective logprob); smollm2-135m for --scoring generate --n-gen 1 (the
paper's first-token match). Results: benchmarks/results/calibrate-MODEL.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, utc_now

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "jsonl"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", choices=["gemma-3-270m", "smollm2-135m"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--items", type=int, default=286)
    args = ap.parse_args()

    from zt_gguf import models

    model = models.get(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="zt-bench-cal-"))
    task = tmp / "sst2.jsonl"
    task.write_text("".join((DATA / "sst2.dev.jsonl").read_text().splitlines(keepends=True)[: args.items]))
    scoring = (
        ["--scoring", "choice", "--objective", "logprob"]
        if args.model == "gemma-3-270m"
        else ["--scoring", "generate", "--n-gen", "1"]
    )
    cmd = [
        shutil.which("zt-gguf") or "zt-gguf",
        "calibrate",
        str(model),
        "--task",
        str(task),
        "-o",
        str(tmp / "tuned.gguf"),
        "--report",
        str(tmp / "report"),
        "--search",
        "paper",
        "--holdout",
        "0.3",
        "--threads",
        str(args.threads),
        "--json",
        "--quiet",
        "--no-resume",
        "--force",
        *scoring,
    ]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - t0
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return 1
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rep = json.loads(res.stdout)
    record = {
        "command": " ".join(["python", *sys.argv]),
        "calibrate_command": " ".join(cmd[1:]).replace(str(tmp), "$TMP"),
        "machine": machine(),
        "date": utc_now(),
        "model": args.model,
        "wall_s": wall,
        "peak_rss_mb": peak_mb,
        "n_calibration": rep["task"]["n_calibration"],
        "n_heldout": rep["task"]["n_heldout"],
        "baseline": rep["baseline"],
        "tuned": rep["tuned"],
        "delta": rep["delta"],
        "chosen": rep["chosen"],
        "evaluations": rep["evaluations"],
    }
    out = REPO / "benchmarks" / "results" / f"calibrate-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("model", "wall_s", "peak_rss_mb", "delta", "chosen")}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
