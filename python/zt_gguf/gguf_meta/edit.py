"""Writing GGUF files with ZeroTuning keys: tuned copies of a model (write_tuned, apply_biases), stripped
copies (strip), bias-only sidecars (write_bias_gguf).

write_tuned() copies a model without re-encoding anything: the header is rewritten, every kept key/value and
every tensor info is copied byte for byte, and the tensor data section is streamed unchanged (tensor offsets
are relative to that section and the alignment is kept, so they stay valid). Only the bias key and the
zerotuning.* keys change. The new key/values are encoded here, by one encoder (encode_kv).

Every write is atomic (zt_gguf.fsutil.atomic_write): a temporary file in the destination's folder, fsync,
rename; the input is never modified, and on any error, KeyboardInterrupt included, no partial file is left.
A problem of a file (unreadable input, full disk, ...) raises GGUFMetaError naming the file; a
KeyboardInterrupt, or any other exception (a bug), propagates unchanged.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_VERSION, GGUFValueType

from .. import fsutil
from .keys import (
    KEY_ARCH,
    PROV_APPLIED_FROM,
    ProvenanceValue,
    bias_key,
    finite_f32,
    is_replaced,
    model_info,
    provenance_items,
    read_bias_file,
    read_model_info,
    validate_biases,
)
from .scan import MAGIC, GGUFMetaError, Layout, one_line, read_layout

__all__ = ["apply_biases", "strip", "write_bias_gguf", "write_tuned"]

COPY_CHUNK_BYTES = 16 * 2**20


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
    layout = read_layout(src)
    info = model_info(layout)
    if _same_file(src, dst):
        raise GGUFMetaError(f"{dst}: is the input file; write the tuned model to another path")
    order = layout.order

    tuned = validate_biases(biases, info) if biases is not None else None
    new_kvs: list[bytes] = []
    if tuned is not None:
        new_kvs.append(encode_kv(bias_key(info.arch), tuned.reshape(-1), order))
    for key, value in provenance_items(provenance, src):
        new_kvs.append(encode_kv(key, value, order))
    kept = [kv for kv in layout.kvs.values() if not is_replaced(kv.key)]

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
        _check_copy(layout, read_layout(tmp), tuned, info.arch, src)

    _write_atomically(dst, write, mode_from=dst if dst.exists() else src)
    return dst


def strip(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write a copy of src without the bias key and without provenance."""
    return write_tuned(src, dst, None, None)


def apply_biases(
    model: str | os.PathLike[str], source: str | os.PathLike[str], dst: str | os.PathLike[str]
) -> Path:
    """Write a copy of model to dst with the biases of source (read_bias_file: a tuned GGUF, a bias-only
    GGUF or JSON). The provenance is a tuned source's zerotuning.* keys (none from a bias-only GGUF or
    JSON) plus applied_from = source's file name. Returns dst."""
    model, source = Path(model), Path(source)
    biases = read_bias_file(source, read_model_info(model))
    provenance: dict[str, Any] = {}
    if source.suffix == ".gguf":
        try:
            provenance = dict(read_model_info(source).provenance)
        except GGUFMetaError:
            provenance = {}  # a bias-only GGUF (no model hyperparameters): its biases were read above
    provenance[PROV_APPLIED_FROM] = source.name
    return write_tuned(model, dst, biases, provenance)


