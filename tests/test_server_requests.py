"""llama-server with our patches: no request ends in an assertion, an abort, a 5xx or a dropped connection
(issue 25, item 2).

A corpus of bad requests (bodies, headers, and the fields our patches read: "echo", "logprobs",
"top_logprobs", "max_tokens", "attn_ftb", the tokenizer endpoints' fields and token ids) goes to a server with
two --attn-ftb-profile profiles: each must get a 4xx whose message names the field, and afterwards the server
answers the same well-formed requests exactly as it did before the corpus (and as the engine computes them).
GET /attn-ftb-profiles lists what was loaded at start-up: changing or deleting the files afterwards, even
across the server's sleep and wake-up (which reloads the model), changes neither the listing nor the biases
served.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from gguf import GGUFValueType

from zt_gguf import gguf_meta, profiles, testing
from zt_gguf.engine import Context, Model
from zt_gguf.testing import Server, log_softmax, make_tiny_llama

ATOL = 2e-4  # server vs engine, no flash attention in either (tests/test_tools.py)
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
PROMPT = "the cat sat on the mat. one two three"
MESSAGES = [{"role": "user", "content": "hello world"}]
HUGE = 2**40  # wraps to 0 as a 32-bit integer
UNKNOWN_P9 = """unknown "attn_ftb" profile 'p9'; known: none, p1, p2"""
PROVENANCE = {"p1": {"task": "p1.jsonl", "heldout_accuracy": 0.5}, "p2": {"task": "p2.jsonl"}}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny llama with a chat template and a stored bias; profiles p1 (GGUF sidecar) and p2 (JSON)."""
    d = tmp_path_factory.mktemp("requests")
    rng = np.random.default_rng(25)
    shape = (2, 4)
    stored = rng.uniform(-2, 2, size=shape).astype(np.float32)
    extra = {"tokenizer.chat_template": (TEMPLATE, GGUFValueType.STRING, None)}
    tm = make_tiny_llama(
        d / "model.gguf", n_layer=shape[0], n_head=shape[1], seed=25, biases=stored, extra_kv=extra
    )
    biases = {n: rng.uniform(-2, 2, size=shape).astype(np.float32) for n in ("p1", "p2")}
    paths = {
        "p1": profiles.write_profile(d / "p1.gguf", biases["p1"], "llama", PROVENANCE["p1"]),
        "p2": profiles.write_profile(d / "p2.json", biases["p2"], "llama", PROVENANCE["p2"]),
    }
    return {"dir": d, "model": tm.path, "n_vocab": tm.tokenizer.n_vocab, "stored": stored, "biases": biases,
            "paths": paths}  # fmt: skip


def _profile_args(paths: dict[str, Path]) -> list[str]:
    return [a for name, path in paths.items() for a in ("--attn-ftb-profile", f"{name}={path}")]


class Reply(NamedTuple):
    status: int  # 0: no HTTP answer (the connection was dropped)
    body: Any  # the decoded JSON, or the raw bytes (or why there was no answer)


