"""A fast scanner of the GGUF layout: header, key/values and tensor infos, over a memory map.

Every length and offset is checked against the file size, and long string arrays (the vocabulary, the merges)
are skipped without being decoded, so reading the metadata of a model takes milliseconds where
gguf.GGUFReader, which builds a numpy view per token, takes seconds. Tensor data are never read.

The scanner knows no key names but general.alignment (gguf-py's ``Keys.General.ALIGNMENT``), which the
layout itself depends on. Every problem of the file raises GGUFMetaError, one line naming the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

from ..errors import UserError

__all__ = ["MAGIC", "MAX_DECODED_STRING_ARRAY", "GGUFMetaError", "Layout", "read_layout", "read_magic"]

MAGIC = struct.pack("<I", GGUF_MAGIC)  # b"GGUF"
# string arrays longer than this (vocabularies, merges) are skipped, not decoded
MAX_DECODED_STRING_ARRAY = 1024

SCALAR_FORMATS = {
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
INT_TYPES = frozenset(t for t, code in SCALAR_FORMATS.items() if code in "BbHhIiQq")
_MAX_ARRAY_DEPTH = 4
_MAX_DIMS = 8


class GGUFMetaError(UserError, ValueError):
    """A GGUF file or bias problem; str() is one line naming the file (and the key)."""


@dataclass
class KV:
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
class Tensor:
    name: str
    dims: tuple[int, ...]
    type: int
    offset: int  # relative to the data section
    nbytes: int


@dataclass
class Layout:
    path: Path
    order: str  # "<" or ">"
    version: int
    kvs: dict[str, KV]  # in file order
    tensors: list[Tensor]
    tensor_infos_start: int
    tensor_infos_end: int
    alignment: int
    data_offset: int
    file_size: int


class _Corrupt(Exception):
    pass


def shown(name: str, limit: int = 80) -> str:
    """A key or tensor name for a message: non-printable characters escaped, shortened."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in name[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(e: object) -> str:
    return " ".join(str(e).split())


def read_magic(path: Path) -> bytes:
    """The first 4 bytes of path (b"GGUF" for a GGUF file); GGUFMetaError if it cannot be read."""
    if not path.exists():
        raise GGUFMetaError(f"{path}: no such file")
    if path.is_dir():
        raise GGUFMetaError(f"{path}: is a directory, not a file")
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError as e:
        raise GGUFMetaError(f"{path}: cannot read: {e.strerror or e}") from None


def read_layout(path: Path) -> Layout:
    """The layout of a GGUF file, with every offset and length checked against the file size."""
    if read_magic(path) != MAGIC:
        raise GGUFMetaError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:  # (an empty file, truncated since, cannot be mapped)
                raise _Corrupt("shorter than a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf)
    except OSError as e:
        raise GGUFMetaError(f"{path}: cannot read: {e.strerror or e}") from None
    except _Corrupt as e:
        raise GGUFMetaError(f"{path}: corrupt or truncated GGUF file ({e})") from None


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
        if vtype in SCALAR_FORMATS:
            (v,) = self.unpack(SCALAR_FORMATS[vtype], off)
            return v, None, 0, off + struct.calcsize(SCALAR_FORMATS[vtype])
        if vtype == GGUFValueType.STRING:
            data, end = self.string(off)
            return data.decode("utf-8", errors="replace"), None, 0, end
        if vtype != GGUFValueType.ARRAY:
            raise _Corrupt(f"unknown value type {int(vtype)} at byte {off}")
        raw_sub, n = self.unpack("IQ", off)
        sub = self.value_type(raw_sub, off)
        off += 12
        if sub in SCALAR_FORMATS:
            code = SCALAR_FORMATS[sub]
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


def _parse(path: Path, buf: mmap.mmap) -> Layout:
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
    kvs, off = _parse_kvs(s, 24, n_kv)
    alignment = _alignment(kvs)
    tensor_infos_start = off
    tensors, off = _parse_tensor_infos(s, off, n_tensors)
    data_offset = off + (-off % alignment)
    data_size = s.size - data_offset
    for t in tensors:
        if t.offset % alignment:
            raise _Corrupt(
                f"tensor {shown(t.name)}: offset {t.offset} is not a multiple of the alignment {alignment}"
            )
        if t.offset + t.nbytes > data_size:
            raise _Corrupt(f"tensor {shown(t.name)} runs past the end of the file")
    return Layout(path, order, version, kvs, tensors, tensor_infos_start, off, alignment, data_offset, s.size)


def _parse_kvs(s: _Scanner, off: int, n_kv: int) -> tuple[dict[str, KV], int]:
    kvs: dict[str, KV] = {}
    for _ in range(n_kv):
        start = off
        key_bytes, off = s.string(off)
        try:
            key = key_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"the key at byte {start} is not UTF-8") from None
        if key in kvs:
            raise _Corrupt(f"duplicate key {shown(key)}")
        (raw_type,) = s.unpack("I", off)
        vtype = s.value_type(raw_type, off)
        try:
            value, sub, count, off = s.value(vtype, off + 4)
        except _Corrupt as e:
            raise _Corrupt(f"key {shown(key)}: {e}") from None
        kvs[key] = KV(key, vtype, sub, count, start, off, value)
    return kvs, off


def _alignment(kvs: dict[str, KV]) -> int:
    kv = kvs.get(Keys.General.ALIGNMENT)
    if kv is None:
        return GGUF_DEFAULT_ALIGNMENT
    if kv.type != GGUFValueType.UINT32 or kv.value == 0 or kv.value & (kv.value - 1):
        raise _Corrupt(f"key {kv.key} must be a UINT32 power of two, not {kv.type_name()} {kv.value}")
    return int(kv.value)


def _parse_tensor_infos(s: _Scanner, off: int, n_tensors: int) -> tuple[list[Tensor], int]:
    tensors: list[Tensor] = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name_bytes, off = s.string(off)
        name = name_bytes.decode("utf-8", errors="replace")
        if name in names:
            raise _Corrupt(f"duplicate tensor {shown(name)}")
        names.add(name)
        (n_dims,) = s.unpack("I", off)
        if n_dims > _MAX_DIMS:
            raise _Corrupt(f"tensor {shown(name)} has {n_dims} dimensions")
        dims = s.unpack("Q" * n_dims, off + 4)
        ggml_type, offset = s.unpack("IQ", off + 4 + 8 * n_dims)
        off += 4 + 8 * n_dims + 12
        tensors.append(Tensor(name, dims, ggml_type, offset, _tensor_nbytes(name, dims, ggml_type)))
    return tensors, off


def _tensor_nbytes(name: str, dims: tuple[int, ...], ggml_type: int) -> int:
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise _Corrupt(f"tensor {shown(name)} has an unknown type {ggml_type}") from None
    if dims and dims[0] % block_size:
        raise _Corrupt(
            f"tensor {shown(name)}: row length {dims[0]} is not a multiple of the block size {block_size}"
        )
    n = 1
    for d in dims:
        n *= d
    return n // block_size * type_size
