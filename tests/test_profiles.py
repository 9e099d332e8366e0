"""Named first-token-bias profiles (zt_gguf.profiles; issue 15 item 1, and the engine and llama-cpp-python
part of item 3): export from a tuned file, load with shape checks and one-line errors, scoring under a profile
against the engine with the same biases set directly, switching a llama-cpp-python Llama."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from zt_gguf import gguf_meta, profiles, testing
from zt_gguf.engine import Context, Model
from zt_gguf.tasks import Item
from zt_gguf.testing import log_softmax, make_tiny_gemma3, make_tiny_llama, write_tiny_task

PROV = {
    "task": "tiny.jsonl",
    "objective": "logprob",
    "heldout_accuracy": 0.75,
    "n_items": 40,
    "supervised": True,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("profiles")
    plain = make_tiny_llama(d / "plain.gguf", seed=3)
    shape = (plain.hparams.n_layer, plain.hparams.n_head)
    rng = np.random.default_rng(8)
    out = {"dir": d, "plain": plain.path}
    for name in ("a", "b"):
        bias = rng.uniform(-2, 2, size=shape).astype(np.float32)
        tuned = d / f"tuned-{name}.gguf"
        gguf_meta.write_tuned(plain.path, tuned, bias, {**PROV, "task": f"{name}.jsonl"})
        out[name] = tuned
    out["other_arch"] = make_tiny_gemma3(d / "gemma.gguf", seed=3, n_layer=3).path
    return out


def test_export_and_load_round_trip_gguf_and_json(files: dict[str, Path]) -> None:
    info = gguf_meta.read_model_info(files["plain"])
    tuned = gguf_meta.read_model_info(files["a"])
    for suffix in (".gguf", ".json"):
        out = files["dir"] / f"a.profile{suffix}"
        before = files["a"].read_bytes()
        assert profiles.export_profile(files["a"], out) == out
        assert files["a"].read_bytes() == before  # the input is never modified
        p = profiles.load_profile("a", out, info)
        assert p.shape == (info.n_layer, info.n_head)
        np.testing.assert_array_equal(p.biases, tuned.biases)
        assert p.provenance["task"] == "a.jsonl" and p.provenance["heldout_accuracy"] == pytest.approx(0.75)
        assert p.provenance["supervised"] is True
        assert profiles.describe(p)["shape"] == [info.n_layer, info.n_head]
    # the sidecar GGUF is small and holds no tensors: what llama.cpp's --attn-ftb FILE reads
    assert (files["dir"] / "a.profile.gguf").stat().st_size < 4096
    assert gguf_meta.read_provenance(files["dir"] / "a.profile.gguf") == tuned.provenance


def test_bad_profiles_are_one_line_errors_naming_the_file(files: dict[str, Path]) -> None:
    info = gguf_meta.read_model_info(files["plain"])
    d = files["dir"]
    (d / "short.json").write_text(json.dumps([0.1, 0.2, 0.3]))
    (d / "broken.json").write_text('{"first_token_bias": [0.1,\n 0.2,, 0.3]}')
    (d / "nan.json").write_text(json.dumps({"first_token_bias": [float("nan")] * info.n_bias}))
    cases = [
        (lambda: profiles.load_profile("s", d / "short.json", info), "short.json"),
        (lambda: profiles.load_profile("b", d / "broken.json", info), "broken.json:2"),
        (lambda: profiles.load_profile("n", d / "nan.json", info), "nan.json"),
        (lambda: profiles.load_profile("m", d / "missing.json", info), "missing.json"),
        (lambda: profiles.load_profile("g", files["other_arch"], info), "gemma.gguf"),
        (lambda: profiles.parse_spec("nofile"), "NAME=FILE"),
        (lambda: profiles.parse_spec("none=x.json"), "reserved"),
        (lambda: profiles.parse_spec("bad name=x.json"), "bad name"),
        (lambda: profiles.load_profiles([f"a={files['a']}", f"a={files['b']}"], info), "given twice"),
        (lambda: profiles.export_profile(files["plain"], d / "x.gguf"), "no usable first-token bias"),
    ]
    for call, word in cases:
        with pytest.raises(profiles.ProfileError) as e:
            call()
        msg = str(e.value)
        assert word in msg and "\n" not in msg, msg


def test_resolve_names(files: dict[str, Path]) -> None:
    info = gguf_meta.read_model_info(files["a"])
    loaded = profiles.load_profiles([f"b={files['b']}"], info)
    np.testing.assert_array_equal(profiles.resolve(loaded, "stored", info), info.biases)
    np.testing.assert_array_equal(profiles.resolve(loaded, None, info), info.biases)
    assert profiles.resolve(loaded, "none", info) is None
    np.testing.assert_array_equal(profiles.resolve(loaded, "b", info), loaded["b"].biases)
    with pytest.raises(profiles.ProfileError, match="unknown profile 'c'; known: none, stored, b"):
        profiles.resolve(loaded, "c", info)


def test_engine_scores_under_a_named_profile(files: dict[str, Path]) -> None:
    """Scores under each profile, in any order, equal a fresh context with the same biases set directly."""
    info = gguf_meta.read_model_info(files["plain"])
    loaded = profiles.load_profiles([f"a={files['a']}", f"b={files['b']}"], info)
    task = write_tiny_task(files["dir"] / "task.jsonl", 8, seed=2)
    items = [
        Item(r["prompt"], tuple(r["choices"]), r["answer"], r["id"]) for r in map(json.loads, open(task))
    ]
    model = Model(files["plain"])

    def direct(bias: np.ndarray | None) -> np.ndarray:
        ctx = Context(model, n_threads=1)
        ctx.set_bias(bias)
        return np.array([s.choice_logprob for s in ctx.score(items, n_gen=0)])

    want = {"a": direct(loaded["a"].biases), "b": direct(loaded["b"].biases), "none": direct(None)}
    assert np.abs(want["a"] - want["none"]).max() > 0.1  # the profiles matter
    ctx = Context(model, n_threads=1)
    for name in ("a", "b", "none", "a", "stored", "b"):
        got = np.array([s.choice_logprob for s in profiles.score_under(ctx, loaded, name, items, n_gen=0)])
        np.testing.assert_allclose(got, want["none" if name == "stored" else name], atol=1e-9, rtol=0)


def test_cli_export_profile_and_calibrate_profile_out(files: dict[str, Path]) -> None:
    d = files["dir"]
    exe = [sys.executable, "-m", "zt_gguf"]
    r = subprocess.run(
        [*exe, "export-profile", str(files["b"]), "-o", str(d / "b.json")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert np.allclose(
        json.loads((d / "b.json").read_text())["first_token_bias"],
        gguf_meta.read_model_info(files["b"]).biases,
    )
    r = subprocess.run(
        [*exe, "export-profile", str(files["plain"]), "-o", str(d / "p.gguf")], capture_output=True, text=True
    )
    assert r.returncode != 0 and "no usable first-token bias" in r.stderr and "Traceback" not in r.stderr
    task = write_tiny_task(d / "cal.jsonl", 40, seed=5, balanced=True)
    r = subprocess.run(
        [*exe, "calibrate", str(files["plain"]), "--task", str(task), "-o", str(d / "cal.gguf"), "--force",
         "--quiet", "--scoring", "choice", "--threads", "1", "--profile-out", str(d / "cal.profile.gguf")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    if (d / "cal.gguf").exists():
        info = gguf_meta.read_model_info(d / "cal.gguf")
        p = profiles.load_profile("cal", d / "cal.profile.gguf", gguf_meta.read_model_info(files["plain"]))
        if info.biases is not None:
            np.testing.assert_array_equal(p.biases, info.biases)
        assert p.provenance == info.provenance
    else:
        assert "no profile written" in r.stderr


_SWITCH = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from zt_gguf import gguf_meta, profiles
    from zt_gguf import llama_cpp_compat as lc

    a = json.loads(sys.argv[1])
    info = gguf_meta.read_model_info(a["plain"])
    loaded = profiles.load_profiles(["a=" + a["a"], "b=" + a["b"]], info)
    llm = lc.load_llama(a["plain"], n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, n_threads=1)
    tokens = llm.tokenize(b"the cat sat on the mat")

    def logits():
        llm.reset()
        llm.eval(tokens)
        return np.array(llm.scores[: llm.n_tokens], dtype=np.float32).tolist()

    out = {"changed": [], "logits": {}}
    for name in ("a", "a", "b", "none", "stored", "a"):
        out["changed"].append(lc.use_profile(llm, name, loaded))
        out["logits"].setdefault(name, []).append(logits())
    print(json.dumps(out))
    """
)


