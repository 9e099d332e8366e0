#!/usr/bin/env python3
"""An independent PyTorch + transformers reference of ZeroTuning, for checking zt-gguf against.

    python benchmarks/zt_reference.py MODEL.gguf [--f32-copy OUT.gguf] [--prompt TEXT] [--gamma 2.0]

(prints the top next tokens with and without gamma on every head; --f32-copy only writes the F32 copy.)

What it implements (shared/design/zerotuning-method.md, sections 1-2). The paper's code multiplies column 0 of
the post-softmax attention by gamma and renormalises each row; that is exactly adding ln(gamma) to the
pre-softmax logit of key position 0. Here the bias is applied in a custom attention function registered with
transformers' ``AttentionInterface`` (name ``"zt_eager"``): the eager attention of transformers' Llama with
``s[..., 0] += ln(gamma)[layer, head]`` after the scale and the mask, for every query row, with the heads
indexed as QUERY heads (after ``repeat_kv``: query head h reads KV head h // (n_head / n_head_kv), as in
llama.cpp). ``mode="post_softmax"`` applies the paper's own form instead (multiply column 0 by gamma,
renormalise), to check the equivalence. ``f16=True`` rounds Q, K, V and the attention probabilities to fp16,
which is what llama.cpp's CPU attention does with its default F16 KV cache (the F16 K/V operand makes ggml
convert the other operand of each attention matmul to F16); it explains the engine's residual difference.

Weights come from a GGUF: ``loader="gguf"`` (default) builds a LlamaConfig from the GGUF metadata and reads
the tensors itself (dequantized with ``gguf.quants.dequantize`` into float32, Q and K rows un-permuted from
llama.cpp's interleaved-RoPE order to HF's half-split order); ``loader="transformers"`` uses
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (needs ``accelerate``). Both give identical
weights (checked by bench_fidelity.py). Token ids come from llama.cpp's tokenizer (zt_gguf.engine.Model), so
both sides see the same ids; :class:`TableVocab` carries them into processes that must not load llama.cpp.

Scoring (:meth:`Reference.score_items`) is the paper code's way: one item at a time, batch 1, a full forward
of the prompt (its last logits give the entropies and the greedy first token) and a full forward of each
prompt+choice (no prefix sharing, no KV cache); it returns :class:`RefScores`, which has the fields and the
semantics of zt_gguf.engine.Scores (so zt_gguf.metrics reads both) without importing llama.cpp.
:func:`paper_search` is a plain re-implementation of the paper's calibration (every candidate on every item).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize

ATTN_IMPL = "zt_eager"

# GGUF tensor name (blk.N. prefix removed) -> HF LlamaForCausalLM parameter name (layer prefix added)
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# ------------------------------------------------------------------------------------------------------------
# GGUF: an F32 copy, metadata, tensors


def _np_shape(tensor: Any) -> tuple[int, ...]:
    """The numpy (row-major) shape of a GGUF tensor: its ggml ne reversed."""
    return tuple(int(x) for x in reversed(tensor.shape.tolist()))


def write_f32_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write dst: src with every tensor dequantized to F32 (gguf.quants.dequantize), the same metadata.

    Every key/value is copied (general.file_type becomes ALL_F32), tensors keep their names, shapes and order.
    llama.cpp then computes on exactly the weights that the PyTorch reference dequantizes from src. dst is
    written to a temporary file first and moved into place.
    """
    return _rewrite(src, dst, None)


def write_requantized_copy(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], qtype: GGMLQuantizationType
) -> Path:
    """Write dst: src's weights dequantized, then every 2-D tensor quantized to qtype (gguf.quants.quantize;
    Q8_0, Q4_0, Q4_1, Q5_0, ...), the other tensors F32; the same metadata otherwise. A diagnostic: the
    engine's speed on a quantization type other than src's, from (nearly) the same weights."""
    return _rewrite(src, dst, qtype)


