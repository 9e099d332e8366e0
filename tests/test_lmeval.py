"""Prompt log-probs in llama-server (patch 0009) and lm-evaluation-harness on tuned GGUFs (issue 14).

1. llama-server's /v1/completions with "echo" and "logprobs": the legacy layout over the prompt and the
   generated tokens, against the engine's own log-softmax of the same tokens (an independent route: one
   sequence evaluated alone, Context.logits), with the stored bias and with --no-attn-ftb, several slots and a
   warm prompt cache; max_tokens 0; token-id prompts; the vLLM tokenizer endpoints; bad requests (400).
2. lm-eval itself, unmodified, through its command line: --model gguf and --model local-completions against
   the server, and `zt-gguf lm-eval` (the engine), tuned and untuned, on a task read from a local JSONL file:
   every per-item log-likelihood against the engine's score of the same tokens, and lm-eval's acc against
   `zt-gguf eval`'s choice accuracy.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from zt_gguf import testing
from zt_gguf.engine import Context, Model
from zt_gguf.lmeval import task_yaml
from zt_gguf.tasks import Item
from zt_gguf.testing import Server, TinyModel, log_softmax, make_tiny_gemma3, make_tiny_llama, write_tiny_task

# server vs engine, no flash attention in either: float32 rounding under other batch shapes (test_tools.py)
ATOL = 2e-4
MIN_EFFECT = 0.1  # the stored biases (uniform in [-2, 2]) move log-probabilities by more than this
N_TOP = 3
PROMPTS = [
    "the cat sat on the mat. one two three",
    "hello world, the dog is",
    "a",
    "the cat sat on the mat. one two",  # a prefix of the first: the prompt cache has it
]


class Ref:
    """The engine's log-softmax of token sequences (one sequence alone, no flash attention), with a bias."""

    def __init__(self, path: Path, bias: str):
        self.model = Model(path)
        self.ctx = Context(self.model, n_threads=1, flash_attn=False)
        if bias == "none":
            self.ctx.set_bias(None)

    def rows(self, tokens: list[int]) -> np.ndarray:
        return log_softmax(self.ctx.logits(tokens))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    folder = tmp_path_factory.mktemp("lmeval-models")
    out = {}
    for arch, make in (("llama", make_tiny_llama), ("gemma3", make_tiny_gemma3)):
        plain = make(folder / f"{arch}-plain.gguf", seed=11)
        shape = (plain.hparams.n_layer, plain.hparams.n_head)
        bias = np.random.default_rng(5).uniform(-2.0, 2.0, size=shape).astype(np.float32)
        out[arch] = make(folder / f"{arch}-tuned.gguf", seed=11, biases=bias)
        out[arch + "-plain"] = plain
    return out


def _post(server: Server, path: str, body: Any) -> tuple[int, Any]:
    """POST body (JSON, or raw bytes) to the server: status and parsed JSON (the error object on 4xx/5xx)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _echo(
    server: Server, prompt: Any, n_top: int = N_TOP, max_tokens: int = 1, **extra: Any
) -> dict[str, Any]:
    body = {"prompt": prompt, "echo": True, "logprobs": n_top, "max_tokens": max_tokens, "temperature": 0}
    status, res = _post(server, "/v1/completions", {**body, **extra})
    assert status == 200, f"status {status}: {res}"
    return res["choices"][0]


def _check_echo(
    choice: dict[str, Any], tokens: list[int], rows: np.ndarray, prompt: str | None, n_gen: int
) -> None:
    """The legacy layout of one echo response against the engine's rows (log-softmax after each token)."""
    lp = choice["logprobs"]
    n = len(tokens)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert len(lp["tokens"]) == n + n_gen
    # the first token has no log-prob; each later prompt token's comes from the row before it
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    got = np.array(lp["token_logprobs"][1:n], dtype=np.float64)
    want = np.array([rows[i - 1, tokens[i]] for i in range(1, n)])
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    for i in range(1, n):
        top = lp["top_logprobs"][i]
        assert 1 <= len(top) <= N_TOP
        # the most likely tokens' log-probs (texts may repeat, so the dict can hold fewer)
        assert abs(max(top.values()) - rows[i - 1].max()) <= ATOL
        assert all(v <= rows[i - 1].max() + ATOL for v in top.values())
    # text offsets count characters of "text", which starts with the prompt
    text = choice["text"]
    for i, off in enumerate(lp["text_offset"]):
        assert off == len("".join(lp["tokens"][:i]))
    prompt_text = "".join(lp["tokens"][:n])
    assert text.startswith(prompt_text)
    if prompt is not None:
        assert prompt_text == prompt
    if n_gen:
        gen_id = choice["logprobs"]["content"][0]["id"]
        assert abs(lp["token_logprobs"][n] - rows[n - 1, gen_id]) <= ATOL


