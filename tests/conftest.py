"""Fixtures shared by the test modules."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_load  # noqa: E402
from bench_load import Server  # noqa: E402


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start llama-server (benchmarks/bench_load.py's helper) on a free loopback port, 4 slots, 1 thread,
    healthy; every server started is stopped at teardown."""
    servers: list[Server] = []

    def start(model: Path, *extra: str, timeout: float = 90.0) -> Server:
        try:
            server = bench_load.start_server(
                model, "--no-warmup", *extra, threads=1, log_dir=tmp_path, startup_timeout=timeout
            )
        except RuntimeError as e:
            pytest.fail(str(e))
        servers.append(server)
        return server

    yield start
    for server in servers:
        bench_load.stop_server(server)