_FILE_TYPE = {
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    GGMLQuantizationType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    GGMLQuantizationType.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    GGMLQuantizationType.Q5_1: LlamaFileType.MOSTLY_Q5_1,
}


def _rewrite(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], qtype: GGMLQuantizationType | None
) -> Path:
    src, dst = Path(src), Path(dst)
    reader = GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    block = GGML_QUANT_SIZES[qtype][0] if qtype is not None else 1
    file_type = LlamaFileType.ALL_F32 if qtype is None else _FILE_TYPE.get(qtype, LlamaFileType.GUESSED)

    def target(t: Any) -> GGMLQuantizationType:
        shape = _np_shape(t)
        if qtype is not None and len(shape) == 2 and shape[-1] % block == 0:
            return qtype
        return GGMLQuantizationType.F32

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dst.name + ".", suffix=".part", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(tmp, arch)
        for f in reader.fields.values():
            if f.name == "general.architecture" or f.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            vtype = f.types[0]
            if f.name == "general.file_type":
                writer.add_key_value(f.name, int(file_type), GGUFValueType.UINT32)
                continue
            if f.name == "general.alignment":
                writer.data_alignment = int(f.contents())
            sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
        for t in reader.tensors:
            shape, tt = _np_shape(t), target(t)
            n = int(np.prod(shape))
            if tt == GGMLQuantizationType.F32:
                writer.add_tensor_info(t.name, shape, np.dtype(np.float32), 4 * n, tt)
            else:
                bsize, tsize = GGML_QUANT_SIZES[tt]
                byte_shape = (*shape[:-1], shape[-1] // bsize * tsize)
                writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), n // bsize * tsize, tt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            data = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            data = data.reshape(_np_shape(t))
            tt = target(t)
            writer.write_tensor_data(data if tt == GGMLQuantizationType.F32 else quantize(data, tt))
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


@dataclass
class GGUFLlama:
    """The hyperparameters of a llama-arch GGUF and where its tensors are."""

    path: Path
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    rope_theta: float
    rms_eps: float
    bos: int | None
    eos: int | None
    tensors: dict[str, Any] = field(repr=False, default_factory=dict)  # name -> gguf ReaderTensor

    @property
    def tied(self) -> bool:
        return "output.weight" not in self.tensors