# --- 1. llama-server ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("bias", ["stored", "none", "file"])
def test_echo_prompt_logprobs_equal_the_engine(
    models: dict[str, TinyModel], start_server: Callable[..., Server], arch: str, bias: str, tmp_path: Path
) -> None:
    """The bias the server applies: the stored one, none (--no-attn-ftb), or a file's on a plain model
    (--attn-ftb FILE)."""
    tm = models[arch]
    if bias == "file":
        assert tm.biases is not None
        bias_file = tmp_path / "bias.json"
        bias_file.write_text(json.dumps([float(v) for v in tm.biases.reshape(-1)]))
        server = start_server(models[arch + "-plain"].path, "--attn-ftb", str(bias_file))
        bias = "stored"  # the plain model with the file's bias is the tuned model with its own
    else:
        server = start_server(tm.path, *(["--no-attn-ftb"] if bias == "none" else []))
    ref = Ref(tm.path, bias)
    other = Ref(tm.path, "none" if bias == "stored" else "stored")
    effect = 0.0
    for prompt in PROMPTS + PROMPTS[:2]:  # twice: the second time the slot's prompt cache holds it
        tokens = ref.model.tokenize(prompt)
        rows = ref.rows(tokens)
        choice = _echo(server, prompt)
        _check_echo(choice, tokens, rows, prompt, n_gen=1)
        got = np.array(choice["logprobs"]["token_logprobs"][1 : len(tokens)], dtype=np.float64)
        orows = other.rows(tokens)
        effect = max(
            effect, float(np.abs(got - [orows[i - 1, tokens[i]] for i in range(1, len(tokens))]).max())
        )
    # the bias (or its absence) is what the server applied: the other setting is far from it
    assert effect > MIN_EFFECT


def test_max_tokens_zero_and_token_id_prompts(
    models: dict[str, TinyModel], start_server: Callable[..., Server]
) -> None:
    tm = models["llama"]
    server = start_server(tm.path)
    ref = Ref(tm.path, "stored")
    prompt = PROMPTS[0]
    tokens = ref.model.tokenize(prompt)
    # max_tokens 0: the prompt is scored, nothing generated
    choice = _echo(server, prompt, max_tokens=0)
    _check_echo(choice, tokens, ref.rows(tokens), prompt, n_gen=0)
    assert choice["text"] == prompt
    # token ids are scored as given: without the BOS token (what lm-eval's local-completions sends)
    ids = ref.model.tokenize(prompt, add_special=False)
    assert ids != tokens
    choice = _echo(server, ids, max_tokens=0)
    _check_echo(choice, ids, ref.rows(ids), None, n_gen=0)
    # a batch of prompts: one choice each, in order
    status, res = _post(
        server,
        "/v1/completions",
        {"prompt": [PROMPTS[1], PROMPTS[2]], "echo": True, "logprobs": 1, "max_tokens": 0},
    )
    assert status == 200
    by_index = sorted(res["choices"], key=lambda c: c["index"])
    assert [c["text"] for c in by_index] == [PROMPTS[1], PROMPTS[2]]


