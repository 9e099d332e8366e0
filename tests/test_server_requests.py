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

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFValueType

from zt_gguf import gguf_meta, profiles, testing
from zt_gguf.engine import Context, Model
from zt_gguf.soak import (
    KINDS,
    MESSAGES,
    Reply,
    bad_requests,
    case_answered,
    drop_mid_stream,
    error_message,
    request,
    run_soak,
    send_case,
    soak_plan,
)
from zt_gguf.testing import Server, log_softmax, make_tiny_llama

ATOL = 2e-4  # server vs engine, no flash attention in either (tests/test_tools.py)
# concurrent vs alone: other batch shapes round K/V to F16 differently; measured up to 2.0e-4 on chat prompts
SOAK_ATOL = 1e-3
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
PROMPT = "the cat sat on the mat. one two three"
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
        reply = request(server, path, body)
        assert reply.status == 200, (path, body, reply)
        out.append(_stable(reply))
    return out


def _echo_logprobs(server: Server, profile: str | None) -> list[float]:
    body: dict[str, Any] = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0}
    if profile is not None:
        body["attn_ftb"] = profile
    reply = request(server, "/v1/completions", body)
    assert reply.status == 200, reply
    return [float(x) for x in reply.body["choices"][0]["logprobs"]["token_logprobs"][1:]]


def _engine_logprobs(path: Path, bias: np.ndarray | None) -> list[float]:
    model = Model(path)
    ctx = Context(model, n_threads=1, flash_attn=False)
    ctx.set_bias(bias)
    tokens = model.tokenize(PROMPT)
    rows = log_softmax(ctx.logits(tokens))
    return [float(rows[i - 1, tokens[i]]) for i in range(1, len(tokens))]


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

    cases = bad_requests(files["n_vocab"], ["p1", "p2"])
    assert len(cases) >= 40
    failures = []
    for case in cases:
        reply = send_case(server, case)
        if not case_answered(case, reply):
            failures.append(
                f"{case.path} {str(case.body)[:100]}: {reply.status} {error_message(reply)[:200]}"
            )
        if server.proc.poll() is not None:
            failures.append(f"the server died on {case.path} {str(case.body)[:100]}")
            break
    dropped = drop_mid_stream(server, "/completion", {"prompt": PROMPT, "n_predict": 200, "attn_ftb": "p2"})
    assert dropped.status == 200, dropped
    assert not failures, "\n".join(failures)

    assert testing.http(server.url + "/health")[0] == 200
    assert _good(server) == before
    assert testing.stop_server(server) == 0


def _wait_asleep(server: Server) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        reply = request(server, "/props", method="GET")
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
    reply = request(server, "/attn-ftb-profiles", method="GET")
    assert reply.status == 200
    assert reply.body == {"profiles": expected, "reserved": ["none"]}
    assert [p["provenance"] for p in reply.body["profiles"]] == [PROVENANCE["p1"], PROVENANCE["p2"]]
    served = _echo_logprobs(server, "p1")
    np.testing.assert_allclose(served, _engine_logprobs(files["model"], files["biases"]["p1"]), atol=ATOL)

    other = np.full_like(files["biases"]["p1"], 1.5)
    profiles.write_profile(paths["p1"], other, "llama", {"task": "changed.jsonl"})
    paths["p2"].unlink()
    assert request(server, "/attn-ftb-profiles", method="GET").body == reply.body

    _wait_asleep(server)
    assert _echo_logprobs(server, "p1") == served
    assert request(server, "/attn-ftb-profiles", method="GET").body == reply.body
    np.testing.assert_allclose(
        _echo_logprobs(server, "p2"), _engine_logprobs(files["model"], files["biases"]["p2"]), atol=ATOL
    )
    assert testing.stop_server(server) == 0


def test_mixed_soak_answers_as_served_alone(
    files: dict[str, Any], start_server: Callable[..., Server]
) -> None:
    """benchmarks/bench_soak.py's soak, small: completions, echoed prompts, chat, streams left after the first
    event and malformed requests, under the model's own biases, "none", p1 and p2, at once from 8 connections
    to 4 slots. Every well-formed answer equals the same request served alone, every malformed one gets a
    4xx naming the field, the server stays up; the echoed log-probabilities served alone are the engine's
    under the profile's biases (the independent reference)."""
    server = start_server(files["model"], *_profile_args(files["paths"]))
    cases = bad_requests(files["n_vocab"], ["p1", "p2"])
    plan = soak_plan(150, testing.make_prompts(5, seed=7), ["p1", "p2"], len(cases), seed=3)
    res = run_soak(server, plan, cases, concurrency=8, n_predict=4, atol=SOAK_ATOL)
    assert res.passed, res.problems[:5]
    assert set(res.by_kind) == set(KINDS) and res.requests == 150
    assert res.verdicts["4xx"] == res.by_kind["malformed"] == 15
    assert res.verdicts["dropped"] == res.by_kind["stream_drop"]
    assert res.verdicts.get("equal", 0) + res.verdicts.get("tie", 0) == 150 - 15 - res.by_kind["stream_drop"]
    assert res.verdicts.get("tie", 0) <= 2
    assert res.answers_the_profile_changes >= 1
    assert res.rss_growth_kib < 32 * 1024

    bias_of = {"": files["stored"], "none": None, **files["biases"]}
    checked = set()
    for (kind, prompt, profile), got in res.alone.items():
        if kind != "echo":
            continue
        model = Model(files["model"])
        ctx = Context(model, n_threads=1, flash_attn=False)
        ctx.set_bias(bias_of[profile])
        tokens = model.tokenize(prompt)
        rows = log_softmax(ctx.logits(tokens))
        want = [float(rows[i - 1, tokens[i]]) for i in range(1, len(tokens))]
        np.testing.assert_allclose(
            got.logprobs[1 : len(tokens)], want, atol=ATOL, err_msg=f"{prompt} {profile}"
        )
        checked.add(profile)
    assert len(checked) >= 3
    assert testing.stop_server(server) == 0