def read_gguf_llama(path: str | os.PathLike[str]) -> GGUFLlama:
    """Hyperparameters from the GGUF metadata; only plain llama (no RoPE scaling) is supported."""
    path = Path(path)
    r = GGUFReader(path)

    def get(key: str, default: Any = None) -> Any:
        f = r.fields.get(key)
        return default if f is None else f.contents()

    arch = get("general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"{path}: architecture {arch!r}; the reference implements llama only")
    if get("llama.rope.scaling.type") not in (None, "none") or any(
        t.name == "rope_freqs.weight" for t in r.tensors
    ):
        raise NotImplementedError(f"{path}: RoPE scaling is not implemented by the reference")
    n_embd = int(get("llama.embedding_length"))
    n_head = int(get("llama.attention.head_count"))
    tokens = r.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens.data) if tokens is not None else int(get("llama.vocab_size"))
    return GGUFLlama(
        path=path,
        n_layer=int(get("llama.block_count")),
        n_embd=n_embd,
        n_ff=int(get("llama.feed_forward_length")),
        n_head=n_head,
        n_head_kv=int(get("llama.attention.head_count_kv", n_head)),
        head_dim=int(get("llama.attention.key_length", n_embd // n_head)),
        n_vocab=n_vocab,
        n_ctx_train=int(get("llama.context_length", 2048)),
        rope_theta=float(get("llama.rope.freq_base", 10000.0)),
        rms_eps=float(get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        bos=get("tokenizer.ggml.bos_token_id"),
        eos=get("tokenizer.ggml.eos_token_id"),
        tensors={t.name: t for t in r.tensors},
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert permutation of q_proj/k_proj rows (interleaved RoPE pairs -> HF half split).

    The converter stores row (h, j, i) of HF (head h, half j, index i) at (h, i, j); this is its inverse.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_tensor(f: Any, t: Any) -> np.ndarray:
    """A tensor as float32 in numpy layout, read with file reads (no memory map kept resident)."""
    shape = _np_shape(t)
    if t.tensor_type == GGMLQuantizationType.F32:
        out = np.empty(shape, dtype=np.float32)
        f.seek(int(t.data_offset))
        f.readinto(memoryview(out).cast("B"))
        return out
    f.seek(int(t.data_offset))
    raw = np.frombuffer(f.read(int(t.n_bytes)), dtype=t.data.dtype).reshape(t.data.shape)
    return np.ascontiguousarray(dequantize(raw, t.tensor_type), dtype=np.float32).reshape(shape)


# ------------------------------------------------------------------------------------------------------------
# the attention patch


def _register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTN_IMPL, zt_attention)
    AttentionMaskInterface.register(ATTN_IMPL, eager_mask)


def zt_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """transformers' eager attention plus this layer's first-token bias (module.zt_bias: [n_head] ln gamma).

    module.zt_mode: "logit" (add ln gamma to the logit of key 0 after scale and mask) or "post_softmax" (the
    paper's code: multiply the probability of key 0 by gamma and renormalise the row). module.zt_f16: round
    Q, K, V and the probabilities to fp16 (llama.cpp's CPU attention with an F16 KV cache).
    """
    import torch

    n_rep = query.shape[1] // key.shape[1]
    f16 = bool(getattr(module, "zt_f16", False))
    if f16:
        query, key, value = (x.to(torch.float16).to(torch.float32) for x in (query, key, value))
    # repeat_kv: query head h reads KV head h // n_rep
    key_states = key.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key
    value_states = value.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value

    s = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    q_len, k_len = s.shape[-2], s.shape[-1]
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :k_len]
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    else:  # causal, the queries being the last q_len positions
        i = torch.arange(q_len).unsqueeze(1) + (k_len - q_len)
        j = torch.arange(k_len).unsqueeze(0)
        s = s.masked_fill(j > i, float("-inf"))

    bias = getattr(module, "zt_bias", None)
    mode = getattr(module, "zt_mode", "logit")
    if bias is not None and mode == "logit":
        s = s.clone()
        s[..., 0] = s[..., 0] + bias.view(1, -1, 1).to(s.dtype)
    p = torch.softmax(s, dim=-1, dtype=torch.float32)
    if bias is not None and mode == "post_softmax":
        gamma = torch.exp(bias.to(torch.float32)).view(1, -1, 1)
        p = p.clone()
        p[..., 0] = p[..., 0] * gamma
        p = p / p.sum(dim=-1, keepdim=True)
    elif bias is not None and mode != "logit":
        raise ValueError(f"unknown zt_mode {mode!r}")
    if f16:
        p = p.to(torch.float16).to(torch.float32)
    p = p.to(query.dtype)
    out = torch.matmul(p, value_states).transpose(1, 2).contiguous()
    return out, p


def set_bias(model: Any, bias: np.ndarray | None, *, mode: str = "logit", f16: bool = False) -> None:
    """Set the first-token biases ([n_layer, n_head] ln gamma, None: off) on every attention module."""
    import torch

    layers = model.model.layers
    n_head = model.config.num_attention_heads
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float32)
        if bias.shape != (len(layers), n_head):
            raise ValueError(f"bias has shape {bias.shape}, the model needs {(len(layers), n_head)}")
        if not np.all(np.isfinite(bias)):
            raise ValueError("bias has a non-finite value")
    for il, layer in enumerate(layers):
        attn = layer.self_attn
        attn.zt_bias = None if bias is None or not np.any(bias[il]) else torch.from_numpy(bias[il].copy())
        attn.zt_mode = mode
        attn.zt_f16 = f16


def _q8_blocks(x: Any) -> Any:
    """x rounded as ggml quantizes activations to Q8_0/Q8_1: blocks of 32, d = amax/127 stored in fp16."""
    import torch

    b = x.reshape(-1, 32)
    d = b.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(b * inv) * d.to(torch.float16).to(torch.float32)).reshape(x.shape)


