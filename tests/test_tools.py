"""End to end: the patched llama.cpp programs and llama-cpp-python on tiny random-weight F32 models.

Every number a tool prints or saves is compared with the engine (zt_gguf.engine.Context.logits: one sequence
alone from an empty cache, F32 K/V) given the same biases, or with a run of the same tool with the bias off;
nothing is hard-coded. The models are F32, so the only differences are float32 rounding: the tools batch the
tokens differently from the engine (other matmul shapes, several sequences in one ubatch), which moves logits
by ~1e-6 (measured <= 2e-6), and could move gemma3's through ggml's FP16 GELU table (an input that rounds the
other way) by ~1e-4. Quantized real models are not batch-invariant in llama.cpp (~0.1 nats), hence tiny F32
models.

Flash attention: "-fa off" is compared with the engine at flash_attn=False (ATOL); "-fa on" casts K/V (and
for few query rows Q) to F16 and is compared with a looser FA_ATOL, while the bias itself moves the
log-probabilities by far more than FA_ATOL (asserted).

Upstream llama.cpp's logger (common/log.cpp) writes stdout from a worker thread and its singleton is leaked at
exit (llama.cpp issue 22142), so a run could exit, with code 0, before its stdout was written (seen in 3-9% of
llama-completion runs here, and in every run of a loaded CI machine). Our patch 0004 drains the queue at exit;
the tests check it by accepting no incomplete output: one run each.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from zt_gguf import gguf_meta, testing, tools
from zt_gguf.engine import Context, Model
from zt_gguf.testing import (
    TOKEN_TYPE_BYTE,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_UNKNOWN,
    Server,
    TinyModel,
    TinyTokenizer,
    make_tiny_gemma3,
    make_tiny_llama,
)

# log-probabilities, tool vs engine, no flash attention: float32 rounding under other batch shapes, measured
# <= 2e-6 (llama and gemma3, perplexity, server, llama-cpp-python); the headroom is for gemma3's FP16 GELU
# table, where an input that rounds the other way moves logits by ~1e-4 (zt_gguf.testing.reference_logits)
ATOL = 2e-4
# flash attention on the CPU (F16 K/V, and Q for small batches) against the F32 engine: measured <= 6e-3
FA_ATOL = 2e-2
# flash attention on in both the tool and the engine (the same F16 roundings, other accumulation order):
# measured ~1e-6
FA_SAME_ATOL = 1e-3
# the stored biases (uniform in [-2, 2]) move log-probabilities by O(1); "differs" means more than this
MIN_EFFECT = 0.1
TOOL_TIMEOUT = 120.0  # seconds, one tool run (each takes well under a second on the tiny models)
THREADS = "1"  # one thread: deterministic and fastest on a loaded 2-core machine for these sizes
WORDS = "the a of and to in is it that was for on hello world cat dog sat mat one two three".split()

PPL_CTX = 16  # llama-perplexity's chunk length
PPL_CHUNKS = 4  # all evaluated in one batch of 4 sequences (-b 4*PPL_CTX)


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def bin_dir() -> Iterator[Path]:
    """The folder of the patched tools and libllama (ZT_GGUF_BIN set for the module if it had to be found)."""
    with pytest.MonkeyPatch.context() as mp:
        try:
            path = tools.bin_dir()
        except tools.ToolError:
            # an editable install keeps the built libraries beside the extension module in site-packages,
            # where tools.bin_dir() (which looks beside tools.py) does not find them
            spec = importlib.util.find_spec("zt_gguf._core")
            path = Path(spec.origin).parent / "bin" if spec and spec.origin else Path("/nonexistent")
            if not (path / "libllama.so").exists():
                raise
            mp.setenv("ZT_GGUF_BIN", str(path))
        yield path


@dataclass
class Tiny:
    """A tiny model with its biases stored (tuned), the same weights without (plain), and bias files."""

    arch: str
    tuned: TinyModel
    plain: TinyModel
    bias: np.ndarray  # float32 [n_layer, n_head]
    bias_gguf: Path
    bias_json_list: Path
    bias_json_object: Path

    @property
    def tokenizer(self) -> TinyTokenizer:
        return self.tuned.tokenizer


def _make_tiny(folder: Path, arch: str) -> Tiny:
    folder.mkdir(parents=True, exist_ok=True)
    make = {"llama": make_tiny_llama, "gemma3": make_tiny_gemma3}[arch]
    plain = make(folder / "plain.gguf", seed=11)
    shape = (plain.hparams.n_layer, plain.hparams.n_head)
    bias = np.random.default_rng(5).uniform(-2.0, 2.0, size=shape).astype(np.float32)
    tuned = make(folder / "tuned.gguf", seed=11, biases=bias)
    values = [float(v) for v in bias.reshape(-1)]
    (folder / "bias_list.json").write_text(json.dumps(values))
    (folder / "bias_object.json").write_text(json.dumps({"first_token_bias": values}))
    return Tiny(
        arch=arch,
        tuned=tuned,
        plain=plain,
        bias=bias,
        bias_gguf=gguf_meta.write_bias_gguf(folder / "bias.gguf", bias, arch),
        bias_json_list=folder / "bias_list.json",
        bias_json_object=folder / "bias_object.json",
    )


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return _make_tiny(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return _make_tiny(tmp_path_factory.mktemp("gemma3"), "gemma3")


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request: pytest.FixtureRequest) -> Tiny:
    return request.getfixturevalue("llama" if request.param == "llama" else "gemma")


# --- helpers: the engine ----------------------------------------------------------------------------------

_STORED = "stored"  # the bias stored in the model (the engine's default)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _engine(path: Path, bias: Any = _STORED, flash_attn: bool = False) -> Context:
    """An engine context on path with its stored bias, or bias (None: off; an array: that bias)."""
    ctx = Context(
        Model(path), n_ctx=512, n_batch=512, n_ubatch=512, n_seq_max=2, n_threads=1, flash_attn=flash_attn
    )
    if not (isinstance(bias, str) and bias == _STORED):
        ctx.set_bias(bias)
    return ctx


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def _piece(tok: TinyTokenizer, token: int) -> bytes:
    """What llama.cpp's token_to_piece prints for a token of the tiny vocabulary (special tokens off)."""
    text, ttype = tok.tokens[token], tok.token_types[token]
    if ttype == TOKEN_TYPE_CONTROL:
        return b""
    if ttype == TOKEN_TYPE_BYTE:
        return bytes([int(text[3:5], 16)])
    if ttype == TOKEN_TYPE_UNKNOWN:
        return "\u2585".encode()
    return text.replace("\u2581", " ").encode()


