"""Tiny random-weight GGUF models and an independent NumPy reference forward pass.

The models are written with the ``gguf`` package, all tensors F32, so that the float64 reference below can be
compared with llama.cpp to float32 rounding. Two architectures are covered:

* ``llama``: RMSNorm, RoPE in the "normal" mode (rotated pairs are adjacent: x[2i], x[2i+1]), GQA, SwiGLU FFN,
  separate ``output.weight``.
* ``gemma3``: embeddings scaled by sqrt(n_embd), per-head RMSNorm of Q and K, RoPE in NEOX mode (pairs x[i],
  x[i+d/2]) with base ``rope.freq_base_swa`` on sliding-window layers and ``rope.freq_base`` on global layers,
  Q scaled by 1/sqrt(head_dim), post-attention and post-FFN RMSNorms, GELU-gated FFN, tied output embedding.
  Norm weights are used as stored (the gemma convert script already adds the +1 to the checkpoint's weights).

ZeroTuning: for every layer l, query head h and query row, the bias ``b[l, h]`` (logit units) is added to
the pre-softmax attention logit of the key at sequence position 0 (after the scale, the soft-cap and the mask,
before the softmax). It has no effect where position 0 is masked (outside the sliding window).

The reference reproduces one llama.cpp numeric that is part of the model's definition on the CPU: GELU goes
through ggml's FP16 lookup table (input rounded to fp16, result rounded to fp16; identity/zero beyond +-10).
Everything else is computed in float64; the RoPE angle of pair i is p * base**(-2i/d).

The last section starts and stops llama-server (our tree's) on a loopback port and drives it with concurrent
greedy completions: the tests and benchmarks/bench_load.py share it.
"""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FIRST_TOKEN_BIAS_KEY = "{arch}.attention.first_token_bias"

# SentencePiece token types as stored in tokenizer.ggml.token_type
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_BYTE = 6

_WORD_PIECES = (
    "▁the",
    "▁a",
    "▁of",
    "▁and",
    "▁to",
    "▁in",
    "▁is",
    "▁it",
    "▁that",
    "▁was",
    "▁for",
    "▁on",
    "▁hello",
    "▁world",
    "▁cat",
    "▁dog",
    "▁sat",
    "▁mat",
    "▁one",
    "▁two",
    "▁three",
    "ing",
    "ed",
    "es",
    "er",
    "re",
)
_LETTERS = tuple("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-")


@dataclass
class TinyTokenizer:
    """The SentencePiece ("llama") vocabulary written to the GGUF."""

    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0
    add_bos: bool = True

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def byte_token(self, b: int) -> int:
        """Id of the byte-fallback token <0xXX>."""
        return 3 + b

    def piece_id(self, piece: str) -> int:
        return self.tokens.index(piece)


@dataclass
class TinyHParams:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_mode: str  # "norm" (llama) or "neox" (gemma3)
    rope_base: float  # global layers
    rope_base_swa: float = 10000.0  # sliding-window layers
    n_swa: int = 0  # sliding window (0: none); a key at p0 is visible from p1 iff p1 - n_swa < p0 <= p1
    swa_layers: list[bool] = field(default_factory=list)  # per layer: is it a sliding-window layer
    attn_scale: float = 0.0  # 0: 1/sqrt(head_dim) on the logits (llama); else Q is scaled by it (gemma3)
    attn_logit_softcap: float = 0.0  # 0: none
    final_logit_softcap: float = 0.0  # 0: none
    embd_scale: float = 1.0  # input embeddings are multiplied by it (gemma: sqrt(n_embd))
    ffn_act: str = "silu"  # "silu" (SwiGLU) or "gelu" (GELU-gated, ggml FP16 table)
    qk_norm: bool = False
    post_norms: bool = False  # post-attention and post-FFN RMSNorms (gemma3)
    tied_output: bool = False


@dataclass
class TinyModel:
    path: Path
    arch: str
    hparams: TinyHParams
    weights: dict[str, np.ndarray]  # GGUF tensor name -> float32 array in the GGUF (numpy, row-major) layout
    tokenizer: TinyTokenizer
    biases: np.ndarray | None = None  # [n_layer, n_head] stored under {arch}.attention.first_token_bias

    @property
    def bias_key(self) -> str:
        return FIRST_TOKEN_BIAS_KEY.format(arch=self.arch)

    @property
    def n_attn_ftb(self) -> int:
        return self.hparams.n_layer * self.hparams.n_head