def set_activation_q8(model: Any, on: bool) -> None:
    """Quantize the input of every Linear layer like llama.cpp's quantized matmuls do (Q8 per 32 values).

    llama.cpp multiplies a Q4_1 (Q8_0) weight by activations quantized to Q8_1 (Q8_0). This gives the size of
    that noise; it cannot follow llama.cpp bit for bit (its dot products round differently).
    """
    import torch

    for h in getattr(model, "_zt_q8_hooks", []):
        h.remove()
    model._zt_q8_hooks = []
    if on:
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.in_features % 32 == 0:
                model._zt_q8_hooks.append(mod.register_forward_pre_hook(lambda m, a: (_q8_blocks(a[0]),)))


# ------------------------------------------------------------------------------------------------------------
# loading


def _no_init() -> Any:
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5

        return no_init_weights()
    except ImportError:
        return nullcontext()


def load_model(gguf_path: str | os.PathLike[str], *, loader: str = "gguf") -> Any:
    """A float32 LlamaForCausalLM with the GGUF's (dequantized) weights, attention = zt_attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _register_attention()
    path = Path(gguf_path)
    if loader == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation=ATTN_IMPL
        )
    elif loader == "gguf":
        g = read_gguf_llama(path)
        config = LlamaConfig(
            vocab_size=g.n_vocab,
            hidden_size=g.n_embd,
            intermediate_size=g.n_ff,
            num_hidden_layers=g.n_layer,
            num_attention_heads=g.n_head,
            num_key_value_heads=g.n_head_kv,
            head_dim=g.head_dim,
            max_position_embeddings=g.n_ctx_train,
            rms_norm_eps=g.rms_eps,
            rope_theta=g.rope_theta,
            tie_word_embeddings=g.tied,
            bos_token_id=g.bos,
            eos_token_id=g.eos,
            attention_bias=False,
            mlp_bias=False,
            attn_implementation=ATTN_IMPL,
        )
        with _no_init():
            model = LlamaForCausalLM(config)
        model = model.to(torch.float32)
        if g.tied:  # one tensor for the embedding and the output, as transformers' own loading does
            model.lm_head.weight = model.model.embed_tokens.weight
        params = dict(model.named_parameters(remove_duplicate=False))
        seen: set[str] = set()
        with open(path, "rb") as f:
            for name, t in g.tensors.items():
                if name.startswith("blk."):
                    _, il, rest = name.split(".", 2)
                    hf = f"model.layers.{il}.{_LAYER_TENSORS[rest]}"
                else:
                    hf = _GLOBAL_TENSORS[name]
                arr = _read_tensor(f, t)
                if name.endswith("attn_q.weight"):
                    arr = unpermute_qk(arr, g.n_head)
                elif name.endswith("attn_k.weight"):
                    arr = unpermute_qk(arr, g.n_head_kv)
                p = params[hf]
                if tuple(p.shape) != arr.shape:
                    raise ValueError(f"{path}: {name} has shape {arr.shape}, {hf} needs {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(torch.from_numpy(arr))
                seen.add(hf)
        missing = {n for n in params if n not in seen and not (g.tied and n == "lm_head.weight")}
        if missing:
            raise ValueError(f"{path}: no tensor for {sorted(missing)[:5]}")
    else:
        raise ValueError(f"unknown loader {loader!r} (gguf | transformers)")
    model.set_attn_implementation(ATTN_IMPL)
    model.eval()
    set_bias(model, None)
    return model


# ------------------------------------------------------------------------------------------------------------
# token ids


class Vocab(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def piece(self, token: int) -> str: ...


class LlamaCppVocab:
    """llama.cpp's tokenizer of the GGUF (zt_gguf.engine.Model): the ids the engine itself scores."""

    def __init__(self, gguf_path: str | os.PathLike[str]):
        from zt_gguf.engine import Model

        self._m = Model(gguf_path)
        self.n_vocab = self._m.n_vocab

    def encode(self, text: str) -> list[int]:
        return list(self._m.tokenize(text))  # the model's BOS rule, special tokens parsed, as the engine

    def piece(self, token: int) -> str:
        return self._m.detokenize([int(token)])

    def table(self, texts: Sequence[str]) -> TableVocab:
        """The encodings of texts and every token's piece, for a process that should not load llama.cpp."""
        return TableVocab({t: self.encode(t) for t in texts}, [self.piece(i) for i in range(self.n_vocab)])


