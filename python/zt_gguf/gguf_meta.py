"""GGUF metadata of ZeroTuning: the first-token attention bias and the provenance keys.

This is the only module that knows GGUF key names.

* ``{arch}.attention.first_token_bias``: FLOAT32 array of n_layer * n_head values, layer-major, in
  logit units; n_layer is ``{arch}.block_count`` and n_head the largest ``{arch}.attention.head_count``
  over the layers (the key holds one number or one per layer). The patched llama.cpp ignores the bias
  key (with a warning) when its type or length is wrong or a value is not finite.
* ``zerotuning.*``: provenance of a tuned file (version, mode, task file and hash, accuracies, ...).
  In Python the provenance is a dict keyed by the names without the "zerotuning." prefix.

Files are read with a small scanner of the GGUF layout (header, key/values, tensor infos) over a
memory map: it checks every length against the file size and skips long string arrays (the
vocabulary) without decoding them, so reading the metadata of a model takes milliseconds where
gguf.GGUFReader, which builds a numpy view per token, takes seconds. Tensor data are never read.

write_tuned() copies a model without re-encoding anything: the header is rewritten, every kept
key/value and every tensor info is copied byte for byte, and the tensor data section is streamed
unchanged (tensor offsets are relative to that section and the alignment is kept, so they stay
valid). Only the bias key and the zerotuning.* keys change.

Every problem raises GGUFMetaError with a one-line message naming the file (and the key).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
)

from . import fsutil

__all__ = [
    "BIAS_KEY_SUFFIX",
    "PROVENANCE_PREFIX",
    "GGUFMetaError",
    "ModelInfo",
    "bias_key",
    "read_bias_file",
    "read_model_info",
    "strip",
    "validate_biases",
    "write_bias_gguf",
    "write_tuned",
]

BIAS_KEY_SUFFIX = ".attention.first_token_bias"
PROVENANCE_PREFIX = "zerotuning."

KEY_ARCH = "general.architecture"
KEY_NAME = "general.name"
KEY_ALIGNMENT = "general.alignment"
KEY_TOKENS = "tokenizer.ggml.tokens"

MAGIC = struct.pack("<I", GGUF_MAGIC)  # b"GGUF"
# a JSON bias file larger than this is not one (80 layers x 128 heads of numbers is ~200 KiB)
MAX_BIAS_JSON_BYTES = 64 * 2**20
COPY_CHUNK_BYTES = 16 * 2**20
# llama.cpp's LLAMA_MAX_LAYERS: it aborts on a larger {arch}.block_count
MAX_LAYERS = 512
# llama.cpp's LLAMA_MAX_ATTN_FTB: with more n_layer*n_head values than this, no bias is allowed
MAX_BIAS_VALUES = 1 << 20
# string arrays longer than this (vocabularies, merges) are skipped, not decoded
MAX_DECODED_STRING_ARRAY = 1024

ProvenanceValue = str | int | float | bool


class GGUFMetaError(ValueError):
    """A GGUF file or bias problem; str() is one line naming the file (and the key)."""


def bias_key(arch: str) -> str:
    return f"{arch}{BIAS_KEY_SUFFIX}"


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
    path = Path(path)
    return _model_info(_scan(path))


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The zerotuning.* keys of any GGUF (a model or a bias-only sidecar), without the prefix."""
    return _read_provenance(_scan(Path(path)))


