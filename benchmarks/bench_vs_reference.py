#!/usr/bin/env python3
"""The same ZeroTuning calibration run by the PyTorch reference and by zt-gguf: wall time and peak memory.

    python benchmarks/bench_vs_reference.py [--items 32] [--threads 1] [--out benchmarks/results]
        [--routes ref-full,ref-generate,zt,zt-f32]

Needs torch and transformers (`pip install torch==2.13.0 transformers`, CPU build). The calibration: the
paper's search (zerotuning-method.md section 2) on SmolLM2-135M-Instruct: probe each of the 9 query-head
indices in all 30 layers at gamma 2.0 and 0.5, keep the dominant type, take the top 40% of its heads, try a
grid of 3 gammas (up 1.5/3/4, down 0.25/0.4/0.75, none equal to a probe), so both sides score the same
1 + 2*9 + 3 = 22 candidates; objective: accuracy of the first greedy token (the paper's first-token match,
parsed by zt_gguf.metrics.parse_generation), on --items SST-2 items of shared/data/jsonl/sst2.dev.jsonl
(a seeded sample) in the paper's prompt template.

Each route runs in its own subprocess, one after the other, in this one run; the parent measures its wall
time, its peak RSS (ru_maxrss of that child, from os.wait4 in a small launcher process: Linux counts a
process's pre-exec memory in ru_maxrss, so a child of this parent would report the parent's size) and its
CPU time; the child's own VmHWM is recorded too. One thread per route by default:
on a shared 2-core machine two threads per process spin at every barrier while another process holds a core
(measured here: torch 0.07 -> 1.2 s a forward, the engine 5x slower), which distorts wall times; with one
thread the CPU-time ratio is the steadiest figure and the wall ratio follows the machine's load.

* ``ref-full``: zt_reference.py as a user of the paper's code would run it: F32 dequantized weights in
  PyTorch, one item at a time, batch 1, a full forward of the prompt and of each prompt+choice (no prefix
  sharing, no KV cache), every candidate on every item (zt_reference.paper_search).
* ``ref-generate``: the same, with only the prompt's forward per item (what the paper's evaluation itself does
  for the first-token objective): the cheapest reference, for a conservative ratio.
* ``zt``: zt_gguf.search.search(method="paper") with context_scorer on the Q4_1 GGUF (batched items, shared
  prefixes, early stopping on), as ``zt-gguf calibrate`` runs it.
* ``zt-f32``: the same on the F32 copy (same weights as the reference): separates the engine's own gain from
  the quantized weights'; its decisions are compared with the reference's.
* ``zt-q4_0``: the same on a Q4_0 re-quantization of those weights (zt_reference.write_requantized_copy): a
  diagnostic of the engine's speed on the type that llama.cpp's CPU backend multiplies fastest (repacked
  GEMM).

Token ids are computed once in the parent with llama.cpp's tokenizer and handed to the reference children
(zt_reference.TableVocab), so those load no llama.cpp. The memory an 8B model needs on each route is computed
(not measured) at the end. Writes OUT/vs_reference.json and OUT/vs_reference.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import utc_now, write_record

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data" / "jsonl" / "sst2.dev.jsonl"
sys.path.insert(0, str(HERE))

# the paper's SST-2 configuration (zerotuning-method.md section 3)
PAPER_SST2 = (
    "Classify the sentence into one of the following categories: positive or negative.\n"
    "Sentence: {text}\nAnswer:"
)
SEARCH = {
    "probe_up": 2.0,
    "probe_down": 0.5,
    "head_fraction": 0.4,
    "grid_up": [1.5, 3.0, 4.0],
    "grid_down": [0.25, 0.4, 0.75],
}
ROUTES = ("ref-full", "ref-generate", "zt", "zt-f32", "zt-q4_0")
TARGET_WALL = 5.0  # wall(ref) / wall(zt) >= this
TARGET_RSS = 0.25  # rss(zt) / rss(ref) <= this


def load_items(n: int, seed: int, path: Path = DATA) -> list[dict[str, Any]]:
    import numpy as np

    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    pick = np.random.default_rng(seed).choice(len(lines), size=min(n, len(lines)), replace=False)
    return [
        {
            "prompt": PAPER_SST2.format(text=lines[i]["fields"]["text"]),
            "choices": list(lines[i]["choices"]),
            "answer": int(lines[i]["answer"]),
            "id": lines[i]["id"],
        }
        for i in sorted(int(i) for i in pick)
    ]


def _vm(field: str) -> float:
    """A /proc/self/status field (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------------------------
# children


def child_ref(cfg: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    import numpy as np
    import torch

    import zt_reference as ztr
    from zt_gguf.metrics import item_results
    from zt_gguf.tasks import Item

    t_import = time.monotonic() - t0
    torch.set_num_threads(cfg["threads"])
    vocab = ztr.TableVocab.from_dict(json.loads(Path(cfg["vocab"]).read_text()))
    items = [Item(d["prompt"], tuple(d["choices"]), d["answer"], d["id"]) for d in cfg["items"]]
    t1 = time.monotonic()
    ref = ztr.load_reference(cfg["model"], vocab=vocab, n_threads=cfg["threads"])
    t_load = time.monotonic() - t1
    rss_loaded = _vm("VmRSS")
    with_choices = cfg["kind"] == "ref-full"

    def accuracy_of(bias: np.ndarray) -> float:
        scores = ref.score_items(items, bias, n_gen=1, choices=with_choices)
        results = item_results(scores, items)
        return float(np.mean([r.gen_pred == it.answer for r, it in zip(results, items)]))

    t2 = time.monotonic()
    res = ztr.paper_search(
        accuracy_of,
        ref.bias_shape,
        probe_up=cfg["search"]["probe_up"],
        probe_down=cfg["search"]["probe_down"],
        head_fraction=cfg["search"]["head_fraction"],
        grid_up=cfg["search"]["grid_up"],
        grid_down=cfg["search"]["grid_down"],
        n_items=len(items),
    )
    t_search = time.monotonic() - t2
    return {
        "import_s": t_import,
        "load_s": t_load,
        "search_s": t_search,
        "rss_after_load_mib": rss_loaded,
        "vmhwm_mib": _vm("VmHWM"),
        "param_mib": sum(p.numel() * p.element_size() for p in ref.model.parameters()) / 2**20,
        "n_forwards": ref.n_forwards,
        "n_forward_tokens": ref.n_forward_tokens,
        "n_evaluations": res.n_evaluations,
        "items_scored": res.items_scored,
        "items_full": res.n_evaluations * len(items),
        "baseline_accuracy": res.baseline_accuracy,
        "best_accuracy": res.best_accuracy,
        "head_type": res.head_type,
        "heads": res.heads,
        "best_gamma": res.best_gamma,
        "gains_up": res.gains_up,
        "gains_down": res.gains_down,
    }


def child_zt(cfg: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    from zt_gguf.engine import Context, Model, fit_n_ctx
    from zt_gguf.search import SearchConfig, context_scorer, search
    from zt_gguf.tasks import Item

    t_import = time.monotonic() - t0
    items = [Item(d["prompt"], tuple(d["choices"]), d["answer"], d["id"]) for d in cfg["items"]]
    t1 = time.monotonic()
    model = Model(cfg["model"])
    # the context zt-gguf calibrate makes: fitted to the items scored per search call
    ctx = Context(model, n_threads=cfg["threads"], n_ctx=fit_n_ctx(model, items, cfg["chunk_size"], 1))
    t_load = time.monotonic() - t1
    rss_loaded = _vm("VmRSS")
    s = cfg["search"]
    config = SearchConfig(
        method="paper",
        objective="accuracy-generate",
        probe_up=s["probe_up"],
        probe_down=s["probe_down"],
        head_fraction=s["head_fraction"],
        grid_up=tuple(s["grid_up"]),
        grid_down=tuple(s["grid_down"]),
        early_stop=True,
        chunk_size=cfg["chunk_size"],
    )
    t2 = time.monotonic()
    res = search(context_scorer(ctx, n_gen=1), items, model.bias_shape, config)
    t_search = time.monotonic() - t2
    stats = ctx.stats
    return {
        "import_s": t_import,
        "load_s": t_load,
        "search_s": t_search,
        "rss_after_load_mib": rss_loaded,
        "vmhwm_mib": _vm("VmHWM"),
        "model_file_mib": Path(cfg["model"]).stat().st_size / 2**20,
        "engine_stats": stats,
        "n_evaluations": res.n_evaluations,
        "items_scored": res.items_scored,
        "items_full": res.items_full,
        "savings": res.savings,
        "baseline_accuracy": res.baseline_objective,
        "best_accuracy": res.best_objective,
        "head_type": res.head_type,
        "heads": res.heads,
        "best_gamma": res.best_gamma,
        "gains_up": res.gains_up,
        "gains_down": res.gains_down,
        "n_stopped_early": sum(c.stopped_early for c in res.candidates),
    }


# ------------------------------------------------------------------------------------------------------------
# the parent


# Linux counts the memory a process had before exec() in its ru_maxrss (exec_mmap keeps the old mm's
# high-water mark), so a child spawned by this parent, which holds the tokenizer and more, would report at
# least the parent's size. Each route is therefore started by a small launcher process and measured there.
LAUNCHER = r"""
import json, os, subprocess, sys, time
cmd, log = json.loads(sys.argv[1]), sys.argv[2]
with open(log, "wb") as f:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
p.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps({"wall_s": wall, "exit": p.returncode, "maxrss_kib": ru.ru_maxrss,
                  "cpu_s": ru.ru_utime + ru.ru_stime}))
"""


def run_child(kind: str, cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run one route in a fresh process; its wall time, peak RSS (ru_maxrss) and CPU time, from a launcher."""
    cfg_path = workdir / f"{kind}.config.json"
    res_path = workdir / f"{kind}.result.json"
    log_path = workdir / f"{kind}.log"
    cfg_path.write_text(json.dumps({**cfg, "kind": kind}))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # OpenMP threads that spin-wait collapse on a shared machine (torch: 0.07 -> 1.2 s a forward at load 5)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--config", str(cfg_path)]
    cmd += ["--result", str(res_path)]
    load_before = os.getloadavg()[0]
    launched = subprocess.run(
        [sys.executable, "-c", LAUNCHER, json.dumps(cmd), str(log_path)],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
    )
    if launched.returncode != 0:
        raise RuntimeError(f"{kind}: the launcher failed: {launched.stderr[-2000:]}")
    m = json.loads(launched.stdout.strip().splitlines()[-1])
    if m["exit"] != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{kind}: exit {m['exit']}\n{tail}")
    out = json.loads(res_path.read_text())
    out.update(
        {
            "wall_s": m["wall_s"],
            "cpu_s": m["cpu_s"],
            "peak_rss_mib": m["maxrss_kib"] / 1024,  # Linux: KiB
            "loadavg_1min_before": load_before,
            "loadavg_1min_after": os.getloadavg()[0],
        }
    )
    print(
        f"{kind}: wall {out['wall_s']:.1f} s (search {out['search_s']:.1f} s), cpu {out['cpu_s']:.1f} s, "
        f"peak RSS {out['peak_rss_mib']:.0f} MiB (VmHWM {out['vmhwm_mib']:.0f}), {out['n_evaluations']} "
        f"candidates, {out['items_scored']} item scorings",
        file=sys.stderr,
    )
    return out


def memory_8b() -> dict[str, Any]:
    """What an 8B model needs on each route (Llama-3.1-8B: 8.03e9 parameters, 32 layers, 8 KV heads x 128)."""
    n_params, n_layer, n_kv, head_dim, n_vocab = 8.03e9, 32, 8, 128, 128256
    kv_tok_f32 = 2 * n_layer * n_kv * head_dim * 4  # bytes per token, K and V
    prompt = 512  # tokens of one reference forward (an SST-2 item is ~50; generous)
    ctx = 4096  # the most cells zt-gguf fits to a task (engine.fit_n_ctx), shared by up to 64 sequences
    ref_act = prompt * kv_tok_f32 + prompt * n_vocab * 4  # its KV + the logits of every position
    gguf = 4.92e9  # Meta-Llama-3.1-8B-Instruct Q4_K_M GGUF file
    zt_kv = ctx * kv_tok_f32 // 2  # F16 cache
    zt_compute = 512 * n_vocab * 4 + 0.1e9  # logits of one 512-token ubatch + graph buffers (approx.)
    routes = {
        "pytorch_fp32": n_params * 4 + ref_act,
        "pytorch_bf16": n_params * 2 + ref_act / 2,
        "zt_gguf_q4_k_m": gguf + zt_kv + zt_compute,
    }
    return {
        "assumptions": {
            "n_params": n_params,
            "n_layer": n_layer,
            "n_kv_head": n_kv,
            "head_dim": head_dim,
            "n_vocab": n_vocab,
            "reference_tokens_per_forward": prompt,
            "zt_n_ctx": ctx,
            "q4_k_m_file_bytes": gguf,
            "kv_bytes_per_token_f32": kv_tok_f32,
        },
        "bytes": routes,
        "gb": {k: v / 1e9 for k, v in routes.items()},
        "ratio_zt_to_fp32": routes["zt_gguf_q4_k_m"] / routes["pytorch_fp32"],
        "ratio_zt_to_bf16": routes["zt_gguf_q4_k_m"] / routes["pytorch_bf16"],
    }


def to_markdown(doc: dict[str, Any]) -> str:
    m, r = doc["machine"], doc["routes"]
    lines = [
        "# The same calibration: PyTorch reference vs zt-gguf",
        "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared with other work: load averages below); "
        f"{doc['threads']} thread{'s' if doc['threads'] != 1 else ''} per route  ",
        f"Date: {doc['date']}; versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + "  ",
        f"Task: {doc['n_items']} SST-2 items (seed {doc['seed']}, paper template), the paper's search: "
        f"probes {SEARCH['probe_up']:g}/{SEARCH['probe_down']:g} on each of {doc['n_head']} head indices in "
        f"all {doc['n_layer']} layers, top {SEARCH['head_fraction']:.0%} heads, grid up {SEARCH['grid_up']} "
        f"/ down {SEARCH['grid_down']}; objective first-greedy-token accuracy. zt chunk size "
        f"{doc['chunk_size']}.",
        "",
        "| route | weights | candidates | item scorings | forwards / decoded tokens | wall s | search s | "
        "CPU s | peak RSS MiB | load avg | baseline acc | best acc | type, heads, gamma |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, v in r.items():
        work = (
            f"{v['n_forwards']} fwd / {v['n_forward_tokens']} tok"
            if "n_forwards" in v
            else f"{int(v['engine_stats'].get('n_decoded', 0))} tok decoded"
        )
        lines.append(
            f"| {kind} | {v['weights']} | {v['n_evaluations']} | {v['items_scored']}/{v['items_full']} | "
            f"{work} | {v['wall_s']:.1f} | {v['search_s']:.1f} | {v['cpu_s']:.1f} | {v['peak_rss_mib']:.0f} "
            f"| {v['loadavg_1min_before']:.1f}-{v['loadavg_1min_after']:.1f} | {v['baseline_accuracy']:.3f} "
            f"| {v['best_accuracy']:.3f} | {v['head_type']} {v['heads']} {v['best_gamma']:g} |"
        )
    lines += ["", "## Ratios", "", "| | value | target |", "|---|---|---|"]
    for k, v in doc["ratios"].items():
        lines.append(f"| {k} | {v['value']:.2f} | {v.get('target', '')} |")
    mem = doc["memory_8b"]
    a = mem["assumptions"]
    lines += [
        "",
        "## Memory for an 8B model (computed, not measured)",
        "",
        f"Llama-3.1-8B: {a['n_params']:.3g} parameters, {a['n_layer']} layers, {a['n_kv_head']} KV heads x "
        f"{a['head_dim']}, vocabulary {a['n_vocab']}; KV {a['kv_bytes_per_token_f32'] // 1024} KiB per token "
        f"in fp32 (half in fp16/bf16).",
        "",
        f"- PyTorch fp32: 8.03e9 x 4 B = {a['n_params'] * 4 / 1e9:.1f} GB of weights + KV and logits of a "
        f"{a['reference_tokens_per_forward']}-token forward = **{mem['gb']['pytorch_fp32']:.1f} GB**",
        f"- PyTorch bf16: 8.03e9 x 2 B = {a['n_params'] * 2 / 1e9:.1f} GB + the same in bf16 = "
        f"**{mem['gb']['pytorch_bf16']:.1f} GB**",
        f"- zt-gguf, Q4_K_M GGUF: {a['q4_k_m_file_bytes'] / 1e9:.2f} GB file (memory-mapped) + F16 KV cache "
        f"of n_ctx {a['zt_n_ctx']} ({a['zt_n_ctx'] * a['kv_bytes_per_token_f32'] / 2 / 1e9:.2f} GB) + "
        f"compute buffers (~0.36 GB) = **{mem['gb']['zt_gguf_q4_k_m']:.1f} GB**",
        f"- zt / fp32 = {mem['ratio_zt_to_fp32']:.2f}; zt / bf16 = {mem['ratio_zt_to_bf16']:.2f}. The fp32 "
        "route does not fit a 16 GB or 24 GB machine; bf16 fits 24 GB only, and bf16 matmuls are slow on "
        "CPUs without AVX512-BF16/AMX.",
        "",
        "## Reading",
        "",
    ]
    lines += doc["notes"]
    return "\n".join(lines) + "\n"


def notes(doc: dict[str, Any]) -> list[str]:
    r = doc["routes"]
    out = []
    zt, full = r.get("zt"), r.get("ref-full")
    if zt and full:
        wall = full["wall_s"] / zt["wall_s"]
        rss = zt["peak_rss_mib"] / full["peak_rss_mib"]
        out.append(
            f"- Targets: wall(ref-full) / wall(zt) = {wall:.2f} (target >= {TARGET_WALL:g}: "
            f"{'met' if wall >= TARGET_WALL else 'NOT met'}); rss(zt) / rss(ref-full) = {rss:.2f} (target <= "
            f"{TARGET_RSS:g}: {'met' if rss <= TARGET_RSS else 'NOT met'}). Both measured on SmolLM2-135M, "
            f"where the reference's runtime (RSS after loading minus its weights: "
            f"{full['rss_after_load_mib'] - full['param_mib']:.0f} MiB) is close to its weights' size; for "
            "an 8B model see the estimate above."
        )
    if zt and full:
        out.append(
            f"- Speed: the reference needs {full['wall_s']:.0f} s, zt-gguf {zt['wall_s']:.0f} s for the same "
            f"{full['n_evaluations']}-candidate search: {full['wall_s'] / zt['wall_s']:.1f}x in wall time "
            f"({full['search_s'] / zt['search_s']:.1f}x for the search alone, "
            f"{full['cpu_s'] / zt['cpu_s']:.1f}x in CPU time, which the shared machine's load disturbs "
            f"less). zt-gguf scored {zt['items_scored']} of {zt['items_full']} item evaluations "
            f"({zt['savings']:.0%} saved by early stopping, {zt['n_stopped_early']} candidates stopped)."
        )
    gen = r.get("ref-generate")
    if zt and gen:
        out.append(
            f"- Against the cheapest reference (the prompt's forward only, as the paper's own evaluation): "
            f"{gen['wall_s'] / zt['wall_s']:.1f}x wall, {gen['search_s'] / zt['search_s']:.1f}x search."
        )
    z32 = r.get("zt-f32")
    if z32 and full:
        out.append(
            "- Same float32 weights on both sides (zt-gguf on the F32 copy): "
            f"{full['wall_s'] / z32['wall_s']:.1f}x wall, {full['search_s'] / z32['search_s']:.1f}x search: "
            "the gain of batching, prefix sharing and early stopping alone, without quantized weights."
        )
    q40 = r.get("zt-q4_0")
    if zt and q40 and full:
        out.append(
            "- The quantization type matters for the engine's speed: the Q4_1 run's search took "
            f"{zt['search_s']:.0f} s, a Q4_0 re-quantization of the same weights {q40['search_s']:.0f} s"
            + (f", the F32 copy {z32['search_s']:.0f} s" if z32 else "")
            + ". Q4_0 goes through ggml's repacked 8x8 GEMM; Q4_1 through llamafile's tinyBLAS only since "
            "our patch 0005 (before it, one dot-product call per weight row and token: 2x slower). "
            "Against the Q4_0 run the "
            f"reference is {full['wall_s'] / q40['wall_s']:.1f}x slower in wall time, "
            f"{full['cpu_s'] / q40['cpu_s']:.1f}x in CPU time."
        )
    if zt and full:
        out.append(
            f"- Memory: peak RSS {zt['peak_rss_mib']:.0f} MiB (zt-gguf, Q4_1) vs {full['peak_rss_mib']:.0f} "
            f"MiB (reference, fp32 weights {full['param_mib']:.0f} MiB): ratio "
            f"{zt['peak_rss_mib'] / full['peak_rss_mib']:.2f}. A good part of the reference's is the torch "
            f"runtime itself; RSS after loading: {full['rss_after_load_mib']:.0f} vs "
            f"{zt['rss_after_load_mib']:.0f} MiB."
        )
    if zt and zt["items_scored"] == zt["items_full"]:
        out.append(
            f"- Early stopping stopped no candidate: on {doc['n_items']} items in chunks of "
            f"{doc['chunk_size']}, none was behind its reference by the paired 99% bound (the probes move "
            "few answers)."
        )
    for name in ("zt", "zt-f32", "zt-q4_0", "ref-generate"):
        other = r.get(name)
        if other and full:
            same = (other["head_type"], other["heads"], other["best_gamma"]) == (
                full["head_type"],
                full["heads"],
                full["best_gamma"],
            )
            out.append(
                f"- Decision of {name} vs ref-full: {'the same' if same else 'DIFFERENT'} "
                f"({other['head_type']} {other['heads']} gamma {other['best_gamma']:g} vs "
                f"{full['head_type']} {full['heads']} gamma {full['best_gamma']:g}); baseline accuracy "
                f"{other['baseline_accuracy']:.3f} vs {full['baseline_accuracy']:.3f}."
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=32, help="calibration items (SST-2 dev, seeded sample)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads per route (1: on a shared machine, two threads that meet at barriers collapse when "
        "another process takes a core, in torch and in ggml alike)",
    )
    ap.add_argument("--chunk-size", type=int, default=8, help="zt-gguf items per scorer call (racing step)")
    ap.add_argument(
        "--routes",
        default=",".join(ROUTES),
        help="comma-separated, from: " + ", ".join(ROUTES),
    )
    ap.add_argument("--model", type=Path, help="a llama GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--f32", type=Path, help="its F32 copy (default: written next to it on first use)")
    ap.add_argument("--data", type=Path, default=DATA, help="SST-2 JSONL with fields.text, choices, answer")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument(
        "--render", action="store_true", help="only rewrite OUT/vs_reference.md from OUT/vs_reference.json"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        cfg = json.loads(args.config.read_text())
        res = child_ref(cfg) if args.child.startswith("ref") else child_zt(cfg)
        args.result.write_text(json.dumps(res))
        return 0

    if args.render:
        doc = json.loads((args.out / "vs_reference.json").read_text())
        doc["memory_8b"] = memory_8b()
        doc["notes"] = notes(doc)
        (args.out / "vs_reference.json").write_text(json.dumps(doc, indent=1) + "\n")
        (args.out / "vs_reference.md").write_text(to_markdown(doc))
        print(to_markdown(doc))
        return 0

    import zt_reference as ztr
    from bench_fidelity import machine, versions
    from zt_gguf import models
    from zt_gguf.gguf_meta import read_model_info

    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    bad = [r for r in routes if r not in ROUTES]
    if bad:
        ap.error(f"unknown routes {bad}")
    q41 = args.model or models.smollm2_135m()
    f32 = args.f32 or q41.with_name(q41.name.replace(".Q4_1.", ".").removesuffix(".gguf") + ".F32.gguf")
    if not f32.exists():
        print(f"writing the F32 copy {f32}", file=sys.stderr)
        ztr.write_f32_copy(q41, f32)
    q40 = f32.with_name(f32.name.removesuffix(".F32.gguf") + ".Q4_0-requant.gguf")
    if "zt-q4_0" in routes and not q40.exists():
        from gguf import GGMLQuantizationType

        print(f"writing the Q4_0 re-quantization {q40}", file=sys.stderr)
        ztr.write_requantized_copy(f32, q40, GGMLQuantizationType.Q4_0)
    info = read_model_info(q41)
    items = load_items(args.items, args.seed, args.data)
    texts = [d["prompt"] for d in items] + [d["prompt"] + c for d in items for c in d["choices"]]
    vocab = ztr.LlamaCppVocab(q41).table(texts)

    doc: dict[str, Any] = {
        "command": "python benchmarks/bench_vs_reference.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "date": utc_now(),
        "machine": machine(),
        "versions": versions(),
        "model": q41.name,
        "f32_copy": f32.name,
        "n_layer": info.n_layer,
        "n_head": info.n_head,
        "n_items": len(items),
        "seed": args.seed,
        "threads": args.threads,
        "chunk_size": args.chunk_size,
        "search": SEARCH,
        "item_ids": [d["id"] for d in items],
        "routes": {},
    }
    with tempfile.TemporaryDirectory(prefix="zt-vs-ref-") as tmp:
        workdir = Path(tmp)
        vocab_path = workdir / "vocab.json"
        vocab_path.write_text(json.dumps(vocab.to_dict()))
        base = {
            "items": items,
            "threads": args.threads,
            "search": SEARCH,
            "chunk_size": args.chunk_size,
            "vocab": str(vocab_path),
        }
        weights = {
            "ref-full": (f32, "F32 (torch fp32)"),
            "ref-generate": (f32, "F32 (torch fp32)"),
            "zt": (q41, "Q4_1 GGUF"),
            "zt-f32": (f32, "F32 GGUF"),
            "zt-q4_0": (q40, "Q4_0 GGUF (re-quantized)"),
        }
        for kind in routes:
            path, label = weights[kind]
            res = run_child(kind, {**base, "model": str(path)}, workdir)
            res["weights"] = label
            doc["routes"][kind] = res

    r = doc["routes"]
    ratios: dict[str, dict[str, Any]] = {}
    if "zt" in r:
        for ref_kind in ("ref-full", "ref-generate"):
            if ref_kind in r:
                ratios[f"wall({ref_kind}) / wall(zt)"] = {
                    "value": r[ref_kind]["wall_s"] / r["zt"]["wall_s"],
                    "target": f">= {TARGET_WALL:g}" if ref_kind == "ref-full" else "",
                }
                ratios[f"search({ref_kind}) / search(zt)"] = {
                    "value": r[ref_kind]["search_s"] / r["zt"]["search_s"]
                }
                ratios[f"cpu({ref_kind}) / cpu(zt)"] = {"value": r[ref_kind]["cpu_s"] / r["zt"]["cpu_s"]}
                ratios[f"rss(zt) / rss({ref_kind})"] = {
                    "value": r["zt"]["peak_rss_mib"] / r[ref_kind]["peak_rss_mib"],
                    "target": f"<= {TARGET_RSS:g}" if ref_kind == "ref-full" else "",
                }
    for other in ("zt-f32", "zt-q4_0"):
        if other in r and "ref-full" in r:
            ratios[f"wall(ref-full) / wall({other})"] = {
                "value": r["ref-full"]["wall_s"] / r[other]["wall_s"]
            }
            ratios[f"cpu(ref-full) / cpu({other})"] = {"value": r["ref-full"]["cpu_s"] / r[other]["cpu_s"]}
            ratios[f"rss({other}) / rss(ref-full)"] = {
                "value": r[other]["peak_rss_mib"] / r["ref-full"]["peak_rss_mib"]
            }
    doc["ratios"] = ratios
    doc["memory_8b"] = memory_8b()
    doc["notes"] = notes(doc)
    print(write_record(args.out, "vs_reference", doc, to_markdown(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
