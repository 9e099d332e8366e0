"""The first-token bias on a GPU backend (patches 0006-0008), checked against the CPU backend.

These tests need zt-gguf built with a GPU backend (``CMAKE_ARGS="-DGGML_VULKAN=ON" pip install .``) and a
device; in CI that is Vulkan on Mesa's lavapipe (a Vulkan driver that runs on the CPU), made visible with
``GGML_VK_VISIBLE_DEVICES=0`` (ggml-vulkan skips CPU-type devices otherwise). Without one they are skipped,
unless ``ZT_GGUF_REQUIRE_GPU=1`` (CI's Vulkan step), where a missing device is a failure.

The independent reference is the CPU backend of the same build: test-backend-ops compares every kv-bias
SOFT_MAX / FLASH_ATTN_EXT case on the GPU with ggml's CPU reference kernels, and the engine's scores with all
layers offloaded must equal its scores with none (``gpu_layers=0``), with every biased attention node
recorded on the GPU device (a node that fell back to the CPU, or a bias ignored, fails).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from zt_gguf.engine import Context, Model
from zt_gguf.tasks import Item
from zt_gguf.testing import make_tiny_gemma3, make_tiny_llama
from zt_gguf.tools import tool_path

REQUIRED = os.environ.get("ZT_GGUF_REQUIRE_GPU") == "1"
# F16 K/V on both sides; ggml-vulkan rounds matmul activations to F16 where the CPU does not: the unbiased
# tiny model's log-probs (|lp| ~ 15) differ by up to 3.2e-3 between the backends, the biased ones by 3.5e-3
ATOL = 1e-2
WORDS = "the a of and to in is it that was for on hello world cat dog sat mat one two three".split()


def _gpu_devices(path: Path) -> list[str]:
    return Model(path).gpu_devices


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_tiny_llama(tmp_path_factory.mktemp("m") / "tiny.gguf", n_layer=3, head_dim=64, seed=3).path
    if not _gpu_devices(path):
        if REQUIRED:
            pytest.fail(
                "ZT_GGUF_REQUIRE_GPU=1 but zt-gguf has no GPU device (built without -DGGML_VULKAN=ON?)"
            )
        pytest.skip("zt-gguf was built without a GPU backend, or no device is visible")
    return path


def _items(n: int, seed: int) -> list[Item]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
        items.append(Item(prompt=prompt, choices=(" cat", " dog sat", " one two"), answer=0, id=str(i)))
    return items


def _scores(
    model: Model, flash_attn: bool, bias: np.ndarray | None, items: list[Item]
) -> tuple[np.ndarray, list]:
    ctx = Context(model, n_ctx=1024, flash_attn=flash_attn)
    ctx.set_bias(bias)
    res = ctx.score(items, n_gen=2)
    lp = np.array([r.choice_logprob for r in res])
    return lp, ctx.attention_devices()


@pytest.mark.parametrize("flash_attn", [False, True])
def test_offloaded_scores_equal_cpu_and_attention_runs_on_the_gpu(tiny: Path, flash_attn: bool) -> None:
    gpu, cpu = Model(tiny), Model(tiny, gpu_layers=0)
    assert gpu.n_gpu_layers == gpu.n_layer and cpu.n_gpu_layers == 0
    rng = np.random.default_rng(7)
    bias = rng.uniform(-3, 3, size=gpu.bias_shape).astype(np.float32)
    items = _items(12, 1)

    lp_gpu, where = _scores(gpu, flash_attn, bias, items)
    lp_cpu, _ = _scores(cpu, flash_attn, bias, items)
    np.testing.assert_allclose(lp_gpu, lp_cpu, atol=ATOL)

    # the bias moves the scores far more than the backends differ (an ignored bias would fail above)
    lp_off, _ = _scores(cpu, flash_attn, None, items)
    assert np.abs(lp_off - lp_cpu).max() > 20 * ATOL

    # every attention node of the last decode ran on the GPU device, with the bias
    devices = {p.device: p for p in where}
    assert set(devices) == set(gpu.gpu_devices[:1]), where
    (p,) = devices.values()
    assert p.n_nodes == p.n_biased and p.n_nodes % gpu.n_layer == 0 and p.n_nodes > 0, where


def test_sliding_window_model_offloaded_equals_cpu(tmp_path: Path, tiny: Path) -> None:
    path = make_tiny_gemma3(tmp_path / "g.gguf", head_dim=64, sliding_window=4, seed=5).path
    gpu, cpu = Model(path), Model(path, gpu_layers=0)
    bias = np.random.default_rng(2).uniform(-3, 3, size=gpu.bias_shape).astype(np.float32)
    items = _items(8, 2)
    for fa in (False, True):
        lp_gpu, where = _scores(gpu, fa, bias, items)
        lp_cpu, _ = _scores(cpu, fa, bias, items)
        np.testing.assert_allclose(lp_gpu, lp_cpu, atol=ATOL)
        assert [p.device for p in where] == gpu.gpu_devices[:1], where
        assert where[0].n_nodes == where[0].n_biased > 0, where


def _backend_ops(device: str, op: str, params: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool_path("test-backend-ops")), "test", "-b", device, "-o", op, "-p", params],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _cases(ops: str, params: str) -> list[tuple[str, str]]:
    """The (op, vars) of the cases the filter selects, from the CPU backend (which supports them all)."""
    res = _backend_ops("CPU", ops, params, 900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    cases = re.findall(r"^  (\w+)\((.*)\): .*OK", res.stdout, re.M)
    m = re.search(r"(\d+)/(\d+) tests passed", res.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) == len(cases) > 0, res.stdout[-2000:]
    return cases


STOCK_SAMPLE = "^hsk=64,hsv=64,nh=4,nr23=\\[1,1\\],kv=113,nb=(1|75),.*type_K=(f16|q8_0),.*n_kv_max=0$"


# One process per case: stock ggml-vulkan at our pin corrupts the heap on lavapipe in some flash-attention
# cases (GQA with split-k, F32 K/V; measured with and without our patches, cpp/patches/README.md), which
# crashes a long run of cases later on; each case alone passes.
@pytest.mark.parametrize(
    ("ops", "params"),
    [
        ("SOFT_MAX", "kv_bias=1"),
        ("FLASH_ATTN_EXT", "kv_bias=1"),
        # the unbiased kernels still pass (a sample of stock cases: F16 and Q8_0 K/V, decode and prefill,
        # masks, sinks, ALiBi, soft-cap)
        ("FLASH_ATTN_EXT", STOCK_SAMPLE),
    ],
    ids=["soft_max-kv_bias", "flash_attn_ext-kv_bias", "flash_attn_ext-stock"],
)
def test_backend_ops_cases_on_the_gpu(tiny: Path, ops: str, params: str) -> None:
    device = Model(tiny).gpu_devices[0]
    failed = []
    cases = _cases(ops, params)
    for op, vars_ in cases:
        res = _backend_ops(device, op, "^" + re.escape(vars_) + "$", 600)
        m = re.search(r"(\d+)/(\d+) tests passed", res.stdout)
        if (
            res.returncode != 0
            or not m
            or (m.group(1), m.group(2)) != ("1", "1")
            or "not supported" in res.stdout
        ):
            failed.append(f"{op}({vars_}): rc {res.returncode}: {res.stdout[-300:]}{res.stderr[-300:]}")
    assert not failed, f"{len(failed)} of {len(cases)} cases failed on {device}:\n" + "\n".join(failed[:10])


def test_a_bias_per_row_is_left_to_the_cpu(tiny: Path) -> None:
    """Per-row biases (per-sequence profiles, patch 0002) have CPU kernels only: the GPU backend must decline
    every such case (the scheduler then runs it on the CPU), never run it with one bias for all rows."""
    device = Model(tiny).gpu_devices[0]
    for op in ("SOFT_MAX", "FLASH_ATTN_EXT"):
        cases = _cases(op, "kv_bias=rows")
        res = _backend_ops(device, op, "kv_bias=rows", 600)
        assert "FAIL" not in res.stdout, res.stdout[-2000:] + res.stderr[-1000:]
        declined = re.findall(r"^  (\w+)\((.*)\): not supported", res.stdout, re.M)
        assert sorted(declined) == sorted(cases), res.stdout[-3000:]