@dataclass
class TableVocab:
    """Pre-computed token ids (text -> ids) and pieces (id -> text)."""

    encodings: dict[str, list[int]]
    pieces: list[str]

    def encode(self, text: str) -> list[int]:
        try:
            return self.encodings[text]
        except KeyError:
            raise KeyError(f"text not pre-tokenized: {text[:60]!r}") from None

    def piece(self, token: int) -> str:
        return self.pieces[int(token)]

    def to_dict(self) -> dict[str, Any]:
        return {"encodings": self.encodings, "pieces": self.pieces}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableVocab:
        return cls({k: list(v) for k, v in d["encodings"].items()}, list(d["pieces"]))


# ------------------------------------------------------------------------------------------------------------
# the reference


@dataclass
class RefScores:
    """The fields of zt_gguf.engine.Scores, same meaning (choice log-likelihoods after the branch point, the
    full-vocabulary and choices' entropies after the prompt, the greedy continuation)."""

    choice_logprob: np.ndarray
    choice_n_tokens: np.ndarray
    choice_first_logprob: np.ndarray
    entropy_full: float
    entropy_choices: float
    gen_text: str
    gen_tokens: list[int] = field(default_factory=list)
    n_prompt_tokens: int = 0


def _stats(x: np.ndarray) -> tuple[float, float, int]:
    """(log-sum-exp, entropy in nats, argmax) of logits, in float64 as the engine computes them."""
    x = np.asarray(x, dtype=np.float64)
    am = int(np.argmax(x))
    z = x - x[am]
    e = np.exp(z)
    s = float(e.sum())
    return float(x[am] + math.log(s)), float(math.log(s) - float((e * z).sum()) / s), am


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    i = 0
    while i < len(a) and i < len(b) and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Reference:
    """The reference model and its token ids; unpacks as (model, vocab)."""

    model: Any
    vocab: Vocab
    mode: str = "logit"  # or "post_softmax" (the paper code's form)
    f16: bool = False  # round Q, K, V and probabilities to fp16 (llama.cpp with an F16 KV cache)
    n_forwards: int = 0
    n_forward_tokens: int = 0

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.vocab))

    @property
    def bias_shape(self) -> tuple[int, int]:
        return (self.model.config.num_hidden_layers, self.model.config.num_attention_heads)

    def _forward(self, tokens: Sequence[int], bias: np.ndarray | None, keep: int) -> np.ndarray:
        """Logits of the last `keep` positions (float32 [keep, n_vocab]) of one full forward, batch 1."""
        import torch

        set_bias(self.model, bias, mode=self.mode, f16=self.f16)
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=False, logits_to_keep=keep)
        self.n_forwards += 1
        self.n_forward_tokens += len(tokens)
        return out.logits[0].float().numpy()

    def last_logits(self, tokens: Sequence[int], bias: np.ndarray | None = None) -> np.ndarray:
        """Logits (float32 [n_vocab]) after the last token; bias [n_layer, n_head] ln gamma (None: off)."""
        return self._forward(tokens, bias, 1)[-1]

    def score_items(
        self, items: Sequence[Any], bias: np.ndarray | None = None, *, n_gen: int = 1, choices: bool = True
    ) -> list[RefScores]:
        """Scores of each item (prompt, choices), the paper code's way (see the module doc).

        choices=False skips the prompt+choice forwards (their log-likelihoods are then 0): the work of the
        paper's own evaluation, which only generates.
        """
        out = []
        for item in items:
            prompt = self.vocab.encode(item.prompt)
            whole = [self.vocab.encode(item.prompt + c) for c in item.choices]
            branch = min([len(prompt)] + [_common_prefix(prompt, w) for w in whole])
            if branch == 0 or any(len(w) <= branch for w in whole):
                raise ValueError(f"item {item.id}: a choice adds no token to the prompt or shares none")

            # the prompt: entropies and the greedy continuation (each new token: a full forward again)
            x = self.last_logits(prompt, bias)
            _, entropy_full, am = _stats(x)
            firsts = sorted(
                {w[len(prompt)] for w in whole if len(w) > len(prompt) and w[: len(prompt)] == prompt}
            )
            entropy_choices = _stats(x[firsts])[1] if len(firsts) > 1 else 0.0
            gen_tokens, gen_text = [am], ""
            while True:
                gen_text += self.vocab.piece(gen_tokens[-1])
                if len(gen_tokens) >= n_gen:
                    break
                gen_tokens.append(int(np.argmax(self.last_logits(prompt + gen_tokens, bias))))

            # each prompt+choice: a full forward; log p of the choice's tokens after the branch point
            lp = np.zeros(len(whole))
            first = np.zeros(len(whole))
            for c, w in enumerate(whole if choices else []):
                logits = self._forward(w, bias, len(w) - branch + 1)[:-1]  # positions branch-1 .. len-2
                for j in range(len(w) - branch):
                    lse = _stats(logits[j])[0]
                    v = float(logits[j][w[branch + j]]) - lse
                    lp[c] += v
                    if j == 0:
                        first[c] = v
            out.append(
                RefScores(
                    choice_logprob=lp,
                    choice_n_tokens=np.array([len(w) - branch for w in whole], dtype=np.int32),
                    choice_first_logprob=first,
                    entropy_full=entropy_full,
                    entropy_choices=entropy_choices,
                    gen_text=gen_text,
                    gen_tokens=gen_tokens,
                    n_prompt_tokens=len(prompt),
                )
            )
        return out


