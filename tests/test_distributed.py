"""The search over Ray workers (zt_gguf.distributed) on a local 2-worker cluster and the tiny float model.

The reference is the single-process search of the same items with the same settings: the distributed run
must make the same picks with the same per-candidate figures, bit for bit, also after a worker is killed
with SIGKILL in the middle of a chunk, and a checkpoint written by either mode resumes in the other."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray  # the [test] extra installs it: a missing Ray fails here, never skips

from zt_gguf.distributed import DistributedError, RayPool, WorkerSpec  # noqa: E402
from zt_gguf.engine import Context, Model, fit_n_ctx  # noqa: E402
from zt_gguf.gguf_meta import read_model_info  # noqa: E402
from zt_gguf.search import SearchConfig, SearchResult, SearchState, context_scorer, search  # noqa: E402
from zt_gguf.tasks import load_task  # noqa: E402
from zt_gguf.testing import make_tiny_llama, write_tiny_task  # noqa: E402

CONFIG = SearchConfig(method="bands", objective="logprob", chunk_size=8, budget=6, grid_up=(2.0, 4.0))


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(
        "local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level="ERROR"
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("dist")
    model_path = make_tiny_llama(d / "tiny.gguf", n_layer=3, seed=5).path
    task = load_task(write_tiny_task(d / "task.jsonl", 40, seed=3))
    model = Model(model_path, gpu_layers=0)
    n_ctx = fit_n_ctx(model, task.items, CONFIG.chunk_size, 1)
    ctx = Context(model, n_threads=1, n_ctx=n_ctx)
    spec = WorkerSpec(
        str(model_path), model_path.stat().st_size, n_threads=1, n_ctx=n_ctx, n_gen=1, gpu_layers=0
    )
    single = search(context_scorer(ctx), task.items, model.bias_shape, CONFIG)
    return {"dir": d, "model": model_path, "items": task.items, "shape": model.bias_shape, "ctx": ctx,
            "spec": spec, "single": single}  # fmt: skip


def _same(a: SearchResult, b: SearchResult) -> None:
    da, db = a.to_dict(include_run=False), b.to_dict(include_run=False)
    assert json.dumps(da, sort_keys=True) == json.dumps(db, sort_keys=True)


def _pool(setup: dict[str, Any], **kw: Any) -> RayPool:
    return RayPool(setup["spec"], 2, **kw)


def test_two_workers_give_the_single_process_result(cluster: None, setup: dict[str, Any]) -> None:
    seen: list[int] = []
    pool = _pool(setup)
    wait = pool.wait

    def counting_wait() -> tuple[int, list[Any], float]:  # the scores every job returned, counted
        job, scores, seconds = wait()
        seen.append(len(scores))
        return job, scores, seconds

    pool.wait = counting_wait  # type: ignore[method-assign]
    try:
        assert pool.n_workers == 2 and len(set(pool.pids)) == 2 and os.getpid() not in pool.pids
        result = search(None, setup["items"], setup["shape"], CONFIG, pool=pool)
    finally:
        pool.close()
    _same(result, setup["single"])
    assert np.any(result.bias)  # a real pick, not the baseline on both sides
    assert any(c.stopped_early for c in result.candidates)  # early stopping applies per candidate
    assert sum(seen) == result.run.items_scored >= result.items_scored


def test_a_worker_killed_mid_run_is_replaced(cluster: None, setup: dict[str, Any], tmp_path: Path) -> None:
    lines: list[str] = []
    pool = _pool(setup, log=lines.append)
    killed: list[int] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "probe" and done >= 16 and not killed:
            killed.append(pool.pids[0])
            os.kill(pool.pids[0], signal.SIGKILL)  # with a chunk in flight: the other worker's is awaited

    ckpt = tmp_path / "ckpt.json"
    try:
        result = search(None, setup["items"], setup["shape"], CONFIG, pool=pool, progress=progress,
                        checkpoint=ckpt, scorer_id="tiny")  # fmt: skip
        assert killed and pool.replacements == 1 and killed[0] not in pool.pids
    finally:
        pool.close()
    _same(result, setup["single"])
    assert any("died" in line and "replacement" in line for line in lines), lines
    assert len(SearchState.load(ckpt, "tiny").evaluations) == result.n_evaluations


@pytest.mark.parametrize("first", ["distributed", "single"])
def test_checkpoint_resumes_across_modes(
    cluster: None, setup: dict[str, Any], tmp_path: Path, first: str
) -> None:
    ckpt = tmp_path / "ckpt.json"
    done: list[int] = []

    def stop_after(name: str, data: dict[str, Any]) -> None:
        if name == "done":
            done.append(1)
            if len(done) == 7:
                raise Stop

    def run(mode: str, events: Any = None) -> SearchResult:
        pool = _pool(setup) if mode == "distributed" else None
        try:
            return search(context_scorer(setup["ctx"]), setup["items"], setup["shape"], CONFIG, pool=pool,
                          checkpoint=ckpt, scorer_id="tiny", events=events)  # fmt: skip
        finally:
            if pool is not None:
                pool.close()

    with pytest.raises(Stop):
        run(first, stop_after)
    n_saved = len(SearchState.load(ckpt, "tiny").evaluations)
    assert n_saved >= 7
    resumed = run("single" if first == "distributed" else "distributed")
    _same(resumed, setup["single"])
    assert resumed.run.evaluations_from_checkpoint == n_saved


def test_a_worker_that_cannot_load_the_model_names_its_node(cluster: None, setup: dict[str, Any]) -> None:
    bad = setup["dir"] / "not-a-model.gguf"
    bad.write_bytes(b"GGUF but not really")
    spec = WorkerSpec(str(bad), None, n_threads=1, n_ctx=512, n_gen=1, gpu_layers=0)
    with pytest.raises(
        DistributedError, match=r"worker 0 on node .+\(.+\): cannot load the model: .*not-a-model"
    ):
        RayPool(spec, 1)
    other = WorkerSpec(str(setup["model"]), 12345, n_threads=1, n_ctx=512, n_gen=1, gpu_layers=0)
    with pytest.raises(DistributedError, match="holds .* bytes, the driver's model 12345: not the same file"):
        RayPool(other, 1)


def _cli(*args: str, env: dict[str, str] | None = None, pre: str = "") -> subprocess.CompletedProcess[str]:
    code = f"import sys; {pre}from zt_gguf.cli import run; sys.argv = ['zt-gguf', *sys.argv[1:]]; run()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env=env)  # fmt: skip


def test_calibrate_with_workers_writes_the_same_tuned_file(setup: dict[str, Any], tmp_path: Path) -> None:
    """The CLI end to end, its own local cluster of 2 workers (a subprocess: not this module's cluster)."""
    task = write_tiny_task(tmp_path / "task.jsonl", 100, seed=3)  # 70 calibration items: 3 chunks
    common = ["calibrate", str(setup["model"]), "--task", str(task), "--scoring", "choice", "--objective",
              "logprob", "--threads", "1", "--gpu-layers", "0", "--grid-up", "2,4", "--grid-down", "0.5",
              "--force", "--json", "--quiet"]  # fmt: skip
    reps = {}
    for name, extra in (("single", []), ("workers", ["--workers", "2"])):
        p = _cli(*common, "-o", str(tmp_path / f"{name}.gguf"), *extra)
        assert p.returncode == 0, p.stderr
        reps[name] = json.loads(p.stdout)
    a, b = reps["single"], reps["workers"]
    for key in ("chosen", "evaluations", "baseline", "tuned", "delta", "baselines"):
        assert a[key] == b[key], key
    assert a["search"]["workers"] is None
    assert b["search"]["workers"]["n"] == 2 and b["search"]["workers"]["replaced"] == 0
    biases = [read_model_info(tmp_path / f"{name}.gguf").biases for name in ("single", "workers")]
    assert biases[0] is not None and np.any(biases[0])
    np.testing.assert_array_equal(biases[0], biases[1])


def test_workers_without_ray_say_how_to_get_it(setup: dict[str, Any], tmp_path: Path) -> None:
    task = write_tiny_task(tmp_path / "task.jsonl", 30)
    out = tmp_path / "out.gguf"
    p = _cli("calibrate", str(setup["model"]), "--task", str(task), "--workers", "2", "--quiet",
             "-o", str(out), pre="sys.modules['ray'] = None; ")  # fmt: skip
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert lines == [
        'zt-gguf: error: distributed calibration needs Ray: pip install "zt-gguf[ray]" (or pip install ray)'
    ]
    # refused before anything is written: no report folder, no tuned file
    assert not (tmp_path / "out.report").exists() and not out.exists()


def test_calibrate_joins_a_running_cluster(setup: dict[str, Any], tmp_path: Path) -> None:
    """The README's cluster lines: `ray start --head` (token authentication, Ray's default), then calibrate
    --ray-address with as many workers as the cluster's CPUs hold."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_exe = Path(sys.executable).with_name("ray")
    args = ["start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard=false",
            "--disable-usage-stats", "--block"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    head = subprocess.Popen([str(ray_exe) if ray_exe.exists() else "ray", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    try:
        assert head.stdout is not None
        for line in head.stdout:  # --block: it prints this once the head is up, then waits
            if "Ray runtime started" in line:
                break
        else:
            raise AssertionError("ray start --head failed")
        threading.Thread(target=head.stdout.read, daemon=True).start()
        task = write_tiny_task(tmp_path / "task.jsonl", 60, seed=4)
        common = ["calibrate", str(setup["model"]), "--task", str(task), "--scoring", "choice", "--threads",
                  "1", "--gpu-layers", "0", "--grid-up", "2", "--grid-down", "0.5", "--force",
                  "--json"]  # fmt: skip
        single = _cli(*common, "--quiet", "-o", str(tmp_path / "a.gguf"))
        assert single.returncode == 0, single.stderr
        joined = _cli(*common, "-o", str(tmp_path / "b.gguf"), "--ray-address", f"127.0.0.1:{port}", env=env)
        assert joined.returncode == 0, joined.stderr
        assert "2 worker(s) ready" in joined.stderr
        a, b = json.loads(single.stdout), json.loads(joined.stdout)
        for key in ("chosen", "evaluations", "tuned", "baselines"):
            assert a[key] == b[key], key
    finally:
        head.terminate()
        head.wait(timeout=60)


def test_calibrate_stops_with_one_line_when_a_worker_cannot_load(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    task = write_tiny_task(tmp_path / "task.jsonl", 30)
    missing = tmp_path / "elsewhere" / "model.gguf"
    p = _cli("calibrate", str(setup["model"]), "--task", str(task), "--workers", "1", "--threads", "1",
             "--worker-model", str(missing), "-o", str(tmp_path / "out.gguf"), "--quiet")  # fmt: skip
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    assert errors[0].startswith("zt-gguf: error: worker 0 on node ") and str(missing) in errors[0]
    assert not (tmp_path / "out.gguf").exists()