def test_llama_cpp_python_switches_profiles(files: dict[str, Path]) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (scripts/test.sh installs it)")
    from zt_gguf.tools import llama_cpp_env

    args = json.dumps({k: str(files[k]) for k in ("plain", "a", "b")})
    r = subprocess.run(
        [sys.executable, "-c", _SWITCH, args],
        capture_output=True,
        text=True,
        env=llama_cpp_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # set only on a change: a, (a again: no), b, none, stored (the plain model has none: no change), a
    assert out["changed"] == [True, False, True, True, False, True]
    model = Model(files["plain"])
    for name in ("a", "b", "none"):
        ctx = Context(model, n_threads=1, flash_attn=False)
        ctx.set_bias(
            None
            if name == "none"
            else profiles.load_profile(name, files[name], gguf_meta.read_model_info(files["plain"])).biases
        )
        want = ctx.logits(model.tokenize("the cat sat on the mat"))
        for got in out["logits"][name]:
            np.testing.assert_allclose(np.array(got), want, atol=2e-4, rtol=0)
    np.testing.assert_array_equal(out["logits"]["stored"][0], out["logits"]["none"][0])


# --- llama-server: per-request profiles (patch 0010) -----------------------------------------------------

ATOL = 2e-4  # server vs engine, no flash attention in either (tests/test_tools.py)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny Gemma-3 model with a stored bias, and three profiles: a GGUF sidecar, a JSON list and object."""
    d = tmp_path_factory.mktemp("served")
    plain = make_tiny_gemma3(d / "plain.gguf", seed=4)
    shape = (plain.hparams.n_layer, plain.hparams.n_head)
    rng = np.random.default_rng(12)
    stored = rng.uniform(-2, 2, size=shape).astype(np.float32)
    tuned = d / "tuned.gguf"
    gguf_meta.write_tuned(plain.path, tuned, stored, {"task": "stored.jsonl"})
    biases = {n: rng.uniform(-2, 2, size=shape).astype(np.float32) for n in ("p1", "p2", "p3")}
    files = {
        "p1": gguf_meta.write_bias_gguf(d / "p1.gguf", biases["p1"], "gemma3", {"task": "p1.jsonl", "n": 3}),
        "p2": d / "p2.json",
        "p3": d / "p3.json",
    }
    files["p2"].write_text(json.dumps([float(v) for v in biases["p2"].reshape(-1)]))
    files["p3"].write_text(
        json.dumps({"first_token_bias": biases["p3"].tolist(), "zerotuning": {"task": "p3"}})
    )
    return {"dir": d, "model": tuned, "stored": stored, "biases": biases, "files": files}


def _error(server: testing.Server, body: dict) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        server.url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, ""
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]["message"]


