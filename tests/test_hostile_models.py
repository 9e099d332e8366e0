"""Hostile model files never abort a zt-gguf command or the engine (issue 25, item 1).

CORPUS holds broken or lying model files, each written with gguf-py alone from a tiny llama or gemma3 of
zt_gguf.testing (two then cut, or patched where gguf-py's reader says): hyperparameters of the wrong
type, length or range, per-layer arrays with unequal entries, head counts that do not divide, rope and
expert counts llama.cpp asserts on, tensors of a type or extent llama.cpp cannot compute with, vocabularies
with a token twice or without the special token the tokenizer adds, offsets past the end. Without the
pre-flight (gguf_meta.check_model, run by engine.Model) llama.cpp aborted (SIGABRT on a GGML_ASSERT), crashed
(SIGSEGV) or hung on most of them; the comment of each case says which. Each must now give:

* ``zt-gguf eval MODEL --task T``: exit 2, no traceback, exactly one stderr line ``zt-gguf: error: ...``
  naming the file and the key or tensor;
* engine.Model(MODEL): a UserError, one line naming the file and the key or tensor (all cases in one child
  process: a crash is seen as the child's death, with the case it died on).

NEAR_MISSES are the valid neighbours of those rules (the same keys within llama.cpp's limits): each loads and
scores, so the rules are no wider than llama.cpp's needs; the pinned real models pass the pre-flight too.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from zt_gguf import gguf_meta, models, tools
from zt_gguf.testing import make_tiny_gemma3, make_tiny_llama, make_tokenizer, write_tiny_task

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_SRC = ROOT / "third_party" / "llama.cpp" / "src"
ZT = shutil.which("zt-gguf") or "zt-gguf"
TIMEOUT = 120.0

U32, I32, F32, STR, ARR, BOOL = (
    GGUFValueType.UINT32,
    GGUFValueType.INT32,
    GGUFValueType.FLOAT32,
    GGUFValueType.STRING,
    GGUFValueType.ARRAY,
    GGUFValueType.BOOL,
)
TOKENS, TOKEN_TYPE = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"


# --- the corpus: a model as key/values and tensors, changed, written with gguf-py -------------------------


@dataclass
class Spec:
    arch: str
    kvs: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]
    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType | None]]  # raw dtype for bytes given as uint8


def read_spec(path: Path) -> Spec:
    reader = GGUFReader(str(path))
    kvs = {}
    for name, field in reader.fields.items():
        if not name.startswith("GGUF."):
            main = field.types[0]
            kvs[name] = (field.contents(), main, field.types[-1] if main == ARR else None)
    tensors = {t.name: (np.array(t.data), None) for t in reader.tensors}
    return Spec(kvs["general.architecture"][0], kvs, tensors)


def write_spec(spec: Spec, path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), spec.arch)
    writer.kv_data[
        0
    ].clear()  # (the writer's own general.architecture: spec.kvs has it, or lacks it on purpose)
    for key, (value, vtype, sub) in spec.kvs.items():
        writer.add_key_value(key, value, vtype, sub)
    for name, (data, raw_dtype) in spec.tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


Mutation = Callable[[Spec], None]


def kv(key: str, value: Any, vtype: GGUFValueType, sub: GGUFValueType | None = None) -> Mutation:
    def f(s: Spec) -> None:
        s.kvs[key.format(arch=s.arch)] = (value, vtype, sub)

    return f


def drop(key: str) -> Mutation:
    return lambda s: s.kvs.pop(key.format(arch=s.arch))


def tensor(
    name: str, change: Callable[[np.ndarray], np.ndarray], raw: GGMLQuantizationType | None = None
) -> Mutation:
    def f(s: Spec) -> None:
        s.tensors[name] = (change(s.tensors[name][0]), raw)

    return f


def both(*changes: Mutation) -> Mutation:
    def f(s: Spec) -> None:
        for change in changes:
            change(s)

    return f


def token_at(i: int, text: str) -> Mutation:
    def f(s: Spec) -> None:
        tokens = list(s.kvs[TOKENS][0])
        tokens[i] = text
        s.kvs[TOKENS] = (tokens, ARR, STR)

    return f


def token_type_at(i: int, new: int) -> Mutation:
    def f(s: Spec) -> None:
        types = list(s.kvs[TOKEN_TYPE][0])
        types[i] = new
        s.kvs[TOKEN_TYPE] = (types, ARR, I32)

    return f


def no_byte_types(s: Spec) -> None:
    s.kvs[TOKEN_TYPE] = ([1 if t == 6 else t for t in s.kvs[TOKEN_TYPE][0]], ARR, I32)


def vocabulary(n: int) -> Mutation:
    """The first n tokens only, with embedding and output matrices of n rows (a consistent small model)."""

    def f(s: Spec) -> None:
        for key in (TOKENS, "tokenizer.ggml.scores", TOKEN_TYPE):
            value, vtype, sub = s.kvs[key]
            s.kvs[key] = (list(value)[:n], vtype, sub)
        s.kvs[f"{s.arch}.vocab_size"] = (n, U32, None)
        for name in ("token_embd.weight", "output.weight"):
            s.tensors[name] = (np.ascontiguousarray(s.tensors[name][0][:n]), None)

    return f


def kv_heads(n: int, layers: range = range(2)) -> Mutation:
    """head_count_kv = n with K and V projections of n heads of 16 (tensors and key agree)."""

    def f(s: Spec) -> None:
        s.kvs[f"{s.arch}.attention.head_count_kv"] = (n, U32, None)
        rng = np.random.default_rng(1)
        for il in layers:
            for w in ("attn_k", "attn_v"):
                s.tensors[f"blk.{il}.{w}.weight"] = (
                    rng.standard_normal((n * 16, 64)).astype(np.float32),
                    None,
                )

    return f


def zero_rows(*names: str) -> Mutation:
    def f(s: Spec) -> None:
        for name in names:
            s.tensors[name] = (np.zeros((0, s.tensors[name][0].shape[1]), np.float32), None)

    return f


def as_arch(arch: str) -> Mutation:
    def f(s: Spec) -> None:
        prefix = f"{s.arch}."
        s.kvs = {(arch + "." + k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in s.kvs.items()}
        s.kvs["general.architecture"] = (arch, STR, None)
        s.arch = arch

    return f


def bf16(a: np.ndarray) -> np.ndarray:
    return (a.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)


def q8_0(a: np.ndarray) -> np.ndarray:
    return gguf.quants.quantize(a, GGMLQuantizationType.Q8_0)


def rwkv_every_byte(s: Spec) -> None:
    """An RWKV vocabulary: the byte tokens become the escaped single bytes "\\xHH"."""
    tokens = list(s.kvs[TOKENS][0])
    tokens[3:259] = [f"\\x{b:02x}" for b in range(256)]
    s.kvs[TOKENS] = (tokens, ARR, STR)
    s.kvs["tokenizer.ggml.model"] = ("rwkv", STR, None)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def offset_past_end(path: Path) -> None:
    """The data offset of blk.0.attn_q.weight set 1 GiB on (its tensor info found by gguf-py's reader)."""
    info = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight").field
    at = info.offset + sum(part.nbytes for part in info.parts[:-1])
    data = bytearray(path.read_bytes())
    data[at : at + 8] = (int(np.frombuffer(data, "<u8", 1, at)[0]) + 2**30).to_bytes(8, "little")
    path.write_bytes(bytes(data))


@dataclass(frozen=True)
class Case:
    base: str  # "llama" or "gemma3"
    change: Mutation
    needle: str  # the key or tensor the one error line names
    after: Callable[[Path], None] | None = None  # a change of the written bytes


A_HEAD, A_KV = "{arch}.attention.head_count", "{arch}.attention.head_count_kv"
CORPUS: dict[str, Case] = {
    # wrong types and lengths of hyperparameters (refused by llama.cpp too, without naming the key)
    "block_count-string": Case("llama", kv("{arch}.block_count", "2", STR), "llama.block_count"),
    "head_count-float": Case("llama", kv(A_HEAD, 4.0, F32), "llama.attention.head_count"),
    "head_count-short-array": Case("llama", kv(A_HEAD, [4], ARR, U32), "llama.attention.head_count"),
    "embedding_length-negative": Case("llama", kv("{arch}.embedding_length", -64, I32), "embedding_length"),
    "architecture-missing": Case("llama", drop("general.architecture"), "general.architecture"),
    # zero and huge counts: abort, GGML_ASSERT(n_layer_all > 0 && n_layer_all <= LLAMA_MAX_LAYERS)
    "block_count-0": Case("llama", kv("{arch}.block_count", 0, U32), "llama.block_count"),
    "block_count-600": Case("llama", kv("{arch}.block_count", 600, U32), "llama.block_count"),
    # abort, GGML_ASSERT(a->ne[0] == b->ne[0]) in ggml_set_rows (K2): per-layer KV heads, unequal
    "kv-heads-per-layer": Case("llama", kv(A_KV, [2, 4], ARR, U32), "llama.attention.head_count_kv"),
    "kv-heads-per-layer-zero": Case("llama", kv(A_KV, [2, 0], ARR, U32), "llama.attention.head_count_kv"),
    "gemma3-kv-heads-per-layer": Case(
        "gemma3", kv(A_KV, [1, 2, 1], ARR, U32), "gemma3.attention.head_count_kv"
    ),
    # abort, GGML_ASSERT(ggml_can_mul_mat(k, q)): KV heads that do not divide the heads (tensors agree)
    "kv-heads-not-a-divisor": Case("llama", kv_heads(3), "llama.attention.head_count_kv"),
    "kv-heads-above-heads": Case("llama", kv_heads(8), "llama.attention.head_count_kv"),
    # abort, GGML_ASSERT(ggml_nelements(a) == ne0*ne1*ne2) in ggml_reshape_3d (the fuzzer's K6): 2^31 + 2 KV
    # heads of size 16 wrap n_embd_k_gqa (uint32) to 32, the tensors' real width
    "kv-heads-width-wraps": Case("llama", kv(A_KV, 2**31 + 2, U32), "llama.attention.head_count_kv"),
    # abort at the first decode, GGML_ASSERT(eps >= 0.0f) in rms_norm (the fuzzer's K5)
    "rms-eps-negative": Case(
        "llama", kv("{arch}.attention.layer_norm_rms_epsilon", -1.9e20, F32), "layer_norm_rms_epsilon"
    ),
    # not an abort: every logit NaN (the fuzzer's K7)
    "rope-base-negative": Case("llama", kv("{arch}.rope.freq_base", -3.0e38, F32), "llama.rope.freq_base"),
    "rope-base-inf": Case("gemma3", kv("{arch}.rope.freq_base_swa", float("inf"), F32), "rope.freq_base_swa"),
    "rms-eps-nan": Case(
        "llama", kv("{arch}.attention.layer_norm_rms_epsilon", float("nan"), F32), "layer_norm_rms_epsilon"
    ),
    # abort, GGML_ASSERT(rope_scaling_type_train != LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED)
    "rope-scaling-unknown": Case("llama", kv("{arch}.rope.scaling.type", "bogus", STR), "rope.scaling.type"),
    # gemma3: abort, GGML_ASSERT(n_dims <= ne0) / GGML_ASSERT(n_dims % 2 == 0) in rope; 0: llama.cpp hung
    "rope-dims-above-head": Case(
        "gemma3", kv("{arch}.rope.dimension_count", 64, U32), "rope.dimension_count"
    ),
    "rope-dims-odd": Case("gemma3", kv("{arch}.rope.dimension_count", 15, U32), "rope.dimension_count"),
    "rope-dims-0": Case("gemma3", kv("{arch}.rope.dimension_count", 0, U32), "rope.dimension_count"),
    # abort on llama.cpp's expert asserts (load_hparams) and n_layer_nextn <= n_layer_all
    "experts-none-used": Case("llama", kv("{arch}.expert_count", 4, U32), "llama.expert_used_count"),
    "experts-too-many": Case("llama", kv("{arch}.expert_count", 4096, U32), "llama.expert_count"),
    "experts-used-without-experts": Case(
        "llama", kv("{arch}.expert_used_count", 2, U32), "expert_used_count"
    ),
    "expert-groups-without-experts": Case(
        "llama", kv("{arch}.expert_group_count", 2, U32), "expert_group_count"
    ),
    "nextn-layers-above-layers": Case(
        "llama", kv("{arch}.nextn_predict_layers", 5, U32), "nextn_predict_layers"
    ),
    # tensors of the wrong type: abort, "binary_op: unsupported types" (norms), SIGSEGV in mul_mat (integers)
    "norm-f16": Case("llama", tensor("blk.0.attn_norm.weight", np.float16), "blk.0.attn_norm.weight"),
    "norm-bf16": Case(
        "llama", tensor("blk.0.attn_norm.weight", bf16, GGMLQuantizationType.BF16), "blk.0.attn_norm.weight"
    ),
    "norm-q8_0": Case(
        "llama", tensor("output_norm.weight", q8_0, GGMLQuantizationType.Q8_0), "output_norm.weight"
    ),
    "norm-2d-f16": Case(
        "llama",
        tensor("blk.1.ffn_norm.weight", lambda a: a.reshape(1, -1).astype(np.float16)),
        "blk.1.ffn_norm",
    ),
    "norm-i32": Case("llama", tensor("output_norm.weight", lambda a: a.view(np.int32)), "output_norm.weight"),
    "weight-i32": Case(
        "llama", tensor("blk.0.attn_q.weight", lambda a: a.view(np.int32)), "blk.0.attn_q.weight"
    ),
    "weight-i8": Case(
        "llama",
        tensor("blk.1.ffn_up.weight", lambda a: np.ascontiguousarray(a.view(np.int8)[:, :64])),
        "blk.1.ffn_up",
    ),
    "weight-f64": Case("llama", tensor("blk.0.attn_v.weight", np.float64), "blk.0.attn_v.weight"),
    # a tensor of extent 0 (key and tensors agree): abort, GGML_ASSERT(!ggml_is_transposed(a))
    "ffn-of-zero-rows": Case(
        "llama",
        both(
            kv("{arch}.feed_forward_length", 0, U32),
            zero_rows(
                "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.1.ffn_gate.weight", "blk.1.ffn_up.weight"
            ),
            tensor("blk.0.ffn_down.weight", lambda a: np.zeros((64, 0), np.float32)),
            tensor("blk.1.ffn_down.weight", lambda a: np.zeros((64, 0), np.float32)),
        ),
        "blk.0.ffn_gate.weight",
    ),
    # no vocabulary / a token twice (K3): abort, GGML_ASSERT(id_to_token.size() == token_to_id.size())
    "tokenizer-none": Case("llama", kv("tokenizer.ggml.model", "none", STR), "tokenizer.ggml.model"),
    "tokens-duplicate": Case("llama", token_at(300, "▁the"), TOKENS),
    "tokens-empty-named-twice": Case("llama", both(token_at(300, ""), token_at(301, "[EMPTY_300]")), TOKENS),
    # llama.cpp hung (its RWKV tokenizer restarts at the same byte forever)
    "rwkv-without-single-bytes": Case("llama", kv("tokenizer.ggml.model", "rwkv", STR), TOKENS),
    # WordPiece: abort in token_to_byte on a BYTE token; GGML_ASSERT(special_sep_id != LLAMA_TOKEN_NULL)
    "bert-byte-token": Case("llama", kv("tokenizer.ggml.model", "bert", STR), TOKEN_TYPE),
    "bert-separator-out-of-range": Case(
        "llama",
        both(
            kv("tokenizer.ggml.model", "bert", STR),
            no_byte_types,
            kv("tokenizer.ggml.seperator_token_id", 100000, U32),
            vocabulary(100),
        ),
        "tokenizer.ggml.seperator_token_id",
    ),
    # token ids out of range where the tokenizer adds them: abort, GGML_ASSERT(special_bos_id != NULL)
    "t5-adds-bos-without-one": Case(
        "llama",
        both(
            kv("tokenizer.ggml.model", "t5", STR),
            drop("tokenizer.ggml.bos_token_id"),
            kv("tokenizer.ggml.add_bos_token", True, BOOL),
        ),
        "tokenizer.ggml.bos_token_id",
    ),
    "bos-out-of-range": Case(
        "llama",
        both(kv("tokenizer.ggml.bos_token_id", 100000, U32), vocabulary(1)),
        "tokenizer.ggml.bos_token_id",
    ),
    "gpt2-adds-bos-without-one": Case(
        "llama",
        both(
            kv("tokenizer.ggml.model", "gpt2", STR),
            kv("tokenizer.ggml.merges", ["▁ t"], ARR, STR),
            drop("tokenizer.ggml.bos_token_id"),
            kv("tokenizer.ggml.add_bos_token", True, BOOL),
            vocabulary(5),
        ),
        "tokenizer.ggml.bos_token_id",
    ),
    # before: an uncaught C++ exception (IndexError) in the tokenizer
    "eos-out-of-range": Case(
        "llama",
        both(
            kv("tokenizer.ggml.eos_token_id", 100000, U32),
            kv("tokenizer.ggml.add_eos_token", True, BOOL),
            vocabulary(2),
        ),
        "tokenizer.ggml.eos_token_id",
    ),
    # offsets past the end of the file, a truncated data section (llama.cpp refused these without a name)
    "offset-past-end": Case("llama", both(), "blk.0.attn_q.weight", offset_past_end),
    "data-truncated": Case("llama", both(), "output.weight", truncate),
}
NEAR_MISSES: dict[str, Case] = {
    "kv-heads-per-layer-equal": Case("llama", kv(A_KV, [2, 2], ARR, U32), ""),
    "heads-per-layer-unequal": Case("llama", kv(A_HEAD, [4, 2], ARR, U32), ""),
    "gemma3-heads-per-layer-unequal": Case("gemma3", kv(A_HEAD, [4, 2, 4], ARR, U32), ""),
    "deci-kv-heads-per-layer": Case(
        "llama", both(as_arch("deci"), kv_heads(1, range(1, 2)), kv(A_KV, [2, 1], ARR, U32)), ""
    ),
    "kv-heads-one": Case("llama", kv_heads(1), ""),
    "rms-eps-0": Case("llama", kv("{arch}.attention.layer_norm_rms_epsilon", 0.0, F32), ""),
    "rope-scaling-yarn": Case("llama", kv("{arch}.rope.scaling.type", "yarn", STR), ""),
    "rope-dims-equal-head": Case("gemma3", kv("{arch}.rope.dimension_count", 16, U32), ""),
    "experts-0": Case(
        "llama", both(kv("{arch}.expert_count", 0, U32), kv("{arch}.expert_used_count", 0, U32)), ""
    ),
    "nextn-layers-0": Case("llama", kv("{arch}.nextn_predict_layers", 0, U32), ""),
    "weights-f16-and-q8_0": Case(
        "llama",
        both(
            tensor("blk.0.attn_q.weight", np.float16),
            tensor("blk.1.ffn_up.weight", q8_0, GGMLQuantizationType.Q8_0),
        ),
        "",
    ),
    "token-empty": Case("llama", token_at(300, ""), ""),
    "bert-without-byte-tokens": Case(
        "llama", both(kv("tokenizer.ggml.model", "bert", STR), no_byte_types), ""
    ),
    "rwkv-with-every-byte": Case("llama", rwkv_every_byte, ""),
    "bos-out-of-range-default-in-range": Case("llama", kv("tokenizer.ggml.bos_token_id", 100000, U32), ""),
    "t5-without-bos-adding-none": Case(
        "llama",
        both(
            kv("tokenizer.ggml.model", "t5", STR),
            drop("tokenizer.ggml.bos_token_id"),
            kv("tokenizer.ggml.add_bos_token", False, BOOL),
        ),
        "",
    ),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    folder = tmp_path_factory.mktemp("hostile")
    bases = {
        "llama": read_spec(make_tiny_llama(folder / "base-llama.gguf").path),
        "gemma3": read_spec(make_tiny_gemma3(folder / "base-gemma3.gguf").path),
    }
    out = {}
    for name, case in {**CORPUS, **NEAR_MISSES}.items():
        spec = copy.deepcopy(bases[case.base])
        case.change(spec)
        out[name] = write_spec(spec, folder / f"{name}.gguf")
        if case.after is not None:
            case.after(out[name])
    yield out


@pytest.fixture(scope="module", autouse=True)
def _bin_dir() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZT_GGUF_BIN", str(tools.bin_dir()))
        yield


# --- the console command --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CORPUS))
def test_eval_refuses_with_one_line(files: dict[str, Path], tmp_path: Path, name: str) -> None:
    path = files[name]
    task = write_tiny_task(tmp_path / "task.jsonl", 4)
    res = subprocess.run(
        [ZT, "eval", str(path), "--task", str(task), "--threads", "1"],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    where = f"exit {res.returncode}\nstdout: {res.stdout[-500:]}\nstderr: {res.stderr[-3000:]}"
    assert res.returncode == 2, where  # (a signal is a negative exit code)
    assert "Traceback" not in res.stderr + res.stdout, where
    lines = res.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith(f"zt-gguf: error: {path}: "), where
    assert CORPUS[name].needle in lines[0], where


# --- the engine API, every case in one child process ----------------------------------------------------

_ENGINE_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from zt_gguf.errors import UserError
    from zt_gguf.engine import Context, Model
    from zt_gguf.tasks import Item

    score = sys.argv[1] == "score"
    for path in sys.argv[2:]:
        os.write(2, ("@@case " + path + "\\n").encode())
        out = {"path": path}
        try:
            model = Model(path)
            if score:
                ctx = Context(model, n_ctx=128, n_threads=1)
                s = ctx.score([Item("the cat sat on the", (" mat", " dog"), 0, "x")], n_gen=2)[0]
                out["logprob"] = s.choice_logprob.tolist()
                out["tokens"] = model.tokenize("h\\u00e9llo \\u2603 the cat\\n")
            out["loaded"] = True
        except UserError as e:
            out["error"] = type(e).__name__
            out["message"] = str(e)
        print(json.dumps(out), flush=True)
    """
)


def _engine_child(how: str, paths: list[Path]) -> dict[str, dict[str, Any]]:
    """The child's record of each path; a failed test naming the case if the child died."""
    res = subprocess.run(
        [sys.executable, "-c", _ENGINE_CHILD, how, *map(str, paths)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=TIMEOUT,
    )
    started = re.findall(r"^@@case (.*)$", res.stderr, re.M)
    if res.returncode != 0:
        pytest.fail(f"the engine died (exit {res.returncode}) on {started[-1:]}:\n{res.stderr[-3000:]}")
    out = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return {r["path"]: r for r in out}


def test_engine_refuses_with_a_user_error(files: dict[str, Path]) -> None:
    out = _engine_child("load", [files[name] for name in CORPUS])
    for name, case in CORPUS.items():
        r = out[str(files[name])]
        assert "loaded" not in r, name
        assert r["error"] == "EngineError", (name, r)
        assert "\n" not in r["message"] and r["message"].startswith(f"{files[name]}: "), (name, r)
        assert case.needle in r["message"], (name, r)


def test_near_misses_load_and_score(files: dict[str, Path]) -> None:
    """The valid neighbours of every rule pass the pre-flight, load and score (finite log-probabilities)."""
    for name in NEAR_MISSES:
        gguf_meta.check_model(files[name])
    out = _engine_child("score", [files[name] for name in NEAR_MISSES])
    for name in NEAR_MISSES:
        r = out[str(files[name])]
        assert r.get("loaded"), (name, r)
        assert np.all(np.isfinite(r["logprob"])) and r["tokens"], (name, r)


def test_check_model_is_gguf_meta_error(files: dict[str, Path]) -> None:
    """The pre-flight itself raises GGUFMetaError (a UserError) with the message the engine gives."""
    path = files["tokens-duplicate"]
    first = make_tokenizer().tokens.index("▁the")
    text = f"{path}: key {TOKENS}: tokens {first} and 300 are the same text '▁the'"
    with pytest.raises(gguf_meta.GGUFMetaError, match=f"^{re.escape(text)}$"):
        gguf_meta.check_model(path)


@pytest.mark.parametrize("name", models.TESTED)
def test_real_models_pass(name: str) -> None:
    info = gguf_meta.check_model(models.get(name))
    assert info.n_layer > 0 and info.n_head > 0 and info.n_vocab > 0


# --- the per-layer KV head architectures, again from llama.cpp's sources ----------------------------------


@pytest.mark.skipif(not LLAMA_CPP_SRC.is_dir(), reason="the llama.cpp sources are not beside the package")
def test_per_layer_kv_archs_match_llama_cpp() -> None:
    """PER_LAYER_KV_ARCHS is every architecture whose model class (src/models/*.cpp) reads a per-layer KV head
    count (n_head_kv(il), n_embd_k_gqa(il), n_head_kv_arr) or sets recurrent layers (is_recr_impl[...])."""
    src = (LLAMA_CPP_SRC / "llama-model.cpp").read_text()
    mapping = src[src.index("llama_model_mapping(") :]
    mapping = mapping[: mapping.index("\n}\n")]
    class_of: dict[str, str] = {}
    pending: list[str] = []
    for line in mapping.splitlines():
        pending += re.findall(r"case (LLM_ARCH_\w+):", line)
        if m := re.search(r"new (llama_model_\w+)\(", line):
            class_of.update((arch, m.group(1)) for arch in pending)
            pending = []
    names = dict(
        re.findall(r"\{\s*(LLM_ARCH_\w+),\s*\"([^\"]+)\"", (LLAMA_CPP_SRC / "llama-arch.cpp").read_text())
    )
    per_layer = re.compile(r"n_head_kv\(\w+\)|n_embd_[kv]_gqa\(\w+\)|n_head_kv_arr|is_recr_impl\[")
    classes: set[str] = set()
    for f in (LLAMA_CPP_SRC / "models").glob("*.cpp"):
        text = f.read_text()
        if per_layer.search(text):
            classes |= set(re.findall(r"(llama_model_\w+)::", text))
    assert {names[arch] for arch, cls in class_of.items() if cls in classes} == gguf_meta.PER_LAYER_KV_ARCHS
