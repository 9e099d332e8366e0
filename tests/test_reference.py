"""The NumPy reference (zt_gguf.testing) against the patched llama.cpp, with and without the first-token bias.

llama.cpp is driven through ctypes (the small binding below, pinned to the struct layout of the patched
llama.h), so that the C API itself (llama_set_attn_ftb and friends) is what is tested. The library is the one
installed with the package (zt_gguf/bin), or the one in LLAMA_CPP_LIB_PATH.

Tolerances (absolute, on logits of magnitude ~8). The effects they must resolve: a bias of +-1 on all heads
moves the logits by > 0.3, a bias of +1 on a single (layer, head) by >= 0.17 (gemma3) / 0.5 (llama).

* ``ATOL_REF = 1e-4``, llama.cpp without flash attention vs the float64 reference for llama. llama.cpp
  computes in float32 (F32 weights and, here, an F32 KV cache); the logits pass through ~25 float32 operations
  whose reductions are at most 64 long: measured max |diff| ~2e-6.
* ``ATOL_REF_GEMMA = 5e-4``, the same for gemma3, whose GELU goes through ggml's FP16 table: a float32-level
  difference of its input flips the fp16 rounding of about 1 input in 1000 (1 fp16 ulp, ~1e-3 relative, on
  that activation): measured max |diff| 1e-5 typically, 2e-4 at worst (12 to 300 tokens).
* ``ATOL_FA = 2e-2``, with flash attention. llama.cpp then casts the F32 K/V to F16 (build_attn_mha), and its
  CPU kernel for fewer than 64 query rows also rounds Q to F16 and accumulates softmax(KQ)·V in F16. The
  reference rounds K and V to fp16 (kv_f16=True) but cannot follow the F16 accumulation nor the fp16
  roundings that a float32 difference flips: measured max |diff| ~1e-2 (~1 fp16 eps relative to the logits).
  That is still an order of magnitude below the effect of a single head's bias, so a bias that is missing,
  doubled or applied to the wrong head, layer, row or stream fails these tests too.
* ``ATOL_RUN = 2e-5``, llama.cpp vs llama.cpp with another batching of the same tokens (the same float32
  operations on other shapes: other matmul kernels); ``ATOL_FA`` for flash attention, whose F16 roundings
  can flip between such runs.
"""

from __future__ import annotations

import ctypes as C
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from zt_gguf.testing import TinyModel, make_tiny_gemma3, make_tiny_llama, reference_logits
from zt_gguf.tools import bin_dir

ATOL_REF = 1e-4  # llama.cpp (float32) vs the float64 reference, llama
ATOL_REF_GEMMA = 5e-4  # the same for gemma3 (FP16 GELU table)
ATOL_FA = 2e-2  # with flash attention (F16 K/V and accumulation)
ATOL_RUN = 2e-5  # llama.cpp vs llama.cpp with another batching of the same tokens

# the patched libllama installed with the package (or LLAMA_CPP_LIB_PATH for another build)
LIB_DIR = os.environ.get("LLAMA_CPP_LIB_PATH") or str(bin_dir())

# ------------------------------------------------------------------------------------------------------------
# a minimal ctypes binding of the patched llama.h


class _ModelParams(C.Structure):
    _fields_ = [
        ("devices", C.c_void_p),
        ("tensor_buft_overrides", C.c_void_p),
        ("n_gpu_layers", C.c_int32),
        ("split_mode", C.c_int),
        ("load_mode", C.c_int),
        ("lazy_mode", C.c_int),
        ("main_gpu", C.c_int32),
        ("tensor_split", C.c_void_p),
        ("progress_callback", C.c_void_p),
        ("progress_callback_user_data", C.c_void_p),
        ("kv_overrides", C.c_void_p),
        ("vocab_only", C.c_bool),
        ("check_tensors", C.c_bool),
        ("use_extra_bufts", C.c_bool),
        ("no_host", C.c_bool),
        ("no_alloc", C.c_bool),
        ("load_mtp", C.c_bool),
    ]


