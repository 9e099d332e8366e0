"""Pre-flight checks of a model file: what would make llama.cpp abort (GGML_ASSERT), crash or hang instead
of returning an error, refused before llama.cpp sees the file.

:func:`check_model` reads the metadata and the tensor table only (never tensor data): the layout (every offset
and length, see :mod:`.scan`), the hyperparameters as :func:`.keys.model_info` reads them (block_count within
1..512), then the rules below, each the narrowest one that llama.cpp's own code (third_party/llama.cpp)
needs, so that no model llama.cpp can run is refused:

* head counts: unequal per-layer KV head counts only in the architectures whose graph reads them per layer
  (PER_LAYER_KV_ARCHS; the others size the KV cache per layer but compute K with layer 0's count); the query
  heads a multiple of the KV heads (the attention's broadcast); head counts times head sizes below 2^32
  (llama.cpp computes the widths in uint32: a wrapped width can equal the tensors', and the graph asserts);
* norm epsilons (``layer_norm_rms_epsilon``, ``layer_norm_epsilon``) not below 0 and not NaN (the first
  decode would hit ggml's GGML_ASSERT(eps >= 0.0f)); ``rope.freq_base`` (and its _swa twin) a positive
  finite number (else every logit is NaN: not an abort, but nothing a calibration could use);
* rope: ``rope.dimension_count`` (and its _swa twin) even, not 0, at most the head size ``key_length``; the
  scaling type one llama.cpp knows;
* experts and next-token-prediction layers: llama.cpp's asserts on their counts;
* tensors: no extent of 0; no integer or F64 type (but the I64 index table d2t); 1-D and ``*_norm.weight``
  tensors F32 (llama.cpp's binary operations take only F32 there, and every converter writes them so);
* vocabulary: a tokenizer with tokens, no token text twice, no BYTE token in a WordPiece ("bert")
  vocabulary, a BOS/EOS/SEP token wherever the tokenizer adds one, and an RWKV vocabulary in which every byte
  that begins a token is a token itself (else llama.cpp's RWKV tokenizer loops forever).

Every refusal is a GGUFMetaError: one line naming the file and the key or tensor.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, Keys

from .keys import ModelInfo, model_info
from .scan import KV, GGUFMetaError, Layout, read_layout, shown

__all__ = ["PER_LAYER_KV_ARCHS", "check_model"]

# The architectures whose llama.cpp graph (src/models/*.cpp) reads the KV head count per layer; derived from
# third_party/llama.cpp (tests/test_hostile_models.py derives it again from the sources).
PER_LAYER_KV_ARCHS = frozenset(
    {
        "bailingmoe3",
        "deci",
        "falcon-h1",
        "gemma4",
        "glm5-next",
        "granite",
        "granite_swa",
        "granitehybrid",
        "graniteswitch",
        "jamba",
        "kimi-k3",
        "kimi-linear",
        "laguna",
        "lfm2",
        "lfm2moe",
        "mimo2",
        "minimax-01",
        "nanbeige",
        "nemotron_h",
        "nemotron_h_moe",
        "openelm",
        "plamo2",
        "plamo3",
        "qwen35",
        "qwen35moe",
        "qwen3next",
        "qwen4exp",
        "spark2_5",
        "step35",
    }
)
LLAMA_MAX_EXPERTS = 1024  # llama-hparams.h
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama-model.cpp LLAMA_ROPE_SCALING_TYPES
# archs whose loader turns n_expert <= 1 into a dense model (llama-model.cpp load_hparams)
DENSE_IF_ONE_EXPERT = frozenset({"hunyuan_vl", "hunyuan-dense"})
INDEX_TENSORS = frozenset({"d2t"})  # eagle3/dflash's draft-to-target vocabulary map, I64 by design
NON_FLOAT_TYPES = frozenset(
    {
        GGMLQuantizationType.I8,
        GGMLQuantizationType.I16,
        GGMLQuantizationType.I32,
        GGMLQuantizationType.I64,
        GGMLQuantizationType.F64,
    }
)
NORM_SUFFIX = "_norm.weight"

# llama-vocab.cpp: the tokenizer models, llama.cpp's default (bos, eos, sep) ids of each, whether it adds
# BOS / EOS without a tokenizer.ggml.add_*_token key (None: depends on the pre-tokenizer; taken as adding)
TOKENIZER_NONE = ("none", "no_vocab")
TOKENIZER_RWKV = "rwkv"
TOKENIZER_WPM = "bert"
TOKENIZER_GEMMA4 = "gemma4"
SPECIAL_DEFAULTS: dict[str, tuple[int | None, int | None, int | None]] = {
    "llama": (1, 2, None),
    TOKENIZER_WPM: (101, None, 102),
    "gpt2": (11, 11, None),
    "hybriddna": (11, 11, None),
    "whitespace": (11, 11, None),
    TOKENIZER_GEMMA4: (None, None, None),
    "t5": (None, 1, None),
}
ADDS_DEFAULT: dict[str, tuple[bool | None, bool]] = {
    "llama": (True, False),
    "gpt2": (None, False),
    "hybriddna": (None, False),
    "whitespace": (None, False),
    TOKENIZER_GEMMA4: (True, False),
    "t5": (False, True),
}
TOKEN_TYPE_BYTE = 6  # gguf.TokenType.BYTE
KEY_TOKENIZER_MODEL = Keys.Tokenizer.MODEL
KEY_TOKENIZER_PRE = Keys.Tokenizer.PRE
KEY_TOKENS = Keys.Tokenizer.LIST
KEY_TOKEN_TYPE = Keys.Tokenizer.TOKEN_TYPE


def check_model(path: str | os.PathLike[str]) -> ModelInfo:
    """The ModelInfo of a model file that llama.cpp can be given without aborting; GGUFMetaError (one line
    naming the file and the key or tensor) for anything llama.cpp would abort, crash or hang on."""
    layout = read_layout(Path(path))
    info = model_info(layout)
    _check_heads(layout, info)
    _check_norm_eps(layout, info)
    _check_rope(layout, info)
    _check_experts(layout, info)
    _check_tensors(layout)
    _check_vocabulary(layout)
    return info


def _refuse(layout: Layout, what: str) -> GGUFMetaError:
    return GGUFMetaError(f"{layout.path}: {what}")


# --- typed reads as llama.cpp's get_key / get_key_or_arr do them (a wrong type: llama.cpp refuses itself) ---


def _u32(layout: Layout, key: str, default: int) -> int | None:
    """The UINT32 value of key, default when absent; None when of another type."""
    kv = layout.kvs.get(key)
    if kv is None:
        return default
    return int(kv.value) if kv.type == GGUFValueType.UINT32 else None


def _per_layer(layout: Layout, key: str, n_layer: int) -> list[int] | None:
    """A UINT32 key or an array of one UINT32/INT32/BOOL per layer; None when llama.cpp refuses it itself."""
    kv = layout.kvs[key]
    if kv.type == GGUFValueType.UINT32:
        return [int(kv.value)] * n_layer
    elem = (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.BOOL)
    if kv.type != GGUFValueType.ARRAY or kv.sub_type not in elem or kv.count != n_layer:
        return None
    return [int(v) & 0xFFFFFFFF for v in kv.value]


def _values(values: list[int]) -> str:
    text = ", ".join(str(v) for v in values[:8])
    return f"[{text}{', ...' if len(values) > 8 else ''}]"


# --- hyperparameters ------------------------------------------------------------------------------------


def _check_heads(layout: Layout, info: ModelInfo) -> None:
    head_key = Keys.Attention.HEAD_COUNT.format(arch=info.arch)
    kv_key = Keys.Attention.HEAD_COUNT_KV.format(arch=info.arch)
    heads = _per_layer(layout, head_key, info.n_layer) if head_key in layout.kvs else [0] * info.n_layer
    kv_heads = _per_layer(layout, kv_key, info.n_layer) if kv_key in layout.kvs else heads
    if heads is None or kv_heads is None:
        return
    named = kv_key if kv_key in layout.kvs else f"{head_key} (no {kv_key})"
    _check_widths(layout, info, heads, kv_heads, named)
    per_layer = info.arch in PER_LAYER_KV_ARCHS
    if not per_layer and len(set(kv_heads)) > 1:
        raise _refuse(
            layout,
            f"key {named} gives the layers different KV head counts {_values(kv_heads)}: llama.cpp's "
            f"'{info.arch}' graph takes one count for every layer (it would abort)",
        )
    for il in range(info.n_layer if per_layer else 1):
        if kv_heads[il] and heads[il] % kv_heads[il]:
            raise _refuse(
                layout,
                f"key {named}: {kv_heads[il]} KV heads do not divide the {heads[il]} attention heads "
                f"({head_key}) of layer {il}",
            )


def _check_widths(layout: Layout, info: ModelInfo, heads: list[int], kv_heads: list[int], named: str) -> None:
    """Head counts times head sizes below 2^32 (llama.cpp's n_embd_k_gqa and Q's width are uint32): the KV
    heads of every layer where the file gives them, and layer 0's query heads (the count the graph computes Q
    with; a file whose later layers claim absurd query counts runs with layer 0's)."""
    n_embd = _u32(layout, Keys.LLM.EMBEDDING_LENGTH.format(arch=info.arch), 0) or 0
    kv_given = Keys.Attention.HEAD_COUNT_KV.format(arch=info.arch) in layout.kvs
    checks = [(heads[0], Keys.Attention.HEAD_COUNT.format(arch=info.arch), 0)] if heads else []
    checks += [(kv_heads[il], named, il) for il in range(info.n_layer)] if kv_given else []
    for count, key, il in checks:
        default = n_embd // heads[il] if heads[il] else 0
        size = max(
            _u32(layout, k.format(arch=info.arch), default) or 0
            for k in (Keys.Attention.KEY_LENGTH, Keys.Attention.VALUE_LENGTH)
        )
        if count * size >= 2**32:
            raise _refuse(
                layout,
                f"key {key}: {count} heads of size {size} in layer {il} are wider than 2^32 values "
                "(llama.cpp's widths would wrap around)",
            )