def _port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _request(server: Server, path: str, body: Any = None, method: str = "POST") -> Reply:
    """One request on its own connection; a body is JSON unless it is bytes already."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", _port(server), timeout=120)
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
    except (OSError, http.client.HTTPException) as e:
        return Reply(0, f"{type(e).__name__}: {e}")
    finally:
        conn.close()
    try:
        return Reply(r.status, json.loads(raw))
    except ValueError:
        return Reply(r.status, raw)


def _raw(server: Server, data: bytes) -> Reply:
    """Bytes straight onto a socket (malformed HTTP): the status of the answer, 0 if there is none."""
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=60) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        except OSError as e:
            return Reply(0, f"{type(e).__name__}: {e}")
    head = out.split(b"\r\n", 1)[0].split()
    return Reply(int(head[1]) if len(head) >= 2 and head[1].isdigit() else 0, out[:300])


class Case(NamedTuple):
    path: str
    body: Any  # JSON, bytes (a body that is not JSON), or ("raw", bytes) for a malformed HTTP request
    word: str  # what the error message must contain (the field it names); "" for a transport-level error


def corpus(n_vocab: int) -> list[Case]:
    """Bad requests: each must be answered with a 4xx."""
    ok = {"prompt": "the cat", "max_tokens": 2}
    echo = {"prompt": "the cat", "echo": True, "logprobs": 1, "max_tokens": 0}
    chat = {"messages": MESSAGES, "max_tokens": 2}
    body = json.dumps({"prompt": "a", "n_predict": 1}).encode()
    post = b"POST /completion HTTP/1.1\r\nHost: x\r\n"
    length = b"Content-Length: %d\r\n\r\n" % len(body)
    cases = [
        # bodies that are not a JSON object
        Case("/completion", b"{not json", "parse error"),
        Case("/completion", b"", "parse error"),
        Case("/completion", b'{"prompt": "\xff\xfe"}', "parse error"),  # invalid UTF-8
        Case("/completion", b'{"prompt": "\\ud800"}', "parse error"),  # a lone surrogate
        Case("/completion", b"[1, 2]", "array"),
        Case("/v1/completions", b"null", "null"),
        Case("/v1/chat/completions", b"{", "parse error"),
        # prompts
        Case("/completion", {}, "prompt"),
        Case("/completion", {"prompt": 5}, "prompt"),
        Case("/completion", {"prompt": []}, "prompt"),
        Case("/completion", {"prompt": [n_vocab]}, "prompt"),
        Case("/completion", {"prompt": [-1]}, "prompt"),
        Case("/completion", {"prompt": [HUGE]}, "prompt"),
        Case("/completion", {"prompt": ["the", HUGE]}, "prompt"),
        Case("/v1/completions", {**echo, "prompt": [1, n_vocab + 7]}, "prompt"),
        # numbers
        Case("/completion", {**ok, "n_predict": -5}, "n_predict"),
        Case("/completion", {**ok, "n_predict": HUGE}, "n_predict"),
        Case("/completion", {**ok, "n_predict": 1e30}, "n_predict"),
        Case("/completion", {**ok, "n_predict": "ten"}, "n_predict"),
        Case("/completion", {**ok, "n_probs": -1}, "n_probs"),
        Case("/completion", {**ok, "n_probs": n_vocab + 1}, "n_probs"),
        Case("/completion", {**ok, "n_probs": HUGE}, "n_probs"),
        Case("/completion", {**ok, "n_cmpl": 1000}, "n_cmpl"),
        Case("/completion", {**ok, "grammar_triggers": [{"type": 99, "value": "x"}]}, "grammar_triggers"),
        Case("/completion", {**ok, "grammar_triggers": [{"type": -1, "value": "x"}]}, "grammar_triggers"),
        # /v1/completions: echo and logprobs (patch 0009)
        Case("/v1/completions", {**echo, "echo": "yes"}, "echo"),
        Case("/v1/completions", {**echo, "logprobs": -1}, "logprobs"),
        Case("/v1/completions", {**echo, "logprobs": n_vocab + 1}, "logprobs"),
        Case("/v1/completions", {**echo, "logprobs": HUGE}, "logprobs"),
        Case("/v1/completions", {**echo, "logprobs": 1e300}, "logprobs"),
        Case("/v1/completions", {**echo, "logprobs": "5"}, "logprobs"),
        Case("/v1/completions", {**echo, "stream": True}, "stream"),
        Case("/v1/completions", {**echo, "max_tokens": -2}, "max_tokens"),
        Case("/v1/completions", {**echo, "max_tokens": HUGE}, "max_tokens"),
        Case("/v1/completions", {**echo, "max_tokens": "5"}, "max_tokens"),
        # /v1/chat/completions
        Case("/v1/chat/completions", {"messages": "hi"}, "messages"),
        Case("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "content"),
        Case("/v1/chat/completions", {**chat, "echo": True, "logprobs": True}, "echo"),
        Case("/v1/chat/completions", {**chat, "logprobs": "yes"}, "logprobs"),
        Case("/v1/chat/completions", {**chat, "top_logprobs": 3}, "top_logprobs"),
        Case("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        Case("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": "3"}, "top_logprobs"),
        Case("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": HUGE}, "top_logprobs"),
        Case("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": n_vocab + 1}, "top_logprobs"),
        Case("/v1/chat/completions", {**chat, "reasoning_format": "nonsense"}, "reasoning_format"),
        # the profile field (patch 0010)
        Case("/completion", {**ok, "attn_ftb": "p9"}, UNKNOWN_P9),
        Case("/completion", {**ok, "attn_ftb": ""}, "attn_ftb"),
        Case("/completion", {**ok, "attn_ftb": "P1"}, "attn_ftb"),
        Case("/completion", {**ok, "attn_ftb": 3}, "attn_ftb"),
        Case("/v1/completions", {**echo, "attn_ftb": ["p1"]}, "attn_ftb"),
        Case("/v1/completions", {**echo, "attn_ftb": "stored"}, "attn_ftb"),
        Case("/v1/chat/completions", {**chat, "attn_ftb": {"name": "p1"}}, "attn_ftb"),
        Case("/v1/chat/completions", {**chat, "attn_ftb": "p1 "}, "attn_ftb"),
        # /tokenize and /detokenize
        Case("/tokenize", b"{bad", "parse error"),
        Case("/tokenize", b"[1, 2]", "object"),
        Case("/tokenize", {}, "content"),
        Case("/tokenize", {"content": 5}, "content"),
        Case("/tokenize", {"prompt": {"a": 1}}, "prompt"),
        Case("/tokenize", {"content": ["the", n_vocab], "with_pieces": True}, "content"),
        Case("/tokenize", {"content": [-1], "with_pieces": True}, "content"),
        Case("/tokenize", {"prompt": [HUGE]}, "prompt"),
        Case("/tokenize", {"content": ["a", True]}, "content"),
        Case("/tokenize", {"content": "a", "add_special": "yes"}, "add_special"),
        Case("/tokenize", {"prompt": "a", "add_special_tokens": 1}, "add_special_tokens"),
        Case("/tokenize", {"content": "a", "with_pieces": "true"}, "with_pieces"),
        Case("/tokenize", {"content": "a", "parse_special": []}, "parse_special"),
        Case("/detokenize", b"nope", "parse error"),
        Case("/detokenize", b"[1]", "object"),
        Case("/detokenize", {}, "tokens"),
        Case("/detokenize", {"tokens": "abc"}, "tokens"),
        Case("/detokenize", {"tokens": [n_vocab]}, "tokens"),
        Case("/detokenize", {"tokens": [-1]}, "tokens"),
        Case("/detokenize", {"tokens": [HUGE]}, "tokens"),
        Case("/detokenize", {"tokens": [[1]]}, "tokens"),
        Case("/detokenize", {"tokens": ["a"]}, "tokens"),
        # malformed HTTP
        Case("/", ("raw", b"GARBAGE\r\n\r\n"), ""),
        Case("/completion", ("raw", post + b"Content-Length: abc\r\n\r\n" + body), ""),
        Case("/completion", ("raw", post + b"Content-Length: 99999999999999999999\r\n\r\n" + body), ""),
        Case("/completion", ("raw", post + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"), ""),
        Case("/completion", ("raw", post + b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n"), ""),
        Case("/completion", ("raw", post + b"Content-Length: 3\r\nContent-Length: 5\r\n\r\n{\"pro"), ""),
        Case("/completion", ("raw", post + b"Content-Length: %d\r\n\r\n" % (len(body) + 10) + body), ""),
        Case("/completion", ("raw", post + b"Content-Encoding: gzip\r\n" + length + body), ""),
    ]  # fmt: skip
    return cases


def _send_case(server: Server, case: Case) -> Reply:
    if isinstance(case.body, tuple):
        return _raw(server, case.body[1])
    return _request(server, case.path, case.body)


def _message(reply: Reply) -> str:
    if isinstance(reply.body, dict) and isinstance(reply.body.get("error"), dict):
        return str(reply.body["error"].get("message", ""))
    return str(reply.body)


# well-formed requests, each evaluated from an empty cache (a cached prefix would change the batch shapes, and
# with them the float rounding)
GOOD = [
    ("/completion", {"prompt": PROMPT, "n_predict": 6, "temperature": 0, "n_probs": 2, "attn_ftb": "p1"}),
    ("/completion", {"prompt": [1, 300, 301, 302], "n_predict": 4, "temperature": 0, "return_tokens": True}),
    ("/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 0, "attn_ftb": "p2"}),
    ("/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0}),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5, "temperature": 0, "attn_ftb": "none"}),
    ("/tokenize", {"content": PROMPT, "add_special": True, "with_pieces": True}),
    ("/detokenize", {"tokens": [1, 300, 301, 302]}),
]
VOLATILE = ("created", "id", "timings", "id_slot", "system_fingerprint", "usage", "tokens_cached")


def _stable(reply: Reply) -> Any:
    """A reply without the fields that differ from one identical request to the next (ids, clocks)."""
    if isinstance(reply.body, dict):
        return {k: v for k, v in reply.body.items() if k not in VOLATILE}
    return reply.body


def _good(server: Server) -> list[Any]:
    out = []
    for path, body in GOOD:
        if not path.endswith("tokenize"):
            body = {**body, "cache_prompt": False}
        reply = _request(server, path, body)
        assert reply.status == 200, (path, body, reply)
        out.append(_stable(reply))
    return out


def _echo_logprobs(server: Server, profile: str | None) -> list[float]:
    body: dict[str, Any] = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0}
    if profile is not None:
        body["attn_ftb"] = profile
    reply = _request(server, "/v1/completions", body)
    assert reply.status == 200, reply
    return [float(x) for x in reply.body["choices"][0]["logprobs"]["token_logprobs"][1:]]


def _engine_logprobs(path: Path, bias: np.ndarray | None) -> list[float]:
    model = Model(path)
    ctx = Context(model, n_threads=1, flash_attn=False)
    ctx.set_bias(bias)
    tokens = model.tokenize(PROMPT)
    rows = log_softmax(ctx.logits(tokens))
    return [float(rows[i - 1, tokens[i]]) for i in range(1, len(tokens))]


def _disconnect_mid_stream(server: Server) -> None:
    """A streaming completion whose client goes away after the first event."""
    body = json.dumps({"prompt": PROMPT, "n_predict": 200, "stream": True, "attn_ftb": "p2"}).encode()
    head = b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=60) as s:
        s.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        got = b""
        while b"data:" not in got:
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk


def test_bad_requests_get_4xx_and_the_server_answers_as_before(
    files: dict[str, Any], start_server: Callable[..., Server]
) -> None:
    server = start_server(files["model"], *_profile_args(files["paths"]))
    before = _good(server)
    # the served log-probs are the engine's under the same biases (the model's stored ones for no "attn_ftb")
    for profile, bias in (("p2", files["biases"]["p2"]), (None, files["stored"]), ("none", None)):
        got = _echo_logprobs(server, profile)
        np.testing.assert_allclose(
            got, _engine_logprobs(files["model"], bias), atol=ATOL, err_msg=str(profile)
        )

    cases = corpus(files["n_vocab"])
    assert len(cases) >= 40
    failures = []
    for case in cases:
        reply = _send_case(server, case)
        message = _message(reply)
        if not 400 <= reply.status < 500 or case.word.lower() not in message.lower():
            failures.append(f"{case.path} {str(case.body)[:100]}: {reply.status} {message[:200]}")
        if server.proc.poll() is not None:
            failures.append(f"the server died on {case.path} {str(case.body)[:100]}")
            break
    _disconnect_mid_stream(server)
    assert not failures, "\n".join(failures)

    assert testing.http(server.url + "/health")[0] == 200
    assert _good(server) == before
    assert testing.stop_server(server) == 0


def _wait_asleep(server: Server) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        reply = _request(server, "/props", method="GET")
        if reply.status == 200 and reply.body.get("is_sleeping"):
            return
        time.sleep(0.1)
    raise AssertionError("the server did not go to sleep")


@pytest.mark.parametrize("per_seq", ["1", "0"])
def test_profiles_and_their_listing_are_what_was_loaded_at_start_up(
    files: dict[str, Any],
    start_server: Callable[..., Server],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    per_seq: str,
) -> None:
    """The listing against zt_gguf.profiles' reading of the files; then the files change on disk (p1 other
    biases and provenance, p2 gone) and the server sleeps and wakes (the model and context are made again):
    the listing and the served log-probs stay those of the files as they were at start-up. With
    LLAMA_ATTN_FTB_PER_SEQ=0 the context's bias is set per batch, and the first request after waking asks for
    the profile the context had before sleeping."""
    monkeypatch.setenv("LLAMA_ATTN_FTB_PER_SEQ", per_seq)
    paths = {name: tmp_path / path.name for name, path in files["paths"].items()}
    for name, path in paths.items():
        path.write_bytes(files["paths"][name].read_bytes())
    server = start_server(files["model"], *_profile_args(paths), "--sleep-idle-seconds", "1")

    info = gguf_meta.read_model_info(files["model"])
    expected = [
        {**profiles.describe(profiles.load_profile(name, path, info)), "file": str(path)}
        for name, path in paths.items()
    ]
    reply = _request(server, "/attn-ftb-profiles", method="GET")
    assert reply.status == 200
    assert reply.body == {"profiles": expected, "reserved": ["none"]}
    assert [p["provenance"] for p in reply.body["profiles"]] == [PROVENANCE["p1"], PROVENANCE["p2"]]
    served = _echo_logprobs(server, "p1")
    np.testing.assert_allclose(served, _engine_logprobs(files["model"], files["biases"]["p1"]), atol=ATOL)

    other = np.full_like(files["biases"]["p1"], 1.5)
    profiles.write_profile(paths["p1"], other, "llama", {"task": "changed.jsonl"})
    paths["p2"].unlink()
    assert _request(server, "/attn-ftb-profiles", method="GET").body == reply.body

    _wait_asleep(server)
    assert _echo_logprobs(server, "p1") == served
    assert _request(server, "/attn-ftb-profiles", method="GET").body == reply.body
    np.testing.assert_allclose(
        _echo_logprobs(server, "p2"), _engine_logprobs(files["model"], files["biases"]["p2"]), atol=ATOL
    )
    assert testing.stop_server(server) == 0
