"""The GGUF keys of ZeroTuning and the model's hyperparameters: the only module that knows key names.

* ``{arch}.attention.first_token_bias`` (ours): FLOAT32 array of n_layer * n_head values, layer-major, in
  logit units; n_layer is ``{arch}.block_count`` and n_head the largest ``{arch}.attention.head_count``
  over the layers (the key holds one number or one per layer). The patched llama.cpp ignores the bias
  key (with a warning) when its type or length is wrong or a value is not finite.
* ``zerotuning.*`` (ours): provenance of a tuned file (version, mode, task file and hash, accuracies, ...).
  In Python the provenance is a dict keyed by the names without the "zerotuning." prefix.
* every other name is gguf-py's (``gguf.Keys``).

A key that is missing or of the wrong type raises GGUFMetaError, one line naming the file and the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType, Keys

from .scan import (
    INT_TYPES,
    KV,
    MAGIC,
    SCALAR_FORMATS,
    GGUFMetaError,
    Layout,
    one_line,
    read_layout,
    read_magic,
    shown,
)

__all__ = [
    "BIAS_KEY_SUFFIX",
    "PROVENANCE_PREFIX",
    "ModelInfo",
    "bias_key",
    "read_bias_file",
    "read_model_info",
    "read_provenance",
    "validate_biases",
]

# ours
BIAS_KEY_SUFFIX = ".attention.first_token_bias"
PROVENANCE_PREFIX = "zerotuning."
JSON_BIAS_KEY = "first_token_bias"  # the key of a JSON bias file's object form
PROV_APPLIED_FROM = "applied_from"  # zerotuning.applied_from: the file apply_biases took the biases from
# gguf-py's
KEY_ARCH = Keys.General.ARCHITECTURE
KEY_NAME = Keys.General.NAME
KEY_ALIGNMENT = Keys.General.ALIGNMENT
KEY_TOKENS = Keys.Tokenizer.LIST

# a JSON bias file larger than this is not one (80 layers x 128 heads of numbers is ~200 KiB)
MAX_BIAS_JSON_BYTES = 64 * 2**20
# llama.cpp's LLAMA_MAX_LAYERS: it aborts on a larger {arch}.block_count
MAX_LAYERS = 512
# llama.cpp's LLAMA_MAX_ATTN_FTB: with more n_layer*n_head values than this, no bias is allowed
MAX_BIAS_VALUES = 1 << 20

ProvenanceValue = str | int | float | bool


def bias_key(arch: str) -> str:
    return f"{arch}{BIAS_KEY_SUFFIX}"


def is_replaced(key: str) -> bool:
    """Whether a tuned copy drops the key: every bias key (also a stale one under another arch prefix:
    llama.cpp's --attn-ftb takes the first one of a file) and every provenance key."""
    return key.endswith(BIAS_KEY_SUFFIX) or key.startswith(PROVENANCE_PREFIX)


@dataclass
class ModelInfo:
    path: Path
    arch: str
    n_layer: int
    n_head: int  # max over the layers: the row length of the bias (0: no bias possible, see MAX_BIAS_VALUES)
    n_head_per_layer: list[int]
    n_head_kv: int  # max over the layers
    n_embd: int
    n_vocab: int  # length of tokenizer.ggml.tokens, else {arch}.vocab_size, else 0
    name: str  # general.name or ""
    biases: np.ndarray | None  # float32 [n_layer, n_head]; None if absent or unusable
    provenance: dict[str, Any] = field(default_factory=dict)  # zerotuning.* without the prefix
    bias_problem: str | None = None  # why a present bias key is unusable (llama.cpp ignores it too)
    n_tensors: int = 0

    @property
    def n_bias(self) -> int:
        return self.n_layer * self.n_head


# --- reading -------------------------------------------------------------------------------


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Hyperparameters, bias and provenance of a GGUF model (metadata only; tensor data not read)."""
    return model_info(read_layout(Path(path)))


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The zerotuning.* keys of any GGUF (a model or a bias-only sidecar), without the prefix."""
    return _provenance(read_layout(Path(path)))


def validate_biases(biases: Any, info: ModelInfo, source: str | os.PathLike[str] | None = None) -> np.ndarray:
    """biases as a float32 [n_layer, n_head] array; GGUFMetaError naming source (or the model) if not."""
    where = str(source) if source is not None else str(info.path)
    try:
        arr = np.asarray(biases, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise GGUFMetaError(f"{where}: biases are not an array of numbers ({one_line(e)})") from None
    if info.n_head == 0:
        head_key = Keys.Attention.HEAD_COUNT.format(arch=info.arch)
        raise GGUFMetaError(f"{info.path}: the model has no attention heads ({head_key})")
    want = (info.n_layer, info.n_head)
    if arr.shape != want:
        raise GGUFMetaError(
            f"{where}: biases have shape {arr.shape}, "
            f"the model {info.path.name} needs (n_layer, n_head) = {want}"
        )
    return finite_f32(arr, where)


def read_bias_file(path: str | os.PathLike[str], info: ModelInfo) -> np.ndarray:
    """Biases for the model of info from a sidecar file, as float32 [n_layer, n_head].

    The file is a GGUF holding a "<arch>.attention.first_token_bias" key (the first such key, any
    arch, as llama.cpp's --attn-ftb), or JSON: a flat list of n_layer*n_head numbers, a nested
    [n_layer][n_head] list, or an object {"first_token_bias": <either list>}.
    """
    path = Path(path)
    values = _bias_from_gguf(path) if read_magic(path) == MAGIC else _bias_from_json(path)
    if values.ndim == 1:
        if values.size != info.n_bias:
            raise GGUFMetaError(
                f"{path}: {values.size} bias values, the model {info.path.name} needs "
                f"n_layer*n_head = {info.n_layer}*{info.n_head} = {info.n_bias}"
            )
        values = values.reshape(info.n_layer, info.n_head)
    return validate_biases(values, info, path)


def finite_f32(arr: np.ndarray, where: str) -> np.ndarray:
    """arr as float32; GGUFMetaError naming where and the first value that is not a finite float32."""
    with np.errstate(over="ignore"):
        out = arr.astype(np.float32)
    bad = np.argwhere(~np.isfinite(out))
    if len(bad):
        index = tuple(int(i) for i in bad[0])
        text = ", ".join(str(i) for i in index)
        raise GGUFMetaError(f"{where}: bias [{text}] = {arr[index]} is not a finite float32")
    return out


def provenance_items(provenance: Mapping[str, Any] | None, src: Path) -> list[tuple[str, ProvenanceValue]]:
    """The provenance given (keys with or without the prefix) as (full key, value) pairs, checked: printable
    ASCII names, each once, values a str, an int that fits in an INT64, a float or a bool."""
    if provenance is None:
        return []
    items: dict[str, ProvenanceValue] = {}
    for key, value in provenance.items():
        if not isinstance(key, str) or not key or not key.isascii() or not key.isprintable() or " " in key:
            raise GGUFMetaError(f"{src}: provenance key {key!r} is not a printable ASCII name")
        full = key if key.startswith(PROVENANCE_PREFIX) else PROVENANCE_PREFIX + key
        if full == PROVENANCE_PREFIX:
            raise GGUFMetaError(f"{src}: provenance key {key!r} has no name after the prefix")
        if full in items:
            raise GGUFMetaError(f"{src}: provenance key {full} is given twice")
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise GGUFMetaError(f"{src}: provenance {full} = {value} does not fit in an INT64")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise GGUFMetaError(f"{src}: provenance {full} is not valid Unicode") from None
        elif not isinstance(value, (bool, int, float)):
            raise GGUFMetaError(
                f"{src}: provenance {full} must be a str, int, float or bool, not {type(value).__name__}"
            )
        items[full] = value
    return list(items.items())


# --- the model's hyperparameters -----------------------------------------------------------


def model_info(layout: Layout) -> ModelInfo:
    """The ModelInfo of a scanned file, its keys checked as llama.cpp reads them."""
    path, kvs = layout.path, layout.kvs
    arch = _get_str(layout, KEY_ARCH)
    block_key = Keys.LLM.BLOCK_COUNT.format(arch=arch)
    n_layer = _get_int(layout, block_key)
    if not 1 <= n_layer <= MAX_LAYERS:
        # llama.cpp aborts the process (GGML_ASSERT) on these instead of refusing the model
        raise GGUFMetaError(f"{path}: key {block_key} is {n_layer}, expected 1 to {MAX_LAYERS}")
    head_key = Keys.Attention.HEAD_COUNT.format(arch=arch)
    # llama.cpp: a missing head count is 0 (models without attention)
    heads = _get_per_layer(layout, head_key, n_layer) if head_key in kvs else [0] * n_layer
    kv_key = Keys.Attention.HEAD_COUNT_KV.format(arch=arch)
    heads_kv = _get_per_layer(layout, kv_key, n_layer) if kv_key in kvs else heads
    n_embd = _get_int(layout, Keys.LLM.EMBEDDING_LENGTH.format(arch=arch))
    vocab_key = Keys.LLM.VOCAB_SIZE.format(arch=arch)
    if KEY_TOKENS in kvs and kvs[KEY_TOKENS].type == GGUFValueType.ARRAY:
        n_vocab = kvs[KEY_TOKENS].count
    elif vocab_key in kvs:
        n_vocab = _get_int(layout, vocab_key)
    else:
        n_vocab = 0
    name = kvs[KEY_NAME].value if KEY_NAME in kvs and kvs[KEY_NAME].type == GGUFValueType.STRING else ""

    info = ModelInfo(
        path=path,
        arch=arch,
        n_layer=n_layer,
        # llama.cpp allows no bias for head counts beyond any real model's (a hostile file): a row length of 0
        n_head=max(heads) if n_layer * max(heads) <= MAX_BIAS_VALUES else 0,
        n_head_per_layer=heads,
        n_head_kv=max(heads_kv),
        n_embd=n_embd,
        n_vocab=n_vocab,
        name=name,
        biases=None,
        provenance=_provenance(layout),
        n_tensors=len(layout.tensors),
    )
    key = bias_key(arch)
    if key in kvs:
        info.biases, info.bias_problem = _stored_bias(kvs[key], info)
    return info


def _get_str(layout: Layout, key: str) -> str:
    kv = layout.kvs.get(key)
    if kv is None:
        raise GGUFMetaError(f"{layout.path}: key {key} is missing")
    if kv.type != GGUFValueType.STRING:
        raise GGUFMetaError(f"{layout.path}: key {key} must be a STRING, not {kv.type_name()}")
    if not kv.value:
        raise GGUFMetaError(f"{layout.path}: key {key} is empty")
    if not kv.value.isprintable():
        raise GGUFMetaError(f"{layout.path}: key {key} has non-printable characters: {shown(kv.value)}")
    return kv.value


def _get_int(layout: Layout, key: str) -> int:
    kv = layout.kvs.get(key)
    if kv is None:
        raise GGUFMetaError(f"{layout.path}: key {key} is missing")
    if kv.type not in INT_TYPES:
        raise GGUFMetaError(f"{layout.path}: key {key} must be an integer, not {kv.type_name()}")
    if kv.value < 0:
        raise GGUFMetaError(f"{layout.path}: key {key} is negative ({kv.value})")
    return int(kv.value)


def _get_per_layer(layout: Layout, key: str, n_layer: int) -> list[int]:
    """A key holding one integer for all layers or an array of one per layer (as llama.cpp)."""
    kv = layout.kvs[key]
    if kv.type != GGUFValueType.ARRAY:
        return [_get_int(layout, key)] * n_layer
    if kv.sub_type not in INT_TYPES:
        raise GGUFMetaError(
            f"{layout.path}: key {key} must be an integer or an integer array, not {kv.type_name()}"
        )
    if kv.count != n_layer:
        raise GGUFMetaError(
            f"{layout.path}: key {key} has {kv.count} values, expected one per layer ({n_layer})"
        )
    values = [int(v) for v in kv.value]
    if min(values) < 0:
        raise GGUFMetaError(f"{layout.path}: key {key} has a negative value")
    return values


def _provenance(layout: Layout) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, kv in layout.kvs.items():
        if key.startswith(PROVENANCE_PREFIX):
            value = kv.value
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif kv.type in SCALAR_FORMATS:
                value = bool(value) if kv.type == GGUFValueType.BOOL else value
            out[key[len(PROVENANCE_PREFIX) :]] = value
    return out


def _stored_bias(kv: KV, info: ModelInfo) -> tuple[np.ndarray | None, str | None]:
    """(biases, None) or (None, why the key is unusable), by llama.cpp's rules."""
    if info.n_bias == 0:
        return None, f"the head counts allow none (0, or over {MAX_BIAS_VALUES} n_layer*n_head values)"
    if kv.type != GGUFValueType.ARRAY or kv.sub_type != GGUFValueType.FLOAT32:
        return None, f"{kv.key} is not a FLOAT32 array ({kv.type_name()})"
    values = kv.value.astype(np.float32)
    if values.size != info.n_bias:
        return None, f"{kv.key} has {values.size} values, expected n_layer*n_head = {info.n_bias}"
    if not np.isfinite(values).all():
        index = int(np.argwhere(~np.isfinite(values))[0][0])
        return None, f"{kv.key} has a non-finite value at [{index // info.n_head}, {index % info.n_head}]"
    return values.reshape(info.n_layer, info.n_head), None


# --- bias files ----------------------------------------------------------------------------


def _bias_from_gguf(path: Path) -> np.ndarray:
    layout = read_layout(path)
    keys = [k for k in layout.kvs if k.endswith(BIAS_KEY_SUFFIX) and len(k) > len(BIAS_KEY_SUFFIX)]
    if not keys:
        raise GGUFMetaError(f"{path}: no '<arch>{BIAS_KEY_SUFFIX}' key")
    kv = layout.kvs[keys[0]]
    if kv.type != GGUFValueType.ARRAY or kv.sub_type != GGUFValueType.FLOAT32:
        raise GGUFMetaError(f"{path}: key {kv.key} must be a FLOAT32 array, not {kv.type_name()}")
    return kv.value.astype(np.float64)


def _bias_from_json(path: Path) -> np.ndarray:
    try:
        size = path.stat().st_size
        if size > MAX_BIAS_JSON_BYTES:
            raise GGUFMetaError(f"{path}: neither a GGUF file nor a JSON bias file ({size} bytes)")
        raw = path.read_bytes()
    except OSError as e:
        raise GGUFMetaError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise GGUFMetaError(f"{path}: neither a GGUF file nor JSON (not UTF-8 at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise GGUFMetaError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except (RecursionError, ValueError) as e:
        raise GGUFMetaError(f"{path}: invalid JSON ({type(e).__name__})") from None
    name = JSON_BIAS_KEY
    if isinstance(obj, dict):
        if name not in obj:
            raise GGUFMetaError(f'{path}: the JSON object has no "{name}" key')
        obj = obj[name]
    if not isinstance(obj, list) or not obj:
        raise GGUFMetaError(f"{path}: {name} must be a non-empty list of numbers or of lists of numbers")
    if not all(isinstance(row, list) for row in obj):
        _check_numbers(obj, path, name)
        return np.array(obj, dtype=np.float64)
    for i, row in enumerate(obj):
        _check_numbers(row, path, f"{name}[{i}]")
    lengths = {len(row) for row in obj}
    if len(lengths) != 1:
        raise GGUFMetaError(f"{path}: the rows of {name} have different lengths {sorted(lengths)}")
    return np.array(obj, dtype=np.float64)


def _check_numbers(values: list[Any], path: Path, name: str) -> None:
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise GGUFMetaError(f"{path}: {name}[{i}] is not a number: {json.dumps(v)[:40]}")
