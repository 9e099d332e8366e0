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

from zt_gguf import gguf_meta, profiles
from zt_gguf.engine import Context, Model
from zt_gguf.tasks import Item
from zt_gguf.testing import make_tiny_gemma3, make_tiny_llama, write_tiny_task

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
