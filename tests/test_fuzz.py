"""Fuzzing the first-token bias metadata and the setter of the patched llama.cpp.

Two bounded runs:

* test_engine_fuzz (every CI run, the normal build): RUNS pseudo-random mutations (fixed seed) of two
  small valid seed models (a tiny llama, a tiny deci with per-layer head counts, both with a stored bias):
  the bias key with the wrong type, length, NaN/inf/raw float bits, empty or huge (4 Mi values), per-layer
  head counts, stale keys of other archs, truncated files, byte flips of the metadata and garbage after a
  GGUF header. Every file goes through gguf_meta.read_model_info and the engine (the patched libllama: load,
  context, the setter with wrong shapes, NaN, None and valid values, a scoring call) in child processes,
  BATCH files per child, so that a crash (an abort, a segfault) is seen as the child's death and reported
  with the file that caused it, instead of killing pytest. Checked: no crash; the bias a context starts
  with is exactly what gguf_meta reads (clamped to [-100, 100]), or off with one "ignoring" log line; the
  setter's errors leave the bias unchanged; scores are finite.
* test_asan_fuzz: cpp/fuzz/fuzz_attn_ftb.cpp (the same ideas through the public C API, with an exact
  oracle of the loader's rules) built with AddressSanitizer and UndefinedBehaviorSanitizer, ASAN_RUNS
  executions. The sanitized build of libllama + ggml takes 13-23 minutes on our 2 cores without ccache
  (benchmarks/bench_fuzz.sh; minutes with it): the test runs when build/asan/fuzz_attn_ftb exists, and
  builds it first when ZT_GGUF_FUZZ=1 (set by .ci/run, so CI always runs it); otherwise it is skipped with
  that reason. benchmarks/bench_fuzz.sh records a longer run.

* test_task_loader_fuzz: TASK_RUNS executions of benchmarks/fuzz_tasks.py, the fuzzer of the task loader and
  of the match rules of open-ended items (a smoke run; results/fuzz_tasks.md records 1,000,000), and
  test_task_loader_fuzz_reports_planted_bugs: the harness finds the bugs planted in a loader.

Inputs that reach a known crash (the "Known findings" of cpp/fuzz/fuzz_attn_ftb.cpp) are counted and not
loaded: K1 (block_count 0 or > 512: gguf_meta refuses these before the engine sees them, llama.cpp would
abort) and K2 (unequal per-layer head_count_kv in a llama-arch file: upstream's GGML_ASSERT). K4 (unequal
per-layer head counts in a llama-arch file with a bias on, our patch's GGML_ASSERT) is fixed: such files are
generated and loaded (tests/test_reliability.py::test_llama_arch_per_layer_heads_with_bias).
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFValueType

from zt_gguf import gguf_meta
from zt_gguf.testing import _linear, _norm_w, _write_gguf, make_tiny_llama, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RUNS = int(os.environ.get("ZT_GGUF_FUZZ_RUNS", "500"))  # engine fuzz cases per CI run (~45 s on 2 cores)
BATCH = 40  # files per child process
SEED = 20260501
ASAN_RUNS = int(os.environ.get("ZT_GGUF_ASAN_RUNS", "2000"))
ASAN_EXE = ROOT / "build" / "asan" / "fuzz_attn_ftb"
CHILD_TIMEOUT = 600.0

U32, F32, ARR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.ARRAY


# --- seed models ------------------------------------------------------------------------------------------


def make_tiny_deci(
    path: str | Path,
    *,
    heads: tuple[int, ...] = (4, 2),
    heads_kv: tuple[int, ...] = (2, 1),
    head_dim: int = 16,
    n_embd: int = 64,
    n_ff: int = 64,
    seed: int = 0,
    biases: np.ndarray | None = None,
    bias_values: Any = None,
) -> Path:
    """A random-weight deci-arch GGUF (all F32) with per-layer query and KV head counts: the architecture of
    Nemotron-NAS, whose graph uses n_head(il) per layer. The bias key holds n_layer * max(heads) values."""
    path = Path(path)
    n_layer = len(heads)
    tok = make_tokenizer(True)
    rng = np.random.default_rng(seed)
    w = {"token_embd.weight": rng.standard_normal((tok.n_vocab, n_embd)).astype(np.float32)}
    for il in range(n_layer):
        p = f"blk.{il}."
        w[p + "attn_norm.weight"] = _norm_w(rng, n_embd)
        w[p + "attn_q.weight"] = _linear(rng, heads[il] * head_dim, n_embd)
        w[p + "attn_k.weight"] = _linear(rng, heads_kv[il] * head_dim, n_embd)
        w[p + "attn_v.weight"] = _linear(rng, heads_kv[il] * head_dim, n_embd)
        w[p + "attn_output.weight"] = _linear(rng, n_embd, heads[il] * head_dim)
        w[p + "ffn_norm.weight"] = _norm_w(rng, n_embd)
        w[p + "ffn_gate.weight"] = _linear(rng, n_ff, n_embd)
        w[p + "ffn_up.weight"] = _linear(rng, n_ff, n_embd)
        w[p + "ffn_down.weight"] = _linear(rng, n_embd, n_ff, 0.5)
    w["output_norm.weight"] = _norm_w(rng, n_embd)
    w["output.weight"] = _linear(rng, tok.n_vocab, n_embd, 2.0)
    kv: list[tuple[str, Any, Any, Any]] = [
        ("{arch}.context_length", 512, U32, None),
        ("{arch}.embedding_length", n_embd, U32, None),
        ("{arch}.block_count", n_layer, U32, None),
        ("{arch}.feed_forward_length", n_ff, U32, None),
        ("{arch}.attention.head_count", list(heads), ARR, U32),
        ("{arch}.attention.head_count_kv", list(heads_kv), ARR, U32),
        ("{arch}.attention.key_length", head_dim, U32, None),
        ("{arch}.attention.value_length", head_dim, U32, None),
        ("{arch}.rope.dimension_count", head_dim, U32, None),
        ("{arch}.rope.freq_base", 10000.0, F32, None),
        ("{arch}.attention.layer_norm_rms_epsilon", 1e-5, F32, None),
        ("{arch}.vocab_size", tok.n_vocab, U32, None),
    ]
    if biases is not None and bias_values is not None:
        raise ValueError("give biases or bias_values, not both")
    _write_gguf(path, "deci", kv, tok, w, biases if bias_values is None else bias_values, None)
    return path


def write_seed_models(folder: Path) -> tuple[Path, Path]:
    """The fuzzers' seeds: seed_llama.gguf (2 layers x 4 heads) and seed_deci.gguf (heads 4, 2), each with a
    stored bias (so that byte flips reach bias values too)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    llama = make_tiny_llama(
        folder / "seed_llama.gguf", seed=3, biases=rng.uniform(-2, 2, (2, 4)).astype(np.float32)
    ).path
    deci = make_tiny_deci(
        folder / "seed_deci.gguf", seed=4, biases=rng.uniform(-2, 2, (2, 4)).astype(np.float32)
    )
    return llama, deci


