#!/usr/bin/env python3
"""Fidelity of zt-gguf's first-token bias against the PyTorch + transformers reference (zt_reference.py).

    python benchmarks/bench_fidelity.py [--prompts 6] [--threads 2] [--seed 0] [--capi] [--out DIR]

(DIR defaults to benchmarks/results.)

Needs torch and transformers (`pip install torch==2.13.0 transformers`, CPU build). Model:
SmolLM2-135M-Instruct Q4_1 (`python -m zt_gguf.models smollm2-135m`) and its F32 copy (every tensor
dequantized with gguf.quants.dequantize, written next to it on first use), so that llama.cpp and PyTorch
compute on identical weights; the reference holds the same float32 weights for both files.

For each prompt and gamma setting (all ones; 2.0 on every head; a seeded random (layer, head) matrix in
[0.3, 3]) the last position's log-softmax over the whole vocabulary is compared between the engine
(zt_gguf.engine.Context.logits with Context.set_bias; flash attention off and on) and the reference:
max |diff|, top-1 agreement, KL, and the change caused by gamma (engine delta vs reference delta: max |diff|
and Pearson correlation). The engine runs with its default F16 KV cache and, where it has the option, with an
F32 one (Context(kv_f32=True)), which separates the F16-cache rounding from the bias itself; --capi also
drives the patched libllama through its C API with an F32 cache (the ctypes binding of
tests/test_reference.py). Reference-only rows give the scale of the F16-cache rounding (fp32 vs Q, K, V and
probabilities rounded to fp16, as llama.cpp's F16 cache does) and of the Q8 activations of llama.cpp's
quantized matmuls, and check that the paper's post-softmax form equals the logit-bias form.
Writes OUT/fidelity.json and OUT/fidelity.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from _common import machine, utc_now, write_record

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import zt_reference as ztr  # noqa: E402

TARGET_F32 = 1e-3  # max |diff| of log-softmax, F32 weights, exact (F32) KV cache

PROMPTS = [
    "Classify the sentence into one of the following categories: positive or negative.\n"
    "Sentence: a gorgeous, witty, seductive movie.\nAnswer:",
    "Review: unflinchingly bleak and desperate\nSentiment:",
    "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n"
    "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Question: Which of these is a mammal?\nA. shark\nB. dolphin\nC. trout\nD. octopus\nAnswer:",
    "The quick brown fox jumps over the lazy dog. The dog, annoyed, gets up and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Read the text and answer the question by True or False.\nText: The Amazon river flows through Brazil, "
    "Peru and Colombia and carries more water than any other river in the world. Its basin covers about "
    "seven million square kilometres, much of it tropical rain forest, and it is home to thousands of "
    "species of fish, birds and mammals found nowhere else.\nQuestion: does the amazon river flow through "
    "peru?\nAnswer:",
    "In 1905 Albert Einstein published four papers that",
]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = float(np.max(x))
    return x - m - math.log(float(np.sum(np.exp(x - m))))


def gamma_settings(shape: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
    """name -> bias (ln gamma) [n_layer, n_head]."""
    rng = np.random.default_rng(seed)
    return {
        "ones": np.zeros(shape, np.float32),
        "all-2.0": np.full(shape, math.log(2.0), np.float32),
        "random[0.3,3]": np.log(rng.uniform(0.3, 3.0, size=shape)).astype(np.float32),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "gguf", "numpy", "zt-gguf"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def _capi() -> Any | None:
    """The ctypes binding of tests/test_reference.py (F32 KV cache through the C API), or None."""
    path = REPO / "tests" / "test_reference.py"
    try:
        spec = importlib.util.spec_from_file_location("_zt_capi", path)
        if spec is None or spec.loader is None:
            return None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # its dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod
    except Exception as e:  # noqa: BLE001 - an optional route
        print(f"bench_fidelity: no C-API route ({type(e).__name__}: {e})", file=sys.stderr)
        return None


LogitsFn = Callable[[Sequence[int], np.ndarray], np.ndarray]


TOP_K = 50  # the "top" columns: the reference's TOP_K most likely tokens (at gamma = 1 and at gamma)


def compare(
    engine: dict[str, dict[str, np.ndarray]], ref: dict[str, dict[str, np.ndarray]], prompts: Sequence[str]
) -> dict[str, Any]:
    """engine/ref: gamma name -> prompt -> log-softmax. Per gamma: diffs, top-1, KL, and the delta vs 'ones'.

    Over the full vocabulary the largest differences sit in the far tail (log p ~ -30); the top-K columns
    restrict both to the reference's most likely tokens, where the probability mass is.
    """
    rows = {}
    for g in engine:
        diffs, top_diffs, kls, top1 = [], [], [], 0
        dd, corr, top_dd, top_corr, dmag = [], [], [], [], []
        for p in prompts:
            e, r = engine[g][p], ref[g][p]
            top = np.argsort(-r)[:TOP_K]
            diffs.append(float(np.max(np.abs(e - r))))
            top_diffs.append(float(np.max(np.abs(e[top] - r[top]))))
            kls.append(float(np.sum(np.exp(r) * (r - e))))
            top1 += int(np.argmax(e) == np.argmax(r))
            if g != "ones":
                de, dr = e - engine["ones"][p], r - ref["ones"][p]
                top = np.union1d(top, np.argsort(-ref["ones"][p])[:TOP_K])
                dd.append(float(np.max(np.abs(de - dr))))
                corr.append(float(np.corrcoef(de, dr)[0, 1]))
                top_dd.append(float(np.max(np.abs(de[top] - dr[top]))))
                top_corr.append(float(np.corrcoef(de[top], dr[top])[0, 1]))
                dmag.append(float(np.max(np.abs(dr[top]))))
        rows[g] = {
            "max_abs_diff": max(diffs),
            "per_prompt_max_abs_diff": diffs,
            "top_max_abs_diff": max(top_diffs),
            "kl_ref_engine_max": max(kls),
            "top1_same": top1,
            "n_prompts": len(prompts),
            "delta_max_abs_diff": max(dd) if dd else None,
            "delta_corr_min": min(corr) if corr else None,
            "top_delta_max_abs_diff": max(top_dd) if top_dd else None,
            "top_delta_corr_min": min(top_corr) if top_corr else None,
            "top_delta_ref_max_abs": max(dmag) if dmag else None,
        }
    return rows


def run(
    q41: Path,
    f32: Path,
    prompts: Sequence[str],
    threads: int,
    seed: int,
    capi_route: bool = False,
    checks: bool = True,
    kv_f32: bool = True,
    noise_rows: bool = True,
) -> dict[str, Any]:
    """The comparisons (see the module doc).

    checks: also compare the reference's weights across loaders; kv_f32: also the engine with an F32 KV cache
    (when it has the option); noise_rows: also the reference with fp16 attention / Q8 activations.
    """
    from zt_gguf.engine import Context, Model

    t0 = time.monotonic()
    ref = ztr.load_reference(f32, n_threads=threads)
    tokens = {p: ref.vocab.encode(p) for p in prompts}
    shape = ref.bias_shape
    gammas = gamma_settings(shape, seed)
    checks_out: dict[str, Any] = {}

    def ref_logsoftmax(**kw: Any) -> dict[str, dict[str, np.ndarray]]:
        ref.mode, ref.f16 = kw.get("mode", "logit"), kw.get("f16", False)
        ztr.set_activation_q8(ref.model, kw.get("q8", False))
        try:
            return {
                g: {p: log_softmax(ref.last_logits(tokens[p], b)) for p in prompts} for g, b in gammas.items()
            }
        finally:
            ref.mode, ref.f16 = "logit", False
            ztr.set_activation_q8(ref.model, False)

    reference = ref_logsoftmax()
    results: list[dict[str, Any]] = []
    if noise_rows:
        results.append(
            {
                "model": "reference",
                "route": "torch fp32 vs torch with Q,K,V,P rounded to fp16",
                "kv": "-",
                "flash_attn": None,
                "gammas": compare(ref_logsoftmax(f16=True), reference, prompts),
            }
        )
        results.append(
            {
                "model": "reference",
                "route": "torch fp32 vs torch with Q8-quantized Linear inputs (as llama.cpp's Q4_1 matmuls)",
                "kv": "-",
                "flash_attn": None,
                "gammas": compare(ref_logsoftmax(q8=True), reference, prompts),
            }
        )
    results.append(
        {
            "model": "reference",
            "route": "logit bias vs the paper's post-softmax form",
            "kv": "-",
            "flash_attn": None,
            "gammas": compare(ref_logsoftmax(mode="post_softmax"), reference, prompts),
        }
    )

    engines: dict[tuple[str, bool], dict[str, dict[str, np.ndarray]]] = {}
    kv_routes: list[tuple[str, dict[str, Any]]] = [("F16", {})]
    if kv_f32 and "kv_f32" in inspect.signature(Context.__init__).parameters:
        kv_routes.append(("F32", {"kv_f32": True}))  # an engine that has the option
    for label, path in (("F32 copy", f32), ("Q4_1", q41)):
        model = Model(path)
        for kv, kw in kv_routes:
            for fa in (False, True):
                try:
                    ctx = Context(model, n_ctx=1024, n_seq_max=2, n_threads=threads, flash_attn=fa, **kw)
                except TypeError as e:  # the Python side has the option, the built _core not yet
                    print(f"bench_fidelity: no engine KV {kv} route ({e})", file=sys.stderr)
                    break
                got: dict[str, dict[str, np.ndarray]] = {}
                for g, b in gammas.items():
                    ctx.set_bias(b)
                    got[g] = {p: log_softmax(ctx.logits(tokens[p])[-1]) for p in prompts}
                if kv == "F16":
                    engines[(label, fa)] = got
                results.append(
                    {
                        "model": label,
                        "route": "zt_gguf engine (Context.logits)",
                        "kv": kv,
                        "flash_attn": fa,
                        "gammas": compare(got, reference, prompts),
                    }
                )
                del ctx
        del model
    results.append(
        {
            "model": "Q4_1 vs F32 copy",
            "route": "engine vs engine (FA off): the Q4_1 kernels' own error",
            "kv": "F16",
            "flash_attn": False,
            "gammas": compare(engines[("Q4_1", False)], engines[("F32 copy", False)], prompts),
        }
    )

    capi = _capi() if capi_route else None
    if capi is not None:
        for label, path in (("F32 copy", f32), ("Q4_1", q41)):
            lm = capi.LlamaModel(path)
            try:
                got = {}
                with capi.LlamaContext(lm, n_ctx=1024, n_threads=threads, flash_attn=False) as lc:
                    for g, b in gammas.items():
                        lc.set_ftb(b)
                        got[g] = {}
                        for p in prompts:
                            lc.clear()
                            got[g][p] = log_softmax(lc.prefill(tokens[p], all_logits=False)[-1])
                results.append(
                    {
                        "model": label,
                        "route": "patched libllama C API (llama_set_attn_ftb)",
                        "kv": "F32",
                        "flash_attn": False,
                        "gammas": compare(got, reference, prompts),
                    }
                )
            finally:
                lm.close()

    # the reference's weights: the same from the Q4_1 file (dequantized in memory) and from the F32 copy,
    # and the same from transformers' own GGUF loader (Q/K un-permutation) when accelerate is installed
    import torch

    if not checks:
        return _doc(prompts, tokens, gammas, shape, results, {}, t0)
    sd = ref.model.state_dict()
    m2 = ztr.load_model(q41)
    checks_out["weights_q41_equal_f32_copy"] = all(torch.equal(sd[k], v) for k, v in m2.state_dict().items())
    del m2
    try:
        m3 = ztr.load_model(f32, loader="transformers")
        sd3 = m3.state_dict()
        checks_out["max_abs_diff_vs_transformers_gguf_loader"] = max(
            float((sd[k] - sd3[k]).abs().max()) for k in sd if k in sd3
        )
        del m3
    except Exception as e:  # noqa: BLE001 - accelerate is optional
        checks_out["max_abs_diff_vs_transformers_gguf_loader"] = (
            f"not run: {type(e).__name__}: {str(e)[:120]}"
        )

    return _doc(prompts, tokens, gammas, shape, results, checks_out, t0)


def _doc(
    prompts: Sequence[str],
    tokens: dict[str, list[int]],
    gammas: dict[str, np.ndarray],
    shape: tuple[int, int],
    results: list[dict[str, Any]],
    checks: dict[str, Any],
    t0: float,
) -> dict[str, Any]:
    return {
        "prompts": [{"text": p, "n_tokens": len(tokens[p])} for p in prompts],
        "gamma_settings": {
            g: {"min": float(np.exp(b.min())), "max": float(np.exp(b.max()))} for g, b in gammas.items()
        },
        "shape": list(shape),
        "results": results,
        "checks": checks,
        "elapsed_s": time.monotonic() - t0,
    }


def _fmt(x: Any, spec: str = ".1e") -> str:
    return "-" if x is None else format(x, spec)


def to_markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# Fidelity: zt-gguf vs the PyTorch reference",
        "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores, load average "
        f"{m['loadavg_1min_at_start']:.1f} at the start (shared); {m['platform']}  ",
        f"Date: {doc['date']}; versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + "  ",
        f"Model: {doc['model']} (n_layer x n_head = {doc['shape'][0]} x {doc['shape'][1]}); "
        f"{len(doc['prompts'])} prompts of {min(p['n_tokens'] for p in doc['prompts'])}-"
        f"{max(p['n_tokens'] for p in doc['prompts'])} tokens; elapsed {doc['elapsed_s']:.0f} s",
        "",
        "Log-softmax of the last position. `max|d|`: max over prompts of the max |engine - reference| over "
        f"the full vocabulary (49152 tokens; its extremes sit in the far tail); `top{TOP_K}`: the same over "
        f"the reference's {TOP_K} most likely tokens; `KL`: max over prompts of KL(reference || engine) in "
        "nats; `top-1`: prompts whose argmax agrees; `delta`: the change caused by gamma (log-softmax at "
        "gamma minus at gamma = 1), engine vs reference: max |diff| over the full vocabulary, and over the "
        "top tokens max |diff| and the smallest Pearson correlation over the prompts; `|delta|`: the largest "
        "change gamma causes among the top tokens in the reference.",
        "",
        f"| compared | route | KV | FA | gamma | max\\|d\\| | top{TOP_K} max\\|d\\| | KL | top-1 | "
        f"delta max\\|d\\| | top{TOP_K} delta max\\|d\\| | top{TOP_K} delta corr | \\|delta\\| |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        fa = "-" if r["flash_attn"] is None else ("on" if r["flash_attn"] else "off")
        for g, v in r["gammas"].items():
            lines.append(
                f"| {r['model']} | {r['route']} | {r['kv']} | {fa} | {g} | {_fmt(v['max_abs_diff'])} | "
                f"{_fmt(v['top_max_abs_diff'])} | {_fmt(v['kl_ref_engine_max'])} | "
                f"{v['top1_same']}/{v['n_prompts']} | {_fmt(v['delta_max_abs_diff'])} | "
                f"{_fmt(v['top_delta_max_abs_diff'])} | {_fmt(v['top_delta_corr_min'], '.5f')} | "
                f"{_fmt(v['top_delta_ref_max_abs'], '.2f')} |"
            )
    c = doc["checks"]
    lines += [
        "",
        f"Checks: reference weights from the Q4_1 file equal those from the F32 copy: "
        f"{c.get('weights_q41_equal_f32_copy', 'not run')}; max |diff| vs transformers' own GGUF loader: "
        f"{c.get('max_abs_diff_vs_transformers_gguf_loader', 'not run')}.",
        "",
        "## Reading",
        "",
    ]
    lines += doc.get("notes", [])
    return "\n".join(lines) + "\n"


def notes(doc: dict[str, Any]) -> list[str]:
    """The verdicts, computed from the figures."""

    def rows(
        model: str, kv: str | None = None, fa: bool | None = None, route: str = ""
    ) -> list[dict[str, Any]]:
        return [
            r
            for r in doc["results"]
            if r["model"] == model
            and (kv is None or r["kv"] == kv)
            and r["flash_attn"] == fa
            and route in r["route"]
        ]

    def worst(rs: list[dict[str, Any]], key: str) -> float | None:
        vals = [v[key] for r in rs for v in r["gammas"].values() if v[key] is not None]
        return max(vals) if vals else None

    def lowest(rs: list[dict[str, Any]], key: str) -> float | None:
        vals = [v[key] for r in rs for v in r["gammas"].values() if v[key] is not None]
        return min(vals) if vals else None

    def met(x: float | None) -> str:
        return "not run" if x is None else "met" if x < TARGET_F32 else "NOT met"

    f16kv = worst(rows("F32 copy", "F16", False), "max_abs_diff")
    f16kv_fa = worst(rows("F32 copy", "F16", True), "max_abs_diff")
    f32kv = worst(rows("F32 copy", "F32", False, "engine"), "max_abs_diff")
    f32kv_fa = worst(rows("F32 copy", "F32", True, "engine"), "max_abs_diff")
    f32kv_capi = worst(rows("F32 copy", "F32", False, "C API"), "max_abs_diff")
    noise16 = worst(rows("reference", route="fp16"), "max_abs_diff")
    post = worst(rows("reference", route="post-softmax"), "max_abs_diff")
    q41 = rows("Q4_1", "F16", False) + rows("Q4_1", "F16", True)
    noise8 = worst(rows("reference", route="Q8"), "top_max_abs_diff")
    own = worst(rows("Q4_1 vs F32 copy", "F16", False), "top_max_abs_diff")
    f16_all = rows("F32 copy", "F16", False) + rows("F32 copy", "F16", True)
    f32_exact = rows("F32 copy", "F32", False, "engine")
    differ = [
        f"{r['model']} / {r['route']} / KV {r['kv']} / FA {r['flash_attn']} / {g}: "
        f"{v['top1_same']}/{v['n_prompts']}"
        for r in doc["results"]
        for g, v in r["gammas"].items()
        if v["top1_same"] != v["n_prompts"]
    ]
    return [
        f"- Target max |d| < {TARGET_F32:g} on the F32 copy. Engine with its default F16 KV cache: "
        f"{_fmt(f16kv)} with flash attention off, {_fmt(f16kv_fa)} on: {met(f16kv)}. Engine with an F32 KV "
        f"cache (Context(kv_f32=True)): {_fmt(f32kv)} with flash attention off: {met(f32kv)}; "
        f"{_fmt(f32kv_fa)} with it on (llama.cpp casts K/V to F16 for flash attention anyway)."
        + (f" The C API with an F32 cache: {_fmt(f32kv_capi)}." if f32kv_capi is not None else ""),
        "- The engine's residual on the F32 copy is the F16 KV cache, not the bias: rounding Q, K, V and "
        "the attention probabilities to fp16 inside the reference alone moves its log-softmax by "
        f"{_fmt(noise16)}, the same size, and with an F32 cache the difference falls to float32 level for "
        "every gamma. llama.cpp's CPU attention converts the other operand of each F16-cache matmul to F16 "
        "as well; once one fp16 rounding flips between two implementations the later layers differ at that "
        "level, so the fp16-rounding reference follows llama.cpp to ~1e-5 only on 1-token prompts and "
        "3-layer models, not through 30 layers. Flash attention also accumulates softmax(KQ)V in F16 on "
        "the CPU: the same order.",
        "- The change caused by gamma (the bias itself) on the F32 copy: engine and reference agree to "
        f"{_fmt(worst(f32_exact, 'delta_max_abs_diff'))} with the F32 cache and to "
        f"{_fmt(worst(f16_all, 'delta_max_abs_diff'))} with the F16 cache (full vocabulary; correlation over "
        "the top tokens >= "
        f"{_fmt(lowest(f16_all + f32_exact, 'top_delta_corr_min'), '.5f')}), for changes of up to "
        f"{_fmt(worst(f16_all, 'top_delta_ref_max_abs'), '.2f')} nats. The paper's post-softmax form equals "
        f"the logit bias to {_fmt(post)}.",
        f"- Q4_1 vs the dequantized reference: up to {_fmt(worst(q41, 'top_max_abs_diff'))} on the top "
        f"tokens (KL <= {_fmt(worst(q41, 'kl_ref_engine_max'))}); the engine on Q4_1 differs from itself on "
        f"the F32 copy by {_fmt(own)}. llama.cpp multiplies Q4_1/Q8_0 weights by activations quantized to 8 "
        "bits per block of 32 (Q8_1/Q8_0); quantizing the reference's Linear inputs that way moves it by "
        f"{_fmt(noise8)}, the same size. That noise also blurs the change caused by gamma: top-token "
        f"correlation {_fmt(lowest(q41, 'top_delta_corr_min'), '.3f')} at worst, max |diff| "
        f"{_fmt(worst(q41, 'top_delta_max_abs_diff'))} on changes of up to "
        f"{_fmt(worst(q41, 'top_delta_ref_max_abs'), '.2f')}; the Q8 activations alone, in the reference, "
        f"give a correlation of {_fmt(lowest(rows('reference', route='Q8'), 'top_delta_corr_min'), '.3f')}.",
        "- Top-1 token: "
        + ("identical in every row." if not differ else "identical except in " + "; ".join(differ) + "."),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=6, help=f"how many prompts (1-{len(PROMPTS)})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="of the random gamma matrix")
    ap.add_argument("--model", type=Path, help="a llama GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--f32", type=Path, help="its F32 copy (default: written next to it on first use)")
    ap.add_argument(
        "--capi",
        action="store_true",
        help="also the F32-KV route through the C API (tests/test_reference.py)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)

    from zt_gguf import models

    q41 = args.model or models.smollm2_135m()
    f32 = args.f32 or q41.with_name(q41.name.replace(".Q4_1.", ".").removesuffix(".gguf") + ".F32.gguf")
    if not f32.exists():
        print(f"writing the F32 copy {f32}", file=sys.stderr)
        ztr.write_f32_copy(q41, f32)
    prompts = PROMPTS[: max(1, min(args.prompts, len(PROMPTS)))]
    doc: dict[str, Any] = {
        "command": "python benchmarks/bench_fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": utc_now(),
        "machine": machine(),
        "versions": versions(),
        "model": q41.name,
        "f32_copy": f32.name,
        "threads": args.threads,
    }
    doc.update(run(q41, f32, prompts, args.threads, args.seed, capi_route=args.capi))
    doc["notes"] = notes(doc)
    print(write_record(args.out, "fidelity", doc, to_markdown(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
