"""A replica's ranks as Ray actors in the replica's own placement group.

A multi-device replica is a Serve replica whose placement group holds one bundle for itself (the
engine core: scheduler, KV manager, output processing; no device) and one bundle per rank, packed
on one node (`gemma4_platform.graph.replica_resources`). `RayExecutor` starts one `RankActor` in
each rank bundle; each wraps an engine `Worker` (the model shard of its rank). The process group
meets at rank 0's node address on a port free there. A rank that dies fails the call in progress at
once with `WorkerFailure` naming it (the other ranks may be blocked in a collective that will never
complete), so the engine stops, the replica's streams end with UNAVAILABLE and its health check
fails, and Ray Serve replaces it; the rank actors share the replica actor's fate.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gemma4.config import load_config
from gemma4.engine.executor import Executor, WorkerFailure
from gemma4.engine.worker import Worker, WorkerConfig

logger = logging.getLogger(__name__)
_HEALTH = "health"  # the actors' concurrency group for pings: answered while a step runs


@ray.remote(concurrency_groups={_HEALTH: 1})
class RankActor:
    """One rank: joins the process group and then runs the worker's methods, one call at a time."""

    def __init__(self, num_threads: int) -> None:
        import torch

        if num_threads >= 1:
            torch.set_num_threads(num_threads)
        self.worker: Worker | None = None

    def rendezvous(self) -> str:
        """A TCP address for the process group on this actor's node (asked of rank 0)."""
        host = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return f"tcp://{host}:{sock.getsockname()[1]}"

    def start(self, config: WorkerConfig, rank: int, init_method: str) -> None:
        self.worker = Worker(config, rank, init_method)

    def call(self, method: str, args: tuple[Any, ...]) -> Any:
        assert self.worker is not None, "start() first"
        return getattr(self.worker, method)(*args)

    @ray.method(concurrency_group=_HEALTH)
    def ping(self) -> bool:
        return True


class RayExecutor(Executor):
    """`config.layout.world_size` rank actors in the current placement group (bundle `rank + 1`), named
    `{name}-rank{rank}` (operators and tests find a replica's ranks by name).

    Must run inside a Serve replica deployed with `replica_resources`' placement group.
    """

    def __init__(self, config: WorkerConfig, name: str) -> None:
        self.config = load_config(config.checkpoint)
        self.world_size = config.layout.world_size
        group = ray.util.get_current_placement_group()
        if group is None or len(group.bundle_specs) < self.world_size + 1:
            raise RuntimeError(
                f"a replica of {self.world_size} ranks runs in a placement group of {self.world_size + 1} bundles "
                "(one for the replica, one per rank): deploy it with gemma4_platform.graph.build_app"
            )
        self._actors = []
        for rank in range(self.world_size):
            bundle = group.bundle_specs[rank + 1]
            self._actors.append(
                RankActor.options(
                    name=f"{name}-rank{rank}",
                    num_cpus=bundle.get("CPU", 0),
                    num_gpus=bundle.get("GPU", 0),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=group, placement_group_bundle_index=rank + 1
                    ),
                ).remote(int(bundle.get("CPU", 1)))
            )
        try:
            init_method = self._gather([self._actors[0].rendezvous.remote()])[0]
            self._gather([actor.start.remote(config, rank, init_method) for rank, actor in enumerate(self._actors)])
        except BaseException:
            self.shutdown()
            raise

    @property
    def actors(self) -> list[Any]:
        """The rank actors, in rank order (tests kill one to check failure handling)."""
        return list(self._actors)

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """Run the worker method on every rank (its arguments serialized once); the results in rank order."""
        shared = ray.put(args)
        return self._gather([actor.call.remote(method, shared) for actor in self._actors])

    def _gather(self, refs: list[Any]) -> list[Any]:
        """Every result, failing at the first rank that died or raised instead of waiting on the others."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            rank = rank_of[ready[0]]
            try:
                ray.get(ready[0])
            except RayActorError as exc:
                raise WorkerFailure(f"rank {rank} of {self.world_size} died") from exc
            except RayTaskError as exc:
                # The message reaches clients (UNAVAILABLE): the cause in one line, its traceback in the log.
                logger.error("rank %d of %d failed:\n%s", rank, self.world_size, exc)
                cause = exc.cause
                raise WorkerFailure(f"rank {rank} of {self.world_size} failed: {type(cause).__name__}") from exc
        return ray.get(refs)

    async def check_alive(self, timeout_s: float) -> None:
        """Raise WorkerFailure unless every rank answers within `timeout_s` (the replica's health check)."""
        pings = [actor.ping.remote() for actor in self._actors]
        for rank, ping in enumerate(pings):
            try:
                await asyncio.wait_for(ping, timeout_s)
            except (RayActorError, TimeoutError) as exc:
                raise WorkerFailure(f"rank {rank} of {self.world_size} does not answer: {exc!r}") from exc

    def shutdown(self) -> None:
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
