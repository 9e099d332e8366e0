"""A mixed soak of llama-server (issue 25, item 4), and the bad-request corpus it shares with the tests.

The soak sends what users send, at once from a bounded pool of loopback connections: greedy completions
(/completion with top-2 log-probabilities), echoed prompts with their log-probabilities (/v1/completions,
patch 0009), chat (/v1/chat/completions with log-probabilities), each under a profile drawn from the
server's (absent: the model's own biases, "none", or a named one), streaming completions whose client leaves
after the first event, and malformed requests drawn from `bad_requests`. Every well-formed answer is compared
with the same request served alone (the same tokens, log-probabilities within a tolerance atol; a divergence
where the alone answer's top-2 gap is below atol is a tie: rounding that moves log-probabilities by up to
atol can swap two tokens that close), every malformed one must be a 4xx, and the server must stay up with
its resident memory growing by less than a bound. tests/test_reliability.py runs it on a tiny model and
benchmarks/bench_soak.py with at least 2,000 requests on a real one.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .testing import (
    Response,
    RssPeak,
    Server,
    compare_responses,
    completion_response,
    rss_kib,
    top2_gap,
)

PROFILE_OWN = ""  # no "attn_ftb" field: the model's own biases
KINDS = ("completion", "echo", "chat", "stream_drop", "malformed")
MESSAGES = [{"role": "user", "content": "hello world"}]
HUGE = 2**40  # wraps to 0 as a 32-bit integer


# --- one request ----------------------------------------------------------------------------------------


class Reply(NamedTuple):
    status: int  # 0: no HTTP answer (the connection was dropped)
    body: Any  # the decoded JSON, or the raw bytes (or why there was no answer)


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def request(server: Server, path: str, body: Any = None, method: str = "POST", timeout: float = 300) -> Reply:
    """One request on its own connection; a body is JSON unless it is bytes already."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=timeout)
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


def send_raw(server: Server, data: bytes, timeout: float = 120) -> Reply:
    """Bytes straight onto a socket (malformed HTTP): the status of the answer, 0 if there is none."""
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=timeout) as s:
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


def drop_mid_stream(server: Server, path: str, body: dict[str, Any], timeout: float = 120) -> Reply:
    """A streaming request whose client goes away after the first event: the status line's code, 0 when no
    event arrived before the server closed the connection."""
    data = json.dumps({**body, "stream": True}).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=timeout) as s:
        s.sendall(head + b"Content-Length: %d\r\n\r\n" % len(data) + data)
        got = b""
        while b"data:" not in got:
            chunk = s.recv(65536)
            if not chunk:
                return Reply(0, got[:300])
            got += chunk
    status = got.split(b"\r\n", 1)[0].split()
    return Reply(int(status[1]) if len(status) >= 2 and status[1].isdigit() else 0, got[:300])


def error_message(reply: Reply) -> str:
    if isinstance(reply.body, dict) and isinstance(reply.body.get("error"), dict):
        return str(reply.body["error"].get("message", ""))
    return str(reply.body)


# --- the bad requests -----------------------------------------------------------------------------------


class Case(NamedTuple):
    path: str
    body: Any  # JSON, bytes (a body that is not JSON), or ("raw", bytes) for a malformed HTTP request
    word: str  # what the error message must contain (the field it names); "" for a transport-level error


def unknown_profile_message(name: str, profiles: Sequence[str]) -> str:
    return f"""unknown "attn_ftb" profile '{name}'; known: {", ".join(["none", *profiles])}"""


