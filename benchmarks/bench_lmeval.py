#!/usr/bin/env python3
"""lm-evaluation-harness on one model and task, three ways, timed side by side in one run (issue 14).

    python benchmarks/bench_lmeval.py [--models smollm2-135m,gemma-3-270m] [--threads 2]
                                      [--tasks sst2.dev:100,commonsense_qa.dev:40] [--no-lcp-for gemma-3-270m]
                                      [--out benchmarks/results] [--record lmeval]

For each model and TASK:N: the first N items of ../shared/data/jsonl/TASK.jsonl as an lm-eval multiple-choice
task read from a local JSONL file (the task-YAML pattern of the README), run by lm-eval's command line through

1. ``zt-gguf lm-eval MODEL`` (lm-eval's model ``zt-gguf``: the batched engine, each context evaluated once and
   its continuations branched from it);
2. ``lm_eval --model gguf`` against our llama-server (patch 0009: echo with prompt log-probs), -np 1;
3. ``lm_eval --model gguf`` against llama-cpp-python's server (``python -m llama_cpp.server``, logits_all on,
   loading our libllama), the route lm-eval's documentation gives for GGUF files.

lm-eval sends the server routes one request per (context, continuation), one at a time. Timed: the wall time
of the lm-eval process (its start-up included, the same for all three: measured apart as the run of a task of
one item), with the servers already up; every server with its defaults but -np 1 (llama-server: flash
attention auto; llama-cpp-python: logits_all on, which echo needs). llama-cpp-python's server takes seconds a
request on Gemma's 262k vocabulary (it sorts the whole vocabulary in Python per prompt token), so
--no-lcp-for leaves it out for those models. Also recorded: acc of each route and the largest per-item
log-likelihood difference from the engine route. Results: OUT/RECORD.json and OUT/RECORD.md with the command,
machine and date.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, utc_now, write_record  # noqa: E402
from zt_gguf import testing  # noqa: E402
from zt_gguf.lmeval import task_yaml  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonl"


def env() -> dict[str, str]:
    return dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def write_task(folder: Path, name: str, src: Path, n: int) -> Path:
    lines = [line for line in src.read_text().splitlines() if line.strip()][:n]
    data = folder / f"{name}.jsonl"
    data.write_text("\n".join(lines) + "\n")
    (folder / "tasks").mkdir(exist_ok=True)
    (folder / "tasks" / f"{name}.yaml").write_text(task_yaml(name, data))
    return data


def run_lm_eval(cmd: list[str], name: str, folder: Path, out: Path) -> float:
    args = [
        "--include_path",
        str(folder / "tasks"),
        "--tasks",
        name,
        "--log_samples",
        "--output_path",
        str(out),
    ]
    t0 = time.perf_counter()
    r = subprocess.run([*cmd, *args], env=env(), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return dt


def results(out: Path, name: str) -> tuple[float, dict[int, list[float]]]:
    (res,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    (smp,) = glob.glob(str(out / "**" / "samples_*.jsonl"), recursive=True)
    acc = float(json.load(open(res))["results"][name]["acc,none"])
    lls = {int(r["doc_id"]): [float(x[0]) for x in r["filtered_resps"]] for r in map(json.loads, open(smp))}
    return acc, lls


def start_llama_cpp_python(model: Path, threads: int, log_dir: Path) -> testing.Server:
    from zt_gguf.tools import llama_cpp_env

    port = testing.free_port()
    log = log_dir / f"llama-cpp-python-{port}.log"
    args = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
        "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--n_ctx", "2048", "--logits_all", "True", "--verbose", "False",
    ]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=llama_cpp_env())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if testing.http(url + "/v1/models", timeout=2)[0] == 200:
                return testing.Server(url, proc, log)
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"llama-cpp-python's server did not start:\n{log.read_text()[-3000:]}")


def bench_task(model: Path, task: str, n: int, threads: int, folder: Path, lcp: bool) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    name = "zt_" + task.replace(".", "_")
    src = DATA / f"{task}.jsonl"
    data = write_task(folder, name, src, n)
    n_items = sum(1 for line in data.read_text().splitlines() if line.strip())
    n_requests = sum(
        len(json.loads(line)["choices"]) for line in data.read_text().splitlines() if line.strip()
    )
    one = write_task(folder, name + "_one", src, 1)
    assert one.exists()

    engine = [sys.executable, "-m", "zt_gguf", "lm-eval", str(model), "--threads", str(threads), "--"]
    lm_eval = [sys.executable, "-m", "lm_eval"]
    routes: dict[str, dict[str, Any]] = {}

    # lm-eval's own start-up and one item, on the engine: the fixed cost in every route's time
    t_fixed = run_lm_eval(engine, name + "_one", folder, folder / "out-one")

    t = run_lm_eval(engine, name, folder, folder / "out-engine")
    routes["zt-gguf lm-eval (engine)"] = {"wall_s": t, "out": folder / "out-engine"}

    srv = testing.start_server(model, "--no-warmup", "-fa", "auto", threads=threads, slots=1, log_dir=folder)
    try:
        t = run_lm_eval([*lm_eval, "--model", "gguf", "--model_args", f"base_url={srv.url}"], name, folder,
                        folder / "out-server")  # fmt: skip
    finally:
        testing.stop_server(srv)
    routes["lm_eval --model gguf, our llama-server"] = {"wall_s": t, "out": folder / "out-server"}

    if lcp:
        srv = start_llama_cpp_python(model, threads, folder)
        try:
            gguf = [*lm_eval, "--model", "gguf", "--model_args", f"base_url={srv.url}"]
            t = run_lm_eval(gguf, name, folder, folder / "out-lcp")
        finally:
            testing.stop_server(srv)
        routes["lm_eval --model gguf, llama-cpp-python's server"] = {"wall_s": t, "out": folder / "out-lcp"}

    base_acc, base_ll = results(routes["zt-gguf lm-eval (engine)"]["out"], name)
    rows = {}
    t_engine = routes["zt-gguf lm-eval (engine)"]["wall_s"]
    for label, r in routes.items():
        acc, ll = results(r["out"], name)
        diff = max(abs(a - b) for i in base_ll for a, b in zip(base_ll[i], ll[i], strict=True))
        rows[label] = {
            "wall_s": round(r["wall_s"], 2),
            "scoring_s": round(r["wall_s"] - t_fixed, 2),
            "slowdown_vs_engine": round(r["wall_s"] / t_engine, 2),
            "acc": acc,
            "max_abs_ll_diff_vs_engine": diff,
        }
        print(f"{task}: {label}: {r['wall_s']:.1f} s, acc {acc:.4f}, max |ll diff| {diff:.2g}", flush=True)
    return {
        "model": model.name,
        "task": task,
        "items": n_items,
        "requests": n_requests,
        "lm_eval_fixed_s": round(t_fixed, 2),
        "routes": rows,
        "engine_acc": base_acc,
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# lm-evaluation-harness: the engine backend vs the server routes",
        "",
        f"`{doc['command']}` on {doc['machine']['cpu']} ({doc['machine']['cores']} cores), {doc['date']}.",
        f"{doc['threads']} threads everywhere; lm-eval {doc['lm_eval']}.",
        "",
        "Wall time of the lm-eval process (servers already up); `scoring` subtracts lm-eval's fixed",
        "start-up (measured as a run on one item). Slowdown: the route's wall time over the engine route's;",
        "max ll diff: the largest per-item log-likelihood difference from the engine route.",
        "",
        "| model | task | items (requests) | route | wall s | scoring s | slowdown | acc | max ll diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in doc["tasks"]:
        for label, r in t["routes"].items():
            lines.append(
                f"| {t['model']} | {t['task']} | {t['items']} ({t['requests']}) | {label} | "
                f"{r['wall_s']:.1f} | "
                f"{r['scoring_s']:.1f} | {r['slowdown_vs_engine']:.1f}x | {r['acc']:.4f} | "
                f"{r['max_abs_ll_diff_vs_engine']:.2g} |"
            )
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma-3-270m", help="names of zt_gguf.models, or paths")
    ap.add_argument("--tasks", default="sst2.dev:100,commonsense_qa.dev:40", help="TASK:N_ITEMS,...")
    ap.add_argument("--no-lcp-for", default="gemma-3-270m", help="models without the llama-cpp-python route")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--record", default="lmeval", help="OUT/RECORD.json and .md")
    args = ap.parse_args()
    import lm_eval

    from zt_gguf import models

    doc: dict[str, Any] = {
        "command": "bench_lmeval.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "date": utc_now(),
        "threads": args.threads,
        "lm_eval": lm_eval.__version__,
        "tasks": [],
    }
    no_lcp = set(args.no_lcp_for.split(",")) if args.no_lcp_for else set()
    with tempfile.TemporaryDirectory(prefix="zt-bench-lmeval-") as tmp:
        for name in args.models.split(","):
            model = models.get(name) if name in models.MODELS else Path(name)
            for spec in args.tasks.split(","):
                task, _, n = spec.partition(":")
                folder = Path(tmp) / f"{model.stem}-{task}"
                doc["tasks"].append(
                    bench_task(model, task, int(n or 100), args.threads, folder, lcp=name not in no_lcp)
                )
    print(write_record(args.out, args.record, doc, markdown(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
