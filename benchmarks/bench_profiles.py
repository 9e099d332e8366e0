#!/usr/bin/env python3
"""Several tunings of one model in one llama-server: mixed bias profiles vs one profile (issue 15).

    python benchmarks/bench_profiles.py [--model PATH] [--requests 200] [--concurrency 16] [--rounds 3]
                                        [--threads 2] [--n-predict 8] [--out benchmarks/results]

The model (default: SmolLM2-135M-Instruct Q4_1 from zt_gguf.models) is served by llama-server -np 4 with four
profiles (--attn-ftb-profile p1..p4: random biases, uniform in [-1, 1], on every head). Each round sends
--requests greedy completions of --n-predict tokens (the prompts of bench_load.py, round-robin) through a
client of --concurrency connections, twice: every request with "attn_ftb": "p1" (single), and each with one
of p1..p4 at random (mixed). Two servers run side by side: per-sequence biases (patch 0010's default: slots
of different profiles share a batch, the bias is a kernel input per row) and per-batch
(LLAMA_ATTN_FTB_PER_SEQ=0: requests of different profiles never batched together, so a mix decodes in more,
smaller batches). Rounds interleave the servers and modes --rounds times; the figures are
median(requests/s mixed) / median(requests/s single) per server (target >= 0.9), and per-sequence /
per-batch per mode. Results: OUT/profiles.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, utc_now, write_record  # noqa: E402
from zt_gguf import testing  # noqa: E402


def run(
    server: testing.Server, jobs: list[tuple[str, str]], n_predict: int, concurrency: int
) -> tuple[float, int]:
    def one(job: tuple[str, str]) -> bool:
        profile, prompt = job
        body = {
            "prompt": prompt,
            "n_predict": n_predict,
            "temperature": 0,
            "ignore_eos": True,
            "attn_ftb": profile,
        }
        status, _ = testing.http(server.url + "/completion", body, timeout=300)
        return status == 200

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        ok = list(pool.map(one, jobs))
    dt = time.perf_counter() - t0
    return len(jobs) / dt, sum(1 for o in ok if not o)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-predict", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    from zt_gguf import gguf_meta, models

    model = args.model or models.smollm2_135m()
    info = gguf_meta.read_model_info(model)
    rng = np.random.default_rng(0)
    prompts = testing.make_prompts(50)
    names = ["p1", "p2", "p3", "p4"]
    single = [("p1", prompts[i % len(prompts)]) for i in range(args.requests)]
    mixed = [(names[int(rng.integers(4))], prompts[i % len(prompts)]) for i in range(args.requests)]
    doc: dict[str, Any] = {
        "command": "bench_profiles.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "date": utc_now(),
        "model": model.name,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "n_predict": args.n_predict,
        "threads": args.threads,
        "rounds": [],
    }
    kernels = {"per-sequence": "1", "per-batch": "0"}  # LLAMA_ATTN_FTB_PER_SEQ of the server
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        extra: list[str] = []
        for n in names:
            bias = rng.uniform(-1, 1, size=(info.n_layer, info.n_head)).astype(np.float32)
            extra += [
                "--attn-ftb-profile",
                f"{n}={gguf_meta.write_bias_gguf(tmp / f'{n}.gguf', bias, info.arch)}",
            ]
        servers: dict[str, testing.Server] = {}
        try:
            for kernel, flag in kernels.items():  # both up at once, idle while the other one serves
                os.environ["LLAMA_ATTN_FTB_PER_SEQ"] = flag
                servers[kernel] = testing.start_server(
                    model, "--no-warmup", *extra, threads=args.threads, slots=4, log_dir=tmp
                )
            os.environ.pop("LLAMA_ATTN_FTB_PER_SEQ")
            for server in servers.values():
                run(server, single[: args.concurrency * 2], args.n_predict, args.concurrency)  # warm-up
            for r in range(args.rounds):
                for kernel, server in servers.items():
                    for label, jobs in (("single", single), ("mixed", mixed)):
                        rps, errors = run(server, jobs, args.n_predict, args.concurrency)
                        doc["rounds"].append(
                            {"round": r, "kernel": kernel, "mode": label, "req_per_s": round(rps, 3),
                             "errors": errors}
                        )  # fmt: skip
                        print(f"round {r} {kernel} {label}: {rps:.2f} req/s, {errors} errors", flush=True)
        finally:
            for server in servers.values():
                testing.stop_server(server)
    med = {
        (k, m): statistics.median(
            x["req_per_s"] for x in doc["rounds"] if x["mode"] == m and x["kernel"] == k
        )
        for k in kernels
        for m in ("single", "mixed")
    }
    doc["median_req_per_s"] = {f"{k} {m}": v for (k, m), v in med.items()}
    doc["ratio_mixed_over_single"] = {k: round(med[(k, "mixed")] / med[(k, "single")], 3) for k in kernels}
    doc["ratio_per_sequence_over_per_batch"] = {
        m: round(med[("per-sequence", m)] / med[("per-batch", m)], 3) for m in ("single", "mixed")
    }
    ratio = doc["ratio_mixed_over_single"]
    md = "\n".join(
        [
            "# Mixed bias profiles vs one profile in llama-server (-np 4)",
            "",
            f"`{doc['command']}` on {doc['machine']['cpu']} ({doc['machine']['cores']} cores),",
            f"{doc['date']}.",
            f"Model `{doc['model']}`, {args.requests} requests a run, {args.concurrency} connections, "
            f"{args.n_predict} tokens each, {args.threads} threads; 4 profiles. Two servers, rounds "
            "interleaved: per-sequence biases (slots of different profiles share a batch; the default) and "
            "per-batch (LLAMA_ATTN_FTB_PER_SEQ=0: one profile per batch).",
            "",
            "| round | kernel | mode | req/s | errors |",
            "|---|---|---|---|---|",
            *[
                f"| {x['round']} | {x['kernel']} | {x['mode']} | {x['req_per_s']:.2f} | {x['errors']} |"
                for x in doc["rounds"]
            ],
            "",
            "Median req/s: "
            + "; ".join(f"{k} {m} {v:.2f}" for (k, m), v in med.items())
            + ". Ratio mixed / single: "
            + ", ".join(f"{k} **{v:.3f}**" for k, v in ratio.items())
            + " (target >= 0.9). Per-sequence / per-batch: "
            + ", ".join(f"{m} {v:.3f}" for m, v in doc["ratio_per_sequence_over_per_batch"].items())
            + ".",
            "",
        ]
    )
    print(write_record(args.out, "profiles", doc, md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
