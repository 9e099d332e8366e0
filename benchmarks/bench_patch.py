#!/usr/bin/env python3
"""Patch overhead: llama-bench of the patched tree (bias off, bias on) against the same tree unpatched.

    python benchmarks/bench_patch.py [--reps 5] [--n-gen 64] [--inner 3] [--threads 2]
                                     [--out benchmarks/results/patch.json]

Builds the unpatched tree once (scripts/fetch_llama_cpp.py --stock, the same CMake flags as ours, into
build/stock), writes a copy of each model with a bias on every head (gamma 2 / 0.5 alternating), then runs
llama-bench -p 128 -n N_GEN -r INNER with -fa 0 and -fa 1, interleaving the three variants round by round
(REPS rounds) so that machine noise hits them alike; the medians over the rounds are compared. Ratios: bias
off / stock (target >= 0.995) and bias on / bias off (target >= 0.98). Patch 0005 (Q4_1 in llamafile's
tinyBLAS) is in the patched build too: SmolLM2's Q4_1 prompt processing (pp128) is ~1.8x stock, by design.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine, utc_now  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the installed package (a source checkout on sys.path would not find the built libraries and tools)
from zt_gguf import gguf_meta, models  # noqa: E402
from zt_gguf.tools import tool_path  # noqa: E402

STOCK_SRC = REPO / "build" / "stock-src"
STOCK_BUILD = REPO / "build" / "stock"


def build_stock() -> Path:
    exe = STOCK_BUILD / "bin" / "llama-bench"
    if exe.exists():
        return exe
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fetch_llama_cpp.py"), "--stock", str(STOCK_SRC)], check=True
    )
    flags = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # as in our CMakeLists (AMX crashes on these VMs)
    subprocess.run(
        [
            "cmake",
            "-S",
            str(STOCK_SRC),
            "-B",
            str(STOCK_BUILD),
            "-G",
            "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=ON",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DLLAMA_BUILD_UI=OFF",
            "-DLLAMA_OPENSSL=OFF",
            f"-DCMAKE_C_FLAGS={flags}",
            f"-DCMAKE_CXX_FLAGS={flags}",
            "-DCMAKE_C_COMPILER_LAUNCHER=ccache",
            "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache",
        ],
        check=True,
    )
    subprocess.run(["cmake", "--build", str(STOCK_BUILD), "-j2", "--target", "llama-bench"], check=True)
    return exe


def full_bias(path: Path, out: Path) -> Path:
    info = gguf_meta.read_model_info(path)
    b = np.full((info.n_layer, info.n_head), np.log(2.0), np.float32)
    b[:, 1::2] = np.log(0.5)
    return gguf_meta.write_tuned(path, out, b, {"note": "benchmark: a bias on every head"})


def bench(exe: Path, model: Path, fa: int, threads: int, n_gen: int, inner: int) -> dict[str, float]:
    cmd = [
        str(exe),
        "-m",
        str(model),
        "-p",
        "128",
        "-n",
        str(n_gen),
        "-r",
        str(inner),
        "-t",
        str(threads),
        "-fa",
        str(fa),
        "-o",
        "json",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    rows = json.loads(res.stdout)
    out = {}
    for r in rows:
        kind = "pp128" if r["n_prompt"] > 0 else f"tg{n_gen}"
        out[kind] = float(r["avg_ts"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--n-gen", type=int, default=64, help="tokens generated per llama-bench tg run")
    ap.add_argument("--inner", type=int, default=3, help="llama-bench -r: runs averaged within a round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "patch.json")
    args = ap.parse_args()

    stock = build_stock()
    patched = tool_path("llama-bench")
    tmp = Path(tempfile.mkdtemp(prefix="zt-bench-"))
    results = []
    for name in ("gemma-3-270m", "smollm2-135m"):
        plain = models.get(name)
        tuned = full_bias(plain, tmp / f"{name}.bias.gguf")
        variants = {"stock": (stock, plain), "bias_off": (patched, plain), "bias_on": (patched, tuned)}
        for fa in (0, 1):
            runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
            for _ in range(args.reps):
                for k, (exe, model) in variants.items():
                    runs[k].append(bench(exe, model, fa, args.threads, args.n_gen, args.inner))
            row: dict[str, object] = {"model": name, "fa": fa}
            for kind in ("pp128", f"tg{args.n_gen}"):
                med = {k: float(np.median([r[kind] for r in v])) for k, v in runs.items()}
                row[kind] = {
                    **{f"{k}_ts": v for k, v in med.items()},
                    "off_vs_stock": med["bias_off"] / med["stock"],
                    "on_vs_off": med["bias_on"] / med["bias_off"],
                }
            results.append(row)
            print(json.dumps(row), flush=True)

    record = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "date": utc_now(),
        "method": f"llama-bench -p 128 -n {args.n_gen} -r {args.inner} -t {args.threads}, "
        f"{args.reps} interleaved rounds, median",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"{time.time() - t0:.0f} s", file=sys.stderr)
    sys.exit(rc)
