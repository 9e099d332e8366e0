#!/usr/bin/env python3
"""Where a calibration's time goes (issue 23, item 4): one `calibrate` through the library API, timed by the
engine's own clocks and Python's.

    python benchmarks/bench_profile.py --model gemma-3-270m --task sst2 [--items 286] [--scoring choice]
    python benchmarks/bench_profile.py --model qwen2.5-coder-1.5b --task sst2 --items 143

The run is zt_gguf.calibrate.calibrate(model, task, CalibrateOptions(search paper, --holdout 0.3, no
resume)); every engine Context it makes is watched. The shares of the wall time:

- decode: inside llama_decode (the model's layers and the output rows llama.cpp computes), the engine's
  `t_decode_s`;
- tokenization: the engine's tokenization inside score() (`t_tokenize_s`; the model's tokenization cache
  remembers every text after its first call); beside it, what the same calls would have cost without the
  cache: every text a call tokenizes, timed once uncached, times the calls that tokenize it;
- logits rows: the rest of score() in C++ (the sweeps over the logits rows: log-softmax, entropies, the
  greedy token; the batch bookkeeping);
- bindings: Context.score's wall time in Python minus score() in C++ (the vectors of the results turned into
  Python lists and NumPy arrays);
- Python: everything else (the search's bookkeeping, metrics, held-out check, baselines, writing).

Records OUT/profile-MODEL-TASK.json and .md (command, machine, date).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import machine, utc_now, write_record
from zt_gguf import engine, models, tasks
from zt_gguf.calibrate import calibrate
from zt_gguf.options import CalibrateOptions
from zt_gguf.outputs import Outputs
from zt_gguf.search_config import SearchConfig

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "jsonl"
TASKS = {"sst2": "sst2.dev.jsonl", "arc_easy": "arc_easy.test.jsonl", "boolq": "boolq.dev.jsonl"}


class Watch:
    """Context.score wrapped: its wall time, the texts each call tokenizes, and every Context made."""

    def __init__(self) -> None:
        self.contexts: list[engine.Context] = []
        self.wall = 0.0
        self.calls = 0
        self.texts: Counter[tuple[str, bool]] = Counter()  # (text, add_special) -> calls that tokenize it
        self.models: list[engine.Model] = []
        self._score = engine.Context.score
        self._init = engine.Context.__init__

    def install(self) -> None:
        watch = self

        def init(ctx: engine.Context, *a: Any, **kw: Any) -> None:
            watch._init(ctx, *a, **kw)
            watch.contexts.append(ctx)
            if not any(m is ctx.model for m in watch.models):
                watch.models.append(ctx.model)

        def score(ctx: engine.Context, items: Sequence[tasks.Item], *a: Any, **kw: Any) -> Any:
            add = ctx.model.add_bos
            for it in items:
                watch.texts[(it.prompt, add)] += 1
                for c in it.choices:
                    watch.texts[(it.prompt + c, add)] += 1
            t0 = time.perf_counter()
            try:
                return watch._score(ctx, items, *a, **kw)
            finally:
                watch.wall += time.perf_counter() - t0
                watch.calls += 1

        engine.Context.__init__ = init  # type: ignore[method-assign]
        engine.Context.score = score  # type: ignore[method-assign]

    def engine_stats(self) -> dict[str, float]:
        total: Counter[str] = Counter()
        for ctx in self.contexts:
            total.update(ctx.stats)
        return dict(total)

    def uncached_tokenization_s(self) -> float:
        """What the calls' tokenization costs without the cache: each text timed once, times its calls."""
        model = self.models[0]
        total = 0.0
        for (text, add), n in self.texts.items():
            t0 = time.perf_counter()
            model.tokenize_uncached(text, add, True)
            total += (time.perf_counter() - t0) * n
        return total


def shares(wall: float, st: dict[str, float], watch: Watch) -> dict[str, float]:
    decode = st.get("t_decode_s", 0.0)
    tok = st.get("t_tokenize_s", 0.0)
    cpp = st.get("t_score_s", 0.0)
    return {
        "decode_s": decode,
        "tokenization_s": tok,
        "logits_rows_s": cpp - decode - tok,
        "bindings_s": watch.wall - cpp,
        "python_s": wall - watch.wall,
    }


def markdown(doc: dict[str, Any]) -> str:
    w = doc["wall_s"]
    rows = [f"| {k.removesuffix('_s')} | {v:.1f} | {100 * v / w:.1f}% |" for k, v in doc["shares"].items()]
    st = doc["engine"]
    uncached = doc["uncached_tokenization_s"]
    return "\n".join(
        [
            f"# Where calibrate's time goes: {doc['model']} on {doc['task']} (benchmarks/bench_profile.py)",
            "",
            f"- command: `{doc['command']}`",
            f"- date: {doc['date']}; machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, "
            f"load average at start {', '.join(f'{x:.1f}' for x in doc['machine']['load_average_at_start'])}",
            f"- calibrate: {doc['options']}; {doc['n_calibration']} calibration items; pick: {doc['pick']}",
            f"- wall {w:.1f} s; {doc['score_calls']} score() calls, {int(st.get('n_calls', 0))} llama_decode "
            f"calls, {int(st.get('n_decoded', 0)):,} tokens decoded, {int(st.get('n_outputs', 0)):,} "
            "output rows",
            "",
            "| share | seconds | of the wall time |",
            "|---|---|---|",
            *rows,
            "",
            f"Tokenization without the model's cache (every call tokenizing its texts again): "
            f"{uncached:.2f} s ({100 * uncached / w:.1f}% of this "
            f"run's wall time), {doc['distinct_texts']:,} distinct texts tokenized "
            f"{doc['text_tokenizations']:,} times.",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", help="a name in zt_gguf.models")
    ap.add_argument("--task", default="sst2", choices=sorted(TASKS))
    ap.add_argument("--items", type=int, default=286, help="items of the task (70%% calibration)")
    ap.add_argument("--scoring", default="choice")
    ap.add_argument("--objective", default="logprob")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)

    started = utc_now()
    model = models.get(args.model)
    task = tasks.load_task(DATA / TASKS[args.task], max_items=args.items)
    options = CalibrateOptions(
        scoring=args.scoring,
        objective=args.objective,
        n_threads=args.threads,
        search=SearchConfig(method="paper", objective=args.objective),
    )
    watch = Watch()
    watch.install()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = calibrate(model, task, options, Outputs(report_dir=Path(tmp) / "report", resume=False))
        wall = time.perf_counter() - t0
    st = watch.engine_stats()
    doc: dict[str, Any] = {
        "command": " ".join(
            ["python benchmarks/bench_profile.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": started,
        "machine": machine(),
        "model": args.model,
        "task": args.task,
        "options": f"--search paper --scoring {args.scoring} --objective {args.objective} --holdout 0.3 "
        f"--threads {args.threads}",
        "n_calibration": res.n_calibration,
        "pick": res.result.best_description,
        "wall_s": wall,
        "score_calls": watch.calls,
        "engine": st,
        "shares": shares(wall, st, watch),
        "uncached_tokenization_s": watch.uncached_tokenization_s(),
        "distinct_texts": len(watch.texts),
        "text_tokenizations": sum(watch.texts.values()),
        "timings": res.timings,
    }
    print(write_record(args.out, f"profile-{args.model}-{args.task}", doc, markdown(doc)))
    print(json.dumps(doc["shares"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
