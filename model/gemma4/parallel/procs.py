"""A replica's ranks as local processes: spawn them, call a method on every rank, notice a dead one.

`RankProcesses(world_size, factory)` spawns one process per rank; each builds its object with
`factory(rank, init_method)` (the factory joins the process group at `init_method`, a TCP address on
the loopback) and then serves method calls sent over a pipe. `call(name, *args)` runs the method on
every rank and returns the results in rank order. A rank that raised makes `call` raise
`RankError` with its traceback; a rank that died (killed, out of memory) makes it raise `RankFailed`
at once instead of waiting forever for a collective that will never complete. This is the
engine's own multi-process executor (`gemma4.engine.executor.MultiprocExecutor`) and the gloo tests'
harness; in Ray Serve, a replica's ranks are actors instead (`gemma4_platform.ray_executor`).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

_READY, _RESULT, _ERROR, _CLOSE = "ready", "result", "error", "close"


class RankFailed(RuntimeError):
    """A rank's process is gone."""


class RankError(RuntimeError):
    """A rank raised; the message carries its traceback."""


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(conn: Connection, rank: int, init_method: str, factory: Callable[[int, str], Any], env: dict[str, str]) -> None:
    """A rank's process: build the object, then answer calls until told to close."""
    os.environ.update(env)
    try:
        target = factory(rank, init_method)
    except BaseException:
        conn.send((_ERROR, traceback.format_exc()))
        return
    conn.send((_READY, None))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message[0] == _CLOSE:
            close = getattr(target, "shutdown", None)
            if close is not None:
                close()
            conn.send((_RESULT, None))
            return
        name, args = message
        try:
            conn.send((_RESULT, getattr(target, name)(*args)))
        except BaseException:
            conn.send((_ERROR, traceback.format_exc()))


class RankProcesses:
    """`world_size` spawned processes serving calls on the object `factory(rank, init_method)` built.

    `env` is set in each child before the factory runs (e.g. `OMP_NUM_THREADS`, `CUDA_VISIBLE_DEVICES`).
    Construction returns once every rank is ready, or raises (and stops them all).
    """

    ERROR_GRACE_S = 10.0

    def __init__(
        self,
        world_size: int,
        factory: Callable[[int, str], Any],
        *,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 300.0,
    ) -> None:
        self.world_size = world_size
        self.init_method = f"tcp://127.0.0.1:{free_loopback_port()}"
        context = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        for rank in range(world_size):
            parent, child = context.Pipe()
            proc = context.Process(
                target=_serve, args=(child, rank, self.init_method, factory, dict(env or {})), daemon=True,
                name=f"gemma4-rank{rank}",
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        try:
            self._collect(timeout_s=start_timeout_s)
        except BaseException:
            self.kill()
            raise

    def call(self, name: str, *args: Any, timeout_s: float | None = None) -> list[Any]:
        """Run `name(*args)` on every rank; the results in rank order."""
        for rank, conn in enumerate(self._conns):
            try:
                conn.send((name, args))
            except (BrokenPipeError, ConnectionResetError, OSError):
                raise RankFailed(f"rank {rank} of {self.world_size} is gone (exit code {self._procs[rank].exitcode})") from None
        return self._collect(timeout_s)

    def _collect(self, timeout_s: float | None) -> list[Any]:
        """One answer per rank; a rank that dies ends the wait for all. One that raised is reported once
        every other rank has answered (so no stale answer is left in a pipe), or, if some have not within
        `ERROR_GRACE_S` (blocked in a collective the failed rank never joined), once all are killed."""
        results: dict[int, Any] = {}
        errors: list[str] = []
        waiting = dict(enumerate(self._conns))
        while waiting:
            sentinels = {self._procs[r].sentinel: r for r in waiting}
            ready = wait([*waiting.values(), *sentinels], timeout=self.ERROR_GRACE_S if errors else timeout_s)
            if not ready and errors:
                self.kill()
                raise RankError("\n".join(errors) + f"\nranks {sorted(waiting)} were stuck after it and are stopped")
            if not ready:
                raise RankFailed(f"ranks {sorted(waiting)} did not answer within {timeout_s} s")
            for item in ready:
                if item in sentinels:
                    rank = sentinels[item]
                    if rank in waiting and not waiting[rank].poll():
                        raise RankFailed(f"rank {rank} of {self.world_size} died")
                    continue
                rank = next(r for r, c in waiting.items() if c is item)
                try:
                    kind, value = item.recv()
                except (EOFError, ConnectionResetError, OSError):
                    raise RankFailed(f"rank {rank} of {self.world_size} died") from None
                del waiting[rank]
                if kind == _ERROR:
                    errors.append(f"rank {rank} failed:\n{value}")
                results[rank] = value
        if errors:
            raise RankError("\n".join(errors))
        return [results[r] for r in range(self.world_size)]

    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def kill(self, rank: int | None = None) -> None:
        """Kill one rank (tests of worker failure) or all of them."""
        for r, proc in enumerate(self._procs):
            if rank is None or r == rank:
                proc.kill()
        if rank is None:
            for proc in self._procs:
                proc.join(timeout=10)

    def close(self, timeout_s: float = 30.0) -> None:
        """Ask every rank to shut down, then make sure each process is gone."""
        for conn in self._conns:
            try:
                conn.send((_CLOSE,))
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        for conn in self._conns:
            conn.close()
