#!/usr/bin/env python3
"""Stock llama.cpp loads a tuned GGUF and gives exactly the untuned outputs.

    python benchmarks/check_stock.py     # needs build/stock (python benchmarks/bench_patch.py builds it)

The unpatched libllama of the same pinned tree (build/stock/bin) is loaded through llama-cpp-python
(LLAMA_CPP_LIB_PATH); for each real model, a copy tuned with a bias on every head and the untuned file are
run on the same prompts: the logits must be bit-identical (stock ignores the unknown key), while the patched
libllama gives different logits for the tuned copy. Results: benchmarks/results/stock.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import utc_now

REPO = Path(__file__).resolve().parents[1]
STOCK_LIB = REPO / "build" / "stock" / "bin"
PROMPTS = ["Review: a gorgeous, witty film\nSentiment:", "Question: What do plants need to grow?\nAnswer:"]

CHILD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
out = {}
for path in sys.argv[2:]:
    llm = Llama(path, n_ctx=256, logits_all=True, verbose=False, n_threads=2, flash_attn=False)
    rows = []
    for p in json.loads(sys.argv[1]):
        llm.reset()
        toks = llm.tokenize(p.encode(), add_bos=True)
        llm.eval(toks)
        rows.append(np.asarray(llm.scores[len(toks) - 1], dtype=np.float32).tolist())
    out[path] = rows
print(json.dumps(out))
"""


def logits(lib: Path, files: list[Path]) -> dict[str, np.ndarray]:
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(lib)}
    res = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(PROMPTS), *map(str, files)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return {k: np.asarray(v) for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def main() -> int:
    from zt_gguf import gguf_meta, models
    from zt_gguf.tools import bin_dir

    if not (STOCK_LIB / "libllama.so").exists():
        print(f"no stock build in {STOCK_LIB}: run python benchmarks/bench_patch.py first", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="zt-stock-"))
    rows = []
    for name in ("smollm2-135m", "gemma-3-270m"):
        plain = models.get(name)
        info = gguf_meta.read_model_info(plain)
        bias = np.where(np.arange(info.n_head) % 2 == 0, np.log(2.0), np.log(0.5)).astype(np.float32)
        tuned = gguf_meta.write_tuned(plain, tmp / f"{name}.tuned.gguf", np.tile(bias, (info.n_layer, 1)))
        stock = logits(STOCK_LIB, [plain, tuned])
        patched = logits(bin_dir(), [plain, tuned])
        row = {
            "model": name,
            "stock_tuned_equals_untuned_bitwise": bool(np.array_equal(stock[str(plain)], stock[str(tuned)])),
            "patched_untuned_equals_stock_untuned_max_abs": float(
                np.abs(patched[str(plain)] - stock[str(plain)]).max()
            ),
            "patched_tuned_vs_untuned_max_abs": float(
                np.abs(patched[str(tuned)] - patched[str(plain)]).max()
            ),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    record = {
        "command": "python benchmarks/check_stock.py",
        "date": utc_now(),
        "stock_lib": str(STOCK_LIB),
        "prompts": PROMPTS,
        "results": rows,
    }
    out = REPO / "benchmarks" / "results" / "stock.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    ok = all(
        r["stock_tuned_equals_untuned_bitwise"] and r["patched_tuned_vs_untuned_max_abs"] > 1e-3 for r in rows
    )
    print(f"wrote {out}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
