"""Smoke tests of the benchmark scripts against the PyTorch reference (benchmarks/zt_reference.py).

torch and transformers are the optional ``bench`` extra (not in the default install nor in CI): the tests
that need them are skipped with that reason. The F32-copy writer, the Q/K un-permutation and the plain
paper search need only gguf and numpy and always run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize

from zt_gguf.search import SearchConfig, search
from zt_gguf.tasks import Item
from zt_gguf.testing import make_tiny_llama, reference_logits

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import zt_reference as ztr  # noqa: E402


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


HAVE_TORCH = _have_torch()
needs_torch = pytest.mark.skipif(
    not HAVE_TORCH,
    reason="torch/transformers not installed: the PyTorch reference is the optional `bench` extra "
    "(pip install torch==2.13.0 transformers)",
)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ------------------------------------------------------------------------------------------------------------
# always run: gguf + numpy


def _quantized_gguf(path: Path) -> dict[str, tuple[GGMLQuantizationType, np.ndarray]]:
    """A small GGUF with tensors of several types and key/values of several value types."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, "llama")
    w.add_name("roundtrip")
    w.add_file_type(LlamaFileType.MOSTLY_Q4_1)
    w.add_key_value("llama.block_count", 2, GGUFValueType.UINT32)
    w.add_key_value("llama.rope.freq_base", 10000.0, GGUFValueType.FLOAT32)
    w.add_key_value("tokenizer.ggml.add_bos_token", False, GGUFValueType.BOOL)
    w.add_key_value(
        "tokenizer.ggml.tokens", ["<unk>", "a", "Ġb", "ü"], GGUFValueType.ARRAY, GGUFValueType.STRING
    )
    w.add_key_value("some.floats", [0.5, -1.25, 3.0], GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    w.add_key_value("some.ints", [1, -2, 3], GGUFValueType.ARRAY, GGUFValueType.INT32)
    tensors = {}
    for name, qtype, shape in (
        ("a.q4_1", GGMLQuantizationType.Q4_1, (3, 64)),
        ("b.q8_0", GGMLQuantizationType.Q8_0, (2, 2, 32)),
        ("c.f16", GGMLQuantizationType.F16, (5, 7)),
        ("d.f32", GGMLQuantizationType.F32, (11,)),
        ("e.q4_0", GGMLQuantizationType.Q4_0, (4, 32)),
    ):
        x = rng.standard_normal(shape).astype(np.float32)
        data = quantize(x, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        tensors[name] = (qtype, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_write_f32_copy_round_trip(tmp_path: Path) -> None:
    src, dst = tmp_path / "q.gguf", tmp_path / "f32.gguf"
    made = _quantized_gguf(src)
    assert ztr.write_f32_copy(src, dst) == dst
    a, b = GGUFReader(src), GGUFReader(dst)

    # every key/value copied (file type set to ALL_F32)
    keys_a = [k for k in a.fields if not k.startswith("GGUF.")]
    keys_b = [k for k in b.fields if not k.startswith("GGUF.")]
    assert keys_b == keys_a
    for k in keys_a:
        fa, fb = a.fields[k], b.fields[k]
        assert fb.types == fa.types, k
        if k == "general.file_type":
            assert fb.contents() == int(LlamaFileType.ALL_F32)
        else:
            assert fb.contents() == fa.contents(), k

    # the same tensors, in order, as float32 holding exactly what gguf.quants.dequantize gives
    assert [t.name for t in b.tensors] == [t.name for t in a.tensors] == list(made)
    for ta, tb in zip(a.tensors, b.tensors):
        assert tb.tensor_type == GGMLQuantizationType.F32
        assert list(tb.shape) == list(ta.shape)
        want = dequantize(ta.data, ta.tensor_type).reshape(made[ta.name][1].shape)
        np.testing.assert_array_equal(np.asarray(tb.data).reshape(want.shape), want)
        if ta.tensor_type == GGMLQuantizationType.F32:
            np.testing.assert_array_equal(np.asarray(tb.data), made[ta.name][1])


def test_requantized_copy_holds_the_quantized_weights(tmp_path: Path) -> None:
    src, dst = tmp_path / "q.gguf", tmp_path / "q8.gguf"
    _quantized_gguf(src)
    ztr.write_requantized_copy(src, dst, GGMLQuantizationType.Q8_0)
    a, b = GGUFReader(src), GGUFReader(dst)
    assert b.fields["general.file_type"].contents() == int(LlamaFileType.MOSTLY_Q8_0)
    for ta, tb in zip(a.tensors, b.tensors):
        x = dequantize(ta.data, ta.tensor_type).reshape(tuple(reversed(ta.shape.tolist())))
        # 2-D tensors with whole blocks are quantized, the rest kept as F32
        want = (
            GGMLQuantizationType.Q8_0 if x.ndim == 2 and x.shape[-1] % 32 == 0 else GGMLQuantizationType.F32
        )
        assert tb.tensor_type == want, ta.name
        got = dequantize(tb.data, tb.tensor_type).reshape(x.shape)
        ref = x if want == GGMLQuantizationType.F32 else dequantize(quantize(x, want), want)
        np.testing.assert_array_equal(got, ref)


def test_f32_copy_of_an_f32_model_gives_llama_cpp_the_same_logits(tmp_path: Path) -> None:
    from zt_gguf.engine import Context, Model

    tiny = make_tiny_llama(tmp_path / "tiny.gguf", n_layer=2, seed=1)
    copy = ztr.write_f32_copy(tiny.path, tmp_path / "tiny.f32.gguf")
    tokens = Model(tiny.path).tokenize("the cat sat on the mat")
    outs = []
    for p in (tiny.path, copy):
        ctx = Context(Model(p), n_ctx=64, n_seq_max=2, n_threads=1, flash_attn=False)
        outs.append(ctx.logits(tokens))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_unpermute_inverts_the_llama_cpp_converter() -> None:
    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)
    np.testing.assert_array_equal(ztr.unpermute_qk(permute(w, 3), 3), w)
    assert not np.array_equal(permute(w, 3), w)


def _fake_scorer(weights: np.ndarray, n_items: int) -> Any:
    """Item i is answered right iff i/n < quality(bias): some heads help when raised, others when lowered."""

    def quality(bias: np.ndarray) -> float:
        return float(np.clip(0.45 + np.sum(weights * bias.mean(axis=0)), 0.0, 1.0))

    def scorer(bias: np.ndarray, items: list[Item]) -> list[ztr.RefScores]:
        q = quality(bias)
        out = []
        for it in items:
            right = int(it.id) / n_items < q
            text = it.choices[it.answer if right else 1 - it.answer]
            out.append(ztr.RefScores(np.zeros(2), np.ones(2, np.int32), np.zeros(2), 1.0, 0.5, text, [0], 3))
        return out

    return scorer


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_plain_paper_search_decides_like_zt_gguf_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_layer, n_head, n = 4, 9, 40
    weights = rng.normal(0, 0.15, n_head)
    items = [Item("p", (" negative", " positive"), i % 2, str(i)) for i in range(n)]
    scorer = _fake_scorer(weights, n)
    grid_up, grid_down = (1.5, 3.0, 4.0), (0.25, 0.4, 0.75)
    zt = search(
        scorer,
        items,
        (n_layer, n_head),
        SearchConfig(
            objective="accuracy-generate",
            grid_up=grid_up,
            grid_down=grid_down,
            early_stop=False,
            chunk_size=8,
        ),
    )

    def accuracy_of(bias: np.ndarray) -> float:
        scores = scorer(bias, items)
        return float(np.mean([s.gen_text == it.choices[it.answer] for s, it in zip(scores, items)]))

    ref = ztr.paper_search(accuracy_of, (n_layer, n_head), grid_up=grid_up, grid_down=grid_down, n_items=n)
    assert (ref.head_type, ref.heads, ref.best_gamma) == (zt.head_type, zt.heads, zt.best_gamma)
    assert ref.n_evaluations == zt.n_evaluations == 1 + 2 * n_head + 3
    assert ref.best_accuracy == pytest.approx(zt.best_objective)
    np.testing.assert_allclose(ref.gains_up, zt.gains_up)
    np.testing.assert_array_equal(ref.bias, zt.bias)


def test_memory_estimate_for_8b() -> None:
    import bench_vs_reference as bvr

    m = bvr.memory_8b()
    assert 32 < m["gb"]["pytorch_fp32"] < 33 and 16 < m["gb"]["pytorch_bf16"] < 16.5
    assert 5 < m["gb"]["zt_gguf_q4_k_m"] < 6
    assert m["ratio_zt_to_fp32"] < 0.25


# ------------------------------------------------------------------------------------------------------------
# the PyTorch reference (optional)


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    if not HAVE_TORCH:
        pytest.skip("torch/transformers not installed: the PyTorch reference is the optional `bench` extra")
    tiny = make_tiny_llama(tmp_path_factory.mktemp("ref") / "tiny.gguf", n_layer=3, seed=3)
    return tiny, ztr.load_reference(tiny.path, n_threads=1)


@needs_torch
def test_reference_matches_the_float64_numpy_reference_with_and_without_bias(
    tiny_ref: tuple[Any, Any],
) -> None:
    tiny, ref = tiny_ref
    tokens = ref.vocab.encode("the cat sat on the mat and the dog")
    bias = np.random.default_rng(0).uniform(-1.5, 1.5, ref.bias_shape).astype(np.float32)
    for b in (None, bias):
        want = _log_softmax(reference_logits(tiny, tokens, b)[-1])
        got = _log_softmax(ref.last_logits(tokens, b))
        assert np.max(np.abs(got - want)) < 1e-4
    # the paper's post-softmax form is the same operation
    ref.mode = "post_softmax"
    try:
        post = _log_softmax(ref.last_logits(tokens, bias))
    finally:
        ref.mode = "logit"
    assert np.max(np.abs(post - _log_softmax(ref.last_logits(tokens, bias)))) < 1e-5
    # a bias on one head of one layer moves the output (the patch is live)
    one = np.zeros(ref.bias_shape, np.float32)
    one[1, 2] = 1.0
    assert (
        np.max(np.abs(_log_softmax(ref.last_logits(tokens, one)) - _log_softmax(ref.last_logits(tokens))))
        > 1e-2
    )


@needs_torch
def test_reference_scores_items_like_the_engine(tiny_ref: tuple[Any, Any]) -> None:
    from zt_gguf.engine import Context, Model

    tiny, ref = tiny_ref
    items = [
        Item("the cat sat on the", (" mat", " dog sat"), 0, "0"),
        Item("hello world one two", (" three", " cat"), 0, "1"),
    ]
    bias = np.full(ref.bias_shape, math.log(2.0), np.float32)
    ctx = Context(Model(tiny.path), n_ctx=128, n_seq_max=8, n_threads=1, flash_attn=False)
    ctx.set_bias(bias)
    want = ctx.score(items, n_gen=1)
    ref.f16 = True  # the engine's F16 KV cache
    try:
        got = ref.score_items(items, bias)
    finally:
        ref.f16 = False
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.choice_logprob, w.choice_logprob, atol=2e-3)
        np.testing.assert_array_equal(g.choice_n_tokens, w.choice_n_tokens)
        assert g.entropy_full == pytest.approx(w.entropy_full, abs=2e-3)
        assert g.gen_tokens == w.gen_tokens and g.gen_text == w.gen_text


@needs_torch
def test_vs_reference_children_run_the_same_search(tiny_ref: tuple[Any, Any], tmp_path: Path) -> None:
    import bench_vs_reference as bvr

    tiny, _ = tiny_ref
    items = [
        {"prompt": p, "choices": [" cat", " dog"], "answer": a, "id": str(i)}
        for i, (p, a) in enumerate([("the cat sat on the", 0), ("a dog and a", 1), ("one two three", 0)])
    ]
    texts = [d["prompt"] for d in items] + [d["prompt"] + c for d in items for c in d["choices"]]
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps(ztr.LlamaCppVocab(tiny.path).table(texts).to_dict()))
    cfg = {
        "items": items,
        "threads": 1,
        "search": bvr.SEARCH,
        "chunk_size": 2,
        "vocab": str(vocab),
        "model": str(tiny.path),
    }
    ref = bvr.child_ref({**cfg, "kind": "ref-full"})
    zt = bvr.run_child("zt", cfg, tmp_path)  # a real subprocess, measured
    n_head = tiny.hparams.n_head
    assert ref["n_evaluations"] == zt["n_evaluations"] == 1 + 2 * n_head + 3
    assert ref["items_scored"] == ref["items_full"] == (1 + 2 * n_head + 3) * len(items)
    assert ref["n_forwards"] == ref["items_scored"] * 3  # prompt + each of 2 choices, no sharing
    assert zt["peak_rss_mib"] > 0 and zt["wall_s"] > 0
    assert ref["baseline_accuracy"] == pytest.approx(zt["baseline_accuracy"])


