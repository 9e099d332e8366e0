#!/usr/bin/env python3
"""Soak: llama-server from our tree, 4 slots, a mixed load of at least 2,000 requests (issue 25, item 4).

    python benchmarks/bench_soak.py [--requests 2400] [--concurrency 8] [--prompts 20] [--n-predict 8]
                                    [--model PATH] [--out benchmarks/results]

The model (default: SmolLM2-135M-Instruct in F32, written from the Q4_1 file on first use, so that
llama.cpp is batch-invariant up to float rounding and "equal" can mean equal tokens) gets a stored bias
(gamma 2 / 0.5 on alternate heads) and two profiles (random gammas in [0.25, 4], seeds 1 and 2), served with
--attn-ftb-profile p1=... p2=... by llama-server -np 4 -t 1. zt_gguf.soak sends the plan: completions with
top-2 log-probabilities, echoed prompts with log-probabilities, chat with log-probabilities, each under the
model's own biases, "none", p1 or p2; 5% streaming completions whose client leaves after the first event;
10% malformed requests (zt_gguf.soak.bad_requests, 83 kinds). Every well-formed answer is compared with the
same request served alone (tokens equal, log-probabilities within ATOL; a divergence where the alone answer's
top-2 gap is below ATOL counts as a tie: the rounding that moves log-probabilities by up to ATOL can swap two
tokens that close), every malformed one must get a 4xx naming the field; the server must stay up, answer
/health, exit 0 on SIGTERM, and its RSS grow by less than 32 MiB from after the warm-up burst to the end.

Records OUT/soak.json and OUT/soak.md (command, machine, date); exit 1 when anything failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from _common import machine, utc_now, write_record
from zt_gguf import gguf_meta, models, profiles
from zt_gguf.soak import SoakResult, bad_requests, run_soak, soak_plan
from zt_gguf.testing import make_prompts, start_server, stop_server

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-2  # as bench_load.py: F16 K/V and other batch shapes, measured up to 3.7e-3 on this model
RSS_LIMIT_MIB = 32
PROFILES = ("p1", "p2")


def f32_model() -> Path:
    """SmolLM2-135M-Instruct in F32 next to the Q4_1 file (benchmarks/zt_reference.py writes it once)."""
    q41 = models.smollm2_135m()
    f32 = q41.with_name(q41.name.replace(".Q4_1.", ".").removesuffix(".gguf") + ".F32.gguf")
    if not f32.exists():
        import zt_reference

        print(f"bench_soak: writing the F32 copy {f32}", file=sys.stderr)
        zt_reference.write_f32_copy(q41, f32)
    return f32


def prepare(base: Path, tmp: Path) -> tuple[Path, dict[str, Path]]:
    """A tuned copy (gamma 2 / 0.5 alternating by head) and the profiles p1, p2 (random gammas)."""
    info = gguf_meta.read_model_info(base)
    gamma = np.where(np.arange(info.n_head) % 2 == 0, 2.0, 0.5)
    stored = np.tile(np.log(gamma), (info.n_layer, 1)).astype(np.float32)
    tuned = gguf_meta.write_tuned(base, tmp / "tuned.gguf", stored, {"version": "bench_soak"})
    paths = {}
    for seed, name in enumerate(PROFILES, start=1):
        rng = np.random.default_rng(seed)
        bias = np.log(rng.uniform(0.25, 4.0, size=(info.n_layer, info.n_head))).astype(np.float32)
        paths[name] = profiles.write_profile(tmp / f"{name}.gguf", bias, info.arch, {"task": f"{name}.jsonl"})
    return tuned, paths


def markdown(doc: dict[str, Any], res: SoakResult) -> str:
    s = doc["settings"]
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(res.by_kind.items()))
    verdicts = ", ".join(f"{k} {n}" for k, n in sorted(res.verdicts.items()))
    load = ", ".join(f"{x:.1f}" for x in doc["machine"]["load_average_at_start"])
    lines = [
        "# llama-server soak: a mixed load (benchmarks/bench_soak.py)",
        "",
        f"- command: `{doc['command']}`",
        f"- date: {doc['date']}; machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores (shared), "
        f"load average at start {load}",
        f"- model: {doc['model']}; server: {doc['server']}",
        f"- client: {res.requests} requests at once from {res.concurrency} loopback connections, greedy, "
        f"{s['n_predict']} tokens, {s['prompts']} distinct prompts; profiles: the model's own, none, "
        f"{', '.join(PROFILES)}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests by kind | {kinds} |",
        f"| verdicts | {verdicts} |",
        f"| problems (a well-formed answer unlike the alone one, a malformed one without a 4xx) "
        f"| {len(res.problems)} |",
        f"| distinct requests served alone (the reference) | {res.alone_requests} |",
        f"| largest log-probability difference from alone (tolerance {res.atol}) "
        f"| {res.max_logprob_diff:.1e} |",
        f"| server alive after the run, /health 200 | {res.server_alive} |",
        f"| exit code on SIGTERM | {doc['exit_code']} |",
        f"| RSS after warm-up -> end (peak), MiB | {res.rss_kib_before / 1024:.1f} -> "
        f"{res.rss_kib_after / 1024:.1f} ({res.rss_kib_peak / 1024:.1f}) |",
        f"| RSS growth, MiB (limit {RSS_LIMIT_MIB}) | {res.rss_growth_kib / 1024:.1f} |",
        f"| seconds, requests/s | {res.seconds:.0f}, {res.requests / res.seconds:.2f} |",
        f"| prompts whose completion differs between profiles (the profiles really differ) "
        f"| {res.answers_the_profile_changes} of {s['prompts']} |",
        "",
        f"Verdict: **{'passed' if doc['passed'] else 'FAILED'}**.",
        "",
    ]
    if res.problems:
        lines += ["First problems:", "", *(f"- {p}" for p in res.problems[:10]), ""]
    return "\n".join(lines)


def say(message: str) -> None:
    print(f"bench_soak: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an unquantized GGUF (default: SmolLM2-135M-Instruct F32)")
    ap.add_argument("--requests", type=int, default=2400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--n-predict", type=int, default=8)
    ap.add_argument("--seed", type=int, default=25)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)

    started = utc_now()
    base = args.model or f32_model()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tuned, paths = prepare(base, tmp)
        n_vocab = gguf_meta.read_model_info(base).n_vocab
        cases = bad_requests(n_vocab, PROFILES)
        plan = soak_plan(args.requests, make_prompts(args.prompts, seed=args.seed), PROFILES, len(cases),
                         seed=args.seed)  # fmt: skip
        profile_args = [a for n, p in paths.items() for a in ("--attn-ftb-profile", f"{n}={p}")]
        server = start_server(tuned, *profile_args, threads=1, log_dir=tmp)
        try:
            res = run_soak(server, plan, cases, concurrency=args.concurrency, n_predict=args.n_predict,
                           atol=ATOL, progress=say)  # fmt: skip
        finally:
            code = stop_server(server)
    doc: dict[str, Any] = {
        "command": " ".join(
            ["python benchmarks/bench_soak.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": started,
        "machine": machine(),
        "model": f"{base.name} with gamma 2 / 0.5 on alternate heads; profiles p1, p2: random gammas "
        "in [0.25, 4]",
        "server": "llama-server -np 4 -c 2048 -t 1 -fa off --attn-ftb-profile p1=... p2=... (our tree)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
        "tie": ATOL,
        "rss_limit_mib": RSS_LIMIT_MIB,
        "exit_code": code,
        "result": {k: v for k, v in dataclasses.asdict(res).items() if k != "alone"},
        "rss_growth_kib": res.rss_growth_kib,
    }
    doc["passed"] = res.passed and code == 0 and res.rss_growth_kib < RSS_LIMIT_MIB * 1024
    print(write_record(args.out, "soak", doc, markdown(doc, res)))
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
