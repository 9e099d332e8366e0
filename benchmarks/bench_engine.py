#!/usr/bin/env python3
"""Engine scoring throughput against llama-bench prompt processing, measured side by side.

    python benchmarks/bench_engine.py [--threads 2] [--items 200] [--out benchmarks/results/engine.json]

For each model (gemma-3-270m Q4_K_M, SmolLM2-135M Q4_1) and task (SST-2 with the data's plain template,
SST-2 with the paper's long instruction template, ARC-Easy with 4 choices), in a fresh subprocess:
- raw throughput: tokens the engine actually decoded per second of llama_decode;
- effective throughput: tokens of the items as written (prompt + every choice) per second of wall time;
- peak RSS of the process.
llama-bench -p 512 -n 0 -b 512 -ub 512 with the same threads runs right before each configuration; the ratios
raw / pp512 (target >= 0.9) and effective / pp512 (target >= 3 on the paper template and 4-choice tasks) use
the pp figure measured next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "jsonl"

# the paper's SST-2 configuration (zerotuning-method.md section 3): instruction1 + template + instruction2
PAPER_SST2 = (
    "Classify the sentence into one of the following categories: positive or negative.\n"
    "Sentence: {text}\nAnswer:"
)

CHILD = r"""
import json, resource, sys, time
from zt_gguf.engine import Context, Model
from zt_gguf.tasks import Item
cfg = json.loads(sys.argv[1])
items = [Item(**d) for d in cfg["items"]]
m = Model(cfg["model"])
ctx = Context(m, n_threads=cfg["threads"], n_batch=512, n_ubatch=512)
ctx.score(items[:8], n_gen=1)  # warm-up
ctx.reset_stats()
t0 = time.perf_counter()
for i in range(0, len(items), 64):
    ctx.score(items[i:i + 64], n_gen=1)
wall = time.perf_counter() - t0
s = ctx.stats
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, **s, "peak_rss_mb": rss}))
"""


def load_items(name: str, n: int) -> list[dict]:
    if name == "sst2-plain":
        path, template = DATA / "sst2.dev.jsonl", None
    elif name == "sst2-paper":
        path, template = DATA / "sst2.dev.jsonl", PAPER_SST2
    else:
        path, template = DATA / "arc_easy.test.jsonl", None
    items = []
    for line in path.read_text().splitlines()[:n]:
        d = json.loads(line)
        prompt = template.format(text=d["fields"]["text"]) if template else d["prompt"]
        items.append({"prompt": prompt, "choices": tuple(d["choices"]), "answer": d["answer"], "id": d["id"]})
    return items


def llama_bench_pp(model: Path, threads: int) -> float:
    from zt_gguf.tools import tool_path

    cmd = [
        str(tool_path("llama-bench")),
        "-m",
        str(model),
        "-p",
        "512",
        "-n",
        "0",
        "-b",
        "512",
        "-ub",
        "512",
        "-r",
        "2",
        "-t",
        str(threads),
        "-o",
        "json",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900)
    return float(json.loads(res.stdout)[0]["avg_ts"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "engine.json")
    args = ap.parse_args()

    from zt_gguf import models

    rows = []
    for model_name in ("gemma-3-270m", "smollm2-135m"):
        model = models.get(model_name)
        for task in ("sst2-plain", "sst2-paper", "arc-easy"):
            pp = llama_bench_pp(model, args.threads)
            items = load_items(task, args.items if task != "arc-easy" else args.items // 2)
            cfg = {"model": str(model), "threads": args.threads, "items": items}
            res = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(cfg)],
                capture_output=True,
                text=True,
                check=True,
                timeout=1800,
            )
            r = json.loads(res.stdout.strip().splitlines()[-1])
            raw = r["n_decoded"] / r["t_decode_s"]
            eff = r["n_item_tokens"] / r["wall_s"]
            row = {
                "model": model_name,
                "task": task,
                "n_items": len(items),
                "llama_bench_pp512_ts": pp,
                "raw_ts": raw,
                "effective_ts": eff,
                "raw_vs_pp": raw / pp,
                "effective_vs_pp": eff / pp,
                "decoded_share": r["n_decoded"] / r["n_item_tokens"],
                **r,
            }
            rows.append(row)
            print(
                json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                flush=True,
            )

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.machine(),
    )
    record = {
        "command": " ".join(sys.argv),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