class _ContextParams(C.Structure):
    _fields_ = [
        ("n_ctx", C.c_uint32),
        ("n_batch", C.c_uint32),
        ("n_ubatch", C.c_uint32),
        ("n_seq_max", C.c_uint32),
        ("n_rs_seq", C.c_uint32),
        ("n_outputs_max", C.c_uint32),
        ("n_outputs_max_per_seq", C.c_uint32),
        ("n_threads", C.c_int32),
        ("n_threads_batch", C.c_int32),
        ("ctx_type", C.c_int),
        ("rope_scaling_type", C.c_int),
        ("pooling_type", C.c_int),
        ("attention_type", C.c_int),
        ("flash_attn_type", C.c_int),
        ("rope_freq_base", C.c_float),
        ("rope_freq_scale", C.c_float),
        ("yarn_ext_factor", C.c_float),
        ("yarn_attn_factor", C.c_float),
        ("yarn_beta_fast", C.c_float),
        ("yarn_beta_slow", C.c_float),
        ("yarn_orig_ctx", C.c_uint32),
        ("defrag_thold", C.c_float),
        ("cb_eval", C.c_void_p),
        ("cb_eval_user_data", C.c_void_p),
        ("type_k", C.c_int),
        ("type_v", C.c_int),
        ("abort_callback", C.c_void_p),
        ("abort_callback_data", C.c_void_p),
        ("embeddings", C.c_bool),
        ("offload_kqv", C.c_bool),
        ("no_perf", C.c_bool),
        ("op_offload", C.c_bool),
        ("swa_full", C.c_bool),
        ("kv_unified", C.c_bool),
        ("samplers", C.c_void_p),
        ("n_samplers", C.c_size_t),
        ("ctx_other", C.c_void_p),
    ]


class _Batch(C.Structure):
    _fields_ = [
        ("n_tokens", C.c_int32),
        ("token", C.POINTER(C.c_int32)),
        ("embd", C.POINTER(C.c_float)),
        ("pos", C.POINTER(C.c_int32)),
        ("n_seq_id", C.POINTER(C.c_int32)),
        ("seq_id", C.POINTER(C.POINTER(C.c_int32))),
        ("logits", C.POINTER(C.c_int8)),
    ]


_LOG_CB = C.CFUNCTYPE(None, C.c_int, C.c_char_p, C.c_void_p)
GGML_TYPE_F32 = 0
GGML_LOG_LEVEL_WARN = 3


class LlamaLib:
    """libllama.so with the argument types of the functions used here and a log that tests can read."""

    _instance: LlamaLib | None = None

    def __init__(self, lib_dir: str) -> None:
        lib = C.CDLL(str(Path(lib_dir) / "libllama.so"))
        vp, i32, sz = C.c_void_p, C.c_int32, C.c_size_t
        fp = C.POINTER(C.c_float)
        sigs: dict[str, tuple[list[object], object]] = {
            "llama_backend_init": ([], None),
            "llama_log_set": ([_LOG_CB, vp], None),
            "llama_model_default_params": ([], _ModelParams),
            "llama_context_default_params": ([], _ContextParams),
            "llama_model_load_from_file": ([C.c_char_p, _ModelParams], vp),
            "llama_model_free": ([vp], None),
            "llama_init_from_model": ([vp, _ContextParams], vp),
            "llama_free": ([vp], None),
            "llama_model_get_vocab": ([vp], vp),
            "llama_vocab_n_tokens": ([vp], i32),
            "llama_vocab_get_add_bos": ([vp], C.c_bool),
            "llama_vocab_bos": ([vp], i32),
            "llama_tokenize": ([vp, C.c_char_p, i32, C.POINTER(i32), i32, C.c_bool, C.c_bool], i32),
            "llama_model_n_layer": ([vp], i32),
            "llama_model_n_head": ([vp], i32),
            "llama_model_n_attn_ftb": ([vp], i32),
            "llama_set_attn_ftb": ([vp, fp, sz], i32),
            "llama_get_attn_ftb": ([vp, fp, sz], i32),
            "llama_batch_init": ([i32, i32, i32], _Batch),
            "llama_batch_free": ([_Batch], None),
            "llama_decode": ([vp, _Batch], i32),
            "llama_get_logits_ith": ([vp, i32], fp),
            "llama_get_memory": ([vp], vp),
            "llama_memory_clear": ([vp, C.c_bool], None),
            "llama_memory_seq_cp": ([vp, i32, i32, i32, i32], None),
        }
        for name, (argtypes, restype) in sigs.items():
            f = getattr(lib, name)
            f.argtypes = argtypes
            f.restype = restype
        self.lib = lib
        self.log: list[tuple[int, str]] = []

        def _on_log(level: int, text: bytes | None, _user: int | None) -> None:
            if text:
                self.log.append((level, text.decode("utf-8", "replace")))

        self._log_cb = _LOG_CB(_on_log)  # keep a reference: the library holds the pointer
        lib.llama_log_set(self._log_cb, None)
        lib.llama_backend_init()

        # the struct layout is pinned to the patched llama.h: check it against the library's defaults
        cp = lib.llama_context_default_params()
        got = (
            cp.n_ctx,
            cp.n_batch,
            cp.n_ubatch,
            cp.n_seq_max,
            cp.flash_attn_type,
            cp.yarn_ext_factor,
            cp.defrag_thold,
            cp.type_k,
            cp.type_v,
            cp.offload_kqv,
            cp.swa_full,
            cp.kv_unified,
            cp.n_samplers,
        )
        want = (512, 2048, 512, 1, -1, -1.0, -1.0, 1, 1, True, True, False, 0)
        if got != want:
            raise RuntimeError(f"llama_context_params layout mismatch: {got} != {want}")
        mp = lib.llama_model_default_params()
        if (mp.n_gpu_layers, mp.split_mode, mp.load_mode, mp.use_extra_bufts, mp.load_mtp) != (
            -1,
            1,
            -1,
            True,
            False,
        ):
            raise RuntimeError("llama_model_params layout mismatch")

    @classmethod
    def get(cls) -> LlamaLib:
        if cls._instance is None:
            cls._instance = LlamaLib(LIB_DIR)
        return cls._instance

    def warnings(self) -> str:
        return "".join(t for lvl, t in self.log if lvl >= GGML_LOG_LEVEL_WARN)