def load_reference(
    gguf_path: str | os.PathLike[str],
    *,
    vocab: Vocab | None = None,
    loader: str = "gguf",
    n_threads: int | None = 2,
) -> Reference:
    """The reference of a llama GGUF (weights dequantized to float32); vocab None: llama.cpp's tokenizer."""
    import torch

    if n_threads:
        torch.set_num_threads(n_threads)
    model = load_model(gguf_path, loader=loader)
    return Reference(model, vocab if vocab is not None else LlamaCppVocab(gguf_path))


def last_logits(ref: Reference, tokens: Sequence[int], bias: np.ndarray | None = None) -> np.ndarray:
    return ref.last_logits(tokens, bias)


def score_items(
    ref: Reference, items: Sequence[Any], bias: np.ndarray | None = None, n_gen: int = 1
) -> list[RefScores]:
    return ref.score_items(items, bias, n_gen=n_gen)


# ------------------------------------------------------------------------------------------------------------
# the paper's calibration, plainly


@dataclass
class PaperSearchResult:
    bias: np.ndarray
    heads: list[int]
    head_type: str
    best_gamma: float
    baseline_accuracy: float
    best_accuracy: float
    gains_up: list[float]
    gains_down: list[float]
    n_evaluations: int
    items_scored: int
    candidates: list[dict[str, Any]]


