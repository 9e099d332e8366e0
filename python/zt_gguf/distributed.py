"""Calibration over a Ray cluster: the chunks of a search scored by worker actors (``calibrate --workers``).

The search (zt_gguf.search) hands out jobs, one chunk of one candidate each, through a ChunkPool; this
module's :class:`RayPool` is that pool over Ray actors. Each actor (:class:`Worker`) loads the model once,
with its own patched llama.cpp context, and receives the calibration items once (one object in Ray's store,
read by every actor); a job carries only the bias matrix and the chunk's range. The search makes the same
picks whatever the number of workers (see "Pools" in zt_gguf.search), so a distributed run and a
single-process run share their checkpoint.

Faults: a worker that dies (its process killed, its node lost) is replaced by a new actor, which loads the
model again, and the job it held is scored again there; completed candidates are in the checkpoint and never
lost. A worker that cannot load the model stops the run with an error naming its node.

The model reaches the workers by path: on a cluster, every node must read it at the same path (a shared file
system), or at the path given as ``worker_model`` (checked by size against the driver's file). zt-gguf must be
installed on every node, built the same way (the same backends), for the results to be the same.

Ray is optional: ``pip install "zt-gguf[ray]"``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .tasks import Item

__all__ = ["DistributedError", "RayPool", "WorkerSpec", "open_pool", "require_ray"]

START_TIMEOUT_S = 300.0  # how long a new worker may take to be placed and load the model
MAX_REPLACEMENTS_PER_WORKER = 3

Log = Callable[[str], None]


class DistributedError(UserError, RuntimeError):
    """A distributed run that cannot go on (Ray missing, a worker that cannot load the model, ...)."""


def require_ray(address: str | None = None) -> Any:
    """The ray module, or a one-line error saying how to get it. With the address of a cluster to join, the
    authentication mode is settled first (Ray reads it on import; see _auth_for_joining)."""
    if address is not None:
        _auth_for_joining()
    try:
        import ray
    except ImportError:
        raise DistributedError(
            'distributed calibration needs Ray: pip install "zt-gguf[ray]" (or pip install ray)'
        ) from None
    return ray


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker loads: the same context as the driver's, for the same scores."""

    model_path: str  # as the workers read it
    model_size: int | None  # the driver's file size (a worker's file must match), None: not checked
    n_threads: int
    n_ctx: int
    n_gen: int
    gen_stop: tuple[str, ...] = ()
    gpu_layers: int | None = None
    flash_attn: bool | None = None


def _node() -> str:
    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:  # outside Ray, or no address yet
        ip = "?"
    return f"{socket.gethostname()} ({ip})"