def _start(served: dict, tmp: Path, *extra: str) -> testing.Server:
    args = [a for n, f in served["files"].items() for a in ("--attn-ftb-profile", f"{n}={f}")]
    return testing.start_server(served["model"], "--no-warmup", *args, *extra, threads=1, log_dir=tmp)


@pytest.mark.parametrize("per_seq", ["1", "0"])
def test_server_profiles_per_request_equal_single_profile_results(
    served: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_seq: str
) -> None:
    """3 profiles + none + the stored bias, 4 slots, 240 concurrent requests with random profiles: every
    prompt's log-probs (echo) equal the engine's with that profile's biases; no error; memory stable. With
    per-sequence biases (the default) slots of different profiles share a batch: the bias is a kernel input
    per row (with the CPU kernel reading one row's bias for all, this test fails); with
    LLAMA_ATTN_FTB_PER_SEQ=0 each batch has one profile."""
    monkeypatch.setenv("LLAMA_ATTN_FTB_PER_SEQ", per_seq)
    server = _start(served, tmp_path)
    try:
        mode = "one per sequence, mixed in a batch" if per_seq == "1" else "one per batch"
        assert f"first-token bias profiles: {mode}" in server.log.read_text()
        status, listing = testing.http(server.url + "/attn-ftb-profiles")
        assert status == 200
        by_name = {p["name"]: p for p in listing["profiles"]}
        assert sorted(by_name) == ["p1", "p2", "p3"]
        assert by_name["p1"]["shape"] == list(served["stored"].shape)
        assert by_name["p1"]["provenance"] == {"task": "p1.jsonl", "n": 3}
        assert by_name["p3"]["provenance"] == {"task": "p3"} and by_name["p2"]["provenance"] == {}

        model = Model(served["model"])
        ctx = Context(model, n_threads=1, flash_attn=False)
        words = "the a of and to in is it that was for on hello world cat dog sat mat one two three".split()
        rng = np.random.default_rng(5)
        prompts = [" ".join(rng.choice(words, size=int(rng.integers(3, 24)))) for _ in range(12)]
        choices = [None, "none", "p1", "p2", "p3"]
        ref: dict[tuple[str | None, str], np.ndarray] = {}
        for name in choices:
            bias = {None: served["stored"], "none": None}.get(name, served["biases"].get(name or ""))
            ctx.set_bias(bias)
            for p in prompts:
                t = model.tokenize(p)
                rows = log_softmax(ctx.logits(t))
                ref[(name, p)] = np.array([rows[i - 1, t[i]] for i in range(1, len(t))])
        jobs = [
            (choices[int(rng.integers(len(choices)))], prompts[int(rng.integers(len(prompts)))])
            for _ in range(240)
        ]

        def one(job: tuple[str | None, str]) -> tuple[int, list[float]]:
            name, p = job
            body = {"prompt": p, "echo": True, "logprobs": 1, "max_tokens": 0}
            if name is not None:
                body["attn_ftb"] = name
            status, res = testing.http(server.url + "/v1/completions", body, timeout=120)
            return status, ([] if status != 200 else res["choices"][0]["logprobs"]["token_logprobs"][1:])

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, jobs[:40]))  # warm-up burst
            rss0 = testing.rss_kib(server.proc.pid)
            results = list(pool.map(one, jobs))
            rss1 = testing.rss_kib(server.proc.pid)
        worst = 0.0
        for (name, p), (status, got) in zip(jobs, results, strict=True):
            assert status == 200, (name, p)
            worst = max(worst, float(np.abs(np.array(got, dtype=np.float64) - ref[(name, p)]).max()))
        assert worst <= ATOL, worst
        # the profiles differ from each other where it matters
        assert np.abs(ref[("p1", prompts[0])] - ref[("p2", prompts[0])]).max() > 0.1
        assert rss1 - rss0 < 16 * 1024, (rss0, rss1)
        # unknown and malformed names: 400 naming the field
        for value, word in (
            ("p9", "unknown \"attn_ftb\" profile 'p9'; known: none, p1, p2, p3"),
            (3, "must be"),
        ):
            status, message = _error(server, {"prompt": "a", "attn_ftb": value})
            assert status == 400 and word in message, (value, message)
        assert testing.http(server.url + "/health")[0] == 200
    finally:
        assert testing.stop_server(server) == 0