def validate_biases(biases: Any, info: ModelInfo, source: str | os.PathLike[str] | None = None) -> np.ndarray:
    """biases as a float32 [n_layer, n_head] array; GGUFMetaError naming source (or the model) if not."""
    where = str(source) if source is not None else str(info.path)
    try:
        arr = np.asarray(biases, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise GGUFMetaError(f"{where}: biases are not an array of numbers ({_one_line(e)})") from None
    if info.n_head == 0:
        raise GGUFMetaError(
            f"{info.path}: the model has no attention heads ({info.arch}.attention.head_count)"
        )
    want = (info.n_layer, info.n_head)
    if arr.shape != want:
        raise GGUFMetaError(
            f"{where}: biases have shape {arr.shape}, "
            f"the model {info.path.name} needs (n_layer, n_head) = {want}"
        )
    return _finite_f32(arr, where)


def read_bias_file(path: str | os.PathLike[str], info: ModelInfo) -> np.ndarray:
    """Biases for the model of info from a sidecar file, as float32 [n_layer, n_head].

    The file is a GGUF holding a "<arch>.attention.first_token_bias" key (the first such key, any
    arch, as llama.cpp's --attn-ftb), or JSON: a flat list of n_layer*n_head numbers, a nested
    [n_layer][n_head] list, or an object {"first_token_bias": <either list>}.
    """
    path = Path(path)
    values = _bias_from_gguf(path) if _read_magic(path) == MAGIC else _bias_from_json(path)
    if values.ndim == 1:
        if values.size != info.n_bias:
            raise GGUFMetaError(
                f"{path}: {values.size} bias values, the model {info.path.name} needs "
                f"n_layer*n_head = {info.n_layer}*{info.n_head} = {info.n_bias}"
            )
        values = values.reshape(info.n_layer, info.n_head)
    return validate_biases(values, info, path)


# --- writing -------------------------------------------------------------------------------


def write_tuned(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    biases: Any | None,
    provenance: Mapping[str, ProvenanceValue] | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a copy of src to dst with the bias key set (None: removed) and the zerotuning.* keys
    replaced by provenance (None: removed); provenance keys may be given with or without the
    "zerotuning." prefix. Tensor data, tensor infos and every other key/value are copied byte for
    byte. src is never modified; dst is replaced atomically. progress(done, total) is called with
    byte counts while the tensor data are copied. Returns dst.
    """
    src, dst = Path(src), Path(dst)
    layout = _scan(src)
    info = _model_info(layout)
    if _same_file(src, dst):
        raise GGUFMetaError(f"{dst}: is the input file; write the tuned model to another path")
    order = layout.order

    tuned = validate_biases(biases, info) if biases is not None else None
    new_kvs: list[bytes] = []
    if tuned is not None:
        new_kvs.append(_pack_f32_array(bias_key(info.arch), tuned.reshape(-1), order))
    for key, value in _provenance_items(provenance, src):
        new_kvs.append(_pack_scalar(key, value, order))
    kept = [kv for kv in layout.kvs.values() if not _is_replaced(kv.key)]

    def write(tmp: Path) -> None:
        try:
            fin = open(src, "rb")  # closed by the with below
        except OSError as e:
            raise GGUFMetaError(f"{src}: cannot read: {e.strerror or e}") from None
        with fin, open(tmp, "wb") as out:
            out.write(MAGIC)
            out.write(
                struct.pack(f"{order}IQQ", layout.version, len(layout.tensors), len(kept) + len(new_kvs))
            )
            for kv in kept:
                out.write(_read_range(fin, src, kv.start, kv.end))
            for record in new_kvs:
                out.write(record)
            out.write(_read_range(fin, src, layout.tensor_infos_start, layout.tensor_infos_end))
            out.write(b"\0" * (-out.tell() % layout.alignment))
            _copy_data(fin, src, layout.data_offset, layout.file_size, out, progress)
            out.flush()
            os.fsync(out.fileno())
        _check_copy(layout, _scan(tmp), tuned, info.arch, src)

    _atomic_write(dst, write, mode_from=dst if dst.exists() else src)
    return dst


def strip(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write a copy of src without the bias key and without provenance."""
    return write_tuned(src, dst, None, None)


def write_bias_gguf(
    path: str | os.PathLike[str],
    biases: Any,
    arch: str,
    provenance: Mapping[str, ProvenanceValue] | None = None,
) -> Path:
    """Write a small GGUF holding only general.architecture, the bias key (for llama.cpp's
    --attn-ftb FILE) and the zerotuning.* provenance given (with or without the prefix); biases is
    [n_layer, n_head]. The write is atomic."""
    path = Path(path)
    prov = _provenance_items(provenance, path)
    if not isinstance(arch, str) or not arch or not arch.isascii() or not arch.isprintable() or " " in arch:
        raise GGUFMetaError(f"{path}: invalid architecture name {arch!r}")
    try:
        arr = np.asarray(biases, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise GGUFMetaError(f"{path}: biases are not an array of numbers ({_one_line(e)})") from None
    if arr.ndim != 2 or arr.size == 0:
        raise GGUFMetaError(
            f"{path}: biases must be a non-empty [n_layer, n_head] array, got shape {arr.shape}"
        )
    values = _finite_f32(arr, str(path))

    def write(tmp: Path) -> None:
        writer = GGUFWriter(tmp, arch)
        writer.add_key_value(
            bias_key(arch), [float(v) for v in values.reshape(-1)], GGUFValueType.ARRAY, GGUFValueType.FLOAT32
        )
        for key, value in prov:
            if isinstance(value, bool):
                writer.add_key_value(key, value, GGUFValueType.BOOL)
            elif isinstance(value, int):
                writer.add_key_value(key, value, GGUFValueType.INT64)
            elif isinstance(value, float):
                writer.add_key_value(key, value, GGUFValueType.FLOAT64)
            else:
                writer.add_key_value(key, value, GGUFValueType.STRING)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        stored = _scan(tmp).kvs.get(bias_key(arch))
        if stored is None or not np.array_equal(stored.value, values.reshape(-1)):
            raise GGUFMetaError(f"{path}: internal error: the written bias does not read back")

    _atomic_write(path, write, mode_from=path if path.exists() else None)
    return path


# --- internals: the GGUF layout ------------------------------------------------------------

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
_INT_TYPES = frozenset(t for t, code in _SCALAR_FORMATS.items() if code in "BbHhIiQq")
_MAX_ARRAY_DEPTH = 4
_MAX_DIMS = 8


@dataclass
class _KV:
    key: str
    type: GGUFValueType
    sub_type: GGUFValueType | None  # arrays only
    count: int  # arrays only: number of elements
    start: int  # byte range of the whole record (key and value) in the file
    end: int
    # scalars, strings, numeric arrays (numpy, native byte order) and short string arrays;
    # None for long string arrays and nested arrays
    value: Any

    def type_name(self) -> str:
        if self.type == GGUFValueType.ARRAY:
            return f"ARRAY of {self.sub_type.name if self.sub_type is not None else '?'}"
        return self.type.name


@dataclass
class _Tensor:
    name: str
    dims: tuple[int, ...]
    type: int
    offset: int  # relative to the data section
    nbytes: int


@dataclass
class _Layout:
    path: Path
    order: str  # "<" or ">"
    version: int
    kvs: dict[str, _KV]  # in file order
    tensors: list[_Tensor]
    tensor_infos_start: int
    tensor_infos_end: int
    alignment: int
    data_offset: int
    file_size: int


class _Corrupt(Exception):
    pass


def _shown(name: str, limit: int = 80) -> str:
    """A key or tensor name for a message: non-printable characters escaped, shortened."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in name[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Scanner:
    def __init__(self, buf: mmap.mmap | bytes, order: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.order = order

    def unpack(self, fmt: str, off: int) -> tuple[Any, ...]:
        n = struct.calcsize(self.order + fmt)
        if off + n > self.size:
            raise _Corrupt(f"unexpected end of file at byte {off}")
        return struct.unpack_from(self.order + fmt, self.buf, off)

    def string(self, off: int) -> tuple[bytes, int]:
        (n,) = self.unpack("Q", off)
        start = off + 8
        if n > self.size - start:
            raise _Corrupt(f"a string of {n} bytes at byte {off} runs past the end of the file")
        return bytes(self.buf[start : start + n]), start + n

    def value_type(self, raw: int, off: int) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Corrupt(f"unknown value type {raw} at byte {off}") from None

    def skip_strings(self, off: int, n: int) -> int:
        unpack = struct.Struct(self.order + "Q").unpack_from
        buf, size = self.buf, self.size
        for _ in range(n):
            if off + 8 > size:
                raise _Corrupt(f"unexpected end of file at byte {off}")
            (length,) = unpack(buf, off)
            off += 8 + length
            if off > size:
                raise _Corrupt(f"a string of {length} bytes runs past the end of the file")
        return off

    def value(
        self, vtype: GGUFValueType, off: int, depth: int = 0
    ) -> tuple[Any, GGUFValueType | None, int, int]:
        """(value, array sub_type, array count, end offset) of the value at off."""
        if vtype in _SCALAR_FORMATS:
            (v,) = self.unpack(_SCALAR_FORMATS[vtype], off)
            return v, None, 0, off + struct.calcsize(_SCALAR_FORMATS[vtype])
        if vtype == GGUFValueType.STRING:
            data, end = self.string(off)
            return data.decode("utf-8", errors="replace"), None, 0, end
        if vtype != GGUFValueType.ARRAY:
            raise _Corrupt(f"unknown value type {int(vtype)} at byte {off}")
        raw_sub, n = self.unpack("IQ", off)
        sub = self.value_type(raw_sub, off)
        off += 12
        if sub in _SCALAR_FORMATS:
            code = _SCALAR_FORMATS[sub]
            size = struct.calcsize(code)
            if n > (self.size - off) // size:
                raise _Corrupt(f"an array of {n} values at byte {off} runs past the end of the file")
            arr = np.frombuffer(self.buf, dtype=np.dtype(self.order + code), count=n, offset=off)
            return arr.astype(arr.dtype.newbyteorder("=")), sub, n, off + n * size
        if sub == GGUFValueType.STRING:
            if n > MAX_DECODED_STRING_ARRAY:
                return None, sub, n, self.skip_strings(off, n)
            out = []
            for _ in range(n):
                data, off = self.string(off)
                out.append(data.decode("utf-8", errors="replace"))
            return out, sub, n, off
        if depth >= _MAX_ARRAY_DEPTH:
            raise _Corrupt(f"arrays nested too deeply at byte {off}")
        for _ in range(n):
            _, _, _, off = self.value(sub, off, depth + 1)
        return None, sub, n, off


def _read_magic(path: Path) -> bytes:
    if not path.exists():
        raise GGUFMetaError(f"{path}: no such file")
    if path.is_dir():
        raise GGUFMetaError(f"{path}: is a directory, not a file")
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError as e:
        raise GGUFMetaError(f"{path}: cannot read: {e.strerror or e}") from None


def _scan(path: Path) -> _Layout:
    """The layout of a GGUF file, with every offset and length checked against the file size."""
    if _read_magic(path) != MAGIC:
        raise GGUFMetaError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, buf)
    except OSError as e:
        raise GGUFMetaError(f"{path}: cannot read: {e.strerror or e}") from None
    except _Corrupt as e:
        raise GGUFMetaError(f"{path}: corrupt or truncated GGUF file ({e})") from None


def _parse(path: Path, buf: mmap.mmap) -> _Layout:
    if len(buf) < 24:
        raise _Corrupt("shorter than a GGUF header")
    (version,) = struct.unpack_from("<I", buf, 4)
    order = "<"
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        order = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in (2, 3):
        raise _Corrupt(f"GGUF version {version} is not supported (2 and 3 are)")
    s = _Scanner(buf, order)
    n_tensors, n_kv = s.unpack("QQ", 8)
    # every key/value takes at least 12 bytes, every tensor info at least 24
    if n_kv > s.size // 12 or n_tensors > s.size // 24:
        raise _Corrupt(f"{n_kv} key/values and {n_tensors} tensors cannot fit in {s.size} bytes")

    off = 24
    kvs: dict[str, _KV] = {}
    for _ in range(n_kv):
        start = off
        key_bytes, off = s.string(off)
        try:
            key = key_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"the key at byte {start} is not UTF-8") from None
        if key in kvs:
            raise _Corrupt(f"duplicate key {_shown(key)}")
        (raw_type,) = s.unpack("I", off)
        vtype = s.value_type(raw_type, off)
        try:
            value, sub, count, off = s.value(vtype, off + 4)
        except _Corrupt as e:
            raise _Corrupt(f"key {_shown(key)}: {e}") from None
        kvs[key] = _KV(key, vtype, sub, count, start, off, value)

    alignment = GGUF_DEFAULT_ALIGNMENT
    if KEY_ALIGNMENT in kvs:
        kv = kvs[KEY_ALIGNMENT]
        if kv.type != GGUFValueType.UINT32 or kv.value == 0 or kv.value & (kv.value - 1):
            raise _Corrupt(
                f"key {KEY_ALIGNMENT} must be a UINT32 power of two, not {kv.type_name()} {kv.value}"
            )
        alignment = int(kv.value)

    tensor_infos_start = off
    tensors: list[_Tensor] = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name_bytes, off = s.string(off)
        name = name_bytes.decode("utf-8", errors="replace")
        if name in names:
            raise _Corrupt(f"duplicate tensor {_shown(name)}")
        names.add(name)
        (n_dims,) = s.unpack("I", off)
        if n_dims > _MAX_DIMS:
            raise _Corrupt(f"tensor {_shown(name)} has {n_dims} dimensions")
        dims = s.unpack("Q" * n_dims, off + 4)
        ggml_type, offset = s.unpack("IQ", off + 4 + 8 * n_dims)
        off += 4 + 8 * n_dims + 12
        tensors.append(_Tensor(name, dims, ggml_type, offset, _tensor_nbytes(name, dims, ggml_type)))
    tensor_infos_end = off

    data_offset = off + (-off % alignment)
    data_size = s.size - data_offset
    for t in tensors:
        if t.offset % alignment:
            raise _Corrupt(
                f"tensor {_shown(t.name)}: offset {t.offset} is not a multiple of the alignment {alignment}"
            )
        if t.offset + t.nbytes > data_size:
            raise _Corrupt(f"tensor {_shown(t.name)} runs past the end of the file")
    return _Layout(
        path,
        order,
        version,
        kvs,
        tensors,
        tensor_infos_start,
        tensor_infos_end,
        alignment,
        data_offset,
        s.size,
    )


def _tensor_nbytes(name: str, dims: tuple[int, ...], ggml_type: int) -> int:
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise _Corrupt(f"tensor {_shown(name)} has an unknown type {ggml_type}") from None
    if dims and dims[0] % block_size:
        raise _Corrupt(
            f"tensor {_shown(name)}: row length {dims[0]} is not a multiple of the block size {block_size}"
        )
    n = 1
    for d in dims:
        n *= d
    return n // block_size * type_size


# --- internals: model info -----------------------------------------------------------------


def _one_line(e: object) -> str:
    return " ".join(str(e).split())


def _model_info(layout: _Layout) -> ModelInfo:
    path, kvs = layout.path, layout.kvs
    arch = _get_str(layout, KEY_ARCH)
    n_layer = _get_int(layout, f"{arch}.block_count")
    if not 1 <= n_layer <= MAX_LAYERS:
        # llama.cpp aborts the process (GGML_ASSERT) on these instead of refusing the model
        raise GGUFMetaError(f"{path}: key {arch}.block_count is {n_layer}, expected 1 to {MAX_LAYERS}")
    head_key = f"{arch}.attention.head_count"
    # llama.cpp: a missing head count is 0 (models without attention)
    heads = _get_per_layer(layout, head_key, n_layer) if head_key in kvs else [0] * n_layer
    kv_key = f"{arch}.attention.head_count_kv"
    heads_kv = _get_per_layer(layout, kv_key, n_layer) if kv_key in kvs else heads
    n_embd = _get_int(layout, f"{arch}.embedding_length")
    if KEY_TOKENS in kvs and kvs[KEY_TOKENS].type == GGUFValueType.ARRAY:
        n_vocab = kvs[KEY_TOKENS].count
    elif f"{arch}.vocab_size" in kvs:
        n_vocab = _get_int(layout, f"{arch}.vocab_size")
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
        provenance=_read_provenance(layout),
        n_tensors=len(layout.tensors),
    )
    key = bias_key(arch)
    if key in kvs:
        info.biases, info.bias_problem = _stored_bias(kvs[key], info)
    return info


def _get_str(layout: _Layout, key: str) -> str:
    kv = layout.kvs.get(key)
    if kv is None:
        raise GGUFMetaError(f"{layout.path}: key {key} is missing")
    if kv.type != GGUFValueType.STRING:
        raise GGUFMetaError(f"{layout.path}: key {key} must be a STRING, not {kv.type_name()}")
    if not kv.value:
        raise GGUFMetaError(f"{layout.path}: key {key} is empty")
    if not kv.value.isprintable():
        raise GGUFMetaError(f"{layout.path}: key {key} has non-printable characters: {_shown(kv.value)}")
    return kv.value


def _get_int(layout: _Layout, key: str) -> int:
    kv = layout.kvs.get(key)
    if kv is None:
        raise GGUFMetaError(f"{layout.path}: key {key} is missing")
    if kv.type not in _INT_TYPES:
        raise GGUFMetaError(f"{layout.path}: key {key} must be an integer, not {kv.type_name()}")
    if kv.value < 0:
        raise GGUFMetaError(f"{layout.path}: key {key} is negative ({kv.value})")
    return int(kv.value)


def _get_per_layer(layout: _Layout, key: str, n_layer: int) -> list[int]:
    """A key holding one integer for all layers or an array of one per layer (as llama.cpp)."""
    kv = layout.kvs[key]
    if kv.type != GGUFValueType.ARRAY:
        return [_get_int(layout, key)] * n_layer
    if kv.sub_type not in _INT_TYPES:
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


def _read_provenance(layout: _Layout) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, kv in layout.kvs.items():
        if key.startswith(PROVENANCE_PREFIX):
            value = kv.value
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif kv.type in _SCALAR_FORMATS:
                value = bool(value) if kv.type == GGUFValueType.BOOL else value
            out[key[len(PROVENANCE_PREFIX) :]] = value
    return out


def _stored_bias(kv: _KV, info: ModelInfo) -> tuple[np.ndarray | None, str | None]:
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


def _finite_f32(arr: np.ndarray, where: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = arr.astype(np.float32)
    bad = np.argwhere(~np.isfinite(out))
    if len(bad):
        index = tuple(int(i) for i in bad[0])
        shown = ", ".join(str(i) for i in index)
        raise GGUFMetaError(f"{where}: bias [{shown}] = {arr[index]} is not a finite float32")
    return out


def _bias_from_gguf(path: Path) -> np.ndarray:
    layout = _scan(path)
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
    name = "first_token_bias"
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


# --- internals: writing --------------------------------------------------------------------


def _is_replaced(key: str) -> bool:
    # every bias key goes (also a stale one under another arch prefix: llama.cpp's --attn-ftb
    # takes the first one of a file), and so does every provenance key
    return key.endswith(BIAS_KEY_SUFFIX) or key.startswith(PROVENANCE_PREFIX)


def _provenance_items(provenance: Mapping[str, Any] | None, src: Path) -> list[tuple[str, ProvenanceValue]]:
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


def _pack_str(text: str, order: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack(f"{order}Q", len(data)) + data


def _pack_scalar(key: str, value: ProvenanceValue, order: str) -> bytes:
    out = _pack_str(key, order)
    if isinstance(value, bool):
        return out + struct.pack(f"{order}I?", GGUFValueType.BOOL, value)
    if isinstance(value, int):
        return out + struct.pack(f"{order}Iq", GGUFValueType.INT64, value)
    if isinstance(value, float):
        return out + struct.pack(f"{order}Id", GGUFValueType.FLOAT64, value)
    return out + struct.pack(f"{order}I", GGUFValueType.STRING) + _pack_str(value, order)


def _pack_f32_array(key: str, values: np.ndarray, order: str) -> bytes:
    header = struct.pack(f"{order}IIQ", GGUFValueType.ARRAY, GGUFValueType.FLOAT32, values.size)
    return _pack_str(key, order) + header + values.astype(f"{order}f4").tobytes()


def _read_range(fin: BinaryIO, src: Path, start: int, end: int) -> bytes:
    try:
        fin.seek(start)
        data = fin.read(end - start)
    except OSError as e:
        raise GGUFMetaError(f"{src}: read error: {e.strerror or e}") from None
    if len(data) != end - start:
        raise GGUFMetaError(f"{src}: the file changed while it was being copied")
    return data


def _copy_data(
    fin: BinaryIO, src: Path, start: int, end: int, out: BinaryIO, progress: Callable[[int, int], None] | None
) -> None:
    """Stream bytes [start, end) of src to out in chunks."""
    total = max(0, end - start)
    done = 0
    while done < total:
        out.write(_read_range(fin, src, start + done, start + done + min(COPY_CHUNK_BYTES, total - done)))
        done += min(COPY_CHUNK_BYTES, total - done)
        if progress is not None:
            progress(done, total)


def _check_copy(src: _Layout, out: _Layout, biases: np.ndarray | None, arch: str, src_path: Path) -> None:
    """Compare the layout of the written file with the source's (a guard against a bug here)."""
    same = (
        [(t.name, t.dims, t.type, t.offset) for t in src.tensors]
        == [(t.name, t.dims, t.type, t.offset) for t in out.tensors]
        and src.file_size - src.data_offset == out.file_size - out.data_offset
        and src.alignment == out.alignment
        and [k for k in src.kvs if not _is_replaced(k)] == [k for k in out.kvs if not _is_replaced(k)]
    )
    stored = out.kvs.get(bias_key(arch))
    if biases is None:
        same = same and stored is None
    else:
        same = same and stored is not None and np.array_equal(stored.value, biases.reshape(-1))
    if not same:
        raise GGUFMetaError(f"{src_path}: internal error: the copy does not match the source's layout")


def _new_file_mode() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it
    os.umask(mask)
    return 0o666 & ~mask


def _same_file(src: Path, dst: Path) -> bool:
    try:
        if dst.exists() and os.path.samefile(src, dst):
            return True
    except OSError:
        pass
    return src.resolve() == dst.resolve()


def _atomic_write(dst: Path, write: Callable[[Path], None], mode_from: Path | None) -> None:
    """Run write(tmp) on a new temporary file next to dst, then rename it to dst.

    On any failure, KeyboardInterrupt included, the temporary file is removed, dst is left as it
    was, and GGUFMetaError is raised.
    """
    parent = dst.parent
    if dst.is_dir():
        raise GGUFMetaError(f"{dst}: is a directory")
    if not parent.is_dir():
        raise GGUFMetaError(f"{dst}: the directory {parent} does not exist")
    # an unnamed file where possible (Linux): a kill -9 while writing leaves no temporary file behind
    try:
        ufd = fsutil.open_unnamed(parent)
        if ufd is None:
            fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=parent)
            os.close(fd)
    except OSError as e:
        raise GGUFMetaError(f"{dst}: cannot create a file in {parent}: {e.strerror or e}") from None
    tmp = Path(f"/proc/self/fd/{ufd}") if ufd is not None else Path(name)
    try:
        write(tmp)
        if mode_from is not None:
            shutil.copymode(mode_from, tmp)
        else:
            os.chmod(tmp, _new_file_mode())
        if ufd is not None:
            fsutil.publish(ufd, dst)
        else:
            os.replace(tmp, dst)
    except BaseException as e:
        if ufd is None:
            try:
                tmp.unlink()
            except OSError:
                pass
        if isinstance(e, GGUFMetaError):
            raise
        if isinstance(e, KeyboardInterrupt):
            raise GGUFMetaError(f"{dst}: interrupted, nothing was written") from e
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise GGUFMetaError(f"{dst}: no space left on device") from e
        if isinstance(e, OSError):
            raise GGUFMetaError(f"{dst}: write failed: {e.strerror or _one_line(e)}") from e
        if isinstance(e, Exception):
            raise GGUFMetaError(f"{dst}: write failed: {type(e).__name__}: {_one_line(e)}") from e
        raise  # SystemExit and the like
    finally:
        if ufd is not None:
            os.close(ufd)