def test_prompt_logprobs_rows_option(
    models: dict[str, TinyModel], start_server: Callable[..., Server]
) -> None:
    """--prompt-logprobs-rows 3: a prompt is scored 3 rows a batch, with the same result; 0: refused (400)."""
    tm = models["gemma3"]
    ref = Ref(tm.path, "stored")
    prompt = " ".join(["the cat sat on the mat"] * 4)
    tokens = ref.model.tokenize(prompt)
    assert len(tokens) > 10
    server = start_server(tm.path, "--prompt-logprobs-rows", "3")
    _check_echo(_echo(server, prompt), tokens, ref.rows(tokens), prompt, n_gen=1)
    server = start_server(tm.path, "--prompt-logprobs-rows", "0")
    status, res = _post(server, "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 1})
    assert status == 400 and "--prompt-logprobs-rows" in res["error"]["message"]
    # echo without logprobs, and logprobs without echo, still work there
    status, res = _post(server, "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 1})
    assert status == 200 and res["choices"][0]["text"].startswith(prompt)


def test_concurrent_echo_requests_on_four_slots(
    models: dict[str, TinyModel], start_server: Callable[..., Server]
) -> None:
    """40 requests at once on 4 slots (batched together, shared prefixes in the slots' caches): each equals
    the engine's scores of its own prompt."""
    tm = models["gemma3"]
    server = start_server(tm.path)
    ref = Ref(tm.path, "stored")
    words = "the a of and to in is it that was for on hello world cat dog sat mat one two three".split()
    rng = np.random.default_rng(3)
    prompts = [" ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for _ in range(20)]
    prompts = prompts + [p + " the cat" for p in prompts]  # each twice, the second extends the first
    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(lambda p: _echo(server, p, max_tokens=int(len(p) % 2)), prompts))
    for prompt, choice in zip(prompts, choices, strict=True):
        tokens = ref.model.tokenize(prompt)
        _check_echo(choice, tokens, ref.rows(tokens), prompt, n_gen=len(prompt) % 2)
    assert testing.http(server.url + "/health")[0] == 200


def test_last_token_in_an_incomplete_utf8_sequence_keeps_its_logprobs(
    models: dict[str, TinyModel], start_server: Callable[..., Server]
) -> None:
    tm = models["llama"]
    server = start_server(tm.path)
    ref = Ref(tm.path, "stored")
    prompt = PROMPTS[1]
    tokens = ref.model.tokenize(prompt)
    lead = tm.tokenizer.byte_token(0xE2)  # the first byte of a 3-byte UTF-8 character
    choice = _echo(server, prompt, logit_bias=[[lead, 100.0]])
    assert choice["logprobs"]["content"][0]["id"] == lead
    _check_echo(choice, tokens, ref.rows(tokens), prompt, n_gen=1)


def test_tokenizer_endpoints_for_lm_eval(
    models: dict[str, TinyModel], start_server: Callable[..., Server]
) -> None:
    tm = models["llama"]
    server = start_server(tm.path)
    model = Model(tm.path)
    status, info = testing.http(server.url + "/tokenizer_info")
    assert status == 200
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>"
    # lm-eval's remote tokenizer: {"prompt", "add_special_tokens"} -> {"tokens"}; {"tokens"} -> {"prompt"}
    text = "the cat sat on the mat"
    status, res = _post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert status == 200 and res["tokens"] == model.tokenize(text, add_special=False)
    status, res = _post(server, "/tokenize", {"prompt": text, "add_special_tokens": True})
    assert res["tokens"] == model.tokenize(text)
    status, res = _post(server, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})
    assert res["tokens"] == [model.eos]
    status, res = _post(server, "/detokenize", {"tokens": model.tokenize(text, add_special=False)})
    assert status == 200 and res["prompt"] == res["content"] == model.detokenize(model.tokenize(text, False))


def test_bad_requests_get_400_and_the_server_lives_on(
    models: dict[str, TinyModel], start_server: Callable[..., Server]
) -> None:
    tm = models["llama"]
    server = start_server(tm.path)
    n_vocab = Model(tm.path).n_vocab
    long_prompt = " ".join(["the cat"] * 400)  # > 512, the context of one of the 4 slots
    cases: list[tuple[str, Any, str]] = [
        ("/v1/completions", {"prompt": "a", "echo": True, "logprobs": n_vocab + 1}, "logprobs"),
        ("/v1/completions", {"prompt": "a", "echo": True, "logprobs": -1}, "logprobs"),
        ("/v1/completions", {"prompt": "a", "echo": True, "logprobs": 2, "stream": True}, "stream"),
        ("/v1/completions", {"prompt": long_prompt, "echo": True, "logprobs": 1, "max_tokens": 0}, "context"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "echo": True, "logprobs": True},
            "echo",
        ),
        ("/v1/completions", b'{"prompt": "a", "echo": tru', "parse"),
    ]
    for path, body, word in cases:
        status, res = _post(server, path, body)
        assert status == 400, f"{path} {body!r}: status {status} {res}"
        assert word in res["error"]["message"].lower(), res
    assert testing.http(server.url + "/health")[0] == 200
    # and a good request still works
    tokens = Model(tm.path).tokenize("a b")
    assert len(_echo(server, "a b", max_tokens=0)["logprobs"]["tokens"]) == len(tokens)