class LlamaModel:
    def __init__(self, path: Path) -> None:
        self.L = LlamaLib.get()
        mp = self.L.lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.ptr = self.L.lib.llama_model_load_from_file(str(path).encode(), mp)
        if not self.ptr:
            raise RuntimeError(f"cannot load {path}")
        self.vocab = self.L.lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = self.L.lib.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        buf = (C.c_int32 * 256)()
        raw = text.encode()
        n = self.L.lib.llama_tokenize(self.vocab, raw, len(raw), buf, 256, add_special, False)
        assert n >= 0
        return list(buf[:n])

    def close(self) -> None:
        if self.ptr:
            self.L.lib.llama_model_free(self.ptr)
            self.ptr = None


class LlamaContext:
    def __init__(
        self,
        model: LlamaModel,
        *,
        flash_attn: bool = False,
        n_ctx: int = 256,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_seq_max: int = 1,
        kv_unified: bool = False,
        swa_full: bool = True,
        n_threads: int = 1,
    ) -> None:
        self.model = model
        lib = model.L.lib
        self.lib = lib
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_ubatch, n_seq_max
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = 1 if flash_attn else 0
        cp.type_k = cp.type_v = GGML_TYPE_F32  # an exact cache: the reference is compared to float32 rounding
        cp.kv_unified, cp.swa_full = kv_unified, swa_full
        self.ptr = lib.llama_init_from_model(model.ptr, cp)
        if not self.ptr:
            raise RuntimeError("cannot create the context")
        self.n_seq_max = n_seq_max

    def __enter__(self) -> LlamaContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.ptr:
            self.lib.llama_free(self.ptr)
            self.ptr = None

    def set_ftb(self, biases: np.ndarray | Sequence[float] | None, n: int | None = None) -> int:
        if biases is None:
            return int(self.lib.llama_set_attn_ftb(self.ptr, None, 0))
        arr = np.ascontiguousarray(np.asarray(biases, dtype=np.float32).reshape(-1))
        ptr = arr.ctypes.data_as(C.POINTER(C.c_float))
        return int(self.lib.llama_set_attn_ftb(self.ptr, ptr, arr.size if n is None else n))

    def get_ftb(self) -> np.ndarray | None:
        n = self.lib.llama_get_attn_ftb(self.ptr, None, 0)
        if n == 0:
            return None
        out = np.zeros(n, dtype=np.float32)
        assert self.lib.llama_get_attn_ftb(self.ptr, out.ctypes.data_as(C.POINTER(C.c_float)), n) == n
        return out

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ptr), True)

    def seq_cp(self, src: int, dst: int) -> None:
        self.lib.llama_memory_seq_cp(self.lib.llama_get_memory(self.ptr), src, dst, -1, -1)

    def decode(
        self, items: Sequence[tuple[int, int, int | tuple[int, ...], bool]]
    ) -> list[np.ndarray | None]:
        """Decode one batch of (token, pos, seq_id(s), want_logits); returns each item's logits (or None)."""
        lib = self.lib
        batch = lib.llama_batch_init(len(items), 0, self.n_seq_max)
        try:
            batch.n_tokens = len(items)
            for i, (tok, pos, seq, out) in enumerate(items):
                seqs = (seq,) if isinstance(seq, int) else seq
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = len(seqs)
                for j, sj in enumerate(seqs):
                    batch.seq_id[i][j] = sj
                batch.logits[i] = 1 if out else 0
            rc = lib.llama_decode(self.ptr, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        finally:
            lib.llama_batch_free(batch)
        res: list[np.ndarray | None] = []
        for i, (_, _, _, out) in enumerate(items):
            if out:
                p = lib.llama_get_logits_ith(self.ptr, i)
                res.append(np.ctypeslib.as_array(p, shape=(self.model.n_vocab,)).astype(np.float64))
            else:
                res.append(None)
        return res

    def prefill(
        self, tokens: Sequence[int], seq: int = 0, start: int = 0, all_logits: bool = True
    ) -> np.ndarray:
        """Decode tokens at positions start.. in one llama_decode call; logits [n or 1, n_vocab]."""
        n = len(tokens)
        items = [(t, start + i, seq, all_logits or i == n - 1) for i, t in enumerate(tokens)]
        return np.stack([r for r in self.decode(items) if r is not None])

    def token_by_token(self, tokens: Sequence[int], seq: int = 0, start: int = 0) -> np.ndarray:
        """Decode tokens one llama_decode call each; logits [n, n_vocab]."""
        rows = [self.decode([(t, start + i, seq, True)])[0] for i, t in enumerate(tokens)]
        return np.stack([r for r in rows if r is not None])


# ------------------------------------------------------------------------------------------------------------
# models


@dataclass
class Loaded:
    tiny: TinyModel
    model: LlamaModel


def _rand_biases(shape: tuple[int, int], seed: int, scale: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.uniform(-scale, scale, size=shape)).astype(np.float32)


LLAMA_B = _rand_biases((2, 4), 11)
GEMMA_B = _rand_biases((3, 4), 12)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Loaded]]:
    d = tmp_path_factory.mktemp("tiny")
    tinies = {
        "llama": make_tiny_llama(d / "llama.gguf"),
        "llama_b": make_tiny_llama(d / "llama_b.gguf", biases=LLAMA_B),
        "llama_nobos": make_tiny_llama(d / "llama_nobos.gguf", add_bos=False, seed=3),
        "gemma3": make_tiny_gemma3(d / "gemma3.gguf"),
        "gemma3_b": make_tiny_gemma3(d / "gemma3_b.gguf", biases=GEMMA_B),
    }
    loaded = {k: Loaded(t, LlamaModel(t.path)) for k, t in tinies.items()}
    yield loaded
    for m in loaded.values():
        m.model.close()


