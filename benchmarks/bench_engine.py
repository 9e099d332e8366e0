#!/usr/bin/env python3
"""Engine scoring throughput against llama-bench prompt processing, measured side by side.

    python benchmarks/bench_engine.py [--threads 2] [--items 200] [--out benchmarks/results/engine.json]

For each model (gemma-3-270m Q4_K_M, SmolLM2-135M Q4_1) and task (SST-2 with the data's plain template,
SST-2 with the paper's long instruction template, ARC-Easy with its 4 answers as the choices, ARC-Easy in the
paper's multiple-choice format: options listed, letters as the choices), in a fresh subprocess:
- raw throughput: tokens the engine actually decoded per second of llama_decode; also as a ratio to the time
  llama.cpp itself needs for the same work (raw_vs_llama_same_work): a scorer needs the logits of every choice
  token but the last, and an output row costs more than a token's layers for Gemma's 262k vocabulary, which
  llama-bench pp (one output row per 512 tokens) does not include. Both rates come from ALL_LOGITS_CHILD, one
  512-token llama_decode through the C API with logits for the last or for every token;
- effective throughput: tokens of the items as written (prompt + every choice) per second of wall time;
- peak RSS of the process.
llama-bench -p 512 -n 0 -b 512 -ub 512 with the same threads runs right before each configuration; the ratios
raw / pp512 (target >= 0.9) and effective / pp512 (target >= 3 on the paper template and 4-choice tasks) use
the pp figure measured next to them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import machine, utc_now

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


# llama.cpp itself through its C API (llama-cpp-python's bindings on our libllama): one 512-token decode with
# logits for the last token only (what llama-bench pp512 measures) and with logits for every token (what a
# scorer needs for every choice token but the last): the cost of an output row, which matters for Gemma's
# 262k vocabulary (its output matrix is larger than the rest of the model)
ALL_LOGITS_CHILD = r"""
import json, sys, time
import llama_cpp as L
cfg = json.loads(sys.argv[1])
L.llama_backend_init()
mp = L.llama_model_default_params()
model = L.llama_model_load_from_file(cfg["model"].encode(), mp)
cp = L.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_ubatch = 1024, 512, 512
cp.n_threads = cp.n_threads_batch = cfg["threads"]
ctx = L.llama_init_from_model(model, cp)
n = 512
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
batch = L.llama_batch_init(n, 0, 1)
for i in range(n):
    batch.token[i] = (1000 + i * 7919) % n_vocab
    batch.pos[i] = i
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = 0
batch.n_tokens = n
out = {}
for name, every in (("last", False), ("all", True), ("last", False), ("all", True)):
    for i in range(n):
        batch.logits[i] = every or i == n - 1
    best = None
    for _ in range(3):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        assert L.llama_decode(ctx, batch) == 0
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    out[name] = min(out.get(name, best), best)
print(json.dumps({"pp512_last_ts": n / out["last"], "pp512_all_ts": n / out["all"]}))
"""


def all_logits_reference(model: Path, threads: int) -> dict:
    from zt_gguf.tools import llama_cpp_env

    cfg = json.dumps({"model": str(model), "threads": threads})
    res = subprocess.run(
        [sys.executable, "-c", ALL_LOGITS_CHILD, cfg],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
        env=llama_cpp_env(),
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


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
        prompt, choices = d["prompt"], tuple(d["choices"])
        if template:
            prompt = template.format(text=d["fields"]["text"])
        elif name == "arc-paper":
            # the paper's multiple-choice format (zerotuning-method.md section 3): options listed, letters
            # as the choices
            letters = "ABCDE"[: len(d["fields"]["options"])]
            listed = "".join(f"\n{a}. {o}" for a, o in zip(letters, d["fields"]["options"]))
            prompt = f"Question: {d['fields']['question']}{listed}\nAnswer:"
            choices = tuple(f" {a}" for a in letters)
        items.append({"prompt": prompt, "choices": choices, "answer": d["answer"], "id": d["id"]})
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
        for task in ("sst2-plain", "sst2-paper", "arc-easy", "arc-paper"):
            pp = llama_bench_pp(model, args.threads)
            ref = all_logits_reference(model, args.threads)
            items = load_items(task, args.items if not task.startswith("arc") else args.items // 2)
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
            # llama.cpp's own time for the engine's work: its tokens at the pp512 rate, plus the extra cost of
            # the rows whose logits the engine reads at the all-logits rate
            n_rest = r["n_decoded"] - r["n_outputs"]
            t_llama = n_rest / ref["pp512_last_ts"] + r["n_outputs"] / ref["pp512_all_ts"]
            row = {
                "model": model_name,
                "task": task,
                "n_items": len(items),
                "llama_bench_pp512_ts": pp,
                "raw_ts": raw,
                "effective_ts": eff,
                "raw_vs_pp": raw / pp,
                **ref,
                "raw_vs_llama_same_work": t_llama / r["t_decode_s"],
                "effective_vs_pp": eff / pp,
                "decoded_share": r["n_decoded"] / r["n_item_tokens"],
                **r,
            }
            rows.append(row)
            print(
                json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                flush=True,
            )

    record = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "date": utc_now(),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
