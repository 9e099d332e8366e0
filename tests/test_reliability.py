"""Failure behaviour as a tested property: hostile model metadata, the runtime setter, broken task files,
interrupted and failing writes, and llama-server under concurrent load.

1. Hostile GGUF metadata in the patched loader (through the engine, llama-cpp-python and the console
   commands, in child processes so that a crash is a failed test, not a dead pytest): the bias key with a
   wrong type, wrong length, NaN, infinity, a huge array, an empty array; a truncated file; per-layer head
   counts. The model loads with the bias off and one log line, or is refused with one clear error line.
2. The runtime setter (llama_set_attn_ftb) through the engine and llama-cpp-python: wrong length, NULL,
   non-finite values, per-layer head counts: defined results.
3. Broken task files (TASK_CORPUS, 40 inputs): one error line "zt-gguf: error: FILE:LINE: ...", exit code
   2 and no traceback, through the real `zt-gguf calibrate` and `zt-gguf eval` console commands.
4. Outputs: the input GGUF is never modified; a kill -9 at a random moment of `apply` or `calibrate` leaves no
   output or a complete valid one (right biases, tensors byte for byte) and no temporary file; `calibrate`
   resumes from its checkpoint to the result of an uninterrupted run; a full disk (a 2 MiB tmpfs) gives one
   clear error line and no partial file.
5. llama-server with a tuned tiny model, 4 slots, LOAD_REQUESTS concurrent requests from a bounded loopback
   client: no error, every response equal to the request sent alone (and its first token to the engine's
   single-sequence result), RSS stable; benchmarks/bench_load.py is the 200-request version with the
   requests/s ratio against the same server with the bias off.

The known crashes (the "Known findings" of cpp/fuzz/fuzz_attn_ftb.cpp) are tested here as fixed: K2/K3
(upstream llama.cpp, stock included, aborts) are refused by the engine's pre-flight (gguf_meta.check_model)
with one error line; K4 (our patch) is fixed in the patch. tests/test_hostile_models.py has the whole corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFValueType

from zt_gguf import gguf_meta, testing, tools
from zt_gguf.engine import Context, EngineError, Model
from zt_gguf.tasks import Item
from zt_gguf.testing import make_tiny_llama, write_tiny_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_fuzz import ARR, F32, U32, Seed, _ftb_lines, _run_child, kv_record, make_tiny_deci  # noqa: E402

ZT = shutil.which("zt-gguf") or "zt-gguf"
CMD_TIMEOUT = 300.0
IGNORING = "ignoring the first-token attention bias"
ATOL = 2e-4  # log-probabilities of F32 tiny models under other batch shapes (see tests/test_tools.py)
LOAD_REQUESTS = 40


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _zt(*args: str | Path, timeout: float = CMD_TIMEOUT, env: dict[str, str] | None = None) -> Any:
    """Run the zt-gguf console command; CompletedProcess with text output."""
    return subprocess.run(
        [ZT, *map(str, args)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def _one_error_line(res: Any, *needles: str) -> str:
    """The single error line of a failed command (exit code 2, no traceback), containing every needle."""
    where = f"exit {res.returncode}\nstdout: {res.stdout[-500:]}\nstderr: {res.stderr[-2000:]}"
    assert res.returncode == 2, where
    assert "Traceback" not in res.stderr + res.stdout, where
    lines = res.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("zt-gguf: error: "), where
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def _bin_dir() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZT_GGUF_BIN", str(tools.bin_dir()))
        yield


@dataclass
class Models:
    folder: Path
    tuned: Path  # tiny llama with a stored bias
    plain: Path  # the same weights without
    bias: np.ndarray
    deci: Path  # per-layer head counts (4, 2), with a stored bias
    deci_bias: np.ndarray
    hashes: dict[Path, str]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Models]:
    """The input models of this module; at the end, every one must still have its first hash."""
    folder = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(5)
    bias = rng.uniform(-2, 2, (2, 4)).astype(np.float32)
    deci_bias = rng.uniform(-2, 2, (2, 4)).astype(np.float32)
    m = Models(
        folder=folder,
        tuned=make_tiny_llama(folder / "tuned.gguf", seed=11, biases=bias).path,
        plain=make_tiny_llama(folder / "plain.gguf", seed=11).path,
        bias=bias,
        deci=make_tiny_deci(folder / "deci.gguf", seed=4, biases=deci_bias),
        deci_bias=deci_bias,
        hashes={},
    )
    m.hashes = {p: _sha(p) for p in (m.tuned, m.plain, m.deci)}
    yield m
    for path, digest in m.hashes.items():
        assert _sha(path) == digest, f"{path} was modified"


# --- 1. hostile metadata in the loader --------------------------------------------------------------------


def _hostile_files(seed_path: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected outcome: "ignored", "clamped" or "refused") for the seed model."""
    seed = Seed(seed_path)
    key = gguf_meta.bias_key(seed.arch)
    n = seed.n_layer * seed.n_head
    ok = np.linspace(-1, 1, n, dtype=np.float32)

    def with_bias(record: bytes | None) -> bytes:
        records = dict(seed.kvs)
        records.pop(key, None)
        if record is not None:
            records[key] = record
        return seed.build(records)

    nan, inf, ninf, big = ok.copy(), ok.copy(), ok.copy(), np.full(n, 1e30, np.float32)
    nan[n // 2], inf[0], ninf[-1] = np.nan, np.inf, -np.inf
    cases: dict[str, tuple[bytes, str]] = {
        "type-int32": (with_bias(kv_record(key, ARR, list(range(n)), GGUFValueType.INT32)), "ignored"),
        "type-float64": (with_bias(kv_record(key, ARR, ok.tolist(), GGUFValueType.FLOAT64)), "ignored"),
        "type-scalar": (with_bias(kv_record(key, F32, 0.5)), "ignored"),
        "type-string": (with_bias(kv_record(key, GGUFValueType.STRING, "0.5")), "ignored"),
        "type-strings": (with_bias(kv_record(key, ARR, ["0.5"] * n, GGUFValueType.STRING)), "ignored"),
        "length-short": (with_bias(kv_record(key, ARR, ok[:-1], F32)), "ignored"),
        "length-long": (with_bias(kv_record(key, ARR, np.append(ok, 0.0), F32)), "ignored"),
        "empty": (with_bias(kv_record(key, ARR, np.zeros(0, np.float32), F32)), "ignored"),
        "huge": (with_bias(kv_record(key, ARR, np.zeros(1 << 22, np.float32), F32)), "ignored"),
        "nan": (with_bias(kv_record(key, ARR, nan, F32)), "ignored"),
        "inf": (with_bias(kv_record(key, ARR, inf, F32)), "ignored"),
        "minus-inf": (with_bias(kv_record(key, ARR, ninf, F32)), "ignored"),
        "finite-1e30": (with_bias(kv_record(key, ARR, big, F32)), "clamped"),
    }
    data = seed.bytes
    bias_kv = seed.layout.kvs[key]
    for name, cut in (
        ("truncated-header", 10),
        ("truncated-in-bias", (bias_kv.start + bias_kv.end) // 2),
        ("truncated-tensor-infos", seed.layout.tensor_infos_start + 20),
        ("truncated-data", len(data) - 1),
    ):
        cases[name] = (data[:cut], "refused")
    out = {}
    for name, (raw, expect) in cases.items():
        path = folder / f"{seed.arch}-{name}.gguf"
        path.write_bytes(raw)
        out[name] = (path, expect)
    return out


@pytest.fixture(scope="module")
def hostile(models: Models) -> dict[str, tuple[Path, str]]:
    folder = models.folder / "hostile"
    folder.mkdir()
    files = {f"llama-{k}": v for k, v in _hostile_files(models.tuned, folder).items()}
    files.update({f"deci-{k}": v for k, v in _hostile_files(models.deci, folder).items()})
    return files


def test_hostile_bias_metadata_through_the_engine(hostile: dict[str, tuple[Path, str]]) -> None:
    """Every hostile file loads with the bias off and exactly one log line naming the key (or, for values
    beyond [-100, 100], with the values clamped), or is refused with an EngineError; never a crash."""
    results, rc, stderr = _run_child([p for p, _ in hostile.values()])
    logs = _ftb_lines(stderr)
    got = {r["path"]: r for r in results if not r.get("start")}
    assert rc == 0 and len(got) == len(hostile), f"exit {rc}:\n{stderr[-3000:]}"
    for name, (path, expect) in hostile.items():
        r, lines = got[str(path)], logs.get(str(path), [])
        assert not r.get("checks"), (name, r["checks"])
        if expect == "refused":
            assert r["engine"] == "refused" and r["meta"] == "refused", (name, r)
            assert str(path) in r["engine_error"] and "\n" not in r["engine_error"], r["engine_error"]
            continue
        assert r["engine"] == "loaded" and r.get("scored"), (name, r)
        if expect == "ignored":
            assert r["start_bias"] is None, name
            assert len(lines) == 1 and IGNORING in lines[0], (name, lines)
            assert gguf_meta.bias_key(name.split("-")[0]) in lines[0], (name, lines)
            assert r["meta_problem"], name  # gguf_meta reads it as unusable too (zt-gguf show says why)
        else:  # clamped to [-100, 100], as documented in llama.h
            assert np.array_equal(np.float32(r["start_bias"]), np.full(len(r["start_bias"]), 100, np.float32))
            assert not any(IGNORING in x for x in lines), (name, lines)


_LLAMA_CPP_CHILD = textwrap.dedent(
    """
    import json, sys
    from zt_gguf import llama_cpp_compat as lc
    out = {}
    for path in sys.argv[1:]:
        try:
            llm = lc.load_llama(path, n_ctx=64, n_threads=1, n_threads_batch=1)
        except ValueError as e:
            out[path] = {"loaded": False, "error": str(e)}
            continue
        b = lc.get_first_token_bias(llm)
        llm.eval(llm.tokenize(b"the cat sat"))
        out[path] = {"loaded": True, "bias": None if b is None else b.reshape(-1).tolist()}
        llm.close()
    print(json.dumps(out))
    """
)


def _needs_llama_cpp() -> None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (scripts/test.sh installs it)")


def _llama_cpp_child(script: str, *args: str) -> Any:
    """Run script in a child Python (llama-cpp-python finds our libllama by itself: LLAMA_CPP_LIB_PATH unset);
    it must exit 0; its last stdout line is JSON."""
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    res = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=CMD_TIMEOUT, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_hostile_bias_metadata_through_llama_cpp_python(hostile: dict[str, tuple[Path, str]]) -> None:
    """llama-cpp-python on our libllama: the same files load with the bias off (or clamped), or raise."""
    _needs_llama_cpp()
    out = _llama_cpp_child(_LLAMA_CPP_CHILD, *(str(p) for p, _ in hostile.values()))
    for name, (path, expect) in hostile.items():
        r = out[str(path)]
        assert r["loaded"] == (expect != "refused"), (name, r)
        if expect == "ignored":
            assert r["bias"] is None, name
        elif expect == "clamped":
            assert set(r["bias"]) == {100.0}, name


@pytest.mark.parametrize("case", ["nan", "huge", "truncated-in-bias", "block-count-600"])
def test_hostile_model_through_the_console_commands(
    models: Models, hostile: dict[str, tuple[Path, str]], tmp_path: Path, case: str
) -> None:
    """zt-gguf eval on a model with an unusable bias key: it runs untuned and stderr has exactly the one
    "ignoring" line; on a truncated file or an out-of-range block_count (llama.cpp would abort): one error
    line, exit 2. zt-gguf show names the problem."""
    task = write_tiny_task(tmp_path / "task.jsonl", 8)
    if case == "block-count-600":
        seed = Seed(models.tuned)
        records = dict(seed.kvs)
        records["llama.block_count"] = kv_record("llama.block_count", U32, 600)
        model = tmp_path / "blocks.gguf"
        model.write_bytes(seed.build(records))
    else:
        model = hostile[f"llama-{case}"][0]
    before = _sha(model)
    res = _zt("eval", model, "--task", task, "--threads", "1", "--json")
    if case in ("nan", "huge"):
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout)["bias"] == "off"
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and IGNORING in lines[0], res.stderr
        show = _zt("show", model)
        assert (
            show.returncode == 0 and "no first-token biases (llama.attention.first_token_bias" in show.stdout
        )
    elif case == "block-count-600":
        _one_error_line(res, str(model), "block_count is 600")
    else:
        _one_error_line(res, str(model), "corrupt or truncated")
    assert _sha(model) == before


def test_per_layer_head_counts_deci(models: Models) -> None:
    """A deci model with 4 and 2 query heads per layer: the stored bias (2 x 4, the row length is the largest
    head count) is applied; the entries past a layer's own head count have no effect at all; the setter
    takes the same shape; llama-cpp-python and the engine agree."""
    model = Model(models.deci)
    assert model.bias_shape == (2, 4)
    ctx = Context(model, n_ctx=64, n_threads=1)
    np.testing.assert_array_equal(ctx.get_bias(), models.deci_bias)
    tokens = model.tokenize("the cat sat on the mat")
    stored = ctx.logits(tokens)
    padded = models.deci_bias.copy()
    padded[1, 2:] = [50.0, -50.0]  # layer 1 has 2 heads: entries 2 and 3 are padding
    ctx.set_bias(padded)
    np.testing.assert_array_equal(ctx.logits(tokens), stored)
    moved = models.deci_bias.copy()
    moved[1, 1] += 2.0
    ctx.set_bias(moved)
    assert np.abs(ctx.logits(tokens) - stored).max() > 0.01
    ctx.set_bias(None)
    off = ctx.logits(tokens)
    assert np.abs(off - stored).max() > 0.01
    with pytest.raises(ValueError, match="shape"):
        ctx.set_bias(np.zeros((2, 2), np.float32))  # one row per layer of its own length is not the layout
    assert ctx.get_bias() is None


def test_runtime_setter_defined_results(models: Models) -> None:
    """The setter through the engine: wrong shapes and non-finite values are refused (the Python check, and
    the C setter's -2 itself) and leave the bias as it was; None turns it off; values beyond [-100, 100] are
    clamped; after every refusal the context still scores as before."""
    model = Model(models.tuned)
    ctx = Context(model, n_ctx=64, n_threads=1)
    tokens = model.tokenize("the cat sat on the mat")
    stored = ctx.logits(tokens)
    bad: list[Any] = [
        np.zeros((2, 5), np.float32),
        np.zeros(9, np.float32),
        np.zeros(7, np.float32),
        np.zeros((0,), np.float32),
        np.full((2, 4), np.nan, np.float32),
    ]
    for b in bad:
        with pytest.raises(ValueError):
            ctx.set_bias(b)
    for value in (np.nan, np.inf, -np.inf):
        b = models.bias.copy()
        b[1, 3] = value
        with pytest.raises(EngineError, match="non-finite"):
            ctx._c.set_bias(b)  # past the Python check: llama_set_attn_ftb returns -2
    np.testing.assert_array_equal(ctx.get_bias(), models.bias)
    np.testing.assert_array_equal(ctx.logits(tokens), stored)
    big = np.full((2, 4), 1e30, np.float32)
    ctx.set_bias(big)
    np.testing.assert_array_equal(ctx.get_bias(), np.full((2, 4), 100, np.float32))
    assert np.isfinite(ctx.logits(tokens)).all()
    ctx.set_bias(None)
    assert ctx.get_bias() is None
    np.testing.assert_array_equal(
        ctx.logits(tokens), Context(Model(models.plain), n_threads=1).logits(tokens)
    )
    assert len(ctx.score([Item("the cat", (" sat", " dog"), 0, "ok")])) == 1


_SETTER_CHILD = textwrap.dedent(
    """
    import ctypes, json, sys
    import numpy as np
    from zt_gguf import llama_cpp_compat as lc

    args = json.loads(sys.argv[1])
    out = {}
    for name, path in args["models"].items():
        llm = lc.load_llama(path, n_ctx=64, n_threads=1, n_threads_batch=1, logits_all=True, flash_attn=False)
        lib = lc.import_llama_cpp().llama_cpp._lib
        ctx = llm._ctx.ctx
        n = lc.n_attn_ftb(llm)
        stored = lc.get_first_token_bias(llm)
        r = {"n": n, "stored": stored.reshape(-1).tolist()}
        flat = stored.reshape(-1).copy()

        def raw(values, count):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            return int(lib.llama_set_attn_ftb(ctx, arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), count))

        r["short"] = raw(flat, n - 1)
        r["long"] = raw(np.append(flat, 0.0), n + 1)
        r["zero_length"] = raw(flat, 0)
        r["sum_of_heads"] = raw(flat[: args["sum_heads"][name]], args["sum_heads"][name])
        nan = flat.copy(); nan[1] = np.nan
        r["nan"] = raw(nan, n)
        inf = flat.copy(); inf[-1] = -np.inf
        r["inf"] = raw(inf, n)
        r["after_errors"] = lc.get_first_token_bias(llm).reshape(-1).tolist()
        # get with a short buffer: only that many values are written
        buf = (ctypes.c_float * (n + 1))(*([7.0] * (n + 1)))
        r["get_short"] = [int(lib.llama_get_attn_ftb(ctx, buf, 2)), list(buf)]
        r["null"] = int(lib.llama_set_attn_ftb(ctx, None, 0))
        r["null_with_length"] = int(lib.llama_set_attn_ftb(ctx, None, n))
        r["off"] = lc.get_first_token_bias(llm)
        r["clamped_code"] = raw(np.full(n, 1e6, np.float32), n)
        r["clamped"] = lc.get_first_token_bias(llm).reshape(-1).tolist()
        lc.set_first_token_bias(llm, stored)
        llm.reset()
        toks = llm.tokenize(b"the cat sat on the mat")
        llm.eval(toks)
        r["tokens"] = toks
        r["logits"] = np.array(llm.scores[: llm.n_tokens], dtype=np.float32).tolist()
        out[name] = r
        llm.close()
    print(json.dumps(out))
    """
)


def test_runtime_setter_through_llama_cpp_python(models: Models) -> None:
    """llama_set_attn_ftb called directly through llama-cpp-python's ctypes: -1 for a wrong length (n-1,
    n+1, 0, the sum of the per-layer head counts of deci), -2 for NaN/-inf, the bias unchanged after errors,
    NULL (any length) turns it off, 1e6 is clamped to 100, get with a short buffer writes only that much;
    the logits with the stored bias equal the engine's."""
    _needs_llama_cpp()
    arg = {
        "models": {"llama": str(models.tuned), "deci": str(models.deci)},
        "sum_heads": {"llama": 8 - 1, "deci": 6},  # llama: any other wrong length
    }
    out = _llama_cpp_child(_SETTER_CHILD, json.dumps(arg))
    for name, path, bias in (("llama", models.tuned, models.bias), ("deci", models.deci, models.deci_bias)):
        r = out[name]
        assert r["n"] == 8
        np.testing.assert_array_equal(np.float32(r["stored"]), bias.reshape(-1))
        codes = [r[k] for k in ("short", "long", "zero_length", "sum_of_heads", "nan", "inf")]
        assert codes == [-1, -1, -1, -1, -2, -2], (name, codes)
        np.testing.assert_array_equal(np.float32(r["after_errors"]), bias.reshape(-1))
        n_got, buf = r["get_short"]
        assert n_got == 8 and buf[:2] == bias.reshape(-1)[:2].tolist() and set(buf[2:]) == {7.0}
        assert r["null"] == 0 and r["null_with_length"] == 0 and r["off"] is None
        assert r["clamped_code"] == 0 and set(r["clamped"]) == {100.0}
        ref = Context(Model(path), n_ctx=64, n_threads=1, flash_attn=False).logits(r["tokens"])
        np.testing.assert_allclose(np.float32(r["logits"]), ref, atol=ATOL, rtol=0)


# --- per-layer head counts (K4, fixed) and the known upstream crashes (K2/K3, refused before llama.cpp) ---


def _llama_with(models: Models, folder: Path, name: str, changes: dict[str, bytes | None]) -> Path:
    seed = Seed(models.tuned)
    records = dict(seed.kvs)
    for k, v in changes.items():
        if v is None:
            records.pop(k, None)
        else:
            records[k] = v
    path = folder / f"{name}.gguf"
    path.write_bytes(seed.build(records))
    return path


_PER_LAYER_HEADS_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from zt_gguf.engine import Context, Model
    odd, same, how = sys.argv[1:]
    ref = Context(Model(same), n_ctx=64, n_threads=1)
    ctx = Context(Model(odd), n_ctx=64, n_threads=1)
    if how == "set":
        ctx.set_bias(ref.get_bias())
    tokens = ref.model.tokenize("the cat sat on the mat")
    got, want = ctx.logits(tokens), ref.logits(tokens)
    ref.set_bias(None)
    print(json.dumps({"diff": float(np.abs(got - want).max()),
                      "effect": float(np.abs(want - ref.logits(tokens)).max())}))
    """
)


@pytest.mark.parametrize("bias", ["stored", "set"])
def test_llama_arch_per_layer_heads_with_bias(models: Models, tmp_path: Path, bias: str) -> None:
    """K4, fixed: a llama-arch file whose head_count says [4, 2] runs in stock llama.cpp with 4 query heads in
    every layer (the llama graph takes layer 0's count). With a first-token bias on (stored, or set at run
    time) it must neither abort nor misapply: its logits equal those of the same tensors declared with 4 heads
    everywhere under the same (2 x 4) bias, in a child process so that an abort fails only this test."""
    key = "llama.attention.head_count"
    changes: dict[str, bytes | None] = {key: kv_record(key, ARR, [4, 2], U32)}
    if bias == "set":
        changes[gguf_meta.bias_key("llama")] = None
    path = _llama_with(models, tmp_path, "per-layer-heads", changes)
    res = subprocess.run(
        [sys.executable, "-c", _PER_LAYER_HEADS_CHILD, str(path), str(models.tuned), bias],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-1500:]}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["diff"] <= 1e-6 and out["effect"] > 0.01, out


def test_head_count_beyond_any_model_allows_no_bias(models: Models, tmp_path: Path) -> None:
    """A llama-arch file whose head_count says [4, 879649411] (found by the ASan fuzzer; stock llama.cpp runs
    it with layer 0's 4 heads) must not size a 7 GB bias: over 2^20 n_layer*n_head values there is no bias.
    The stored key is ignored with one warning and the tool runs; gguf_meta says why; the engine refuses the
    model (nothing to tune); a bias file given to the tool is refused (the setter's wrong length)."""
    key = "llama.attention.head_count"
    path = _llama_with(models, tmp_path, "huge-heads", {key: kv_record(key, ARR, [4, 879649411], U32)})
    info = gguf_meta.read_model_info(path)
    assert info.n_head == 0 and info.biases is None and "allow none" in (info.bias_problem or "")
    with pytest.raises(EngineError, match="1048576"):
        Model(path)
    tool = [str(tools.tool_path("llama-completion")), "-m", str(path), "-p", "the cat", "-n", "2", "-no-cnv"]
    tool += ["--temp", "0", "-t", "1", "--no-warmup"]
    res = subprocess.run(tool, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.count("ignoring the first-token attention bias: the head counts allow none") == 1
    side = tmp_path / "bias.json"
    side.write_text(json.dumps([0.5] * 8))
    res = subprocess.run([*tool, "--attn-ftb", str(side)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and side.name in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("case", ["K2-llama-per-layer-kv-heads", "K3-duplicate-tokens"])
def test_upstream_aborts_on_hostile_models_are_refused(models: Models, tmp_path: Path, case: str) -> None:
    """Upstream llama.cpp (stock too) aborts instead of refusing: K2 GGML_ASSERT(a->ne[0] == b->ne[0]) in
    ggml_set_rows at context creation for a llama-arch file with unequal per-layer head_count_kv; K3
    GGML_ASSERT(id_to_token.size() == token_to_id.size()) in llama_vocab::impl::load for two equal tokens.
    zt-gguf eval refuses both with one error line naming the file and the key; the engine API with a
    UserError."""
    if case.startswith("K2"):
        key = "llama.attention.head_count_kv"
        path = _llama_with(models, tmp_path, case, {key: kv_record(key, ARR, [2, 4], U32)})
    else:
        from gguf import GGUFReader

        tokens = GGUFReader(str(models.tuned)).fields["tokenizer.ggml.tokens"].contents()
        tokens[300] = tokens[301]
        key = "tokenizer.ggml.tokens"
        path = _llama_with(models, tmp_path, case, {key: kv_record(key, ARR, tokens, GGUFValueType.STRING)})
    task = write_tiny_task(tmp_path / "task.jsonl", 4)
    res = _zt("eval", path, "--task", task, "--threads", "1", "--json")
    _one_error_line(res, str(path), key)
    with pytest.raises(EngineError, match=f"^{path}: key {key}"):
        Model(path)


# --- 3. broken task files through the console commands ----------------------------------------------------

GOOD = json.dumps({"prompt": "the cat sat on the", "choices": [" mat", " dog"], "answer": 0})
GOOD2 = json.dumps({"prompt": "hello world it was", "choices": [" mat", " dog"], "answer": 1})


def _lines(*bad: str | bytes, good: int = 2) -> bytes:
    """good valid lines, then the bad ones (the first bad line is line good + 1)."""
    head = [GOOD, GOOD2][:good] + [GOOD] * max(0, good - 2)
    parts = [x.encode() for x in head] + [x if isinstance(x, bytes) else x.encode() for x in bad]
    return b"\n".join(parts) + b"\n"


def _obj(**kw: Any) -> str:
    base: dict[str, Any] = {"prompt": "the dog", "choices": [" mat", " dog"], "answer": 0}
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not _DROP})


_DROP = object()

# name -> (file bytes, or a callable writing the file; the line the error names, None for the whole file;
# a fragment of the message)
TASK_CORPUS: dict[str, tuple[Any, int | None, str]] = {
    "json-unclosed": (_lines('{"prompt": "x", "choices": [" a", " b"], "answer": 0'), 3, "invalid JSON"),
    "json-trailing": (_lines(GOOD + " x"), 3, "invalid JSON"),
    "json-single-quotes": (_lines("{'prompt': 'x'}"), 3, "invalid JSON"),
    "json-nested-deep": (_lines("[" * 100_000 + "]" * 100_000), 3, "nested too deeply"),
    "json-huge-int": (
        _lines('{"prompt": "x", "choices": [" a", " b"], "answer": 1' + "0" * 5000 + "}"),
        3,
        "",
    ),
    "json-duplicate-key": (
        _lines('{"prompt": "x", "prompt": "y", "choices": [" a", " b"]}'),
        3,
        "duplicate key",
    ),
    "not-an-object": (_lines("[1, 2, 3]"), 3, "expected a JSON object"),
    "a-string": (_lines('"hello"'), 3, "expected a JSON object"),
    "no-prompt-or-text": (_lines('{"question": "x", "choices": [" a", " b"]}'), 3, '"prompt" key'),
    "prompt-null": (_lines(_obj(prompt=None)), 3, 'missing "prompt"'),
    "prompt-number": (_lines(_obj(prompt=5)), 3, '"prompt" must be a string'),
    "prompt-empty": (_lines(_obj(prompt="  ")), 3, '"prompt" is empty'),
    "choices-missing": (_lines(_obj(choices=_DROP)), 3, 'missing "choices"'),
    "choices-string": (_lines(_obj(choices=" a, b")), 3, '"choices" must be a list'),
    "choices-one": (_lines(_obj(choices=[" a"])), 3, "at least 2"),
    "choices-empty-list": (_lines(_obj(choices=[])), 3, "at least 2"),
    "choice-number": (_lines(_obj(choices=[" a", 3])), 3, '"choices"[1] must be a string'),
    "choice-empty": (_lines(_obj(choices=[" a", ""])), 3, '"choices"[1] is empty'),
    "choices-duplicate": (_lines(_obj(choices=[" a", " a"])), 3, "twice"),
    "answer-out-of-range": (_lines(_obj(answer=2)), 3, "out of range"),
    "answer-negative": (_lines(_obj(answer=-1)), 3, "out of range"),
    "answer-string": (_lines(_obj(answer="0")), 3, "must be an integer"),
    "answer-bool": (_lines(_obj(answer=True)), 3, "must be an integer"),
    "answer-float": (_lines(_obj(answer=1.0)), 3, "must be an integer"),
    "answer-nan": (
        _lines('{"prompt": "x", "choices": [" a", " b"], "answer": NaN}'),
        3,
        "must be an integer",
    ),
    "id-duplicate": (_lines(_obj(id="a"), _obj(id="a"), good=0), 2, 'duplicate "id"'),
    "id-list": (_lines(_obj(id=[1])), 3, '"id" must be'),
    "not-utf8": (_lines(b'{"prompt": "caf\xe9", "choices": [" a", " b"]}'), 3, "not valid UTF-8"),
    "surrogate": (_lines('{"prompt": "x\\ud800", "choices": [" a", " b"]}'), 3, "unpaired surrogate"),
    "mixed-formats": (_lines('{"text": "x", "label": 0}'), 3, "mixed formats"),
    "text-without-template": (_lines('{"text": "x", "label": 0}', good=0), 1, "need a template"),
    "header-not-first": (
        _lines('{"zt_task": {"template": "{text}", "choices": ["a", "b"]}}'),
        3,
        "first line",
    ),
    "label-unknown": (
        _lines(
            json.dumps({"zt_task": {"template": "Review: {text}", "choices": [" neg", " pos"]}}),
            json.dumps({"text": "x", "label": "meh"}),
            good=0,
        ),
        2,
        "not one of the choices",
    ),
    "empty-file": (b"", None, "no items"),
    "blank-lines": (b"\n\n   \n\r\n", None, "no items"),
    "line-17MiB": ("long17", 3, "longer than 16 MiB"),
    "line-1GiB-sparse": ("sparse1g", 1, "longer than 16 MiB"),
    "prompt-longer-than-context": ("longprompt", 7, "tokens of context"),
    "directory": ("dir", None, "is a directory"),
    "missing-file": ("missing", None, "no such file"),
}


def _write_task(path: Path, spec: Any) -> Path:
    if isinstance(spec, bytes):
        path.write_bytes(spec)
    elif spec == "long17":  # a 17 MiB line, written in chunks
        with open(path, "wb") as f:
            f.write(_lines(good=2))
            f.write(b'{"prompt": "')
            chunk = b"the cat " * (1 << 17)  # 1 MiB
            for _ in range(17):
                f.write(chunk)
            f.write(b'", "choices": [" a", " b"]}\n')
    elif spec == "sparse1g":  # a 1 GiB line of which only the ends are on disk
        with open(path, "wb") as f:
            f.write(b'{"prompt": "')
            f.seek(1 << 30)
            f.write(b'", "choices": [" a", " b"]}\n')
    elif spec == "longprompt":  # 24 valid items, line 7 longer than --ctx 64
        lines = [_obj(prompt="the cat sat on the mat " + str(i)) for i in range(24)]
        lines[6] = _obj(prompt=" ".join(["the cat sat on the mat"] * 200))  # ~1200 tokens
        path.write_text("\n".join(lines) + "\n")
    elif spec == "dir":
        path.mkdir()
    elif spec == "missing":
        pass
    return path


@pytest.fixture(scope="module")
def task_corpus(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, tuple[Path, int | None, str]]]:
    folder = tmp_path_factory.mktemp("tasks")
    out = {}
    for name, (spec, line, fragment) in TASK_CORPUS.items():
        out[name] = (_write_task(folder / f"{name}.jsonl", spec), line, fragment)
    sparse = out["line-1GiB-sparse"][0]
    assert sparse.stat().st_size > 1 << 30 and sparse.stat().st_blocks * 512 < 1 << 20  # really sparse
    yield out
    for path, _, _ in out.values():  # no 1 GiB (or 17 MiB) file is left behind
        if path.is_file():
            path.unlink()


@pytest.mark.parametrize("command", ["calibrate", "eval"])
def test_broken_task_files_give_one_error_line(
    models: Models, task_corpus: dict[str, tuple[Path, int | None, str]], tmp_path: Path, command: str
) -> None:
    """Every broken task file of TASK_CORPUS through the real console command: exit code 2, one line
    "zt-gguf: error: FILE:LINE: ..." (FILE alone for a whole-file problem), no traceback, no output file."""
    out = tmp_path / "out.gguf"

    def run(name: str) -> tuple[str, Any]:
        path, _, _ = task_corpus[name]
        args: list[str | Path] = [command, models.plain, "--task", path, "--threads", "1", "--ctx", "64"]
        if command == "calibrate":
            args += [
                "-o",
                out,
                "--report",
                tmp_path / f"{name}.report",
                "--grid-up",
                "2",
                "--grid-down",
                "0.5",
            ]
        return name, _zt(*args)

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(pool.map(run, TASK_CORPUS))
    seconds = time.monotonic() - t0
    for name, res in results.items():
        path, line, fragment = task_corpus[name]
        where = f"{path}:{line}:" if line is not None else f"{path}:"
        try:
            _one_error_line(res, where, fragment)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    assert not out.exists()
    print(f"\n{command}: {len(results)} broken task files, {seconds:.1f} s")


# --- 4. outputs: the input untouched, kill -9, resume, full disk ------------------------------------------


def _tensor_data(path: Path) -> bytes:
    layout = gguf_meta._scan(path)
    with open(path, "rb") as f:
        f.seek(layout.data_offset)
        return f.read()


def _check_output(path: Path, bias: np.ndarray, data: bytes) -> None:
    """path is a complete valid GGUF with these biases and these tensor bytes."""
    info = gguf_meta.read_model_info(path)
    assert info.biases is not None and np.array_equal(info.biases, bias)
    assert _tensor_data(path) == data


def _leftovers(*folders: Path, allowed: tuple[str, ...] = ()) -> list[str]:
    """Files in folders (recursively) that are not allowed: temporary files above all."""
    out = []
    for folder in folders:
        if folder.exists():
            out += [str(p) for p in folder.rglob("*") if p.is_file() and p.name not in allowed]
    return out


def _kill_after(args: list[str | Path], delay: float) -> int:
    proc = subprocess.Popen(
        [ZT, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=60)


def test_kill_9_during_apply(models: Models, tmp_path: Path) -> None:
    """kill -9 at random moments of `zt-gguf apply` on a 33 MB model: afterwards the output folder holds
    nothing, or only the complete output (right biases, tensors byte for byte); never a temporary file."""
    big = make_tiny_llama(tmp_path / "big.gguf", n_layer=3, n_head=8, n_head_kv=8, head_dim=64, n_ff=1024)
    bias = np.random.default_rng(1).uniform(-1, 1, (3, 8)).astype(np.float32)
    source = gguf_meta.write_bias_gguf(tmp_path / "bias.gguf", bias, "llama")
    before, data = _sha(big.path), _tensor_data(big.path)
    out_dir = tmp_path / "out"
    rng = random.Random(3)
    outcomes = []
    for i in range(10):
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir()
        out = out_dir / "big.zt.gguf"
        rc = _kill_after(["apply", big.path, "--from", source, "-o", out], rng.uniform(0.05, 0.6))
        files = _leftovers(out_dir)
        assert files in ([], [str(out)]), f"kill {i}: {files}"
        if out.exists():
            _check_output(out, bias, data)
        outcomes.append("complete" if out.exists() else "absent")
        assert rc in (0, -signal.SIGKILL)
    assert _sha(big.path) == before
    print(
        f"\napply killed 10 times: {outcomes.count('absent')} absent, {outcomes.count('complete')} complete"
    )


CAL_ARGS = ["--threads", "1", "--scoring", "choice", "--objective", "logprob", "--grid-up", "1.5,2,3,4"]
CAL_ARGS += ["--grid-down", "0.25,0.5,0.75", "--no-early-stop", "--force", "--quiet", "--json"]


def kill_calibrate_repeatedly(
    args: list[str | Path],
    out: Path,
    rep: Path,
    allowed: tuple[str, ...],
    ref_bias: Any,
    data: bytes,
    delays: tuple[float, float],
    rng: random.Random,
    kills: int = 6,
) -> list[str]:
    """kill -9 a `zt-gguf calibrate` run (args) after a random delay, up to kills times or until a run
    completes; after each kill the output folder holds only allowed files and the output is absent or
    complete with ref_bias and the input's tensor data. Returns what each run had reached."""
    phases = []
    for i in range(kills):
        rc = _kill_after(args, rng.uniform(*delays))
        assert rc in (0, -signal.SIGKILL)
        stray = _leftovers(out.parent, allowed=allowed)
        assert not stray, f"kill {i}: {stray}"
        if out.exists():
            _check_output(out, ref_bias, data)
        if rc == 0:
            phases.append("completed")
            break
        done = 0
        if (rep / "checkpoint.json").exists():
            runs = json.loads((rep / "checkpoint.json").read_text())["runs"]
            done = sum(len(r["evaluations"]) for r in runs.values())
        phases.append("written" if out.exists() else f"{done} candidates done")
    return phases


def test_kill_9_during_calibrate_then_resume(tmp_path: Path) -> None:
    """kill -9 at random moments of `zt-gguf calibrate` (a 7 MB model, 300 items, 21 candidates: ~3 s),
    rerun each time with the same arguments: after each kill the output is absent or complete and valid, the
    report folder holds only the checkpoint (and the report once complete), no temporary file; the run that
    finally completes writes exactly the biases and report of an uninterrupted run, from its checkpoint."""
    model = make_tiny_llama(tmp_path / "mid.gguf", n_layer=4, n_head=8, n_head_kv=4, head_dim=32, n_ff=256)
    before, data = _sha(model.path), _tensor_data(model.path)
    task = write_tiny_task(tmp_path / "task.jsonl", 300, seed=2)
    ref_out = tmp_path / "ref" / "tuned.gguf"
    ref_out.parent.mkdir()
    t0 = time.monotonic()
    res = _zt("calibrate", model.path, "--task", task, "-o", ref_out, *CAL_ARGS)
    t_ref = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    ref = json.loads(res.stdout)
    assert ref["written"]["path"] is not None, ref["written"]  # --force: written even if not better
    ref_bias = gguf_meta.read_model_info(ref_out).biases

    out_dir = tmp_path / "run"
    out_dir.mkdir()
    out, rep = out_dir / "tuned.gguf", out_dir / "tuned.report"
    args: list[str | Path] = ["calibrate", model.path, "--task", task, "-o", out, *CAL_ARGS]
    rng = random.Random(11)
    report_files = {"checkpoint.json", "report.json", "report.md", "heatmap.png", "heatmap.txt"}
    report_files |= {"accuracy.png", "report.html"}  # report.write_report
    allowed = ("tuned.gguf", *report_files)
    phases = kill_calibrate_repeatedly(
        args, out, rep, allowed, ref_bias, data, (0.15 * t_ref, 0.6 * t_ref), rng
    )
    res = _zt(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    final = json.loads(res.stdout)
    _check_output(out, ref_bias, data)
    for key in ("chosen", "baseline", "tuned", "delta", "mode", "task"):
        assert final[key] == ref[key], key
    assert (rep / "checkpoint.json").exists()
    assert not _leftovers(out_dir, allowed=("tuned.gguf", *report_files))
    assert _sha(model.path) == before
    # the kills hit the search, not only the start-up
    assert any(p.endswith("candidates done") and not p.startswith("0 ") for p in phases), phases
    print(
        f"\ncalibrate (reference {t_ref:.1f} s), state after each kill: {phases}; resumed to the same result"
    )


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only); unmounted at teardown."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {res.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path, leave: int) -> None:
    """Fill the filesystem of folder but `leave` bytes."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_full_disk(models: Models, small_tmpfs: Path, tmp_path: Path) -> None:
    """apply of a 33 MB model and calibrate of a tiny one onto a full 2 MiB tmpfs: exit code 2, one line
    "no space left on device", nothing left on the tmpfs; the input unchanged."""
    big = make_tiny_llama(tmp_path / "big.gguf", n_layer=3, n_head=8, n_head_kv=8, head_dim=64, n_ff=1024)
    before = _sha(big.path)
    out = small_tmpfs / "big.zt.gguf"
    src = gguf_meta.write_bias_gguf(tmp_path / "b.gguf", np.full((3, 8), 0.5, np.float32), "llama")
    res = _zt("apply", big.path, "--from", src, "-o", out)
    _one_error_line(res, str(out), "no space left on device")
    assert os.listdir(small_tmpfs) == []
    assert _sha(big.path) == before

    task = write_tiny_task(tmp_path / "task.jsonl", 40, seed=1)
    _fill(small_tmpfs, 64 * 1024)  # room for less than the 430 KB tuned model
    out = small_tmpfs / "tuned.gguf"
    res = _zt("calibrate", models.plain, "--task", task, "-o", out, "--report", tmp_path / "rep", *CAL_ARGS)
    _one_error_line(res, str(out), "no space left on device")
    assert sorted(os.listdir(small_tmpfs)) == ["filler"]
    assert _sha(models.plain) == models.hashes[models.plain]


# --- 5. llama-server under concurrent load ----------------------------------------------------------------


def test_server_under_concurrent_load(models: Models, tmp_path: Path) -> None:
    """llama-server -np 4 with the tuned tiny model: LOAD_REQUESTS concurrent requests from an 8-connection
    client, zero errors, every response equal to the same request sent alone (tokens and log-probabilities),
    the first tokens equal to the engine's single-sequence result; RSS stable; then the same load on the
    same model with --no-attn-ftb (requests/s recorded, not asserted: too noisy on a shared machine)."""
    prompts = testing.make_prompts(20, seed=4)
    engine_ctx = Context(Model(models.tuned), n_ctx=512, n_seq_max=2, n_threads=1, flash_attn=False)
    figures: dict[str, dict[str, Any]] = {}
    for variant, extra in (("on", ()), ("off", ("--no-attn-ftb",))):
        server = testing.start_server(models.tuned, *extra, threads=1, log_dir=tmp_path)
        try:
            res = testing.run_load(server, prompts, LOAD_REQUESTS, 8, 4, atol=ATOL)
        finally:
            code = testing.stop_server(server)
        assert code == 0, server.log.read_text(errors="replace")[-2000:]
        assert res["errors"] == 0, res["first_errors"]
        assert res["mismatches"] == 0, res["first_mismatches"]
        assert res["equal"] + res["ties"] == LOAD_REQUESTS and res["ties"] <= 1
        assert res["rss_kib_after"] - res["rss_kib_before"] < 16 * 1024, res
        if variant == "on":  # the single-sequence results equal the engine's
            checked = 0
            for p, alone in res["alone"].items():
                lp = engine_ctx.logits(engine_ctx.model.tokenize(p))[-1].astype(np.float64)
                lp = lp - lp.max() - np.log(np.exp(lp - lp.max()).sum())
                assert lp[alone["tokens"][0]] >= lp.max() - ATOL  # the engine's greedy token
                if alone["logprobs"]:
                    assert abs(alone["logprobs"][0] - lp[alone["tokens"][0]]) <= ATOL
                    checked += 1
            assert checked >= 5
        figures[variant] = {k: res[k] for k in ("requests_per_s", "rss_kib_before", "rss_kib_after", "ties")}
    ratio = figures["on"]["requests_per_s"] / figures["off"]["requests_per_s"]
    print(f"\nload: {json.dumps(figures)}; requests/s on/off {ratio:.3f}")