# --- helpers: running the tools ---------------------------------------------------------------------------


def _run(
    args: Sequence[str | os.PathLike[str]],
    *,
    complete: Callable[[bytes], bool] = lambda out: True,
    timeout: float = TOOL_TIMEOUT,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a program, which must exit 0 with its whole stdout written (module docstring)."""
    argv = [str(a) for a in args]
    res = subprocess.run(argv, capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, (
        f"{' '.join(argv)} exited {res.returncode}\n"
        f"stdout: {res.stdout[-2000:].decode(errors='replace')}\n"
        f"stderr: {res.stderr[-4000:].decode(errors='replace')}"
    )
    assert complete(res.stdout), f"{' '.join(argv)}: stdout incomplete: {res.stdout[-500:]!r}"
    return res


@dataclass
class PplRun:
    """What one llama-perplexity run printed and saved."""

    tokens: np.ndarray  # int32 [n_chunk, n_ctx], as tokenized (before BOS replacement)
    scale: np.ndarray  # float32 [n_chunk, n_scored]: log-prob step of the 16-bit codes
    min_logprob: np.ndarray  # float32 [n_chunk, n_scored]: log-prob of code 0
    codes: np.ndarray  # uint16 [n_chunk, n_scored, n_vocab]
    nll: np.ndarray  # float64 [n_chunk]: printed running mean NLL after each chunk (6 decimals)
    stderr: str

    def logprobs(self) -> tuple[np.ndarray, np.ndarray]:
        """Decoded log-probabilities [n_chunk, n_scored, n_vocab] and where they are known (code > 0)."""
        known = self.codes > 0
        lp = self.min_logprob[..., None].astype(np.float64) + self.scale[..., None] * self.codes
        return lp, known


_PPL_LINE = re.compile(rb"^\s*(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.naif-]+)\s*$", re.M)


def _run_perplexity(model: Path, text: Path, out: Path, *extra: str) -> PplRun:
    """llama-perplexity over PPL_CHUNKS chunks of PPL_CTX tokens evaluated as parallel sequences of one batch,
    saving every scored token's log-probabilities (--kl-divergence-base) and printing the running NLL."""
    args = [
        tools.tool_path("llama-perplexity"),
        "-m", model, "-f", text, "-c", str(PPL_CTX), "-b", str(PPL_CTX * PPL_CHUNKS),
        "--chunks", str(PPL_CHUNKS), "--ppl-output-type", "1", "--kl-divergence-base", out,
        "-t", THREADS, "--no-warmup", *extra,
    ]  # fmt: skip
    res = _run(args, complete=lambda o: len(_PPL_LINE.findall(o)) == PPL_CHUNKS)
    nll = np.array([float(m[2]) for m in _PPL_LINE.findall(res.stdout)])

    raw = out.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(raw, "<i4", 3, 8))
    assert (n_ctx, n_chunk) == (PPL_CTX, PPL_CHUNKS)
    off = 20
    tokens = np.frombuffer(raw, "<i4", n_chunk * n_ctx, off).reshape(n_chunk, n_ctx)
    off += tokens.nbytes
    nv = 2 * ((n_vocab + 1) // 2) + 4  # per scored token: 2 floats (scale, min log-prob), codes, padding
    n_scored = n_ctx - 1 - n_ctx // 2
    rec = np.frombuffer(raw, "<u2", n_chunk * n_scored * nv, off).reshape(n_chunk, n_scored, nv)
    assert off + rec.nbytes == len(raw), "unexpected size of the saved log-probabilities"
    head = np.ascontiguousarray(rec[..., :4]).view("<f4")
    return PplRun(
        tokens=tokens,
        scale=head[..., 0],
        min_logprob=head[..., 1],
        codes=rec[..., 4 : 4 + n_vocab],
        nll=nll,
        stderr=res.stderr.decode(errors="replace"),
    )


def _engine_perplexity(ctx: Context, tokens: np.ndarray, bos: int) -> tuple[np.ndarray, np.ndarray]:
    """The engine's log-probabilities [n_chunk, n_scored, n_vocab] at the positions llama-perplexity scores,
    and its running mean NLL per chunk.

    llama-perplexity (tools/perplexity/perplexity.cpp, perplexity()) evaluates chunk c = tokens[c*n_ctx :
    (c+1)*n_ctx] with its first token replaced by BOS (the model adds one), keeps the logits of positions
    first = n_ctx/2 .. n_ctx-2 and scores the next token of each: n_ctx-1-first tokens per chunk.
    """
    n_chunk, n_ctx = tokens.shape
    first = n_ctx // 2
    lps, nll_sum, count, running = [], 0.0, 0, []
    for c in range(n_chunk):
        toks = tokens[c].tolist()
        toks[0] = bos
        lp = _log_softmax(ctx.logits(toks))[first : n_ctx - 1]
        target = tokens[c, first + 1 :]
        nll_sum += float(-lp[np.arange(len(target)), target].sum())
        count += len(target)
        running.append(nll_sum / count)
        lps.append(lp)
    return np.stack(lps), np.array(running)


def _saved_error(run: PplRun, ref: np.ndarray) -> float:
    """Largest difference of the tool's saved log-probabilities from ref beyond their 16-bit quantization
    (half a step). Code 0 means "at or below min_logprob": ref must be there too."""
    lp, known = run.logprobs()
    half = run.scale[..., None] / 2
    err_known = np.where(known, np.abs(lp - ref) - half, -np.inf).max()
    err_floor = np.where(~known, ref - (run.min_logprob[..., None] + half), -np.inf).max()
    return float(max(err_known, err_floor, 0.0))


def _text_file(folder: Path, model: Path, seed: int) -> Path:
    """A text of at least PPL_CHUNKS*PPL_CTX tokens."""
    rng = np.random.default_rng(seed)
    text = _words(rng, PPL_CHUNKS * PPL_CTX + 16)
    assert len(Model(model).tokenize(text)) >= PPL_CHUNKS * PPL_CTX
    path = folder / "text.txt"
    path.write_text(text)
    return path


def _complete_output(stdout: bytes) -> bool:
    return stdout.endswith(b"\n\n")  # llama-completion's last stdout line (FIFO logger: all else came before)


def _run_completion(model: Path, prompt: str, n_predict: int, *extra: str) -> bytes:
    """The bytes llama-completion prints for its greedy continuation of prompt (without its trailer)."""
    args = [
        tools.tool_path("llama-completion"),
        "-m", model, "-p", prompt, "-n", str(n_predict), "--temp", "0", "-no-cnv", "--no-display-prompt",
        "-t", THREADS, "--no-warmup", "-s", "1", *extra,
    ]  # fmt: skip
    return _run(args, complete=_complete_output).stdout[:-2]


def _engine_greedy(ctx: Context, tok: TinyTokenizer, prompt: str, n_predict: int) -> tuple[bytes, float]:
    """The engine's greedy continuation as llama-completion prints it, and the smallest top-2 logit gap."""
    tokens = ctx.model.tokenize(prompt)
    out, gap = b"", np.inf
    for _ in range(n_predict):
        logits = ctx.logits(tokens)[-1].astype(np.float64)
        top2 = np.sort(logits)[-2:]
        gap = min(gap, float(top2[1] - top2[0]))
        nxt = int(np.argmax(logits))
        if nxt == tok.eos_id:
            return out + b" [end of text]\n", gap
        out += _piece(tok, nxt)
        tokens.append(nxt)
    return out, gap


# --- 1. llama-perplexity and llama-completion -------------------------------------------------------------


def test_perplexity_applies_stored_and_given_biases(tiny: Tiny, tmp_path: Path) -> None:
    """llama-perplexity's log-probabilities equal the engine's: (a) with the stored bias, (b) with
    --no-attn-ftb equal to the engine with the bias off and different from (a), (c) an untuned model with
    --attn-ftb (GGUF, JSON list, JSON object) identical to (a), in a unified KV cache too, and (d) with flash
    attention on within FA_ATOL of the exact engine and FA_SAME_ATOL of the engine with flash attention.
    The four chunks are four sequences of one batch, each with its own position 0."""
    text = _text_file(tmp_path, tiny.tuned.path, seed=21)
    bos = tiny.tokenizer.bos_id

    def run(name: str, model: Path, *extra: str) -> PplRun:
        return _run_perplexity(model, text, tmp_path / f"{name}.bin", *extra)

    stored = run("stored", tiny.tuned.path, "-fa", "off")
    assert "ignoring the first-token attention bias" not in stored.stderr
    assert np.array_equal(
        stored.tokens.reshape(-1), Model(tiny.tuned.path).tokenize(text.read_text())[: PPL_CHUNKS * PPL_CTX]
    )

    # (a) the stored bias
    ref_on, nll_on = _engine_perplexity(_engine(tiny.tuned.path), stored.tokens, bos)
    assert _saved_error(stored, ref_on) <= ATOL
    np.testing.assert_allclose(stored.nll, nll_on, atol=ATOL, rtol=0)

    # (b) --no-attn-ftb: the engine with the bias off, and not (a)
    off = run("off", tiny.tuned.path, "-fa", "off", "--no-attn-ftb")
    ref_off, nll_off = _engine_perplexity(_engine(tiny.tuned.path, bias=None), off.tokens, bos)
    assert _saved_error(off, ref_off) <= ATOL
    np.testing.assert_allclose(off.nll, nll_off, atol=ATOL, rtol=0)
    assert np.abs(ref_on - ref_off).max() > MIN_EFFECT
    lp_on, known_on = stored.logprobs()
    lp_off, known_off = off.logprobs()
    both = known_on & known_off
    assert np.abs(lp_on - lp_off)[both].max() > MIN_EFFECT
    assert np.abs(stored.nll - off.nll).max() > 1e-3

    # the untuned model: the bias off, as --no-attn-ftb
    plain = run("plain", tiny.plain.path, "-fa", "off")
    assert np.array_equal(plain.codes, off.codes) and np.array_equal(plain.nll, off.nll)

    # (c) the untuned model with --attn-ftb FILE: the same computation as (a), bit for bit
    for name, path in (
        ("gguf", tiny.bias_gguf),
        ("json_list", tiny.bias_json_list),
        ("json_object", tiny.bias_json_object),
    ):
        given = run(f"given_{name}", tiny.plain.path, "-fa", "off", "--attn-ftb", str(path))
        assert "applied the first-token attention bias" in given.stderr, name
        assert np.array_equal(given.codes, stored.codes), name
        assert np.array_equal(given.scale, stored.scale) and np.array_equal(given.nll, stored.nll), name

    # the four sequences in one unified KV buffer (their position-0 cells are different cells of one stream)
    unified = run("unified", tiny.tuned.path, "-fa", "off", "-kvu")
    assert _saved_error(unified, ref_on) <= ATOL
    np.testing.assert_allclose(unified.nll, nll_on, atol=ATOL, rtol=0)

    # (d) flash attention on: F16 K/V; against the exact (F32) engine and the engine with flash attention
    fa = run("fa", tiny.tuned.path, "-fa", "on")
    assert _saved_error(fa, ref_on) <= FA_ATOL
    np.testing.assert_allclose(fa.nll, nll_on, atol=FA_ATOL, rtol=0)
    assert np.abs(ref_on - ref_off).max() > 5 * FA_ATOL
    ref_fa, nll_fa = _engine_perplexity(_engine(tiny.tuned.path, flash_attn=True), fa.tokens, bos)
    assert _saved_error(fa, ref_fa) <= FA_SAME_ATOL
    np.testing.assert_allclose(fa.nll, nll_fa, atol=FA_SAME_ATOL, rtol=0)
    fa_off = run("fa_off_bias", tiny.tuned.path, "-fa", "on", "--no-attn-ftb")
    assert _saved_error(fa_off, ref_off) <= FA_ATOL


def test_completion_greedy_text_equals_engine(llama: Tiny) -> None:
    """llama-completion's greedy continuation equals the engine's with the stored bias, with --no-attn-ftb
    (the engine with the bias off; a different text) and on the untuned model with --attn-ftb FILE (the text
    of the stored bias); flash attention off."""
    n_predict = 8
    on, off = _engine(llama.tuned.path), _engine(llama.tuned.path, bias=None)
    # a prompt whose greedy continuation the bias changes, with no near-tie on either path
    rng = np.random.default_rng(3)
    for _ in range(50):
        prompt = _words(rng, int(rng.integers(3, 10)))
        (want_on, gap_on), (want_off, gap_off) = (
            _engine_greedy(c, llama.tokenizer, prompt, n_predict) for c in (on, off)
        )
        if want_on != want_off and min(gap_on, gap_off) > 10 * ATOL:
            break
    else:
        pytest.fail("no prompt whose greedy continuation the bias changes")

    def run(model: Path, *extra: str) -> bytes:
        return _run_completion(model, prompt, n_predict, "-fa", "off", *extra)

    assert run(llama.tuned.path) == want_on
    assert run(llama.tuned.path, "--no-attn-ftb") == want_off
    assert run(llama.plain.path) == want_off
    assert run(llama.plain.path, "--attn-ftb", str(llama.bias_gguf)) == want_on
    assert run(llama.plain.path, "--attn-ftb", str(llama.bias_json_list)) == want_on


def test_completion_logit_bias_args_equal_engine(llama: Tiny) -> None:
    """The --logit-bias arguments zt-gguf prints for a fitted logit bias (corrections.LogitBias.cli_args) make
    llama-completion generate what the engine generates with the same bias, on a tuned file: the engine
    batched (Context.score(logit_bias=...)) and single-sequence decodes with the bias added in NumPy agree."""
    from zt_gguf.corrections import LogitBias
    from zt_gguf.tasks import Item

    n_predict = 6
    on = _engine(llama.tuned.path)
    rng = np.random.default_rng(17)
    for _ in range(50):
        prompt = _words(rng, int(rng.integers(3, 9)))
        tokens = on.model.tokenize(prompt)
        logits = on.logits(tokens)[-1].astype(np.float64)
        order = np.argsort(logits)
        lb = LogitBias([int(order[-3]), int(order[-1])], [2.5, -1.0], [[0], [1]])
        vec = np.zeros(len(logits))
        for t, b in lb.pairs():
            vec[t] = b
        out, gen, gap, end = b"", [], np.inf, False
        for _ in range(n_predict):
            z = on.logits(tokens + gen)[-1].astype(np.float64) + vec
            top2 = np.sort(z)[-2:]
            gap = min(gap, float(top2[1] - top2[0]))
            nxt = int(np.argmax(z))
            if nxt == llama.tokenizer.eos_id:
                out, end = out + b" [end of text]\n", True
                break
            out += _piece(llama.tokenizer, nxt)
            gen.append(nxt)
        if gen and gen[0] != int(order[-1]) and gap > 10 * ATOL:
            break
    else:
        pytest.fail("no prompt whose greedy continuation the logit bias changes without a near-tie")
    args = lb.cli_args()
    assert args == ["--logit-bias", f"{order[-3]}+2.5", "--logit-bias", f"{order[-1]}-1"]
    assert _run_completion(llama.tuned.path, prompt, n_predict, "-fa", "off", *args) == out
    batched = on.score([Item(prompt=prompt, choices=(" cat", " dog"), answer=0, id="p")], n_gen=n_predict,
                       logit_bias=lb.pairs())[0]  # fmt: skip
    assert batched.gen_tokens == gen + ([llama.tokenizer.eos_id] if end else [])


@pytest.mark.parametrize("case", ["short", "nan", "missing", "not-json", "nested-ok"])
def test_attn_ftb_file_errors_stop_the_tool(llama: Tiny, tmp_path: Path, case: str) -> None:
    """A --attn-ftb file that cannot be applied fails the context: the tool exits non-zero naming the file."""
    f = tmp_path / f"{case}.json"
    if case == "short":
        f.write_text(json.dumps([0.5] * (llama.bias.size - 1)))
    elif case == "nan":
        f.write_text(json.dumps([0.5] * (llama.bias.size - 1) + ["nan"]).replace('"nan"', "NaN"))
    elif case == "not-json":
        f.write_text("{not json")
    elif case == "nested-ok":
        f.write_text(json.dumps(llama.bias.tolist()))  # one array per layer is accepted too
    args = [
        tools.tool_path("llama-completion"),
        "-m", llama.plain.path, "-p", "the cat", "-n", "1", "--temp", "0", "-no-cnv", "-t", THREADS,
        "--no-warmup", "--attn-ftb", f,
    ]  # fmt: skip
    res = subprocess.run([str(a) for a in args], capture_output=True, timeout=TOOL_TIMEOUT)
    err = res.stderr.decode(errors="replace")
    if case == "nested-ok":
        assert res.returncode == 0, err[-2000:]
    else:
        assert res.returncode != 0 and f.name in err, f"exit {res.returncode}, no line naming {f.name}: {err}"


# --- 2. llama-server --------------------------------------------------------------------------------------


N_TOP = 5  # top log-probabilities requested
N_REQUESTS = 20  # concurrent requests, > 4 slots: queued and batched together


def _first_logprobs(ctx: Context, prompt: str) -> np.ndarray:
    """The engine's log-probabilities of the token after prompt (one sequence alone)."""
    return _log_softmax(ctx.logits(ctx.model.tokenize(prompt)))[-1]


def _completion_request(server: Server, prompt: str) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": N_TOP, "seed": 1}
    status, res = testing.http(server.url + "/v1/completions", body, timeout=60)
    assert status == 200, f"status {status} for {prompt!r}"
    return res


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _check_first_token(res: dict[str, Any], lp: np.ndarray, n_prompt: int) -> float:
    """The server's first generated token and its top N_TOP log-probabilities against the engine's
    log-softmax lp of the last prompt token; returns the largest log-probability difference."""
    assert res["usage"]["prompt_tokens"] == n_prompt
    first = res["choices"][0]["logprobs"]["content"][0]
    top = first["top_logprobs"]
    assert len(top) == N_TOP
    ids = np.array([t["id"] for t in top])
    got = np.array([t["logprob"] for t in top], dtype=np.float64)
    err = float(np.abs(got - lp[ids]).max())
    assert err <= ATOL, f"top log-probabilities differ from the engine's by {err}"
    # the same top set (up to ties within ATOL) and the greedy token
    kth = np.sort(lp)[-N_TOP]
    assert np.all(lp[ids] >= kth - ATOL)
    best = int(np.argmax(lp))
    assert first["id"] == best or lp[best] - lp[first["id"]] <= ATOL
    assert abs(first["logprob"] - lp[first["id"]]) <= ATOL
    return err


def test_server_concurrent_requests_equal_engine(llama: Tiny, start_server: Callable[..., Server]) -> None:
    """N_REQUESTS concurrent /v1/completions on 4 slots sharing one unified KV cache (prompt prefixes cached
    and reused): each first token's top log-probabilities and the greedy token equal the engine's
    single-sequence result with the stored bias; a server started with --no-attn-ftb answers as the engine
    with the bias off."""
    server = start_server(llama.tuned.path, "-kvu")
    model = Model(llama.tuned.path)
    on, off = _engine(llama.tuned.path), _engine(llama.tuned.path, bias=None)
    rng = np.random.default_rng(8)
    expect: dict[str, np.ndarray] = {}
    while len(expect) < N_REQUESTS:
        # shared prefixes, so that slots reuse cached prompt prefixes; lengths 3-14 words
        prompt = ("the cat sat " if len(expect) % 3 == 0 else "") + _words(rng, int(rng.integers(3, 12)))
        lp = _first_logprobs(on, prompt)
        # the server leaves out the log-probabilities of a token that ends inside a UTF-8 character
        if _utf8(_piece(llama.tokenizer, int(np.argmax(lp)))):
            expect[prompt] = lp
    prompts = list(expect)

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        futures = [pool.submit(_completion_request, server, p) for p in prompts]
        results = [f.result(timeout=120) for f in futures]
    errs = [_check_first_token(r, expect[p], len(model.tokenize(p))) for p, r in zip(prompts, results)]
    assert max(errs) <= ATOL

    # a server started with --no-attn-ftb answers as the engine with the bias off, not as with it
    p = next(p for p in prompts if _utf8(_piece(llama.tokenizer, int(np.argmax(_first_logprobs(off, p))))))
    lp_off = _first_logprobs(off, p)
    assert np.abs(expect[p] - lp_off).max() > MIN_EFFECT
    plain = start_server(llama.tuned.path, "--no-attn-ftb")
    res = _completion_request(plain, p)
    _check_first_token(res, lp_off, len(model.tokenize(p)))
    top = res["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    ids, got = [t["id"] for t in top], np.array([t["logprob"] for t in top])
    assert np.abs(got - expect[p][ids]).max() > MIN_EFFECT
    for s in (server, plain):  # SIGTERM: a clean shutdown
        assert testing.stop_server(s) == 0, s.log.read_text(errors="replace")[-3000:]


# --- 3. llama-cpp-python ----------------------------------------------------------------------------------


def _needs_llama_cpp() -> None:
    # not imported here: llama_cpp loads its libllama at import, from LLAMA_CPP_LIB_PATH (set in the children)
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (scripts/test.sh installs it)")


_LLAMA_CPP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from zt_gguf import llama_cpp_compat as lc

    args = json.loads(sys.argv[1])
    tokens, bias = args["tokens"], np.array(args["bias"], dtype=np.float32)
    out = {}

    def logits(llm):
        llm.reset()
        llm.eval(tokens)
        return np.array(llm.scores[: llm.n_tokens], dtype=np.float32).tolist()

    def make(path, fa):
        return lc.load_llama(path, n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, flash_attn=fa,
                             n_threads=1, n_threads_batch=1)

    llm = make(args["tuned"], False)
    out["lib"] = lc.import_llama_cpp().llama_cpp._lib._name
    out["n_attn_ftb"] = lc.n_attn_ftb(llm)
    out["tokenized"] = llm.tokenize(args["prompt"].encode())
    out["stored_bias"] = lc.get_first_token_bias(llm).tolist()
    out["stored"] = logits(llm)
    flat = bias.reshape(-1)
    out["code_short"] = lc.set_first_token_bias(llm, flat[:-1], check=False)
    out["code_long"] = lc.set_first_token_bias(llm, np.append(flat, 0.0), check=False)
    nan = flat.copy(); nan[3] = np.nan
    out["code_nan"] = lc.set_first_token_bias(llm, nan, check=False)
    inf = flat.copy(); inf[0] = np.inf
    out["code_inf"] = lc.set_first_token_bias(llm, inf, check=False)
    try:
        lc.set_first_token_bias(llm, nan)
        out["raised"] = None
    except lc.AttnFtbError as e:
        out["raised"] = e.code
    out["bias_after_errors"] = lc.get_first_token_bias(llm).tolist()
    out["after_errors"] = logits(llm)
    try:
        lc.set_first_token_bias(llm, bias.T.copy())
        out["transposed"] = None
    except ValueError as e:
        out["transposed"] = str(e)
    out["code_none"] = lc.set_first_token_bias(llm, None)
    out["bias_none"] = lc.get_first_token_bias(llm)
    out["none"] = logits(llm)
    out["code_again"] = lc.set_first_token_bias(llm, bias)
    out["again"] = logits(llm)
    # without reset the next eval reuses nothing: the setter already cleared the cache and the history
    lc.set_first_token_bias(llm, None)
    llm.eval(tokens)
    out["none_no_reset"] = np.array(llm.scores[: llm.n_tokens], dtype=np.float32).tolist()

    plain = make(args["plain"], False)
    out["plain_bias"] = lc.get_first_token_bias(plain)
    out["plain_given"] = (lc.set_first_token_bias(plain, bias), logits(plain))[1]
    out["fa_on"] = logits(make(args["tuned"], True))
    print(json.dumps(out))
    """
)


def test_llama_cpp_python_on_the_patched_library(llama: Tiny, bin_dir: Path) -> None:
    """llama-cpp-python 0.3.36 on our libllama (zt_gguf.llama_cpp_compat): Llama(tuned) logits equal the
    engine's, flash attention within FA_ATOL, the setter's error codes (-1 length, -2 non-finite) leave the
    bias unchanged, None restores the untuned logits and the bias given to an untuned model equals the
    stored one."""
    _needs_llama_cpp()
    prompt = "the cat sat on the mat and the dog was on it"
    tokens = Model(llama.tuned.path).tokenize(prompt)
    arg = {
        "tuned": str(llama.tuned.path),
        "plain": str(llama.plain.path),
        "prompt": prompt,
        "tokens": tokens,
        "bias": llama.bias.tolist(),
    }
    # LLAMA_CPP_LIB_PATH unset: load_llama points llama_cpp at the patched libllama itself
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    res = _run([sys.executable, "-c", _LLAMA_CPP_SCRIPT, json.dumps(arg)], env=env, timeout=180)
    out = json.loads(res.stdout.decode().strip().splitlines()[-1])

    assert Path(out["lib"]).resolve().parent == bin_dir.resolve()
    assert out["tokenized"] == tokens
    assert out["n_attn_ftb"] == llama.bias.size
    np.testing.assert_array_equal(np.array(out["stored_bias"], np.float32), llama.bias)

    on = _engine(llama.tuned.path).logits(tokens)
    off = _engine(llama.tuned.path, bias=None).logits(tokens)
    fa = _engine(llama.tuned.path, flash_attn=True).logits(tokens)
    assert np.abs(_log_softmax(on) - _log_softmax(off)).max() > MIN_EFFECT

    def close(name: str, ref: np.ndarray, atol: float) -> None:
        got = np.array(out[name], dtype=np.float32)
        assert got.shape == ref.shape, name
        np.testing.assert_allclose(got, ref, atol=atol, rtol=0, err_msg=name)

    close("stored", on, ATOL)
    assert (out["code_short"], out["code_long"], out["code_nan"], out["code_inf"]) == (-1, -1, -2, -2)
    assert out["raised"] == -2
    assert out["transposed"] and "shape" in out["transposed"]
    np.testing.assert_array_equal(np.array(out["bias_after_errors"], np.float32), llama.bias)
    close("after_errors", on, ATOL)
    assert out["code_none"] == 0 and out["bias_none"] is None
    close("none", off, ATOL)
    close("none_no_reset", off, ATOL)
    assert out["code_again"] == 0
    close("again", on, ATOL)
    assert out["plain_bias"] is None
    close("plain_given", on, ATOL)
    np.testing.assert_array_equal(np.array(out["plain_given"]), np.array(out["stored"]))
    close("fa_on", on, FA_ATOL)
    close("fa_on", fa, FA_SAME_ATOL)


# the ctypes structures of llama-cpp-python 0.3.36 that have a C counterpart with the same field names
_STRUCTS = (
    "llama_model_params",
    "llama_context_params",
    "llama_batch",
    "llama_token_data",
    "llama_token_data_array",
    "llama_sampler_chain_params",
    "llama_sampler_seq_config",
    "llama_logit_bias",
    "llama_chat_message",
    "llama_model_quantize_params",
    "llama_perf_context_data",
    "llama_perf_sampler_data",
)

_CTYPES_LAYOUT = textwrap.dedent(
    """
    import ctypes, json, sys
    from llama_cpp import llama_cpp as L
    out = {}
    for name in sys.argv[1:]:
        cls = getattr(L, name)
        fields = {f[0]: getattr(cls, f[0]).offset for f in cls._fields_}
        out[name] = {"size": ctypes.sizeof(cls), "fields": fields}
    print(json.dumps(out))
    """
)


def test_llama_cpp_python_structs_match_llama_h(tmp_path: Path) -> None:
    """Every field of llama-cpp-python's ctypes llama_model_params, llama_context_params, llama_batch, ...
    is at the offset of the C field of the same name in our llama.h, and the sizes are equal."""
    _needs_llama_cpp()
    tree = Path(__file__).resolve().parent.parent / "third_party" / "llama.cpp"
    header = tree / "include" / "llama.h"
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not header.exists() or cxx is None:
        pytest.skip("needs the patched tree (third_party/llama.cpp) and a C++ compiler")
    res = _run([sys.executable, "-c", _CTYPES_LAYOUT, *_STRUCTS], env=tools.llama_cpp_env())
    py = json.loads(res.stdout.decode().strip().splitlines()[-1])

    lines = ["#include <cstddef>", "#include <cstdio>", '#include "llama.h"', "int main() {"]
    for name, layout in py.items():
        lines.append(f'    std::printf("%s :size %zu\\n", "{name}", sizeof(struct {name}));')
        for field in layout["fields"]:
            lines.append(
                f'    std::printf("%s %s %zu\\n", "{name}", "{field}", offsetof(struct {name}, {field}));'
            )
    lines += ["    return 0;", "}"]
    src = tmp_path / "layout.cpp"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    _run([cxx, "-std=c++17", "-I", tree / "include", "-I", tree / "ggml" / "include", src, "-o", exe])
    c: dict[str, dict[str, Any]] = {}
    for line in _run([exe]).stdout.decode().splitlines():
        name, field, value = line.split()
        entry = c.setdefault(name, {"size": 0, "fields": {}})
        if field == ":size":
            entry["size"] = int(value)
        else:
            entry["fields"][field] = int(value)
    assert c == py


# --- 4. stock compatibility of a tuned file ---------------------------------------------------------------


def test_tuned_gguf_is_a_valid_gguf_with_identical_tensors(llama: Tiny, tmp_path: Path) -> None:
    """A file written by gguf_meta.write_tuned reads with gguf.GGUFReader and gguf-dump, holds the bias key
    and every tensor byte for byte as in the untuned input."""
    from gguf import GGUFReader, GGUFValueType

    tuned = gguf_meta.write_tuned(llama.plain.path, tmp_path / "tuned.gguf", llama.bias, {"version": "test"})
    key = gguf_meta.bias_key("llama")

    src, dst = GGUFReader(str(llama.plain.path)), GGUFReader(str(tuned))
    assert key not in src.fields
    field = dst.fields[key]
    assert field.types == [GGUFValueType.ARRAY, GGUFValueType.FLOAT32]
    np.testing.assert_array_equal(np.asarray(field.contents(), dtype=np.float32), llama.bias.reshape(-1))
    assert dst.fields["zerotuning.version"].contents() == "test"
    # every other key/value unchanged
    skip = {key, "GGUF.kv_count"}
    for name, f in src.fields.items():
        if name not in skip:
            assert dst.fields[name].contents() == f.contents(), name
    # the tensors: same names, types, shapes and bytes; the data section itself unchanged
    assert [t.name for t in dst.tensors] == [t.name for t in src.tensors]
    for a, b in zip(src.tensors, dst.tensors):
        assert (a.tensor_type, list(a.shape), a.n_bytes) == (b.tensor_type, list(b.shape), b.n_bytes), a.name
        assert a.data.tobytes() == b.data.tobytes(), a.name
    assert Path(tuned).read_bytes()[dst.data_offset :] == llama.plain.path.read_bytes()[src.data_offset :]

    # gguf-dump (the gguf package's script; its entry point too if installed)
    dumps = [[sys.executable, "-m", "gguf.scripts.gguf_dump"]]
    if shutil.which("gguf-dump"):
        dumps.append([shutil.which("gguf-dump") or "gguf-dump"])
    for cmd in dumps:
        d_src, d_dst = (
            json.loads(_run([*cmd, "--json", "--json-array", p]).stdout) for p in (llama.plain.path, tuned)
        )
        meta = d_dst["metadata"][key]
        assert meta["type"] == "ARRAY" and meta["array_types"] == ["FLOAT32"]
        np.testing.assert_array_equal(np.array(meta["value"], dtype=np.float32), llama.bias.reshape(-1))
        tensors = {k: {f: v[f] for f in ("shape", "type")} for k, v in d_src["tensors"].items()}
        assert {k: {f: v[f] for f in ("shape", "type")} for k, v in d_dst["tensors"].items()} == tensors