def _check_norm_eps(layout: Layout, info: ModelInfo) -> None:
    for key in (Keys.Attention.LAYERNORM_RMS_EPS, Keys.Attention.LAYERNORM_EPS):
        kv = layout.kvs.get(key.format(arch=info.arch))
        if kv is not None and kv.type == GGUFValueType.FLOAT32 and not float(kv.value) >= 0.0:
            raise _refuse(
                layout,
                f"key {kv.key} is {float(kv.value):g}: a norm epsilon must be 0 or more (llama.cpp would "
                "abort at the first decode)",
            )


def _check_rope(layout: Layout, info: ModelInfo) -> None:
    arch = info.arch
    for key in (Keys.Rope.FREQ_BASE, Keys.Rope.FREQ_BASE_SWA):
        kv = layout.kvs.get(key.format(arch=arch))
        if kv is not None and kv.type == GGUFValueType.FLOAT32 and not 0.0 < float(kv.value) < math.inf:
            raise _refuse(
                layout,
                f"key {kv.key} is {float(kv.value):g}: a rope frequency base must be a positive number "
                "(llama.cpp would compute NaN logits)",
            )
    scaling_key = Keys.Rope.SCALING_TYPE.format(arch=arch)
    scaling = layout.kvs.get(scaling_key)
    if (
        scaling is not None
        and scaling.type == GGUFValueType.STRING
        and scaling.value not in ROPE_SCALING_TYPES
    ):
        raise _refuse(
            layout,
            f"key {scaling_key} is '{shown(scaling.value)}', not one of {', '.join(ROPE_SCALING_TYPES)}",
        )
    key_length = _u32(layout, Keys.Attention.KEY_LENGTH.format(arch=arch), 0)
    key_length_swa = _u32(layout, Keys.Attention.KEY_LENGTH_SWA.format(arch=arch), key_length or 0)
    pairs = (
        (Keys.Rope.DIMENSION_COUNT.format(arch=arch), key_length, Keys.Attention.KEY_LENGTH),
        (Keys.Rope.DIMENSION_COUNT_SWA.format(arch=arch), key_length_swa, Keys.Attention.KEY_LENGTH_SWA),
    )
    for rope_key, head_size, head_key in pairs:
        n_rot = _u32(layout, rope_key, -1)
        if n_rot is None or n_rot < 0:
            continue
        if n_rot == 0 or n_rot % 2:
            raise _refuse(layout, f"key {rope_key} is {n_rot}: rotary dimensions come in pairs, at least one")
        if head_size and n_rot > head_size:
            raise _refuse(
                layout,
                f"key {rope_key} is {n_rot}, more than the head size {head_size} "
                f"({head_key.format(arch=arch)})",
            )