def test_server_refuses_bad_profile_files_at_start_up(served: dict, tmp_path: Path) -> None:
    d = served["dir"]
    (d / "short.json").write_text("[0.1, 0.2]")
    (d / "broken.json").write_text("[0.1, ")
    from zt_gguf.tools import tool_path

    cases = [
        (["--attn-ftb-profile", f"s={d / 'short.json'}"], "short.json"),
        (["--attn-ftb-profile", f"b={d / 'broken.json'}"], "broken.json"),
        (["--attn-ftb-profile", f"m={d / 'missing.gguf'}"], "missing.gguf"),
        (["--attn-ftb-profile", f"none={served['files']['p1']}"], "reserved"),
        (
            [
                "--attn-ftb-profile",
                f"p={served['files']['p1']}",
                "--attn-ftb-profile",
                f"p={served['files']['p2']}",
            ],
            "twice",
        ),
        (["--attn-ftb-profile", "nofile"], "NAME=FILE"),
    ]
    for extra, word in cases:
        r = subprocess.run(
            [str(tool_path("llama-server")), "-m", str(served["model"]), "--no-warmup", "-t", "1",
             "--port", str(testing.free_port()), *extra],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode != 0, extra
        assert word in r.stdout + r.stderr, (extra, (r.stdout + r.stderr)[-1500:])