def write_bias_gguf(
    path: str | os.PathLike[str],
    biases: Any,
    arch: str,
    provenance: Mapping[str, ProvenanceValue] | None = None,
) -> Path:
    """Write a small GGUF holding only general.architecture, the bias key (for llama.cpp's
    --attn-ftb FILE) and the zerotuning.* provenance given (with or without the prefix); biases is
    [n_layer, n_head]. The file is what gguf.GGUFWriter writes for these keys (version 3, little-endian,
    no tensors). The write is atomic."""
    path = Path(path)
    prov = provenance_items(provenance, path)
    if not isinstance(arch, str) or not arch or not arch.isascii() or not arch.isprintable() or " " in arch:
        raise GGUFMetaError(f"{path}: invalid architecture name {arch!r}")
    try:
        arr = np.asarray(biases, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise GGUFMetaError(f"{path}: biases are not an array of numbers ({one_line(e)})") from None
    if arr.ndim != 2 or arr.size == 0:
        raise GGUFMetaError(
            f"{path}: biases must be a non-empty [n_layer, n_head] array, got shape {arr.shape}"
        )
    values = finite_f32(arr, str(path)).reshape(-1)
    records = [encode_kv(KEY_ARCH, arch, "<"), encode_kv(bias_key(arch), values, "<")]
    records += [encode_kv(key, value, "<") for key, value in prov]
    data = MAGIC + struct.pack("<IQQ", GGUF_VERSION, 0, len(records)) + b"".join(records)
    data += b"\0" * (-len(data) % GGUF_DEFAULT_ALIGNMENT)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            out.write(data)
        stored = read_layout(tmp).kvs.get(bias_key(arch))
        if stored is None or not np.array_equal(stored.value, values):
            raise GGUFMetaError(f"{path}: internal error: the written bias does not read back")

    _write_atomically(path, write, mode_from=path if path.exists() else None)
    return path


# --- the encoder ---------------------------------------------------------------------------


def encode_kv(key: str, value: ProvenanceValue | np.ndarray, order: str) -> bytes:
    """One GGUF key/value record in byte order order ("<" or ">"): a bool as BOOL, an int as INT64, a float
    as FLOAT64, a str as STRING, a numpy array as an ARRAY of FLOAT32."""
    out = _encode_str(key, order)
    if isinstance(value, np.ndarray):
        header = struct.pack(f"{order}IIQ", GGUFValueType.ARRAY, GGUFValueType.FLOAT32, value.size)
        return out + header + value.astype(f"{order}f4").tobytes()
    if isinstance(value, bool):
        return out + struct.pack(f"{order}I?", GGUFValueType.BOOL, value)
    if isinstance(value, int):
        return out + struct.pack(f"{order}Iq", GGUFValueType.INT64, value)
    if isinstance(value, float):
        return out + struct.pack(f"{order}Id", GGUFValueType.FLOAT64, value)
    return out + struct.pack(f"{order}I", GGUFValueType.STRING) + _encode_str(value, order)


def _encode_str(text: str, order: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack(f"{order}Q", len(data)) + data


# --- copying -------------------------------------------------------------------------------


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


def _check_copy(src: Layout, out: Layout, biases: np.ndarray | None, arch: str, src_path: Path) -> None:
    """Compare the layout of the written file with the source's (a guard against a bug here)."""
    same = (
        [(t.name, t.dims, t.type, t.offset) for t in src.tensors]
        == [(t.name, t.dims, t.type, t.offset) for t in out.tensors]
        and src.file_size - src.data_offset == out.file_size - out.data_offset
        and src.alignment == out.alignment
        and [k for k in src.kvs if not is_replaced(k)] == [k for k in out.kvs if not is_replaced(k)]
    )
    stored = out.kvs.get(bias_key(arch))
    if biases is None:
        same = same and stored is None
    else:
        same = same and stored is not None and np.array_equal(stored.value, biases.reshape(-1))
    if not same:
        raise GGUFMetaError(f"{src_path}: internal error: the copy does not match the source's layout")


def _same_file(src: Path, dst: Path) -> bool:
    try:
        if dst.exists() and os.path.samefile(src, dst):
            return True
    except OSError:
        pass
    return src.resolve() == dst.resolve()


def _write_atomically(dst: Path, write: Callable[[Path], None], mode_from: Path | None) -> None:
    """fsutil.atomic_write(dst, write, mode_from), the destination checked first and the file system's
    errors (OSError) as one GGUFMetaError line naming dst. Anything else, KeyboardInterrupt included,
    propagates unchanged; either way no temporary file is left and dst is as it was."""
    parent = dst.parent
    if dst.is_dir():
        raise GGUFMetaError(f"{dst}: is a directory")
    if not parent.is_dir():
        raise GGUFMetaError(f"{dst}: the directory {parent} does not exist")
    started = False

    def run(tmp: Path) -> None:
        nonlocal started
        started = True
        write(tmp)

    try:
        fsutil.atomic_write(dst, run, mode_from)
    except OSError as e:
        if not started:
            raise GGUFMetaError(f"{dst}: cannot create a file in {parent}: {e.strerror or e}") from None
        if e.errno == errno.ENOSPC:
            raise GGUFMetaError(f"{dst}: no space left on device") from e
        raise GGUFMetaError(f"{dst}: write failed: {e.strerror or one_line(e)}") from e