def _check_experts(layout: Layout, info: ModelInfo) -> None:
    """llama.cpp's asserts on the expert and next-token-prediction layer counts (llama-model.cpp)."""
    arch = info.arch
    nextn_key = Keys.LLM.NEXTN_PREDICT_LAYERS.format(arch=arch)
    nextn = _u32(layout, nextn_key, 0)
    if nextn is not None and nextn > info.n_layer:
        raise _refuse(layout, f"key {nextn_key} is {nextn}, more than the {info.n_layer} layers")
    count_key = Keys.LLM.EXPERT_COUNT.format(arch=arch)
    used_key = Keys.LLM.EXPERT_USED_COUNT.format(arch=arch)
    groups_key = Keys.LLM.EXPERT_GROUP_COUNT.format(arch=arch)
    group_used_key = Keys.LLM.EXPERT_GROUP_USED_COUNT.format(arch=arch)
    n_expert = _u32(layout, count_key, 0)
    used_per_layer = _per_layer(layout, used_key, info.n_layer) if used_key in layout.kvs else [0]
    groups = _u32(layout, groups_key, 0)
    group_used = _u32(layout, group_used_key, 0)
    if n_expert is None or used_per_layer is None or groups is None or group_used is None:
        return
    used = max(used_per_layer)
    if arch in DENSE_IF_ONE_EXPERT and n_expert <= 1:
        n_expert = used = 0
    if n_expert > LLAMA_MAX_EXPERTS:
        raise _refuse(layout, f"key {count_key} is {n_expert}, more than llama.cpp's {LLAMA_MAX_EXPERTS}")
    if used > n_expert:
        raise _refuse(layout, f"key {used_key} is {used}, more than the {n_expert} experts ({count_key})")
    if n_expert == 0:
        if groups:
            raise _refuse(layout, f"key {groups_key} is {groups} in a model without experts ({count_key})")
        return
    if used == 0:
        raise _refuse(layout, f"key {used_key} is 0 or missing in a model with {n_expert} experts")
    if groups >= n_expert or (groups > 1 and n_expert % groups):
        raise _refuse(layout, f"key {groups_key} is {groups}: it must divide the {n_expert} experts")
    if groups > 1 and not 0 < group_used < groups:
        raise _refuse(layout, f"key {group_used_key} is {group_used}, expected 1 to {groups - 1}")