@needs_torch
def test_fidelity_on_one_prompt_of_smollm2() -> None:
    import bench_fidelity as bf
    from zt_gguf import models

    try:
        q41 = models.smollm2_135m()
    except models.ModelNotAvailable as e:
        pytest.skip(f"SmolLM2-135M not available: {e}")
    f32 = q41.with_name("SmolLM2-135M-Instruct.F32.gguf")
    if not f32.exists():
        ztr.write_f32_copy(q41, f32)
    # one thread: on a busy machine two threads of torch or ggml spin against other work
    doc = bf.run(q41, f32, bf.PROMPTS[:1], threads=1, seed=0, checks=False, kv_f32=False, noise_rows=False)
    rows = {(r["model"], r["route"].split(" ")[0], r["flash_attn"]): r["gammas"] for r in doc["results"]}
    for fa in (False, True):
        for g, v in rows[("F32 copy", "zt_gguf", fa)].items():
            assert v["max_abs_diff"] < 5e-2, (fa, g)  # F16 KV cache: ~2e-2 measured
            assert v["top1_same"] == 1
            if g != "ones":
                assert v["top_delta_corr_min"] > 0.999
                assert v["top_delta_ref_max_abs"] > 0.5  # gamma does change the output
        for g, v in rows[("Q4_1", "zt_gguf", fa)].items():
            assert v["top_max_abs_diff"] < 1.5 and v["kl_ref_engine_max"] < 0.1, (fa, g)
    for v in rows[("reference", "logit", None)].values():  # the paper's post-softmax form
        assert v["max_abs_diff"] < 1e-3


