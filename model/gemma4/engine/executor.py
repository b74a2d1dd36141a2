"""Executors: how the engine core reaches its workers, one per rank.

An `Executor` calls a `Worker` method on every rank (`call_all`) and answers the core's few
questions in terms of it: the KV blocks every rank can hold, a step's sampled tokens (rank 0's),
the expert load and placements. `UniprocExecutor` holds one worker in the core's process (the
default single-device replica); `MultiprocExecutor` spawns one local process per rank
(`gemma4.parallel.procs`), the engine's own way to run a multi-device replica (`LLM(...,
tensor_parallel_size=2)`) and the gloo tests'. Ray Serve replicas use actors instead
(`gemma4_platform`), behind the same interface. A rank that dies or raises fails the call with
`WorkerFailure`, which names it.
"""

from __future__ import annotations

import functools
import os
import threading
from abc import ABC, abstractmethod
from typing import Any, Mapping

import torch

from gemma4.backends import backend_of
from gemma4.config import Gemma4Config, load_config
from gemma4.engine.worker import Worker, WorkerConfig
from gemma4.engine.worker_step import StepOutput, WorkerStep
from gemma4.parallel.placement import ExpertPlacement
from gemma4.parallel.procs import RankError, RankFailed, RankProcesses

_SHUTDOWN_WAIT_S = 30.0  # how long shutdown waits for a call in flight before killing the workers


class WorkerFailure(RuntimeError):
    """A rank's worker is gone or raised; the replica cannot take another step."""


class Executor(ABC):
    """The replica's ranks as the engine core sees them."""

    config: Gemma4Config
    world_size: int

    @abstractmethod
    def call_all(self, method: str, *args: Any) -> list[Any]:
        """`Worker.<method>(*args)` on every rank; the results in rank order (WorkerFailure if a rank fails)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the workers (idempotent)."""

    def num_kv_blocks(self) -> dict[str, int]:
        """Blocks per cache group every rank can hold (the core's block ids index every rank's pools)."""
        per_rank = self.call_all("num_kv_blocks")
        return {name: min(blocks[name] for blocks in per_rank) for name in per_rank[0]}

    def init_cache(self, num_blocks: Mapping[str, int]) -> None:
        self.call_all("init_cache", dict(num_blocks))

    def execute(self, step: WorkerStep) -> StepOutput:
        """Run a step on every rank; rank 0's output (its sampled results)."""
        return self.call_all("execute", step)[0]

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert so far, per MoE layer (rank 0's count: routing is replicated)."""
        return self.call_all("expert_load")[0]

    def expert_placements(self) -> dict[int, ExpertPlacement]:
        return self.call_all("expert_placements")[0]

    def apply_expert_placements(self, placements: Mapping[int, ExpertPlacement]) -> None:
        self.call_all("apply_expert_placements", dict(placements))


class UniprocExecutor(Executor):
    """One worker in this process; its exceptions propagate unchanged (nothing else is lost with it)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.config = worker.config
        self.world_size = 1

    def call_all(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def shutdown(self) -> None:
        self.worker.shutdown()


class MultiprocExecutor(Executor):
    """One spawned local process per rank (each on its own GPU on CUDA and ROCm, `OMP_NUM_THREADS`
    a share of the host's cores).

    Calls are serialized (the step thread and a metrics reader may both call). After a failure every
    rank is killed, so none stays blocked in a collective, and later calls fail at once.
    """

    def __init__(self, config: WorkerConfig, *, start_timeout_s: float = 300.0) -> None:
        self.config = load_config(config.checkpoint)
        config.engine_args.check_model(self.config.text)
        self.world_size = config.layout.world_size
        threads = max(1, (os.cpu_count() or 1) // self.world_size)
        self._lock = threading.Lock()
        self._failure: WorkerFailure | None = None
        try:
            self._procs = RankProcesses(
                self.world_size,
                functools.partial(_start_worker, config, threads),
                env={"OMP_NUM_THREADS": str(threads)},
                start_timeout_s=start_timeout_s,
            )
        except (RankFailed, RankError) as exc:
            raise WorkerFailure(f"the replica's workers did not start: {exc}") from exc

    @property
    def processes(self) -> RankProcesses:
        """The rank processes (tests kill one to check failure handling)."""
        return self._procs

    def call_all(self, method: str, *args: Any) -> list[Any]:
        with self._lock:
            if self._failure is not None:
                raise WorkerFailure(f"the replica's workers failed earlier: {self._failure}")
            try:
                return self._procs.call(method, *args)
            except (RankFailed, RankError) as exc:
                self._failure = WorkerFailure(f"worker {exc}")
                self._procs.kill()
                raise self._failure from exc

    def shutdown(self) -> None:
        if not self._lock.acquire(timeout=_SHUTDOWN_WAIT_S):
            self._procs.kill()  # a call is stuck in the workers: ending them ends it
            return
        try:
            if self._failure is None:
                self._failure = WorkerFailure("the workers were shut down")
                self._procs.close()
            else:
                self._procs.kill()
        finally:
            self._lock.release()


def rank_device(device: str, rank: int) -> str:
    """The device rank `rank` of a local replica uses: GPU `rank` (from the given index on), else `device`."""
    parsed = torch.device(device)
    if backend_of(parsed).name in ("cuda", "rocm"):
        return str(torch.device(parsed.type, (parsed.index or 0) + rank))
    return device


def _start_worker(config: WorkerConfig, threads: int, rank: int, init_method: str) -> Worker:
    """A rank process's worker (torch was imported before the environment was set: threads explicitly)."""
    torch.set_num_threads(threads)
    return Worker(config.on_device(rank_device(config.device, rank)), rank, init_method)
