"""The C++ tests built with the package.

test-kv-bias checks the ggml kv bias against an independent double-precision reference, and the backend guard;
test-backend-ops' kv-bias cases check the optimised CPU kernels (tiled and split-KV flash attention) against
the CPU reference kernels. test-mul-mat-q4_1 checks patch 0005 (Q4_1 batches in llamafile's tinyBLAS): bit for
bit equal to ggml's one-column vec_dot path, and within 1e-5 of a double-precision reference of the blocks.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from zt_gguf.tools import tool_path


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def test_kv_bias_against_reference() -> None:
    res = _run([str(tool_path("test-kv-bias"))], timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    m = re.search(r"^(\d+) passed, (\d+) failed$", res.stdout, re.M)
    assert m and int(m.group(1)) >= 50 and m.group(2) == "0", res.stdout[-2000:]
    assert "backend guard" in res.stdout


def test_mul_mat_q4_1_batches_equal_single_columns() -> None:
    res = _run([str(tool_path("test-mul-mat-q4_1"))], timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    m = re.search(r"^(\d+) passed, (\d+) failed$", res.stdout, re.M)
    assert m and int(m.group(1)) >= 160 and m.group(2) == "0", res.stdout[-2000:]
    cpu = Path("/proc/cpuinfo")
    flags = set(cpu.read_text().split()) if cpu.exists() else set()
    if {"avx2", "f16c"} <= flags:  # the kernel itself was called and took the type, on every shape
        assert len(re.findall(r"^ok .* sgemm ", res.stdout, re.M)) >= 80, res.stdout[-2000:]


def test_backend_ops_kv_bias_cases() -> None:
    exe = str(tool_path("test-backend-ops"))
    res = _run([exe, "test", "-b", "CPU", "-o", "SOFT_MAX,FLASH_ATTN_EXT", "-p", "kv_bias=1"], timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    m = re.search(r"(\d+)/(\d+) tests passed", res.stdout)
    assert m, res.stdout[-2000:]
    passed, total = int(m.group(1)), int(m.group(2))
    assert passed == total and total >= 100, res.stdout[-2000:]