# --- 2. lm-eval ------------------------------------------------------------------------------------------


def _lm_eval_env() -> dict[str, str]:
    # no hub: the task's data is a local file; lm-eval's datasets and hub clients must not try the network
    return dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _samples(out: Path) -> dict[int, list[float]]:
    (path,) = glob.glob(str(out / "**" / "samples_*.jsonl"), recursive=True)
    return {
        int(r["doc_id"]): [float(x[0]) for x in r["filtered_resps"]]
        for r in (json.loads(line) for line in open(path))
    }


def _acc(out: Path, name: str) -> float:
    (path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    return float(json.load(open(path))["results"][name]["acc,none"])


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, env=_lm_eval_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (
        f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    )


@pytest.mark.parametrize("bias", ["stored", "none"])
def test_lm_eval_routes_equal_the_engine(
    models: dict[str, TinyModel], start_server: Callable[..., Server], tmp_path: Path, bias: str
) -> None:
    tm = models["llama"]
    data = write_tiny_task(tmp_path / "task.jsonl", 16, seed=4)
    name = "zt_tiny_" + bias
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / f"{name}.yaml").write_text(task_yaml(name, data))
    items = [json.loads(line) for line in open(data)]
    server = start_server(tm.path, *(["--no-attn-ftb"] if bias == "none" else []))
    common = ["--include_path", str(tmp_path / "tasks"), "--tasks", name, "--log_samples"]
    routes = {
        "gguf": ["lm_eval", "--model", "gguf", "--model_args", f"base_url={server.url}"],
        "local-completions": [
            "lm_eval",
            "--model",
            "local-completions",
            "--model_args",
            f"base_url={server.url}/v1/completions,tokenizer_backend=remote,model=tiny",
        ],
        "zt-gguf": [
            sys.executable,
            "-m",
            "zt_gguf",
            "lm-eval",
            str(tm.path),
            "--threads",
            "1",
            *(["--no-bias"] if bias == "none" else []),
            "--",
        ],  # fmt: skip
    }
    got = {}
    for route, cmd in routes.items():
        out = tmp_path / f"out-{route}"
        _run([*cmd, *common, "--output_path", str(out)], tmp_path)
        got[route] = (_samples(out), _acc(out, name))

    # the engine's scores of the same items: the string routes tokenize context + continuation with BOS ...
    model = Model(tm.path)
    ctx = Context(model, n_threads=1, flash_attn=False)
    if bias == "none":
        ctx.set_bias(None)
    task_items = [Item(it["prompt"], tuple(it["choices"]), it["answer"], it["id"]) for it in items]
    scores = ctx.score(task_items, n_gen=0)
    ref = Ref(tm.path, bias)
    for i, (it, sc) in enumerate(zip(items, scores, strict=True)):
        for route in ("gguf", "zt-gguf"):
            tol = (
                ATOL if route == "gguf" else 2e-2
            )  # the engine route runs flash attention where it is fastest
            np.testing.assert_allclose(got[route][0][i], sc.choice_logprob, atol=tol, rtol=0, err_msg=route)
        # ... local-completions sends the remote tokenizer's ids (no BOS), scores the tokens after the context
        ctx_ids = model.tokenize(it["prompt"], add_special=False)
        for c, choice in enumerate(it["choices"]):
            whole = model.tokenize(it["prompt"] + choice, add_special=False)
            rows = ref.rows(whole)
            want = sum(rows[t - 1, whole[t]] for t in range(len(ctx_ids), len(whole)))
            assert abs(got["local-completions"][0][i][c] - want) <= ATOL
    # lm-eval's acc is zt-gguf eval's choice accuracy on the same items
    cmd = [
        sys.executable,
        "-m",
        "zt_gguf",
        "eval",
        str(tm.path),
        "--task",
        str(data),
        "--json",
        "--threads",
        "1",
    ]
    r = subprocess.run(
        cmd + (["--no-bias"] if bias == "none" else []), capture_output=True, text=True, check=True
    )
    acc = json.loads(r.stdout)["accuracy_choice"]
    for route in ("gguf", "zt-gguf"):
        assert got[route][1] == pytest.approx(acc, abs=1e-9), route


