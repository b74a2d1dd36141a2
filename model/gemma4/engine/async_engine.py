"""An asyncio front for `LLMEngine`: requests stream their outputs while a worker thread steps.

The engine steps in one background thread (model forwards would block the event loop); requests
are added and aborted from the loop under a lock, and each step's outputs are handed to the
requests' queues on the loop. A consumer that stops iterating (client gone, deadline, cancellation)
aborts its request, which frees its KV blocks at once. If a step fails, every live request's stream
ends with that error instead of hanging.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from gemma4.engine.llm_engine import LLMEngine, Prompt
from gemma4.engine.outputs import EngineStats, RequestOutput
from gemma4.engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine's step loop failed or was shut down; the request cannot complete."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gemma4-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    async def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
        parse_chat: bool | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request (ValueError now if invalid) and return the iterator of its outputs."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._work:
            if self._error is not None or self._stopped:
                raise EngineDeadError("the engine is not running") from self._error
            rid = self.engine.add_request(
                prompt, params, request_id=request_id, priority=priority, parse_chat=parse_chat, cache_salt=cache_salt
            )
            self._queues[rid] = (loop, queue)
            self._work.notify()
        return self._stream(rid, queue)

    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"request {request_id} failed: {item}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> bool:
        """Abort a request now (frees its KV blocks); its stream ends with an 'abort' output."""
        with self._work:
            output = self.engine.abort_request(request_id)
            target = self._queues.pop(request_id, None)
        if output is not None and target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, output)
        return output is not None

    def stats(self) -> EngineStats:
        with self._lock:
            return self.engine.stats()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._stopped

    def shutdown(self) -> None:
        """Stop stepping; requests still running end with EngineDeadError."""
        with self._work:
            self._stopped = True
            self._work.notify()
        self._thread.join(timeout=30)
        self._fail_all(EngineDeadError("the engine was shut down"))

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        while True:
            with self._work:
                while not self._stopped and not self.engine.has_unfinished_requests():
                    self._work.wait()
                if self._stopped:
                    return
                try:
                    outputs = self.engine.step()
                except BaseException as exc:  # noqa: BLE001 - every waiter must learn of it
                    self._error = exc
                    break
                deliveries = []
                for output in outputs:
                    target = self._queues.get(output.request_id)
                    if target is not None:
                        deliveries.append((target, output))
                        if output.finished:
                            del self._queues[output.request_id]
            for (loop, queue), output in deliveries:
                loop.call_soon_threadsafe(queue.put_nowait, output)
        self._fail_all(self._error)

    def _fail_all(self, error: BaseException | None) -> None:
        with self._lock:
            targets = list(self._queues.values())
            self._queues.clear()
        for loop, queue in targets:
            if not loop.is_closed():
                loop.call_soon_threadsafe(queue.put_nowait, error or EngineDeadError("engine stopped"))