# --- tensors --------------------------------------------------------------------------------------------


def _check_tensors(layout: Layout) -> None:
    for t in layout.tensors:
        ggml_type = GGMLQuantizationType(t.type)  # known: the scanner refuses other types
        shape = ", ".join(str(d) for d in t.dims)
        if 0 in t.dims:
            raise _refuse(layout, f"tensor {shown(t.name)} has an extent of 0 ({shape})")
        if t.name in INDEX_TENSORS:
            continue
        if ggml_type in NON_FLOAT_TYPES:
            raise _refuse(
                layout,
                f"tensor {shown(t.name)} has type {ggml_type.name}: llama.cpp computes with float and "
                "quantized weights only",
            )
        if (len(t.dims) <= 1 or t.name.endswith(NORM_SUFFIX)) and ggml_type != GGMLQuantizationType.F32:
            raise _refuse(
                layout,
                f"tensor {shown(t.name)} ({shape}) has type {ggml_type.name}: llama.cpp takes 1-D and norm "
                "tensors as F32 only",
            )


# --- vocabulary -----------------------------------------------------------------------------------------


def _check_vocabulary(layout: Layout) -> None:
    model_kv = layout.kvs.get(KEY_TOKENIZER_MODEL)
    tokens = layout.kvs.get(KEY_TOKENS)
    if model_kv is None or model_kv.type != GGUFValueType.STRING:
        return  # llama.cpp refuses the file itself
    tokenizer = model_kv.value
    if tokenizer in TOKENIZER_NONE:
        raise _refuse(layout, f"key {KEY_TOKENIZER_MODEL} is '{tokenizer}': the model has no vocabulary")
    if tokens is None or tokens.type != GGUFValueType.ARRAY or tokens.sub_type != GGUFValueType.STRING:
        return  # llama.cpp refuses the file itself
    if tokens.count == 0:
        raise _refuse(layout, f"key {KEY_TOKENS} is empty")
    texts = _token_texts(layout, tokens)
    _check_distinct(layout, texts)
    if tokenizer == TOKENIZER_RWKV:
        _check_rwkv_bytes(layout, texts)
    if tokenizer == TOKENIZER_WPM:
        _check_no_byte_tokens(layout, tokens.count)
    if tokenizer in SPECIAL_DEFAULTS:
        _check_specials(layout, tokenizer, tokens.count)