def test_zt_gguf_lm_eval_errors_are_one_line(tmp_path: Path) -> None:
    for args, word in (
        ([str(tmp_path / "missing.gguf"), "--", "--tasks", "x"], "no such model file"),
        ([str(tmp_path / "missing.gguf"), "--", "--model", "hf"], "sets --model itself"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "zt_gguf", "lm-eval", *args], capture_output=True, text=True
        )
        assert r.returncode != 0
        assert word in r.stderr and "Traceback" not in r.stderr, r.stderr


class _Request:
    """What lm-eval hands a model: an object with .args."""

    def __init__(self, *args: Any):
        self.args = args


def test_zt_gguf_model_generate_until_and_rolling_equal_the_engine(models: dict[str, TinyModel]) -> None:
    from zt_gguf.lmeval import make_lm_class

    tm = models["llama"]
    lm = make_lm_class()(model=str(tm.path), threads="1")
    ref = Ref(tm.path, "stored")
    # loglikelihood_rolling: the whole string after BOS
    texts = ["the cat sat on the mat", "hello world one two three four"]
    got = lm.loglikelihood_rolling([_Request(t) for t in texts], disable_tqdm=True)
    for t, g in zip(texts, got, strict=True):
        tokens = ref.model.tokenize(t)
        rows = ref.rows(tokens)
        want = sum(rows[i - 1, tokens[i]] for i in range(1, len(tokens)))
        assert abs(g - want) <= 2e-2  # the engine's flash attention (F16 K/V) against none
    # generate_until: the greedy continuation (the engine's logits, token by token), cut at a stop string
    prompt = "the cat sat on"
    tokens = ref.model.tokenize(prompt)
    greedy = []
    for _ in range(6):
        nxt = int(np.argmax(ref.rows(tokens + greedy)[-1]))
        greedy.append(nxt)
    full = ref.model.detokenize(greedy)
    (text,) = lm.generate_until([_Request(prompt, {"until": [], "max_gen_toks": 6})], disable_tqdm=True)
    assert text == full
    stop = full[len(full) // 2 :][:2]
    if stop.strip():
        (cut,) = lm.generate_until(
            [_Request(prompt, {"until": [stop], "max_gen_toks": 6})], disable_tqdm=True
        )
        assert cut == full[: full.find(stop)]
    # loglikelihood with is_greedy: a continuation that is the greedy token (one whose text tokenizes back to
    # it after the prompt) is greedy, another is not
    for p in ("a cat", "on to sat a", "that sat is in sat one"):
        t = ref.model.tokenize(p)
        best = int(np.argmax(ref.rows(t)[-1]))
        first = ref.model.detokenize([best])
        if ref.model.tokenize(p + first) == t + [best]:
            break
    else:
        pytest.fail("no prompt whose greedy token tokenizes back to itself")
    other = " mat" if first != " mat" else " dog"
    (ll_g, g1), (ll_o, g2) = lm.loglikelihood([_Request(p, first), _Request(p, other)], disable_tqdm=True)
    assert g1 and not g2 and ll_g > ll_o