# --- GGUF records -----------------------------------------------------------------------------------------


def _str(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


_FMT = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT32: "i",
    GGUFValueType.UINT32: "I",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.FLOAT64: "d",
    GGUFValueType.BOOL: "B",
}


def kv_record(key: str, vtype: GGUFValueType, value: Any, sub: GGUFValueType | None = None) -> bytes:
    """One key/value record of a little-endian GGUF, written as is (no checks: hostile values welcome)."""
    out = _str(key) + struct.pack("<I", vtype)
    if vtype == GGUFValueType.STRING:
        return out + _str(value)
    if vtype == GGUFValueType.FLOAT32:
        with np.errstate(over="ignore"):
            return out + np.float32(value).astype("<f4").tobytes()  # beyond float32's range: inf
    if vtype != GGUFValueType.ARRAY:
        return out + struct.pack("<" + _FMT[vtype], value)
    assert sub is not None
    out += struct.pack("<IQ", sub, len(value))
    if sub == GGUFValueType.STRING:
        return out + b"".join(_str(v) for v in value)
    if sub == GGUFValueType.FLOAT32 and isinstance(value, np.ndarray):
        return out + value.astype("<f4").tobytes()
    return out + struct.pack(f"<{len(value)}{_FMT[sub]}", *value)


class Seed:
    """A seed model split into header, key/value records, tensor infos and data (offsets unchanged)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bytes = path.read_bytes()
        layout = gguf_meta._scan(path)
        self.info = gguf_meta.read_model_info(path)
        self.arch = self.info.arch
        self.n_layer = self.info.n_layer
        self.n_head = self.info.n_head
        self.layout = layout
        self.kvs = {k: self.bytes[kv.start : kv.end] for k, kv in layout.kvs.items()}
        self.n_tensors = len(layout.tensors)
        self.tensor_infos = self.bytes[layout.tensor_infos_start : layout.tensor_infos_end]
        self.data = self.bytes[layout.data_offset :]
        self.alignment = layout.alignment
        # where byte flips go: the header and every key/value but the tokenizer's (flipping the vocabulary
        # reaches upstream aborts of the tokenizer, e.g. two equal tokens, not the bias)
        self.flip_ranges = [(0, 24)] + [
            (kv.start, kv.end)
            for k, kv in layout.kvs.items()
            if not k.startswith("tokenizer.") and k != "general.file_type"  # U2, fuzz_attn_ftb.cpp
        ]

    def build(self, records: dict[str, bytes]) -> bytes:
        head = b"GGUF" + struct.pack("<IQQ", 3, self.n_tensors, len(records))
        body = head + b"".join(records.values()) + self.tensor_infos
        return body + b"\0" * (-len(body) % self.alignment) + self.data


# --- the mutator ------------------------------------------------------------------------------------------


def _value(rng: random.Random) -> float:
    r = rng.randrange(12)
    if r == 0:
        return math.nan
    if r == 1:
        return math.inf
    if r == 2:
        return -math.inf
    if r == 3:
        return struct.unpack("<f", rng.randbytes(4))[0]
    if r == 4:
        return rng.choice((1.0, -1.0)) * 2.0 ** rng.randrange(-10, 130)
    if r == 5:
        return 1e-45
    if r == 6:
        return -0.0
    if r == 7:
        return rng.choice((100.0, -100.0))
    return (rng.randrange(256) - 128) / 16


def _f32_values(rng: random.Random, n: int) -> np.ndarray:
    how = rng.randrange(4)
    if n > 4096:  # huge arrays: cheap values, sometimes one bad one
        v = (np.arange(n, dtype=np.float32) % 7) - 3
        if how == 0:
            v[rng.randrange(n)] = np.nan
        return v
    if how == 0:
        return np.frombuffer(rng.randbytes(4 * n), dtype="<f4").copy()
    if how in (1, 2):
        return np.array([(rng.randrange(256) - 128) / 32 for _ in range(n)], dtype=np.float32)
    with np.errstate(over="ignore"):
        return np.array([_value(rng) for _ in range(n)], dtype=np.float32)


def mutate(seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    """One hostile variant of seed and a description of it."""
    mode = rng.randrange(20)
    key = gguf_meta.bias_key(seed.arch)
    if mode >= 18:  # byte flips in the header and the non-tokenizer key/values
        data = bytearray(seed.bytes)
        where = []
        for _ in range(rng.randrange(1, 9)):
            a, b = rng.choice(seed.flip_ranges)
            at = rng.randrange(a, b)
            data[at] = data[at] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
            where.append(at)
        return bytes(data), f"flips@{where}"
    if mode == 17:  # garbage after a GGUF header
        return b"GGUF\x03\x00\x00\x00" + rng.randbytes(rng.randrange(0, 600)), "raw"

    records = dict(seed.kvs)
    what = []
    n_exp = seed.n_layer * seed.n_head
    if rng.random() < 0.25:
        # per-layer head counts: arrays where the architecture has them (deci), and sometimes in a llama file
        # (its graph takes layer 0's count; the fixed finding K4)
        hk = f"{seed.arch}.attention.head_count"
        if seed.arch == "deci" or rng.random() < 0.3:
            heads = [rng.choice((0, 1, 2, 4, 4, 8)) for _ in range(seed.n_layer + (rng.random() < 0.1))]
            records[hk] = kv_record(hk, ARR, heads, rng.choice((U32, GGUFValueType.INT32)))
        else:
            records[hk] = kv_record(hk, U32, rng.choice((0, 1, 2, 4, 8)))
        what.append("head_count")
    if rng.random() < 0.05:
        bk = f"{seed.arch}.block_count"
        records[bk] = kv_record(bk, U32, rng.choice((0, 1, 2, 3, 600, 2**32 - 1)))
        what.append("block_count")

    records.pop(key, None)
    kind = rng.randrange(16)
    if kind == 0:
        what.append("bias:absent")
    elif kind <= 8:
        n = rng.choice([n_exp] * 4 + [n_exp - 1, n_exp + 1, 0, 1, rng.randrange(4097), 1 << 16, 1 << 22])
        records[key] = kv_record(key, ARR, _f32_values(rng, n), F32)
        what.append(f"bias:f32[{n}]")
    elif kind == 9:
        records[key] = kv_record(key, F32, _value(rng))
        what.append("bias:f32")
    elif kind == 10:
        records[key] = kv_record(
            key, ARR, [rng.randrange(-(2**31), 2**31) for _ in range(n_exp)], GGUFValueType.INT32
        )
        what.append("bias:i32[]")
    elif kind == 11:
        records[key] = kv_record(key, ARR, [_value(rng) for _ in range(n_exp)], GGUFValueType.FLOAT64)
        what.append("bias:f64[]")
    elif kind == 12:
        records[key] = kv_record(key, ARR, [rng.randrange(2) for _ in range(n_exp)], GGUFValueType.BOOL)
        what.append("bias:bool[]")
    elif kind == 13:
        records[key] = kv_record(key, ARR, [str(_value(rng)) for _ in range(n_exp)], GGUFValueType.STRING)
        what.append("bias:str[]")
    elif kind == 14:
        records[key] = kv_record(key, GGUFValueType.STRING, "0.5")
        what.append("bias:str")
    else:
        records[key] = kv_record(key, ARR, [rng.randrange(256) for _ in range(n_exp)], GGUFValueType.UINT8)
        what.append("bias:u8[]")
    if rng.random() < 0.1:
        stale = "other.attention.first_token_bias"
        records[stale] = kv_record(stale, ARR, np.ones(3, np.float32), F32)
        what.append("stale-key")
    data = seed.build(records)
    if mode == 16:
        cut = rng.randrange(len(data))
        data = data[:cut]
        what.append(f"truncated@{cut}")
    return data, " ".join(what)


_SIZES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}


def lenient_kvs(data: bytes) -> dict[str, tuple[int, Any]] | None:
    """The key/values of a little-endian GGUF as llama.cpp's parser sees them (keys need not be UTF-8, which
    gguf_meta refuses): key -> (type, value) with strings, scalars and integer arrays decoded; None if the
    records do not parse."""
    try:
        if data[:4] != b"GGUF":
            return None
        (n_kv,) = struct.unpack_from("<Q", data, 16)
        off, out = 24, {}
        for _ in range(n_kv):
            (klen,) = struct.unpack_from("<Q", data, off)
            key = data[off + 8 : off + 8 + klen].decode("utf-8", "replace")
            off += 8 + klen
            (vtype,) = struct.unpack_from("<I", data, off)
            off += 4
            value: Any = None
            if vtype == 8:
                (n,) = struct.unpack_from("<Q", data, off)
                value = data[off + 8 : off + 8 + n].decode("utf-8", "replace")
                off += 8 + n
            elif vtype == 9:
                sub, n = struct.unpack_from("<IQ", data, off)
                off += 12
                if n > len(data):
                    return None
                if sub == 8:
                    for _ in range(n):
                        off += 8 + struct.unpack_from("<Q", data, off)[0]
                elif sub in _SIZES:
                    size = struct.calcsize(_SIZES[sub])
                    if sub in (4, 5) and off + n * size <= len(data):
                        value = list(struct.unpack_from(f"<{n}{_SIZES[sub]}", data, off))
                    off += n * size
                else:
                    return None
            elif vtype in _SIZES:
                (value,) = struct.unpack_from("<" + _SIZES[vtype], data, off)
                off += struct.calcsize(_SIZES[vtype])
            else:
                return None
            if off > len(data):
                return None
            out[key] = (vtype, value)
        return out
    except (struct.error, OverflowError):
        return None


def known_finding(data: bytes) -> str | None:
    """The known crash a file reaches (K1, K2 of cpp/fuzz/fuzz_attn_ftb.cpp), by its raw key/values."""
    kvs = lenient_kvs(data)
    if kvs is None or kvs.get("general.architecture", (0, None))[0] != 8:
        return None
    arch = kvs["general.architecture"][1]
    vtype, n_layer = kvs.get(f"{arch}.block_count", (None, None))
    if vtype == 4 and not 1 <= n_layer <= 512:
        return "K1"  # upstream GGML_ASSERT; gguf_meta refuses it first (zt-gguf gives one error line)

    def unequal(key: str) -> bool:
        t, v = kvs.get(f"{arch}.attention.{key}", (None, None))
        return t == 9 and isinstance(v, list) and len(set(v)) > 1

    if arch == "llama" and unequal("head_count_kv"):
        return "K2"  # upstream GGML_ASSERT in ggml_set_rows
    return None


# --- the child: one batch of files through gguf_meta and the engine ---------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, math, os, sys
    import numpy as np
    from zt_gguf import gguf_meta
    from zt_gguf.engine import Context, EngineError, Model
    from zt_gguf.tasks import Item

    def say(obj):
        sys.stdout.write(json.dumps(obj) + "\\n")
        sys.stdout.flush()

    for path in sys.argv[1:]:
        os.write(2, ("@@case " + path + "\\n").encode())  # stderr marker: llama.cpp's log lines follow it
        say({"path": path, "start": True})
        out = {"path": path}
        try:
            info = gguf_meta.read_model_info(path)
            out["meta"] = "ok"
            out["meta_bias"] = None if info.biases is None else info.biases.reshape(-1).tolist()
            out["meta_problem"] = info.bias_problem
            out["per_layer"] = info.n_head_per_layer
        except gguf_meta.GGUFMetaError as e:
            info = None
            out["meta"] = "refused"
            out["meta_error"] = str(e)
        if os.environ.get("ZT_FUZZ_SKIP") and path.endswith(".skip.gguf"):
            say(out)
            continue
        try:
            model = Model(path)
        except EngineError as e:
            out["engine"] = "refused"
            out["engine_error"] = str(e).splitlines()[0] if str(e) else ""
            say(out)
            continue
        out["engine"] = "loaded"
        out["shape"] = list(model.bias_shape)
        ctx = Context(model, n_ctx=64, n_batch=16, n_ubatch=16, n_seq_max=2, n_threads=1)
        b = ctx.get_bias()
        out["start_bias"] = None if b is None else b.reshape(-1).tolist()
        shape = model.bias_shape
        checks = []
        # wrong shapes and non-finite values are refused; the bias stays as it was
        n = shape[0] * shape[1]
        for bad in (np.zeros((shape[0], shape[1] + 1), np.float32), np.zeros(n + 1, np.float32)):
            try:
                ctx.set_bias(bad)
                checks.append("wrong shape accepted")
            except ValueError:
                pass
        nan = np.zeros(shape, np.float32)
        nan.flat[len(nan.flat) // 2] = np.nan
        for setter in (ctx.set_bias, ctx._c.set_bias):  # the Python check, then the C setter itself (-2)
            try:
                setter(nan)
                checks.append("NaN accepted")
            except (ValueError, EngineError):
                pass
        after = ctx.get_bias()
        if (after is None) != (b is None) or (after is not None and not np.array_equal(after, b)):
            checks.append("a refused bias changed the bias")
        ctx.set_bias(None)
        if ctx.get_bias() is not None:
            checks.append("the bias is on after set_bias(None)")
        good = np.linspace(-150, 150, shape[0] * shape[1], dtype=np.float32).reshape(shape)
        ctx.set_bias(good)
        if not np.array_equal(ctx.get_bias(), np.clip(good, -100, 100)):
            checks.append("the bias read back is not the clamped values set")
        try:
            s = ctx.score([Item("the cat sat on the", (" mat", " dog"), 0, "x")], n_gen=2)[0]
            if not np.all(np.isfinite(s.choice_logprob)):
                checks.append("non-finite scores")
            out["scored"] = True
        except EngineError as e:
            out["score_error"] = str(e).splitlines()[0]
        out["checks"] = checks
        say(out)
    """
)