def test_bench_engine_llama_cpp_reference(tmp_path: Path) -> None:
    """bench_engine's llama.cpp reference child (llama-cpp-python on our libllama) times a 512-token decode
    with one and with every output row on a tiny model."""
    import bench_engine as be

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is installed by scripts/test.sh")
    tiny = make_tiny_llama(tmp_path / "tiny.gguf").path
    ref = be.all_logits_reference(tiny, 1)
    assert ref["pp512_last_ts"] > 0 and ref["pp512_all_ts"] > 0


def test_bench_engine_arc_in_the_papers_format() -> None:
    """bench_engine's paper-format ARC items list the options, with the letters as the choices, and keep the
    answer of the data's format."""
    import bench_engine as be

    if not (be.DATA / "arc_easy.test.jsonl").exists():
        pytest.skip("../shared/data is not beside the repo")
    plain, paper = be.load_items("arc-easy", 3), be.load_items("arc-paper", 3)
    for a, b in zip(plain, paper):
        assert a["answer"] == b["answer"] and len(a["choices"]) == len(b["choices"])
        letters = [c.strip() for c in b["choices"]]
        assert letters == list("ABCDE"[: len(letters)])
        for letter, choice in zip(letters, a["choices"]):
            assert f"\n{letter}.{choice}\n" in b["prompt"]
        assert b["prompt"].endswith("\nAnswer:")