def paper_search(
    accuracy_of: Callable[[np.ndarray], float],
    shape: tuple[int, int],
    *,
    probe_up: float = 2.0,
    probe_down: float = 0.5,
    head_fraction: float = 0.4,
    grid_up: Sequence[float] = (1.5, 3.0, 4.0),
    grid_down: Sequence[float] = (0.25, 0.4, 0.75),
    n_items: int = 0,
    log: Callable[[str], None] | None = None,
) -> PaperSearchResult:
    """The paper's search (zerotuning-method.md section 2), every candidate on every item.

    accuracy_of(bias) scores all the calibration items with that bias. The rules are zt_gguf.search's "paper"
    method without early stopping: probe each query-head index in all layers at probe_up and probe_down;
    dominant type by the summed positive gains; the ceil(head_fraction * n_head) best heads of that type (only
    the positive ones when fewer are positive, at least the best one); the best gamma of the type's grid (a
    tie goes to the smaller |ln gamma| sum, the baseline first).
    """
    n_layer, n_head = shape
    candidates: list[dict[str, Any]] = []

    def evaluate(heads: Sequence[int], gamma: float, label: str) -> float:
        bias = np.zeros(shape, np.float32)
        bias[:, list(heads)] = np.float32(math.log(gamma))
        acc = float(accuracy_of(bias))
        candidates.append({"description": label, "accuracy": acc, "norm": float(np.abs(bias).sum())})
        if log:
            log(f"{label}: {acc:.4f}")
        return acc

    base = evaluate([], 1.0, "baseline")
    gains_up = [evaluate([h], probe_up, f"probe head {h} gamma={probe_up:g}") - base for h in range(n_head)]
    gains_down = [
        evaluate([h], probe_down, f"probe head {h} gamma={probe_down:g}") - base for h in range(n_head)
    ]
    head_type = "up" if sum(max(g, 0) for g in gains_up) >= sum(max(g, 0) for g in gains_down) else "down"
    gains = gains_up if head_type == "up" else gains_down
    ranked = sorted(range(n_head), key=lambda h: (-gains[h], h))
    k = math.ceil(head_fraction * n_head)
    positive = [h for h in ranked if gains[h] > 0]
    heads = sorted(ranked[:k] if len(positive) >= k else positive or ranked[:1])
    best_acc, best_gamma, best_norm = base, 1.0, 0.0
    for g in grid_up if head_type == "up" else grid_down:
        acc = evaluate(heads, g, f"heads {heads} gamma={g:g}")
        norm = candidates[-1]["norm"]
        if acc > best_acc + 1e-12 or (abs(acc - best_acc) <= 1e-12 and norm < best_norm - 1e-9):
            best_acc, best_gamma, best_norm = acc, g, norm
    bias = np.zeros(shape, np.float32)
    if best_gamma != 1.0:
        bias[:, heads] = np.float32(math.log(best_gamma))
    return PaperSearchResult(
        bias=bias,
        heads=heads,
        head_type=head_type,
        best_gamma=best_gamma,
        baseline_accuracy=base,
        best_accuracy=best_acc,
        gains_up=gains_up,
        gains_down=gains_down,
        n_evaluations=len(candidates),
        items_scored=len(candidates) * n_items,
        candidates=candidates,
    )


# ------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="a llama-arch GGUF")
    ap.add_argument("--f32-copy", type=Path, help="only write an F32 copy of the model to this path")
    ap.add_argument("--prompt", default="Review: a gorgeous, witty film\nSentiment:")
    ap.add_argument("--gamma", type=float, default=2.0, help="gamma on every head of every layer")
    ap.add_argument("--loader", default="gguf", choices=["gguf", "transformers"])
    args = ap.parse_args(argv)
    if args.f32_copy:
        print(write_f32_copy(args.model, args.f32_copy))
        return 0
    ref = load_reference(args.model, loader=args.loader)
    tokens = ref.vocab.encode(args.prompt)
    bias = np.full(ref.bias_shape, math.log(args.gamma), np.float32)
    for label, b in (("gamma=1", None), (f"gamma={args.gamma:g}", bias)):
        x = ref.last_logits(tokens, b).astype(np.float64)
        ls = x - _stats(x)[0]
        top = np.argsort(-ls)[:5]
        print(label, ", ".join(f"{ref.vocab.piece(int(t))!r} {math.exp(ls[t]):.3f}" for t in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