def _ftb_lines(stderr: str) -> dict[str, list[str]]:
    """The first-token bias log lines of each case, from the child's stderr (split at the markers)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in stderr.splitlines():
        if line.startswith("@@case "):
            current = line[len("@@case ") :]
            out[current] = []
        elif current is not None and "first-token" in line:
            out[current].append(line)
    return out


def _run_child(paths: list[Path]) -> tuple[list[dict[str, Any]], int, str]:
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, paths)],
        capture_output=True,
        timeout=CHILD_TIMEOUT,
        env={**os.environ, "ZT_FUZZ_SKIP": "1"},
    )
    lines = [json.loads(x) for x in res.stdout.decode().splitlines() if x.startswith("{")]
    return lines, res.returncode, res.stderr.decode(errors="replace")


def run_engine_fuzz(n: int, seed: int, folder: Path) -> dict[str, Any]:
    """n mutated files through gguf_meta and the engine; a summary (counts and failures)."""
    llama, deci = write_seed_models(folder / "seeds")
    seeds = [Seed(llama), Seed(deci)]
    rng = random.Random(seed)
    cases: list[tuple[Path, str, str | None]] = []
    counts: Counter[str] = Counter()
    failures: list[str] = []
    work = folder / "cases"
    work.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        s = seeds[rng.randrange(len(seeds))]
        data, what = mutate(s, rng)
        path = work / f"case{i:05d}.gguf"
        path.write_bytes(data)
        known = known_finding(data)
        if known:
            counts[f"known_{known}"] += 1
            path = path.rename(path.with_suffix(".skip.gguf"))
        cases.append((path, f"{s.arch}: {what}", known))
    crashed = False
    for start in range(0, len(cases), BATCH):
        if crashed:
            break
        batch = cases[start : start + BATCH]
        got, rc, stderr = _run_child([p for p, _, _ in batch])
        logs = _ftb_lines(stderr)
        done = {r["path"]: r for r in got if not r.get("start")}
        for path, what, _known in batch:
            r = done.get(str(path))
            if r is None:  # the child died on this file (a crash): keep it, stop
                failures.append(f"{path.name} ({what}): the child died (exit {rc}) on it\n{stderr[-1500:]}")
                (folder / "crash.gguf").write_bytes(path.read_bytes())
                crashed = True
                break
            counts["cases"] += 1
            counts[f"meta_{r['meta']}"] += 1
            if "engine" not in r:
                continue
            counts[f"engine_{r['engine']}"] += 1
            failures += [f"{path.name} ({what}): {c}" for c in r.get("checks", [])]
            if r["engine"] != "loaded":
                continue
            lines = logs.get(str(path), [])
            ignored = sum("ignoring the first-token attention bias" in x for x in lines)
            start_bias = r["start_bias"]
            if r["meta"] == "ok":
                want = None if r["meta_bias"] is None else np.clip(np.float32(r["meta_bias"]), -100, 100)
                if (start_bias is None) != (want is None) or (
                    want is not None and not np.array_equal(np.float32(start_bias), want)
                ):
                    failures.append(f"{path.name} ({what}): the engine's bias is not what gguf_meta reads")
                if r["meta_problem"] is not None and ignored != 1:
                    failures.append(f"{path.name} ({what}): {ignored} 'ignoring' lines for an unusable key")
                if r["meta_problem"] is None and ignored:
                    failures.append(
                        f"{path.name} ({what}): an 'ignoring' line, yet gguf_meta finds no problem"
                    )
                counts["bias_on" if start_bias is not None else "bias_off"] += 1
                counts["bias_ignored"] += r["meta_problem"] is not None
                counts["per_layer_heads"] += len(set(r["per_layer"])) > 1
            counts["scored"] += bool(r.get("scored"))
            if "score_error" in r:
                failures.append(f"{path.name} ({what}): scoring failed: {r['score_error']}")
    return {"counts": dict(counts), "failures": failures, "n": n, "seed": seed}


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("fuzz")


def test_seed_models_load_with_their_bias(fuzz_dir: Path) -> None:
    """The seeds are valid: the engine applies their stored bias, and the deci seed has per-layer heads."""
    from zt_gguf.engine import Context, Model

    llama, deci = write_seed_models(fuzz_dir / "check")
    for path in (llama, deci):
        info = gguf_meta.read_model_info(path)
        ctx = Context(Model(path), n_ctx=64, n_threads=1)
        np.testing.assert_array_equal(ctx.get_bias(), info.biases)
    assert gguf_meta.read_model_info(deci).n_head_per_layer == [4, 2]


def test_engine_fuzz(fuzz_dir: Path) -> None:
    """RUNS mutated files (fixed seed) through gguf_meta and the engine: no crash, no failed check."""
    summary = run_engine_fuzz(RUNS, SEED, fuzz_dir)
    c = summary["counts"]
    print(f"\nengine fuzz: {json.dumps(summary['counts'], sort_keys=True)}")
    assert not summary["failures"], "\n".join(summary["failures"][:10])
    assert c["cases"] == RUNS  # every file went through the children (the known findings without the engine)
    # the run reached what it is meant to: loaded files with the bias on, ignored keys, per-layer heads
    assert c.get("bias_on", 0) >= 5 and c.get("bias_ignored", 0) >= 20 and c.get("per_layer_heads", 0) >= 5
    assert c.get("engine_refused", 0) >= 5 and c.get("scored", 0) >= 20


# --- the sanitized C++ fuzz target ------------------------------------------------------------------------


def _asan_exe() -> Path:
    if ASAN_EXE.exists():
        return ASAN_EXE
    if os.environ.get("ZT_GGUF_FUZZ") != "1":
        pytest.skip(
            "no ASan build (build/asan/fuzz_attn_ftb; it took 23 min on 2 shared cores): set ZT_GGUF_FUZZ=1 "
            "to build it here, or run benchmarks/bench_fuzz.sh"
        )
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "bench_fuzz.sh"), "--build-only"],
        capture_output=True,
        timeout=3600,
    )
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-3000:]
    return ASAN_EXE


def test_asan_fuzz(fuzz_dir: Path) -> None:
    """ASAN_RUNS executions of cpp/fuzz/fuzz_attn_ftb.cpp under AddressSanitizer and UBSan: 0 crashes."""
    exe = _asan_exe()
    llama, deci = write_seed_models(fuzz_dir / "asan")
    env = {
        **os.environ,
        "ASAN_OPTIONS": "abort_on_error=1:detect_leaks=1:allocator_may_return_null=1:halt_on_error=1",
        # U1 (upstream gguf.cpp, an out-of-range enum value loaded then refused): cpp/fuzz/ubsan.supp
        "UBSAN_OPTIONS": f"halt_on_error=1:print_stacktrace=1:suppressions={ROOT / 'cpp/fuzz/ubsan.supp'}",
    }
    res = subprocess.run(
        [str(exe), "--seeds", str(llama), str(deci), "--runs", str(ASAN_RUNS), "--seed", "1"]
        + ["--work", str(fuzz_dir), "--keep-failing", str(fuzz_dir)],
        capture_output=True,
        timeout=1800,
        env=env,
    )
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, f"{out[-1000:]}\n{res.stderr.decode(errors='replace')[-4000:]}"
    assert f"fuzz: {ASAN_RUNS} executions, 0 crashes" in out
    stats = {line.split()[1]: int(line.split()[2]) for line in out.splitlines() if line.startswith("stat ")}
    print("\nasan fuzz:", json.dumps(stats))
    assert stats["loaded_bias_on"] > 0 and stats["loaded_bias_ignored"] > 0 and stats["set_ok"] > 0


# --- the task loader's fuzzer (benchmarks/fuzz_tasks.py) --------------------------------------------------

TASK_RUNS = 600  # executions of benchmarks/fuzz_tasks.py per CI run (a few seconds); 1,000,000 outside CI
FUZZ_TASKS = ROOT / "benchmarks" / "fuzz_tasks.py"


def _run_fuzz_tasks(work: Path, n: int, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """benchmarks/fuzz_tasks.py run as a script (tests do not import benchmarks); its summary."""
    res = subprocess.run(
        [
            sys.executable,
            str(FUZZ_TASKS),
            "--executions",
            str(n),
            "--seed",
            str(SEED),
            "--work",
            str(work),
            *args,
        ],
        capture_output=True,
        timeout=CHILD_TIMEOUT,
        env={**os.environ, **(env or {})},
    )
    summary_path = work / "summary.json"
    assert summary_path.exists(), res.stderr.decode(errors="replace")[-3000:]
    summary = json.loads(summary_path.read_text())
    assert res.returncode == (1 if summary["findings"] else 0), res.stderr.decode(errors="replace")[-3000:]
    return summary


def test_task_loader_fuzz(tmp_path: Path) -> None:
    """TASK_RUNS inputs of the task loader's fuzzer: no finding, and every format loaded and refused."""
    summary = _run_fuzz_tasks(tmp_path, TASK_RUNS)
    c = summary["counts"]
    print(f"\ntask loader fuzz: {json.dumps(c, sort_keys=True)}")
    assert not summary["findings"], "\n".join(f"{f['index']}: {f['what']}" for f in summary["findings"][:10])
    for fmt in ("prompt", "text", "open"):
        assert c[f"exec_{fmt}"] == TASK_RUNS // 3
        # unmutated inputs loaded exactly as built; mutated ones loaded or refused with one line
        assert (
            c[f"valid_{fmt}"] >= 10 and c[f"loaded_{fmt}"] > c[f"valid_{fmt}"] and c[f"refused_{fmt}"] >= 50
        )
    assert (
        c["variant_text_args"]
        and c["variant_text_header"]
        and c["variant_open_header"]
        and c["variant_open_args"]
    )
    assert all(c.get(f"open_rule_{rule}", 0) >= 3 for rule in ("exact", "contains", "number", "regex"))
    assert c["match_calls"] >= 200 and c.get("match_exact_True", 0) and c.get("match_number_True", 0)