class Worker:
    """A Ray actor: one model, one context, the items; scores chunks under a bias."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.node = _node()
        self.error: str | None = None
        self.items: list[Item] = []
        self.ctx: Any = None
        try:
            path = Path(spec.model_path)
            size = path.stat().st_size
            if spec.model_size is not None and size != spec.model_size:
                raise ValueError(
                    f"{path} holds {size} bytes, the driver's model {spec.model_size}: not the same file"
                )
            from .engine import Context, Model

            model = Model(path, gpu_layers=spec.gpu_layers)
            self.ctx = Context(model, n_threads=spec.n_threads, n_ctx=spec.n_ctx, flash_attn=spec.flash_attn)
        except Exception as e:  # reported by info(): the driver stops the run with it
            self.error = f"cannot load the model: {e}"

    def info(self) -> dict[str, Any]:
        return {"node": self.node, "pid": os.getpid(), "error": self.error}

    def set_items(self, items: list[Item]) -> int:
        self.items = list(items)
        return len(self.items)

    def score(self, bias: np.ndarray, start: int, stop: int) -> list[Any]:
        self.ctx.set_bias(np.asarray(bias, np.float32))
        return self.ctx.score(
            self.items[start:stop], n_gen=self.spec.n_gen, gen_stop=list(self.spec.gen_stop)
        )


@dataclass
class _Running:
    worker: int
    job: int
    bias: np.ndarray
    start: int
    stop: int
    t0: float


class RayPool:
    """A search.ChunkPool over Ray actors; see the module docstring.

    address None starts a local Ray cluster sized for n_workers (n_workers x n_threads CPUs); an address
    joins that cluster, with n_workers workers (None: as many as its CPUs hold at n_threads each, at most one
    a GPU when it has GPUs). Each worker asks Ray for n_threads CPUs and, when the cluster has GPUs and
    gpu_layers is not 0, for a GPU (a share of one when there are more workers than GPUs); Ray then shows
    the worker only its GPU(s). Without GPUs in Ray, gpu_layers applies as on one machine."""

    def __init__(
        self,
        spec: WorkerSpec,
        n_workers: int | None,
        *,
        address: str | None = None,
        log: Log | None = None,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        ray = require_ray(address)
        self.ray = ray
        self.spec = spec
        self.log = log
        self.start_timeout = start_timeout
        self.owns_cluster = False
        self.items: list[Item] = []
        self.items_ref: Any = None
        self.replacements = 0
        self.actors: list[Any] = []
        self.nodes: list[str] = []
        self.pids: list[int] = []
        self.idle: list[int] = []
        self.running: dict[Any, _Running] = {}
        quiet = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}
        try:
            if ray.is_initialized():
                pass  # this process is already on a cluster (a notebook, the tests): its workers go there
            elif address is None:
                if n_workers is None or n_workers < 1:
                    raise DistributedError("--workers must be at least 1")
                ray.init(address="local", num_cpus=n_workers * spec.n_threads, **quiet)
                self.owns_cluster = True
            else:
                ray.init(address=address, **quiet)
        except DistributedError:
            raise
        except Exception as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            hint = (
                "; a cluster with token authentication needs its token here (RAY_AUTH_TOKEN, or the file "
                "~/.ray/auth_token of its head)"
                if address
                else ""
            )
            raise DistributedError(f"cannot start or join {where}: {str(e).splitlines()[0]}{hint}") from None
        try:
            resources = ray.cluster_resources()
            gpus = float(resources.get("GPU", 0)) if spec.gpu_layers != 0 else 0.0
            if n_workers is None:
                n_workers = max(1, int(float(resources.get("CPU", 1)) // spec.n_threads))
                if gpus >= 1:
                    n_workers = min(n_workers, int(gpus))
            # a GPU per worker where the cluster has one each, else the GPUs shared between the workers
            self.num_gpus: float = 0.0 if gpus <= 0 else min(1.0, gpus / n_workers)
            self.n_workers = n_workers
            self._remote = ray.remote(num_cpus=spec.n_threads, num_gpus=self.num_gpus)(Worker)
            handles = [self._remote.remote(spec) for _ in range(n_workers)]
            infos = [self._ready(h, k) for k, h in enumerate(handles)]
            for k, (h, info) in enumerate(zip(handles, infos)):
                self.actors.append(h)
                self.nodes.append(info["node"])
                self.pids.append(info["pid"])
                self.idle.append(k)
        except BaseException:
            self.close()
            raise

    # --- workers ---

    def _ready(self, handle: Any, k: int) -> dict[str, Any]:
        ray = self.ray
        try:
            info = ray.get(handle.info.remote(), timeout=self.start_timeout)
        except ray.exceptions.GetTimeoutError:
            need = f"{self.spec.n_threads} CPUs" + (f" and {self.num_gpus:g} GPU" if self.num_gpus else "")
            raise DistributedError(
                f"worker {k} did not start within {self.start_timeout:.0f} s: the Ray cluster has no room "
                f"for a worker with {need} (use fewer --workers or --threads)"
            ) from None
        except ray.exceptions.RayError as e:
            raise DistributedError(f"worker {k} did not start: {str(e).splitlines()[0]}") from None
        if info["error"]:
            raise DistributedError(f"worker {k} on node {info['node']}: {info['error']}")
        return info

    def _replace(self, k: int, why: str) -> None:
        self.replacements += 1
        if self.replacements > MAX_REPLACEMENTS_PER_WORKER * self.n_workers:
            raise DistributedError(
                f"{self.replacements} workers lost (the last: worker {k} on node {self.nodes[k]}: {why});"
                " stopping"
            )
        if self.log is not None:
            self.log(f"worker {k} on node {self.nodes[k]} died ({why}); starting a replacement")
        with contextlib.suppress(Exception):
            self.ray.kill(self.actors[k], no_restart=True)
        handle = self._remote.remote(self.spec)
        info = self._ready(handle, k)
        if self.items_ref is not None:
            self.ray.get(handle.set_items.remote(self.items_ref))
        self.actors[k], self.nodes[k], self.pids[k] = handle, info["node"], info["pid"]

    # --- search.ChunkPool ---

    def start(self, items: Sequence[Item]) -> None:
        self.items = list(items)
        self.items_ref = self.ray.put(self.items)
        refs = {k: a.set_items.remote(self.items_ref) for k, a in enumerate(self.actors)}
        for k, ref in refs.items():
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayActorError as e:
                self._replace(k, _why(e))

    def submit(self, job: int, bias: np.ndarray, start: int, stop: int) -> None:
        if not self.idle:
            raise RuntimeError("RayPool.submit with every worker busy")
        k = self.idle.pop(0)
        self._send(_Running(k, job, np.asarray(bias, np.float32), start, stop, time.monotonic()))

    def _send(self, r: _Running) -> None:
        ref = self.actors[r.worker].score.remote(r.bias, r.start, r.stop)
        self.running[ref] = r

    def wait(self) -> tuple[int, list[Any], float]:
        ray = self.ray
        while True:
            if not self.running:
                raise RuntimeError("RayPool.wait with no job submitted")
            ready, _ = ray.wait(list(self.running), num_returns=1)
            r = self.running.pop(ready[0])
            try:
                scores = ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                self._replace(r.worker, _why(e))
                r.t0 = time.monotonic()
                self._send(r)  # the same chunk, on the replacement
                continue
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                raise DistributedError(
                    f"worker {r.worker} on node {self.nodes[r.worker]}: {str(cause).splitlines()[0]}"
                ) from None
            self.idle.append(r.worker)
            return r.job, scores, time.monotonic() - r.t0

    def close(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(a, no_restart=True)
        self.actors, self.running, self.idle = [], {}, []
        if self.owns_cluster:
            with contextlib.suppress(Exception):
                self.ray.shutdown()
            self.owns_cluster = False


def _auth_for_joining() -> None:
    """`ray start` clusters use token authentication by default since Ray 2.59, but a driver that joins one
    sends its token only with RAY_AUTH_MODE=token: set it when a token is at hand and the user chose no mode.
    (A token-mode driver joins a cluster without authentication too.)"""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    has_token = (
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()
    )
    if has_token:
        os.environ["RAY_AUTH_MODE"] = "token"


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextlib.contextmanager
def open_pool(
    spec: WorkerSpec,
    n_workers: int | None,
    *,
    address: str | None = None,
    log: Log | None = None,
) -> Iterator[RayPool]:
    """A RayPool for the duration of a search; the actors (and a local cluster) are gone afterwards."""
    pool = RayPool(spec, n_workers, address=address, log=log)
    try:
        yield pool
    finally:
        pool.close()