def make_tokenizer(add_bos: bool = True) -> TinyTokenizer:
    """A small SentencePiece vocabulary: <unk>, <s>, </s>, the 256 byte tokens, word pieces and characters."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL]
    scores = [0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(TOKEN_TYPE_BYTE)
        scores.append(0.0)
    # every substring (of 2+ characters) of a word piece is a piece too, so that SentencePiece's bigram merges
    # always reach the whole word
    pieces: list[str] = []
    for word in _WORD_PIECES:
        for n in range(2, len(word) + 1):
            for i in range(len(word) - n + 1):
                sub = word[i : i + n]
                if sub not in pieces:
                    pieces.append(sub)
    pieces += [c for c in ("▁", *_LETTERS) if c not in pieces]
    for rank, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(TOKEN_TYPE_NORMAL)
        # longer pieces score higher; single characters lowest
        scores.append(float(10 * len(piece)) - 0.001 * rank if len(piece) > 1 else -1000.0 - rank)
    return TinyTokenizer(tokens=tokens, scores=scores, token_types=types, add_bos=add_bos)


def _check_biases(
    biases: np.ndarray | Sequence[float] | None, n_layer: int, n_head: int
) -> np.ndarray | None:
    if biases is None:
        return None
    b = np.asarray(biases, dtype=np.float32)
    if b.shape != (n_layer, n_head):
        raise ValueError(f"biases must have shape ({n_layer}, {n_head}), got {b.shape}")
    return b


def _write_gguf(
    path: Path,
    arch: str,
    kv: list[tuple[str, Any, Any, Any]],
    tok: TinyTokenizer,
    weights: Mapping[str, np.ndarray],
    bias_values: np.ndarray | Sequence[float] | None,
    extra_kv: Mapping[str, tuple[Any, Any, Any]] | None,
) -> None:
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"zt-gguf tiny {arch}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, val, vtype, sub in kv:
        w.add_key_value(key.format(arch=arch), val, vtype, sub)

    w.add_tokenizer_model("llama")
    w.add_token_list(tok.tokens)
    w.add_token_scores(tok.scores)
    w.add_token_types(tok.token_types)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_unk_token_id(tok.unk_id)
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(False)

    if bias_values is not None:
        vals = [float(x) for x in np.asarray(bias_values, dtype=np.float32).reshape(-1)]
        w.add_key_value(
            FIRST_TOKEN_BIAS_KEY.format(arch=arch), vals, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32
        )
    for key, (val, vtype, sub) in (extra_kv or {}).items():
        w.add_key_value(key.format(arch=arch), val, vtype, sub)

    for name, t in weights.items():
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _linear(rng: np.random.Generator, n_out: int, n_in: int, gain: float = 1.0) -> np.ndarray:
    """A weight in GGUF layout [n_out, n_in] (ggml ne = {n_in, n_out}), y = W @ x."""
    return (rng.standard_normal((n_out, n_in)) * (gain / math.sqrt(n_in))).astype(np.float32)


def _norm_w(rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
    return (scale * (1.0 + 0.1 * rng.standard_normal(n))).astype(np.float32)


def _shape_kv(hp: TinyHParams) -> list[tuple[str, Any, Any, Any]]:
    """The key/values every tiny model has: sizes, head counts and the norm epsilon."""
    import gguf

    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    return [
        ("{arch}.context_length", hp.n_ctx_train, u32, None),
        ("{arch}.embedding_length", hp.n_embd, u32, None),
        ("{arch}.block_count", hp.n_layer, u32, None),
        ("{arch}.feed_forward_length", hp.n_ff, u32, None),
        ("{arch}.attention.head_count", hp.n_head, u32, None),
        ("{arch}.attention.head_count_kv", hp.n_head_kv, u32, None),
        ("{arch}.attention.key_length", hp.head_dim, u32, None),
        ("{arch}.attention.value_length", hp.head_dim, u32, None),
        ("{arch}.attention.layer_norm_rms_epsilon", hp.rms_eps, f32, None),
    ]


def make_tiny_llama(
    path: str | Path,
    *,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int = 16,
    n_ff: int = 64,
    n_embd: int | None = None,
    n_ctx_train: int = 512,
    seed: int = 0,
    add_bos: bool = True,
    biases: np.ndarray | None = None,
    bias_values: np.ndarray | Sequence[float] | None = None,
    extra_kv: Mapping[str, tuple[Any, Any, Any]] | None = None,
) -> TinyModel:
    """Write a random-weight llama-arch GGUF (all F32) and return its description.

    ``biases`` ([n_layer, n_head]) is stored under ``llama.attention.first_token_bias``. ``bias_values``
    writes the given values under that key without any check (for testing how malformed keys are handled);
    it excludes ``biases``. ``extra_kv`` maps more keys (``{arch}`` is substituted) to (value, GGUFValueType,
    sub-type or None).
    """
    import gguf

    if biases is not None and bias_values is not None:
        raise ValueError("give biases or bias_values, not both")
    path = Path(path)
    n_embd = n_head * head_dim if n_embd is None else n_embd
    b = _check_biases(biases, n_layer, n_head)
    tok = make_tokenizer(add_bos)
    n_vocab = tok.n_vocab
    rng = np.random.default_rng(seed)

    weights: dict[str, np.ndarray] = {}
    weights["token_embd.weight"] = rng.standard_normal((n_vocab, n_embd)).astype(np.float32)
    for il in range(n_layer):
        p = f"blk.{il}."
        weights[p + "attn_norm.weight"] = _norm_w(rng, n_embd)
        # q/k at unit gain: the attention logits are O(1), so attention is far from uniform
        weights[p + "attn_q.weight"] = _linear(rng, n_head * head_dim, n_embd)
        weights[p + "attn_k.weight"] = _linear(rng, n_head_kv * head_dim, n_embd)
        weights[p + "attn_v.weight"] = _linear(rng, n_head_kv * head_dim, n_embd)
        weights[p + "attn_output.weight"] = _linear(rng, n_embd, n_head * head_dim)
        weights[p + "ffn_norm.weight"] = _norm_w(rng, n_embd)
        weights[p + "ffn_gate.weight"] = _linear(rng, n_ff, n_embd)
        weights[p + "ffn_up.weight"] = _linear(rng, n_ff, n_embd)
        weights[p + "ffn_down.weight"] = _linear(rng, n_embd, n_ff, 0.5)
    weights["output_norm.weight"] = _norm_w(rng, n_embd)
    weights["output.weight"] = _linear(rng, n_vocab, n_embd, 2.0)

    hp = TinyHParams(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=n_ff,
        n_vocab=n_vocab,
        n_ctx_train=n_ctx_train,
        rms_eps=1e-5,
        rope_mode="norm",
        rope_base=10000.0,
        swa_layers=[False] * n_layer,
    )
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    kv = _shape_kv(hp) + [
        ("{arch}.rope.dimension_count", head_dim, u32, None),
        ("{arch}.rope.freq_base", hp.rope_base, f32, None),
        ("{arch}.vocab_size", n_vocab, u32, None),
    ]
    _write_gguf(path, "llama", kv, tok, weights, b if bias_values is None else bias_values, extra_kv)
    return TinyModel(path=path, arch="llama", hparams=hp, weights=weights, tokenizer=tok, biases=b)


def _gemma3_weights(
    rng: np.random.Generator,
    n_vocab: int,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    head_dim: int,
    n_ff: int,
) -> dict[str, np.ndarray]:
    """The random tensors of a tiny gemma3 (tied output embedding, Q/K norms, post-attention/FFN norms)."""
    weights: dict[str, np.ndarray] = {}
    # tied output: logits = norm(x) @ E^T; E rows have norm ~1 so the logits stay O(1)
    weights["token_embd.weight"] = (rng.standard_normal((n_vocab, n_embd)) / math.sqrt(n_embd)).astype(
        np.float32
    )
    for il in range(n_layer):
        p = f"blk.{il}."
        weights[p + "attn_norm.weight"] = _norm_w(rng, n_embd)
        weights[p + "attn_q.weight"] = _linear(rng, n_head * head_dim, n_embd)
        weights[p + "attn_k.weight"] = _linear(rng, n_head_kv * head_dim, n_embd)
        weights[p + "attn_v.weight"] = _linear(rng, n_head_kv * head_dim, n_embd)
        weights[p + "attn_output.weight"] = _linear(rng, n_embd, n_head * head_dim)
        # q/k norms well above 1: the logits q.k/sqrt(d) have a spread of a few units
        weights[p + "attn_q_norm.weight"] = _norm_w(rng, head_dim, 2.0)
        weights[p + "attn_k_norm.weight"] = _norm_w(rng, head_dim, 1.0)
        weights[p + "post_attention_norm.weight"] = _norm_w(rng, n_embd)
        weights[p + "ffn_norm.weight"] = _norm_w(rng, n_embd)
        weights[p + "ffn_gate.weight"] = _linear(rng, n_ff, n_embd)
        weights[p + "ffn_up.weight"] = _linear(rng, n_ff, n_embd)
        weights[p + "ffn_down.weight"] = _linear(rng, n_embd, n_ff)
        # a small post-FFN norm keeps the FFN's share small, and so the effect of ggml's FP16 GELU table,
        # where a float32-level difference of the input can flip its fp16 rounding (see reference_logits)
        weights[p + "post_ffw_norm.weight"] = _norm_w(rng, n_embd, 0.1)
    weights["output_norm.weight"] = _norm_w(rng, n_embd, 2.0)
    return weights


def make_tiny_gemma3(
    path: str | Path,
    *,
    n_layer: int = 3,
    n_embd: int = 32,
    n_head: int = 4,
    n_head_kv: int = 1,
    head_dim: int = 16,
    n_ff: int = 64,
    sliding_window: int = 4,
    swa_pattern: int = 2,
    rope_base: float = 1_000_000.0,
    rope_base_swa: float = 10_000.0,
    n_ctx_train: int = 512,
    seed: int = 0,
    add_bos: bool = True,
    biases: np.ndarray | None = None,
    bias_values: np.ndarray | Sequence[float] | None = None,
    extra_kv: Mapping[str, tuple[Any, Any, Any]] | None = None,
) -> TinyModel:
    """Write a random-weight gemma3-arch GGUF (all F32) and return its description.

    Layer il is a sliding-window layer iff ``il % swa_pattern < swa_pattern - 1`` (llama.cpp's
    ``set_swa_pattern``); ``swa_pattern=2`` with 3 layers gives sliding, global, sliding. ``n_embd`` may
    differ from ``n_head*head_dim`` (as in real gemma3 models). See :func:`make_tiny_llama` for the bias
    arguments.
    """
    import gguf

    if biases is not None and bias_values is not None:
        raise ValueError("give biases or bias_values, not both")
    if swa_pattern < 2:
        raise ValueError("swa_pattern must be >= 2 (0 or 1 would make every layer sliding-window)")
    path = Path(path)
    b = _check_biases(biases, n_layer, n_head)
    tok = make_tokenizer(add_bos)
    n_vocab = tok.n_vocab
    weights = _gemma3_weights(
        np.random.default_rng(seed), n_vocab, n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff
    )
    swa_layers = [il % swa_pattern < swa_pattern - 1 for il in range(n_layer)]
    hp = TinyHParams(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=n_ff,
        n_vocab=n_vocab,
        n_ctx_train=n_ctx_train,
        rms_eps=1e-6,
        rope_mode="neox",
        rope_base=rope_base,
        rope_base_swa=rope_base_swa,
        n_swa=sliding_window,
        swa_layers=swa_layers,
        attn_scale=1.0 / math.sqrt(head_dim),
        embd_scale=math.sqrt(n_embd),
        ffn_act="gelu",
        qk_norm=True,
        post_norms=True,
        tied_output=True,
    )
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    kv = _shape_kv(hp) + [
        ("{arch}.rope.freq_base", rope_base, f32, None),
        ("{arch}.rope.freq_base_swa", rope_base_swa, f32, None),
        ("{arch}.attention.sliding_window", sliding_window, u32, None),
        ("{arch}.attention.sliding_window_pattern", swa_pattern, u32, None),
    ]
    _write_gguf(path, "gemma3", kv, tok, weights, b if bias_values is None else bias_values, extra_kv)
    return TinyModel(path=path, arch="gemma3", hparams=hp, weights=weights, tokenizer=tok, biases=b)


# ------------------------------------------------------------------------------------------------------------
# reference forward pass (float64)


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(np.float64)


def _rope(x: np.ndarray, pos: np.ndarray, base: float, mode: str) -> np.ndarray:
    """x: [T, H, d]. Pair i (0 <= i < d/2) is rotated by pos * base**(-2i/d)."""
    d = x.shape[-1]
    inv_freq = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
    ang = pos.astype(np.float64)[:, None] * inv_freq[None, :]  # [T, d/2]
    cos = np.cos(ang)[:, None, :]
    sin = np.sin(ang)[:, None, :]
    if mode == "norm":
        x0, x1 = x[..., 0::2], x[..., 1::2]
    elif mode == "neox":
        x0, x1 = x[..., : d // 2], x[..., d // 2 :]
    else:
        raise ValueError(f"unknown rope mode {mode!r}")
    r0 = x0 * cos - x1 * sin
    r1 = x0 * sin + x1 * cos
    out = np.empty_like(x)
    if mode == "norm":
        out[..., 0::2], out[..., 1::2] = r0, r1
    else:
        out[..., : d // 2], out[..., d // 2 :] = r0, r1
    return out


def gelu_ggml(x: np.ndarray) -> np.ndarray:
    """ggml's CPU GELU (tanh approximation through an FP16 lookup table, identity/zero beyond +-10)."""
    x32 = np.asarray(x, dtype=np.float32)
    h = x32.astype(np.float16).astype(np.float32)
    c = np.float32(0.79788456080286535587989211986876)
    a = np.float32(0.044715)
    g = (np.float32(0.5) * h * (np.float32(1.0) + np.tanh(c * h * (np.float32(1.0) + a * h * h)))).astype(
        np.float16
    )
    y = g.astype(np.float64)
    y = np.where(x32 <= -10.0, 0.0, y)
    y = np.where(x32 >= 10.0, np.asarray(x, dtype=np.float64), y)
    return y


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to float16 (through float32, as ggml converts)."""
    return x.astype(np.float32).astype(np.float16).astype(np.float64)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in float64 (the reference the tests compare log-probabilities with)."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _attention_heads(
    hp: TinyHParams,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    visible: np.ndarray,
    kq_scale: float,
    bias: np.ndarray | None,
) -> np.ndarray:
    """Softmax attention of every query head [T, n_head, head_dim] (GQA: query head hq reads K/V head
    hq // (n_head / n_head_kv)); bias [n_head] is added to the logit of the key at position 0."""
    T = q.shape[0]
    group = hp.n_head // hp.n_head_kv
    out = np.empty((T, hp.n_head, hp.head_dim))
    for hq in range(hp.n_head):
        hk = hq // group
        s = (q[:, hq, :] @ k[:, hk, :].T) * kq_scale  # [T, T]
        if hp.attn_logit_softcap:
            s = hp.attn_logit_softcap * np.tanh(s / hp.attn_logit_softcap)
        if bias is not None:
            s[:, 0] += bias[hq]  # the key at position 0 (masked below where invisible)
        s = np.where(visible, s, -np.inf)
        s = s - s.max(axis=1, keepdims=True)
        e = np.exp(s)
        prob = e / e.sum(axis=1, keepdims=True)
        out[:, hq, :] = prob @ v[:, hk, :]
    return out


def _ffn(hp: TinyHParams, W: Mapping[str, np.ndarray], p: str, x: np.ndarray) -> np.ndarray:
    """The FFN block of layer prefix p on the residual x (its norm, gated activation, post-norm)."""
    h = _rms_norm(x, W[p + "ffn_norm.weight"], hp.rms_eps)
    gate = h @ W[p + "ffn_gate.weight"].T
    up = h @ W[p + "ffn_up.weight"].T
    if hp.ffn_act == "silu":
        act = _silu(gate) * up
    elif hp.ffn_act == "gelu":
        act = gelu_ggml(gate) * up
    else:
        raise ValueError(f"unknown ffn_act {hp.ffn_act!r}")
    ffn = act @ W[p + "ffn_down.weight"].T
    if hp.post_norms:
        ffn = _rms_norm(ffn, W[p + "post_ffw_norm.weight"], hp.rms_eps)
    return ffn


def reference_logits(
    model: TinyModel,
    tokens: Sequence[int],
    biases: np.ndarray | None,
    *,
    kv_f16: bool = False,
    q_f16: bool = False,
) -> np.ndarray:
    """Logits [n_tokens, n_vocab] (float64) of one sequence at positions 0..n_tokens-1.

    ``biases`` [n_layer, n_head] is the first-token bias (None: off). It is added to the logit of key
    position 0 for every query row where that key is visible (not outside the sliding window).

    ``kv_f16`` rounds K and V to fp16 as llama.cpp's flash attention does (it casts the KV cache to F16);
    ``q_f16`` rounds Q too (its CPU kernel for fewer than 64 query rows does).

    Expected agreement with llama.cpp on the CPU (F32 KV cache, no flash attention): ~1e-5 on logits of
    magnitude ~8 for llama. For gemma3 the GELU goes through ggml's FP16 table: a float32-level difference of
    its input flips the fp16 rounding of about 1 input in 1000, which moves some logits by up to a few 1e-4.
    """
    hp = model.hparams
    W = {k: v.astype(np.float64) for k, v in model.weights.items()}
    toks = np.asarray(list(tokens), dtype=np.int64)
    T = len(toks)
    if T == 0:
        raise ValueError("no tokens")
    if toks.min() < 0 or toks.max() >= hp.n_vocab:
        raise ValueError("token id out of range")
    b = None if biases is None else np.asarray(biases, dtype=np.float64).reshape(hp.n_layer, hp.n_head)

    pos = np.arange(T)

    x = W["token_embd.weight"][toks] * hp.embd_scale
    for il in range(hp.n_layer):
        p = f"blk.{il}."
        swa = bool(hp.swa_layers[il]) if hp.swa_layers else False

        h = _rms_norm(x, W[p + "attn_norm.weight"], hp.rms_eps)
        q = (h @ W[p + "attn_q.weight"].T).reshape(T, hp.n_head, hp.head_dim)
        k = (h @ W[p + "attn_k.weight"].T).reshape(T, hp.n_head_kv, hp.head_dim)
        v = (h @ W[p + "attn_v.weight"].T).reshape(T, hp.n_head_kv, hp.head_dim)
        if hp.qk_norm:
            q = _rms_norm(q, W[p + "attn_q_norm.weight"], hp.rms_eps)
            k = _rms_norm(k, W[p + "attn_k_norm.weight"], hp.rms_eps)
        base = hp.rope_base_swa if swa else hp.rope_base
        q = _rope(q, pos, base, hp.rope_mode)
        k = _rope(k, pos, base, hp.rope_mode)
        if kv_f16:
            k = _f16(k)
            v = _f16(v)

        if hp.attn_scale:
            q = q * hp.attn_scale
            kq_scale = 1.0
        else:
            kq_scale = 1.0 / math.sqrt(hp.head_dim)
        if q_f16:
            q = _f16(q)

        # visible[i, j]: query at position i sees key at position j
        visible = pos[None, :] <= pos[:, None]
        if swa and hp.n_swa > 0:
            visible &= (pos[:, None] - pos[None, :]) < hp.n_swa

        out = _attention_heads(hp, q, k, v, visible, kq_scale, None if b is None else b[il])
        attn = out.reshape(T, hp.n_head * hp.head_dim) @ W[p + "attn_output.weight"].T
        if hp.post_norms:
            attn = _rms_norm(attn, W[p + "post_attention_norm.weight"], hp.rms_eps)
        x = x + attn

        x = x + _ffn(hp, W, p, x)

    x = _rms_norm(x, W["output_norm.weight"], hp.rms_eps)
    out_w = W["token_embd.weight"] if hp.tied_output else W["output.weight"]
    logits = x @ out_w.T
    if hp.final_logit_softcap:
        logits = hp.final_logit_softcap * np.tanh(logits / hp.final_logit_softcap)
    return logits


def write_tiny_task(path: str | Path, n: int, *, seed: int = 0, balanced: bool = False) -> Path:
    """A JSONL task of n items whose prompts use the tiny vocabulary's words, choices " cat" / " dog"."""
    words = [w.lstrip("▁") for w in _WORD_PIECES]
    rng = np.random.default_rng(seed)
    path = Path(path)
    with path.open("w") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(words, size=int(rng.integers(3, 8)))) + " is"
            answer = i % 2 if balanced else int(rng.integers(2))
            item = {"prompt": prompt, "choices": [" cat", " dog"], "answer": answer, "id": f"t{i}"}
            f.write(json.dumps(item) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------------
# llama-server: start, stop, and a load client

SERVER_TIE = 1e-3  # a greedy choice between two tokens closer than this may flip under another batch shape
_PROMPT_WORDS = tuple(w.lstrip("▁") for w in _WORD_PIECES if w.startswith("▁"))


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Response:
    ok: bool
    status: int
    tokens: list[int] | list[str] = field(default_factory=list)  # ids, or pieces where only those are given
    logprobs: list[float] = field(default_factory=list)  # of the chosen tokens
    gaps: list[float] = field(default_factory=list)  # top-1 minus top-2 log-probability per step
    text: str = ""
    error: str = ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 120.0) -> tuple[int, Any]:
    """POST body as JSON (GET without one): the status and the decoded JSON reply (None on an HTTP error)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


def start_server(
    model: Path,
    *extra: str,
    threads: int = 2,
    slots: int = 4,
    ctx: int = 2048,
    log_dir: Path,
    startup_timeout: float = 180.0,
) -> Server:
    """llama-server of our tree on a free loopback port, healthy (or RuntimeError with its log)."""
    from .tools import tool_path

    for _ in range(3):  # a port taken between free_port() and the bind: try another
        port = free_port()
        log = log_dir / f"server-{port}.log"
        args = [
            str(tool_path("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(slots), "-c", str(ctx), "-t", str(threads), "-tb", str(threads), "-fa", "off",
            "--no-webui", *extra,
        ]  # fmt: skip
        with open(log, "wb") as f:
            proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if http(url + "/health", timeout=2)[0] == 200:
                    return Server(url, proc, log)
            except OSError:
                pass
            time.sleep(0.1)
        if proc.poll() is None:
            stop_server(Server(url, proc, log))
            break
    raise RuntimeError(f"llama-server did not start:\n{log.read_text(errors='replace')[-3000:]}")


def stop_server(server: Server) -> int:
    """SIGTERM (then SIGKILL after 20 s); the exit code."""
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
    return int(proc.returncode)


class RssPeak:
    """The peak resident set size of a process (KiB), sampled every 50 ms by a thread inside the with-block;
    it starts at `start`."""

    def __init__(self, pid: int, start: int) -> None:
        self.pid, self.peak = pid, start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except (OSError, RuntimeError):
                return

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS of /proc/PID/status), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def complete(server: Server, prompt: str, n_predict: int, timeout: float = 300.0) -> Response:
    """A greedy completion (llama-server's /completion): the generated token ids, and the log-probability and
    top-2 gap of each when the server gives them (it leaves them out for a token that ends inside a UTF-8
    character)."""
    body = {
        "prompt": prompt,
        "n_predict": n_predict,
        "temperature": 0,
        "n_probs": 2,
        "return_tokens": True,
        "seed": 1,
        "ignore_eos": True,
    }
    try:
        status, res = http(server.url + "/completion", body, timeout=timeout)
    except OSError as e:
        return Response(False, 0, error=f"{type(e).__name__}: {e}")
    return completion_response(status, res)


def completion_response(status: int, res: Any) -> Response:
    """A /completion answer (with "return_tokens" and "n_probs" >= 2) as a Response."""
    if status != 200 or not isinstance(res, dict):
        return Response(False, status, error=f"HTTP {status}")
    try:
        tokens = [int(t) for t in res["tokens"]]
        steps = res.get("completion_probabilities") or []
        logprobs: list[float] = []
        gaps: list[float] = []
        if len(steps) == len(tokens) and all(int(s["id"]) == t for s, t in zip(steps, tokens)):
            for s in steps:
                logprobs.append(float(s["logprob"]))
                gaps.append(top2_gap(float(t["logprob"]) for t in s["top_logprobs"]))
        return Response(True, status, tokens, logprobs, gaps, str(res.get("content", "")))
    except (KeyError, IndexError, TypeError, ValueError) as e:
        return Response(False, status, error=f"unexpected response ({type(e).__name__}: {e})")


def top2_gap(logprobs: Iterable[float]) -> float:
    """The most likely log-probability minus the second (inf when there is one)."""
    top = sorted(logprobs, reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def compare_responses(
    got: Response, ref: Response, atol: float, tie: float = SERVER_TIE
) -> tuple[str, float]:
    """("equal", "tie" (a divergence where the reference's top-2 gap is below `tie`) or what differs; the
    largest log-probability difference over the tokens both have)."""
    if not got.ok:
        return f"error: {got.error}", 0.0
    probs = len(got.logprobs) == len(got.tokens) and len(ref.logprobs) == len(ref.tokens)
    worst = 0.0
    for k, (a, b) in enumerate(zip(got.tokens, ref.tokens)):
        if a != b:
            gap = ref.gaps[k] if k < len(ref.gaps) else float("inf")
            return ("tie" if gap < tie else f"token {k}: {a} != {b} (gap {gap:.4f})"), worst
        if probs:
            worst = max(worst, abs(got.logprobs[k] - ref.logprobs[k]))
            if worst > atol:
                return f"log-probability {k}: {got.logprobs[k]} vs {ref.logprobs[k]}", worst
    if len(got.tokens) != len(ref.tokens):
        return f"{len(got.tokens)} tokens, alone {len(ref.tokens)}", worst
    return "equal", worst


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts of 3-14 words (a third share a prefix, so that slots reuse cached prefixes)."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        p = ("the cat sat " if len(out) % 3 == 0 else "") + " ".join(
            rng.choice(_PROMPT_WORDS, int(rng.integers(3, 12)))
        )
        if p not in out:
            out.append(p)
    return out


def run_load(
    server: Server,
    prompts: Sequence[str],
    n_requests: int,
    concurrency: int,
    n_predict: int,
    *,
    atol: float,
) -> dict[str, Any]:
    """The single-sequence results, then n_requests concurrent ones (prompts round-robin); the figures."""
    complete(server, prompts[0], n_predict)  # warm-up
    alone = {p: complete(server, p, n_predict) for p in prompts}
    bad_alone = [p for p, r in alone.items() if not r.ok]
    if bad_alone:
        raise RuntimeError(f"{len(bad_alone)} requests failed alone: {alone[bad_alone[0]].error}")
    # a first concurrent burst, so that the slots' buffers exist before RSS is sampled
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        warm = list(pool.map(lambda p: complete(server, p, n_predict), list(prompts)[: 2 * concurrency]))
    if not all(r.ok for r in warm):
        raise RuntimeError(f"the warm-up burst failed: {next(r.error for r in warm if not r.ok)}")
    pid = server.proc.pid
    rss_before = rss_kib(pid)
    order = [prompts[i % len(prompts)] for i in range(n_requests)]
    t0 = time.monotonic()
    with RssPeak(pid, rss_before) as peak, ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda p: complete(server, p, n_predict), order))
    seconds = time.monotonic() - t0
    rss_after = rss_kib(pid)
    compared = [compare_responses(r, alone[p], atol) for p, r in zip(order, results)]
    verdicts = [v for v, _ in compared]
    errors = [r.error for r in results if not r.ok]
    mismatches = [v for v in verdicts if v not in ("equal", "tie") and not v.startswith("error")]
    return {
        "requests": n_requests,
        "distinct_prompts": len(prompts),
        "concurrency": concurrency,
        "n_predict": n_predict,
        "seconds": seconds,
        "requests_per_s": n_requests / seconds,
        "errors": len(errors),
        "first_errors": errors[:3],
        "equal": verdicts.count("equal"),
        "ties": verdicts.count("tie"),
        "mismatches": len(mismatches),
        "max_logprob_diff": max(d for _, d in compared),
        "atol": atol,
        "first_mismatches": mismatches[:3],
        "rss_kib_before": rss_before,
        "rss_kib_after": rss_after,
        "rss_kib_peak": peak.peak,
        "alone": {p: {"tokens": r.tokens, "logprobs": r.logprobs} for p, r in alone.items()},
    }
