"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from zt_gguf import testing
from zt_gguf.testing import Server


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start llama-server (zt_gguf.testing's helper) on a free loopback port, 4 slots, 1 thread, healthy;
    every server started is stopped at teardown."""
    servers: list[Server] = []

    def start(model: Path, *extra: str, timeout: float = 90.0) -> Server:
        try:
            server = testing.start_server(
                model, "--no-warmup", *extra, threads=1, log_dir=tmp_path, startup_timeout=timeout
            )
        except RuntimeError as e:
            pytest.fail(str(e))
        servers.append(server)
        return server

    yield start
    for server in servers:
        testing.stop_server(server)