_PLANTED = textwrap.dedent(
    """
    import dataclasses, hashlib, os, time
    from zt_gguf.matching import MatchRule
    from zt_gguf.tasks import TaskError, load_task

    class BadRule(MatchRule):
        def matches(self, continuation, references):
            return 1

    def planted(path, **kwargs):
        h = hashlib.sha256(path.read_bytes()).digest()[0]
        if h % 50 == 1:
            raise KeyError("planted")
        if h % 50 == 2:
            raise TaskError(f"{path}:1: two\\nlines")
        if h % 100 == 3:
            time.sleep(600)  # a hang
        if h % 100 == 4:
            os._exit(3)  # a crash
        task = load_task(path, **kwargs)
        if h % 50 in (5, 6):
            task.has_answers = not task.has_answers
        if task.kind == "open" and h >= 128:
            bad = BadRule("exact")
            task.match = bad
            task.items = [dataclasses.replace(it, match=bad) for it in task.items]
        return task
    """
)


def test_task_loader_fuzz_reports_planted_bugs(tmp_path: Path) -> None:
    """The harness itself: a loader with planted bugs (another exception, a two-line message, a wrong
    has_answers, a match rule returning a non-bool, a hang, a crash) gives those findings, and the counts
    stay exact across the restarts."""
    (tmp_path / "planted_loader.py").write_text(_PLANTED)
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    args = ("--loader", "planted_loader:planted", "--time-limit", "2")
    summary = _run_fuzz_tasks(tmp_path / "work", 300, *args, env={"PYTHONPATH": pythonpath})
    what = [f["what"] for f in summary["findings"]]
    assert any("raised KeyError" in w for w in what)
    assert any("a message of 2 lines" in w for w in what)
    assert any("has_answers disagrees" in w for w in what)
    assert any("matches returned 1" in w for w in what)
    assert any("a hang" in w for w in what)
    assert any("the child died (exit 3)" in w for w in what)
    c = summary["counts"]
    assert sum(c[f"exec_{f}"] for f in ("prompt", "text", "open")) == 300
    assert c["hang_or_crash"] == sum("a hang" in w or "child died" in w for w in what)