def bad_requests(n_vocab: int, profiles: Sequence[str]) -> list[Case]:
    """Bad requests for a server whose vocabulary has n_vocab tokens and whose --attn-ftb-profile names are
    profiles (at least one): each must be answered with a 4xx."""
    # long because: the corpus is one literal list, a case a line
    p1 = profiles[0]
    ok = {"prompt": "the cat", "max_tokens": 2}
    echo = {"prompt": "the cat", "echo": True, "logprobs": 1, "max_tokens": 0}
    chat = {"messages": MESSAGES, "max_tokens": 2}
    body = json.dumps({"prompt": "a", "n_predict": 1}).encode()
    post = b"POST /completion HTTP/1.1\r\nHost: x\r\n"
    length = b"Content-Length: %d\r\n\r\n" % len(body)
    return [
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
        Case("/completion", {**ok, "attn_ftb": "p9"}, unknown_profile_message("p9", profiles)),
        Case("/completion", {**ok, "attn_ftb": ""}, "attn_ftb"),
        Case("/completion", {**ok, "attn_ftb": p1.upper() if p1.upper() != p1 else p1 + "x"}, "attn_ftb"),
        Case("/completion", {**ok, "attn_ftb": 3}, "attn_ftb"),
        Case("/v1/completions", {**echo, "attn_ftb": [p1]}, "attn_ftb"),
        Case("/v1/completions", {**echo, "attn_ftb": "stored"}, "attn_ftb"),
        Case("/v1/chat/completions", {**chat, "attn_ftb": {"name": p1}}, "attn_ftb"),
        Case("/v1/chat/completions", {**chat, "attn_ftb": p1 + " "}, "attn_ftb"),
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


def send_case(server: Server, case: Case) -> Reply:
    if isinstance(case.body, tuple):
        return send_raw(server, case.body[1])
    return request(server, case.path, case.body)


def case_answered(case: Case, reply: Reply) -> bool:
    """A 4xx whose message names what was wrong."""
    return 400 <= reply.status < 500 and case.word.lower() in error_message(reply).lower()


# --- the well-formed kinds: their bodies and their answers as Responses --------------------------------


def well_formed_body(kind: str, prompt: str, profile: str, n_predict: int) -> tuple[str, dict[str, Any]]:
    """The path and body of a well-formed request of a kind (greedy, so that an answer is reproducible)."""
    if kind in ("completion", "stream_drop"):
        path = "/completion"
        body: dict[str, Any] = {"prompt": prompt, "n_predict": n_predict, "n_probs": 2, "return_tokens": True,
                                "ignore_eos": True}  # fmt: skip
    elif kind == "echo":
        path = "/v1/completions"
        body = {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": min(n_predict, 2)}
    elif kind == "chat":
        path = "/v1/chat/completions"
        messages = [{"role": "user", "content": prompt}]
        body = {"messages": messages, "max_tokens": n_predict, "logprobs": True, "top_logprobs": 2}
    else:
        raise ValueError(f"not a well-formed kind: {kind}")
    body.update(temperature=0, seed=1)
    if profile != PROFILE_OWN:
        body["attn_ftb"] = profile
    return path, body


def _echo_response(res: dict[str, Any]) -> Response:
    lp = res["choices"][0]["logprobs"]
    pieces = [str(t) for t in lp["tokens"]]
    logprobs = [0.0 if x is None else float(x) for x in lp["token_logprobs"]]
    gaps = [top2_gap(float(v) for v in (top or {}).values()) for top in lp["top_logprobs"]]
    if not len(pieces) == len(logprobs) == len(gaps):
        raise ValueError("tokens, token_logprobs and top_logprobs differ in length")
    return Response(True, 200, pieces, logprobs, gaps, str(res["choices"][0]["text"]))


def _chat_response(res: dict[str, Any]) -> Response:
    choice = res["choices"][0]
    steps = (choice.get("logprobs") or {}).get("content") or []
    pieces = [str(s["token"]) for s in steps]
    logprobs = [float(s["logprob"]) for s in steps]
    gaps = [top2_gap(float(t["logprob"]) for t in s["top_logprobs"]) for s in steps]
    return Response(True, 200, pieces, logprobs, gaps, str(choice["message"].get("content") or ""))


def response_of(kind: str, reply: Reply) -> Response:
    """A well-formed request's answer as a Response (ok False, with why, when it is not a usable answer)."""
    if kind == "completion":
        return completion_response(reply.status, reply.body)
    if reply.status != 200 or not isinstance(reply.body, dict):
        return Response(False, reply.status, error=f"HTTP {reply.status}: {str(reply.body)[:200]}")
    try:
        return _echo_response(reply.body) if kind == "echo" else _chat_response(reply.body)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        return Response(False, reply.status, error=f"unexpected response ({type(e).__name__}: {e})")


# --- the plan ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakRequest:
    kind: str  # one of KINDS
    prompt: str = ""
    profile: str = PROFILE_OWN
    case: int = -1  # the bad_requests index of a malformed request

    @property
    def key(self) -> tuple[str, str, str]:
        """Requests with one key get one answer: what the request served alone is compared with."""
        return (self.kind, self.prompt, self.profile)


@dataclass(frozen=True)
class Mix:
    """Shares of the request kinds (the rest are completions)."""

    echo: float = 0.25
    chat: float = 0.25
    stream_drop: float = 0.05
    malformed: float = 0.10


def soak_plan(
    n: int, prompts: Sequence[str], profiles: Sequence[str], n_cases: int, *, seed: int, mix: Mix = Mix()
) -> list[SoakRequest]:
    """n requests in a shuffled order: each kind its share of n (rounded), prompts and profiles (the
    server's names, plus the model's own and "none") drawn at random, malformed ones cycling through the
    n_cases bad requests."""
    rng = random.Random(seed)
    counts = {k: round(n * getattr(mix, k)) for k in ("echo", "chat", "stream_drop", "malformed")}
    counts["completion"] = n - sum(counts.values())
    if counts["completion"] < 0:
        raise ValueError(f"the shares of {mix} add up to more than 1")
    choices = [PROFILE_OWN, "none", *profiles]
    plan: list[SoakRequest] = []
    for kind, count in counts.items():
        for i in range(count):
            if kind == "malformed":
                plan.append(SoakRequest(kind, case=i % n_cases))
            else:
                plan.append(SoakRequest(kind, rng.choice(list(prompts)), rng.choice(choices)))
    rng.shuffle(plan)
    return plan


# --- the run ----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    request: SoakRequest
    verdict: str  # "equal", "tie", "4xx", "dropped", or what went wrong
    logprob_diff: float = 0.0


@dataclass
class SoakResult:
    requests: int
    concurrency: int
    seconds: float
    by_kind: dict[str, int]
    verdicts: dict[str, int]
    problems: list[str]  # every outcome that is not a pass, described
    max_logprob_diff: float
    atol: float
    rss_kib_before: int
    rss_kib_after: int
    rss_kib_peak: int
    server_alive: bool
    alone_requests: int
    answers_the_profile_changes: int  # of the prompts sent as completions: answers that differ by profile
    alone: dict[tuple[str, str, str], Response]  # the answers served alone, by SoakRequest.key

    @property
    def rss_growth_kib(self) -> int:
        return self.rss_kib_after - self.rss_kib_before

    @property
    def passed(self) -> bool:
        return not self.problems and self.server_alive


@dataclass
class Soak:
    """One soak against a running server: the alone answers, a warm-up, then the plan at once."""

    server: Server
    cases: Sequence[Case]
    n_predict: int
    atol: float
    timeout: float = 300
    alone: dict[tuple[str, str, str], Response] = field(default_factory=dict)

    def send(self, r: SoakRequest) -> tuple[Reply, Response | None]:
        if r.kind == "malformed":
            return send_case(self.server, self.cases[r.case]), None
        path, body = well_formed_body(r.kind, r.prompt, r.profile, self.n_predict)
        if r.kind == "stream_drop":
            return drop_mid_stream(self.server, path, body, self.timeout), None
        reply = request(self.server, path, body, timeout=self.timeout)
        return reply, response_of(r.kind, reply)

    def judge(self, r: SoakRequest) -> Outcome:
        reply, got = self.send(r)
        if r.kind == "malformed":
            case = self.cases[r.case]
            ok = case_answered(case, reply)
            why = f"{case.path} {str(case.body)[:80]}: {reply.status} {error_message(reply)[:120]}"
            return Outcome(r, "4xx" if ok else f"malformed answered {why}")
        if r.kind == "stream_drop":
            return Outcome(r, "dropped" if reply.status == 200 else f"stream answered {reply.status}")
        assert got is not None
        verdict, diff = compare_responses(got, self.alone[r.key], self.atol, tie=self.atol)
        return Outcome(r, verdict, diff)

    def serve_alone(self, plan: Sequence[SoakRequest]) -> int:
        """Every distinct well-formed request of the plan, one at a time; the number sent."""
        for r in plan:
            if r.kind in ("completion", "echo", "chat") and r.key not in self.alone:
                got = self.send(r)[1]
                assert got is not None
                if not got.ok:
                    raise RuntimeError(
                        f"{r.kind} {r.prompt!r} ({r.profile or 'own'}) failed alone: {got.error}"
                    )
                self.alone[r.key] = got
        return len(self.alone)

    def burst(self, plan: Sequence[SoakRequest], concurrency: int) -> list[Outcome]:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(self.judge, plan))


def _profile_changes(alone: dict[tuple[str, str, str], Response]) -> int:
    """Of the prompts sent as completions under several profiles: how many get different answers."""
    by_prompt: dict[str, set[tuple[Any, ...]]] = {}
    for (kind, prompt, _), resp in alone.items():
        if kind == "completion":
            by_prompt.setdefault(prompt, set()).add(tuple(resp.tokens))
    return sum(len(v) > 1 for v in by_prompt.values())


def run_soak(
    server: Server,
    plan: Sequence[SoakRequest],
    cases: Sequence[Case],
    *,
    concurrency: int,
    n_predict: int,
    atol: float,
    progress: Callable[[str], None] | None = None,
) -> SoakResult:
    """The plan against a running server: its distinct well-formed requests alone, a warm-up burst of the
    plan's first 2 x concurrency requests (so that the slots' buffers exist before RSS is read), then the
    whole plan at once from `concurrency` connections, RSS sampled every 50 ms."""
    soak = Soak(server, cases, n_predict, atol)
    say = progress or (lambda _: None)
    n_alone = soak.serve_alone(plan)
    say(f"{n_alone} distinct requests served alone")
    warm = soak.burst(plan[: 2 * concurrency], concurrency)
    bad_warm = [o for o in warm if o.verdict not in ("equal", "tie", "4xx", "dropped")]
    if bad_warm:
        raise RuntimeError(f"the warm-up burst failed: {bad_warm[0].verdict}")
    pid = server.proc.pid
    rss_before = rss_kib(pid)
    t0 = time.monotonic()
    with RssPeak(pid, rss_before) as peak:
        outcomes = soak.burst(plan, concurrency)
    seconds = time.monotonic() - t0
    alive = server.proc.poll() is None and request(server, "/health", method="GET", timeout=30).status == 200
    rss_after = rss_kib(pid) if server.proc.poll() is None else 0
    say(f"{len(plan)} requests in {seconds:.0f} s")
    passes = ("equal", "tie", "4xx", "dropped")
    return SoakResult(
        requests=len(plan),
        concurrency=concurrency,
        seconds=seconds,
        by_kind=dict(Counter(r.kind for r in plan)),
        verdicts=dict(Counter(o.verdict if o.verdict in passes else "problem" for o in outcomes)),
        problems=[
            f"{o.request.kind} {o.request.prompt!r}: {o.verdict}" for o in outcomes if o.verdict not in passes
        ],
        max_logprob_diff=max((o.logprob_diff for o in outcomes), default=0.0),
        atol=atol,
        rss_kib_before=rss_before,
        rss_kib_after=rss_after,
        rss_kib_peak=peak.peak,
        server_alive=alive,
        alone_requests=n_alone,
        answers_the_profile_changes=_profile_changes(soak.alone),
        alone=soak.alone,
    )