def _token_texts(layout: Layout, tokens: KV) -> list[bytes]:
    """The raw texts of tokenizer.ggml.tokens (their lengths were checked by the scanner)."""
    unpack = struct.Struct(layout.order + "Q").unpack_from
    try:
        with open(layout.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            (key_len,) = unpack(buf, tokens.start)
            off = tokens.start + 8 + key_len + 16  # the key, the ARRAY type, the STRING type, the count
            texts = []
            for _ in range(tokens.count):
                (n,) = unpack(buf, off)
                texts.append(buf[off + 8 : off + 8 + n])
                off += 8 + n
            return texts
    except (OSError, ValueError, struct.error) as e:  # (the file changed since it was scanned)
        raise _refuse(layout, f"cannot read {KEY_TOKENS}: {e}") from None


def _check_distinct(layout: Layout, texts: list[bytes]) -> None:
    """llama.cpp maps every token text to one id and asserts that no text comes twice (an empty text
    stands for "[EMPTY_<id>]")."""
    named = [text or b"[EMPTY_%d]" % i for i, text in enumerate(texts)] if b"" in texts else texts
    if len(set(named)) == len(named):
        return
    first: dict[bytes, int] = {}
    for i, text in enumerate(named):
        j = first.setdefault(text, i)
        if j != i:
            raise _refuse(
                layout,
                f"key {KEY_TOKENS}: tokens {j} and {i} are the same text "
                f"'{shown(text.decode('utf-8', errors='replace'))}'",
            )


def _check_no_byte_tokens(layout: Layout, n_tokens: int) -> None:
    kv = layout.kvs.get(KEY_TOKEN_TYPE)
    if kv is None or kv.sub_type != GGUFValueType.INT32 or kv.count < n_tokens:
        return  # none, or llama.cpp refuses it itself
    byte = np.flatnonzero(kv.value[:n_tokens] == TOKEN_TYPE_BYTE)
    if len(byte):
        raise _refuse(
            layout,
            f"key {KEY_TOKEN_TYPE}: token {int(byte[0])} is a BYTE token, which a '{TOKENIZER_WPM}' "
            "(WordPiece) vocabulary cannot have",
        )


def _check_specials(layout: Layout, tokenizer: str, n_tokens: int) -> None:
    """Each special token that llama.cpp's tokenizer adds must exist (it asserts so)."""
    bos, eos, sep = SPECIAL_DEFAULTS[tokenizer]
    needed: list[tuple[str, int | None, str | None]]
    if tokenizer == TOKENIZER_WPM:
        needed = [(Keys.Tokenizer.BOS_ID, bos, "always"), (Keys.Tokenizer.SEP_ID, sep, "always")]
    else:
        add_bos, add_eos = ADDS_DEFAULT[tokenizer]
        pre = layout.kvs.get(KEY_TOKENIZER_PRE)
        forced = tokenizer == TOKENIZER_GEMMA4 or (pre is not None and pre.value == TOKENIZER_GEMMA4)
        needed = [
            (
                Keys.Tokenizer.BOS_ID,
                bos,
                "always" if forced else _adds(layout, Keys.Tokenizer.ADD_BOS, add_bos),
            ),
            (Keys.Tokenizer.EOS_ID, eos, _adds(layout, Keys.Tokenizer.ADD_EOS, add_eos)),
        ]
    for key, default, why in needed:
        if why and _special_id(layout, key, default, n_tokens) is None:
            kv = layout.kvs.get(key)
            if kv is None:
                held = "is missing"
            elif kv.type != GGUFValueType.UINT32:
                held = f"is a {kv.type_name()}, not a UINT32"
            else:
                held = f"is {kv.value}, outside the vocabulary of {n_tokens} tokens"
            raise _refuse(
                layout,
                f"key {key} {held}, but the '{tokenizer}' tokenizer adds that token ({why})",
            )


def _adds(layout: Layout, key: str, default: bool | None) -> str | None:
    """Why the tokenizer adds a special token (None: it does not): the key's true, or by default."""
    kv = layout.kvs.get(key)
    if kv is not None and kv.type == GGUFValueType.BOOL:
        return f"{key} is true" if kv.value else None
    return "by default" if default is not False else None


def _special_id(layout: Layout, key: str, default: int | None, n_tokens: int) -> int | None:
    """The id llama.cpp takes: the key's if in the vocabulary, else its default if in the vocabulary."""
    kv = layout.kvs.get(key)
    if kv is not None and kv.type == GGUFValueType.UINT32 and kv.value < n_tokens:
        return int(kv.value)
    return default if default is not None and default < n_tokens else None


def _check_rwkv_bytes(layout: Layout, texts: list[bytes]) -> None:
    """llama.cpp's RWKV tokenizer restarts at the same place forever when a text holds a byte that begins
    some token but is no token itself, so every such byte must be a one-byte token."""
    starts: set[int] = set()
    singles: set[int] = set()
    for piece in map(_rwkv_unescape, texts):
        if piece:
            starts.add(piece[0])
            if len(piece) == 1:
                singles.add(piece[0])
    missing = sorted(starts - singles)
    if missing:
        raise _refuse(
            layout,
            f"key {KEY_TOKENS}: tokens begin with the byte 0x{missing[0]:02x} but none is that byte alone, "
            f"which llama.cpp's '{TOKENIZER_RWKV}' tokenizer needs",
        )


def _rwkv_unescape(text: bytes) -> bytes:
    """llama.cpp's llama_unescape_rwkv_token, byte for byte (its hex digits too, read from a signed char)."""
    out = bytearray()
    escaping = False
    hex_left = 0
    acc = 0
    for c in text:
        if hex_left:
            acc = ((acc << 4) + ((c - 87) if 97 <= c < 128 else (c - 48))) & 0xFF
            hex_left -= 1
            if not hex_left:
                out.append(acc)
                acc = 0
        elif escaping:
            escaping = False
            if c == ord("x"):
                hex_left = 2
            else:
                out.append({ord("t"): 9, ord("n"): 10, ord("r"): 13}.get(c, c))
        elif c == ord("\\"):
            escaping = True
        else:
            out.append(c)
    return bytes(out)