def _prompt(tiny: TinyModel, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(1000 + seed)
    body = [int(t) for t in rng.integers(3, tiny.hparams.n_vocab, size=n)]
    return [tiny.tokenizer.bos_id, *body[1:]] if tiny.tokenizer.add_bos else body


def _assert_close(got: np.ndarray, want: np.ndarray, atol: float) -> None:
    err = float(np.max(np.abs(got - want)))
    assert err <= atol, f"max |diff| = {err:.3g} > {atol:.3g}"


# ------------------------------------------------------------------------------------------------------------
# parametrisation


FA = [pytest.param(False, id="nofa"), pytest.param(True, id="fa")]
ARCHS = ["llama", "gemma3"]


def _ref(tiny: TinyModel, tokens: Sequence[int], biases: np.ndarray | None, fa: bool) -> np.ndarray:
    return reference_logits(tiny, tokens, biases, kv_f16=fa)


def _atol_ref(arch: str, fa: bool) -> float:
    return ATOL_FA if fa else ATOL_REF if arch == "llama" else ATOL_REF_GEMMA


def _atol_run(fa: bool) -> float:
    return ATOL_FA if fa else ATOL_RUN


def _biases(arch: str) -> np.ndarray:
    return LLAMA_B if arch == "llama" else GEMMA_B


# ------------------------------------------------------------------------------------------------------------
# the reference against llama.cpp


@pytest.mark.parametrize("fa", FA)
@pytest.mark.parametrize("arch", ARCHS)
def test_bias_off_matches_reference(models: dict[str, Loaded], arch: str, fa: bool) -> None:
    m = models[arch]
    toks = _prompt(m.tiny, 12)
    with LlamaContext(m.model, flash_attn=fa) as c:
        assert c.get_ftb() is None
        got = c.prefill(toks)
    _assert_close(got, _ref(m.tiny, toks, None, fa), _atol_ref(arch, fa))


@pytest.mark.parametrize("fa", FA)
@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_bias_matches_reference(models: dict[str, Loaded], arch: str, fa: bool) -> None:
    m = models[arch + "_b"]
    b = _biases(arch)
    toks = _prompt(m.tiny, 12)
    assert m.model.L.lib.llama_model_n_attn_ftb(m.model.ptr) == b.size
    with LlamaContext(m.model, flash_attn=fa) as c:
        np.testing.assert_array_equal(c.get_ftb(), b.reshape(-1))
        got = c.prefill(toks)
    want = _ref(m.tiny, toks, b, fa)
    _assert_close(got, want, _atol_ref(arch, fa))
    _assert_close(got[-1:], want[-1:], _atol_ref(arch, fa))
    # the bias moves the logits far more than the tolerance
    assert np.max(np.abs(want - _ref(m.tiny, toks, None, fa))) > 0.3


@pytest.mark.parametrize("fa", FA)
@pytest.mark.parametrize("arch", ARCHS)
def test_setter_bias_matches_reference(models: dict[str, Loaded], arch: str, fa: bool) -> None:
    m = models[arch]
    b = _biases(arch)
    b2 = -0.5 * b[::-1]  # other values, same shape
    toks = _prompt(m.tiny, 12, seed=1)
    with LlamaContext(m.model, flash_attn=fa) as c:
        off = c.prefill(toks)
        c.clear()
        assert c.set_ftb(b) == 0
        np.testing.assert_array_equal(c.get_ftb(), b.reshape(-1))
        got = c.prefill(toks)
        _assert_close(got, _ref(m.tiny, toks, b, fa), _atol_ref(arch, fa))
        # new values are picked up without a graph rebuild
        c.clear()
        assert c.set_ftb(b2) == 0
        got2 = c.prefill(toks)
        _assert_close(got2, _ref(m.tiny, toks, b2, fa), _atol_ref(arch, fa))
        # turning it off again gives exactly the bias-off logits
        c.clear()
        assert c.set_ftb(None) == 0
        assert c.get_ftb() is None
        np.testing.assert_array_equal(c.prefill(toks), off)


@pytest.mark.parametrize("arch", ARCHS)
def test_setter_overrides_and_disables_gguf_bias(models: dict[str, Loaded], arch: str) -> None:
    plain, biased = models[arch], models[arch + "_b"]
    toks = _prompt(plain.tiny, 10, seed=2)
    with LlamaContext(plain.model) as c:
        off = c.prefill(toks)
    with LlamaContext(biased.model) as c:
        assert c.set_ftb(None) == 0
        np.testing.assert_array_equal(c.prefill(toks), off)  # same weights, bias off
        c.clear()
        b2 = np.full_like(_biases(arch), 0.75)
        assert c.set_ftb(b2) == 0
        _assert_close(c.prefill(toks), reference_logits(plain.tiny, toks, b2), _atol_ref(arch, False))


@pytest.mark.parametrize("fa", FA)
@pytest.mark.parametrize("arch", ARCHS)
def test_unit_bias_effect_is_measurable(models: dict[str, Loaded], arch: str, fa: bool) -> None:
    m = models[arch]
    toks = _prompt(m.tiny, 12, seed=3)
    shape = _biases(arch).shape
    with LlamaContext(m.model, flash_attn=fa) as c:
        off = c.prefill(toks, all_logits=False)[0]
        for sign in (1.0, -1.0):
            b = np.full(shape, sign, dtype=np.float32)
            c.clear()
            assert c.set_ftb(b) == 0
            got = c.prefill(toks, all_logits=False)[0]
            want = _ref(m.tiny, toks, b, fa)[-1]
            _assert_close(got, want, _atol_ref(arch, fa))
            assert np.max(np.abs(got - off)) > 0.1  # far above 1e-3
            c.clear()


@pytest.mark.parametrize("fa", FA)
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_bias_is_bit_identical_to_off(
    models: dict[str, Loaded], tmp_path: Path, arch: str, fa: bool
) -> None:
    m = models[arch]
    toks = _prompt(m.tiny, 70, seed=4)  # >= 64 rows: the tiled flash-attention kernel too
    zeros = np.zeros_like(_biases(arch))
    with LlamaContext(m.model, flash_attn=fa) as c:
        off = c.prefill(toks)
        c.clear()
        off_tbt = c.token_by_token(toks[:6])
        c.clear()
        assert c.set_ftb(zeros) == 0
        np.testing.assert_array_equal(c.prefill(toks), off)
        c.clear()
        np.testing.assert_array_equal(c.token_by_token(toks[:6]), off_tbt)
    mk = make_tiny_llama if arch == "llama" else make_tiny_gemma3
    zero_model = LlamaModel(mk(tmp_path / "zero.gguf", biases=zeros).path)
    try:
        with LlamaContext(zero_model, flash_attn=fa) as c:
            np.testing.assert_array_equal(c.get_ftb(), zeros.reshape(-1))
            np.testing.assert_array_equal(c.prefill(toks), off)
    finally:
        zero_model.close()


# ------------------------------------------------------------------------------------------------------------
# batching: sequences, ubatches, token by token


@pytest.mark.parametrize("kv_unified", [pytest.param(False, id="streams"), pytest.param(True, id="unified")])
@pytest.mark.parametrize("fa", FA)
@pytest.mark.parametrize("arch", ARCHS)
def test_multi_sequence_batch_equals_single(
    models: dict[str, Loaded], arch: str, fa: bool, kv_unified: bool
) -> None:
    m = models[arch + "_b"]
    b = _biases(arch)
    lens = [5, 9, 3, 12]
    prompts = [_prompt(m.tiny, n, seed=10 + s) for s, n in enumerate(lens)]
    # one batch, the tokens of the 4 sequences interleaved
    items = [(p[i], i, s, True) for i in range(max(lens)) for s, p in enumerate(prompts) if i < len(p)]
    with LlamaContext(m.model, flash_attn=fa, n_seq_max=4, n_ctx=1024, kv_unified=kv_unified) as c:
        out = c.decode(items)
    got: dict[int, list[np.ndarray]] = {s: [] for s in range(4)}
    for (_, _, s, _), r in zip(items, out, strict=True):
        assert r is not None
        got[s].append(r)
    for s, p in enumerate(prompts):
        with LlamaContext(m.model, flash_attn=fa) as c:
            alone = c.prefill(p)
        batched = np.stack(got[s])
        _assert_close(batched, alone, _atol_run(fa))
        _assert_close(batched, _ref(m.tiny, p, b, fa), _atol_ref(arch, fa))


@pytest.mark.parametrize("kv_unified", [pytest.param(False, id="streams"), pytest.param(True, id="unified")])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_copied_to_another_sequence(
    models: dict[str, Loaded], arch: str, kv_unified: bool
) -> None:
    m = models[arch + "_b"]
    b = _biases(arch)
    prefix = _prompt(m.tiny, 6, seed=20)
    cont = [_prompt(m.tiny, 5, seed=21)[1:], _prompt(m.tiny, 7, seed=22)[1:]]
    with LlamaContext(m.model, n_seq_max=2, n_ctx=512, kv_unified=kv_unified) as c:
        c.prefill(prefix, seq=0, all_logits=False)
        c.seq_cp(0, 1)
        items = [(t, len(prefix) + i, s, True) for s in (0, 1) for i, t in enumerate(cont[s])]
        out = c.decode(items)
    for s in (0, 1):
        got = np.stack([r for (_, _, ss, _), r in zip(items, out, strict=True) if ss == s])
        want = reference_logits(m.tiny, prefix + cont[s], b)[len(prefix) :]
        _assert_close(got, want, _atol_ref(arch, False))


@pytest.mark.parametrize("fa", FA)
@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_shared_by_two_sequences_in_one_batch(models: dict[str, Loaded], arch: str, fa: bool) -> None:
    """Prefix tokens carrying seq ids (0, 1), then each sequence's own tokens, all in one batch."""
    m = models[arch + "_b"]
    b = _biases(arch)
    prefix = _prompt(m.tiny, 5, seed=23)
    cont = [_prompt(m.tiny, 4, seed=24)[1:], _prompt(m.tiny, 6, seed=25)[1:]]
    items: list[tuple[int, int, int | tuple[int, ...], bool]] = [
        (t, i, (0, 1), False) for i, t in enumerate(prefix)
    ]
    items += [(t, len(prefix) + i, s, True) for s in (0, 1) for i, t in enumerate(cont[s])]
    with LlamaContext(m.model, flash_attn=fa, n_seq_max=2, n_ctx=512, kv_unified=True) as c:
        out = c.decode(items)
    for s in (0, 1):
        got = np.stack([r for (_, _, ss, _), r in zip(items, out, strict=True) if ss == s and r is not None])
        want = _ref(m.tiny, prefix + cont[s], b, fa)[len(prefix) :]
        _assert_close(got, want, _atol_ref(arch, fa))


@pytest.mark.parametrize("fa", FA)
@pytest.mark.parametrize("arch", ARCHS)
def test_ubatch_split_equals_one_ubatch(models: dict[str, Loaded], arch: str, fa: bool) -> None:
    m = models[arch + "_b"]
    toks = _prompt(m.tiny, 13, seed=5)
    with LlamaContext(m.model, flash_attn=fa) as c:
        one = c.prefill(toks)
    with LlamaContext(m.model, flash_attn=fa, n_ubatch=4) as c:
        split = c.prefill(toks)
    _assert_close(split, one, _atol_run(fa))
    _assert_close(split, _ref(m.tiny, toks, _biases(arch), fa), _atol_ref(arch, fa))


@pytest.mark.parametrize("fa", FA)
@pytest.mark.parametrize("arch", ARCHS)
def test_token_by_token_equals_prefill(models: dict[str, Loaded], arch: str, fa: bool) -> None:
    m = models[arch + "_b"]
    toks = _prompt(m.tiny, 11, seed=6)
    with LlamaContext(m.model, flash_attn=fa) as c:
        pre = c.prefill(toks)
        c.clear()
        tbt = c.token_by_token(toks)
    _assert_close(tbt, pre, _atol_run(fa))
    _assert_close(tbt, _ref(m.tiny, toks, _biases(arch), fa), _atol_ref(arch, fa))


@pytest.mark.parametrize("arch", ARCHS)
def test_flash_attn_tiled_and_split_kv_kernels(models: dict[str, Loaded], arch: str) -> None:
    """300 query rows use the tiled CPU kernel; one more token against 512 KV cells the split-KV kernel."""
    m = models[arch + "_b"]
    b = _biases(arch)
    toks = _prompt(m.tiny, 301, seed=7)
    want = _ref(m.tiny, toks, b, True)
    with LlamaContext(m.model, flash_attn=True, n_ctx=512, n_threads=2) as c:  # 2 threads: 2 KV chunks
        pre = c.prefill(toks[:300])
        last = c.decode([(toks[300], 300, 0, True)])[0]
    _assert_close(pre, want[:300], ATOL_FA)
    assert last is not None
    _assert_close(last, want[300], ATOL_FA)
    with LlamaContext(m.model, flash_attn=False, n_ctx=512) as c:
        nofa = c.prefill(toks)
    _assert_close(nofa, reference_logits(m.tiny, toks, b), _atol_ref(arch, False))


# ------------------------------------------------------------------------------------------------------------
# gemma3: sliding-window layers


@pytest.mark.parametrize("swa_full", [pytest.param(True, id="swa_full"), pytest.param(False, id="swa_small")])
@pytest.mark.parametrize("fa", FA)
def test_gemma3_sliding_window(models: dict[str, Loaded], fa: bool, swa_full: bool) -> None:
    m = models["gemma3_b"]
    hp = m.tiny.hparams
    assert hp.swa_layers == [True, False, True] and hp.n_swa == 4
    toks = _prompt(m.tiny, 20, seed=8)
    want = _ref(m.tiny, toks, GEMMA_B, fa)
    with LlamaContext(m.model, flash_attn=fa, swa_full=swa_full) as c:
        _assert_close(c.prefill(toks), want, _atol_ref("gemma3", fa))
        c.clear()
        _assert_close(c.token_by_token(toks), want, _atol_ref("gemma3", fa))
    with LlamaContext(m.model, flash_attn=fa, swa_full=swa_full, n_ubatch=3) as c:
        _assert_close(c.prefill(toks), want, _atol_ref("gemma3", fa))


@pytest.mark.parametrize("fa", FA)
def test_gemma3_bias_stops_outside_the_window(models: dict[str, Loaded], fa: bool) -> None:
    """A bias on the last layer only (a sliding-window layer) changes no logit of a position >= n_swa."""
    m = models["gemma3"]
    n_swa = m.tiny.hparams.n_swa
    b = np.zeros_like(GEMMA_B)
    b[-1] = [2.0, -2.0, 1.5, -1.5]
    toks = _prompt(m.tiny, 12, seed=9)
    want_off = _ref(m.tiny, toks, None, fa)
    want = _ref(m.tiny, toks, b, fa)
    np.testing.assert_array_equal(want[n_swa:], want_off[n_swa:])  # the reference agrees
    with LlamaContext(m.model, flash_attn=fa) as c:
        off = c.prefill(toks)
        c.clear()
        assert c.set_ftb(b) == 0
        on = c.prefill(toks)
        c.clear()
        on_tbt = c.token_by_token(toks)
    np.testing.assert_array_equal(on[n_swa:], off[n_swa:])
    assert np.min(np.max(np.abs(on[:n_swa] - off[:n_swa]), axis=1)[1:]) > 0.05  # position 0 sees only itself
    _assert_close(on, want, _atol_ref("gemma3", fa))
    _assert_close(on_tbt, want, _atol_ref("gemma3", fa))


def test_gemma3_long_prompt_small_swa_cache(models: dict[str, Loaded]) -> None:
    """With swa_full off the sliding-window cache reuses the cell of position 0 for later positions."""
    m = models["gemma3_b"]
    toks = _prompt(m.tiny, 300, seed=10)
    want = reference_logits(m.tiny, toks, GEMMA_B)
    with LlamaContext(m.model, swa_full=False, n_ctx=512, n_ubatch=64, n_batch=64) as c:
        got = np.concatenate([c.prefill(toks[i : i + 64], start=i) for i in range(0, 300, 64)])
        nxt = _prompt(m.tiny, 3, seed=11)[1:]
        more = c.token_by_token(nxt, start=300)
    _assert_close(got, want, ATOL_REF_GEMMA)
    _assert_close(more, reference_logits(m.tiny, toks + nxt, GEMMA_B)[300:], ATOL_REF_GEMMA)


# ------------------------------------------------------------------------------------------------------------
# tokenizer / add_bos


def test_tokenizer_and_add_bos_false(models: dict[str, Loaded]) -> None:
    with_bos, no_bos = models["llama"], models["llama_nobos"]
    lib = with_bos.model.L.lib
    assert lib.llama_vocab_get_add_bos(with_bos.model.vocab)
    assert not lib.llama_vocab_get_add_bos(no_bos.model.vocab)
    tok = no_bos.tiny.tokenizer
    a = with_bos.model.tokenize("the cat sat")
    z = no_bos.model.tokenize("the cat sat")
    assert a[0] == tok.bos_id and a[1:] == z
    assert z == [tok.piece_id("▁the"), tok.piece_id("▁cat"), tok.piece_id("▁sat")]
    assert no_bos.model.tokenize("é")[-2:] == [tok.byte_token(0xC3), tok.byte_token(0xA9)]  # byte fallback

    toks = no_bos.model.tokenize("the cat sat on the mat and the dog")
    assert toks[0] != tok.bos_id
    with LlamaContext(no_bos.model) as c:
        off = c.prefill(toks)
        c.clear()
        assert c.set_ftb(LLAMA_B) == 0
        got = c.prefill(toks)
    _assert_close(off, reference_logits(no_bos.tiny, toks, None), ATOL_REF)
    _assert_close(got, reference_logits(no_bos.tiny, toks, LLAMA_B), ATOL_REF)
    assert np.max(np.abs(got - off)) > 0.1


# ------------------------------------------------------------------------------------------------------------
# invalid biases


def _malformed_cases() -> list[object]:
    import gguf

    n = LLAMA_B.size
    key = "{arch}.attention.first_token_bias"
    arr, f32, i32 = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.INT32
    nan = LLAMA_B.reshape(-1).copy()
    nan[3] = np.nan
    inf = LLAMA_B.reshape(-1).copy()
    inf[5] = np.inf
    return [
        pytest.param({"bias_values": LLAMA_B.reshape(-1)[: n - 1]}, True, id="too_short"),
        pytest.param({"bias_values": np.concatenate([LLAMA_B.reshape(-1), [0.5]])}, True, id="too_long"),
        pytest.param({"bias_values": nan}, True, id="nan"),
        pytest.param({"bias_values": inf}, True, id="inf"),
        pytest.param({"extra_kv": {key: ([1] * n, arr, i32)}}, True, id="int32_array"),
        pytest.param({"extra_kv": {key: (0.5, f32, None)}}, False, id="scalar"),
    ]


@pytest.mark.parametrize(("kwargs", "warns"), _malformed_cases())
def test_malformed_gguf_bias_loads_with_bias_off(
    models: dict[str, Loaded], tmp_path: Path, kwargs: dict[str, object], warns: bool
) -> None:
    plain = models["llama"]
    toks = _prompt(plain.tiny, 9, seed=12)
    with LlamaContext(plain.model) as c:
        off = c.prefill(toks)
    L = LlamaLib.get()
    L.log.clear()
    tiny = make_tiny_llama(tmp_path / "bad.gguf", **kwargs)  # type: ignore[arg-type]
    bad = LlamaModel(tiny.path)
    try:
        if warns:
            assert "ignoring the first-token attention bias" in L.warnings()
        with LlamaContext(bad) as c:
            assert c.get_ftb() is None
            np.testing.assert_array_equal(c.prefill(toks), off)
    finally:
        bad.close()


def test_setter_validation(models: dict[str, Loaded]) -> None:
    m = models["llama_b"]
    n = m.model.L.lib.llama_model_n_attn_ftb(m.model.ptr)
    assert n == LLAMA_B.size
    with LlamaContext(m.model) as c:
        before = c.get_ftb()
        assert c.set_ftb(np.zeros(n - 1)) == -1
        assert c.set_ftb(np.zeros(n + 1)) == -1
        bad = np.zeros(n)
        bad[2] = np.nan
        assert c.set_ftb(bad) == -2
        bad[2] = -np.inf
        assert c.set_ftb(bad) == -2
        np.testing.assert_array_equal(c.get_ftb(), before)  # unchanged on error
        big = np.full(n, 1e4, dtype=np.float32)
        big[0] = -1e4
        assert c.set_ftb(big) == 0
        got = c.get_ftb()
        assert got is not None and got[0] == -100.0 and np.all(got[1:] == 100.0)
