"""An asyncio front for `LLMEngine`: requests stream their outputs while two worker threads run it.

No lock is ever held across a forward. The step thread runs only the engine core (schedule,
forward, sample); between steps it drains an inbox of commands: requests to add, aborts, and the
stops the output processor orders when a stop string ends a request. The output thread runs the
output processor (detokenize, stop strings, chat parsing) over each step's records and hands the
outputs to the requests' asyncio queues, so the next step starts without waiting for text.

`add_request` validates at once (ValueError) and `abort` only queues a command, so neither waits
for a step; `stats()` reads the snapshot the step thread publishes after each step and the output
processor's finished-request counters. A consumer that stops iterating (client gone, deadline,
cancellation) aborts its request: its blocks are freed at the next step boundary and its stream
ends with an 'abort' output. If a step or the output processing fails, every live request's stream
ends with that error instead of hanging; a failed worker (`EngineDeadError` from the core, naming
its rank) ends them at once. Once wrapped, the engine must be driven only through here, and
`shutdown` stops its workers too.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from queue import SimpleQueue
from typing import AsyncIterator, Union

from gemma4.engine.core import EngineCore, EngineDeadError, StopRequest, check_request_id
from gemma4.engine.llm_engine import LLMEngine, Prompt
from gemma4.engine.outputs import CoreStats, EngineStats, RequestOutput
from gemma4.engine.request import Request
from gemma4.engine.sampling_params import SamplingParams

_JOIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class _Add:
    """Queue a request in the core, then track it in the output processor (in that order)."""

    request: Request
    parse_chat: bool


@dataclass(frozen=True)
class _Abort:
    request_id: str


_Command = Union[_Add, _Abort, StopRequest]
_Target = tuple[asyncio.AbstractEventLoop, asyncio.Queue]
_END = object()  # the last item the step thread hands the output thread


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()  # guards the fields below; held for bookkeeping only, never across a step
        self._wake = threading.Condition(self._lock)  # the step thread waits on it for commands
        self._inbox: list[_Command] = []
        self._streams: dict[str, _Target] = {}  # every request from add_request until its final output
        self._stopped = False
        self._error: BaseException | None = None
        self._outbox: SimpleQueue[object] = SimpleQueue()  # step thread -> output thread, in order
        self._core_stats: CoreStats = engine.core.stats()  # replaced by the step thread after each step
        self._step_thread = threading.Thread(target=self._run_core, name="gemma4-engine", daemon=True)
        self._output_thread = threading.Thread(target=self._run_outputs, name="gemma4-outputs", daemon=True)
        self._step_thread.start()
        self._output_thread.start()

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
        """Queue a request (ValueError now if invalid or its id is in use) and return the iterator of its outputs."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running") from self._error
        request, chat = self.engine.make_request(
            prompt, params, request_id=request_id, priority=priority, parse_chat=parse_chat, cache_salt=cache_salt
        )
        queue: asyncio.Queue = asyncio.Queue()
        with self._wake:
            if self._error is not None or self._stopped:
                raise EngineDeadError("the engine is not running") from self._error
            check_request_id(request.request_id, self._streams)
            self._streams[request.request_id] = (asyncio.get_running_loop(), queue)
            self._inbox.append(_Add(request, chat))
            self._wake.notify()
        return self._stream(request.request_id, queue)

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
        """Abort a request (False if it is not running): its blocks are freed at the next step
        boundary and its stream ends with an 'abort' output."""
        with self._wake:
            if self._stopped or request_id not in self._streams:
                return False
            self._inbox.append(_Abort(request_id))
            self._wake.notify()
        return True

    def stats(self) -> EngineStats:
        """The core's state after its latest step (never waits for one) and the finished-request counters."""
        return EngineStats.of(self._core_stats, self.engine.output_processor.finished_stats)

    @property
    def is_running(self) -> bool:
        alive = self._step_thread.is_alive() and self._output_thread.is_alive()
        return alive and self._error is None and not self._stopped

    def shutdown(self) -> None:
        """Stop stepping (after the step in progress) and the engine's workers; requests still running
        end with EngineDeadError."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._step_thread.join(timeout=_JOIN_TIMEOUT_S)
        self._outbox.put(_END)  # ends the output thread even if the step thread is still in a forward
        self._output_thread.join(timeout=_JOIN_TIMEOUT_S)
        self._fail_all(EngineDeadError("the engine was shut down"))
        self.engine.shutdown()

    # ------------------------------------------------------------------ step thread
    def _run_core(self) -> None:
        core = self.engine.core
        try:
            while True:
                with self._wake:
                    while not (self._stopped or self._inbox or core.has_unfinished_requests()):
                        self._wake.wait()
                    if self._stopped:
                        return
                    commands, self._inbox = self._inbox, []
                for command in commands:
                    self._apply(core, command)
                records = core.step() if core.has_unfinished_requests() else []
                self._core_stats = core.stats()
                if records:
                    self._outbox.put(records)
        except BaseException as exc:  # noqa: BLE001 - every waiter must learn of it
            with self._lock:
                self._error = exc
        finally:
            self._outbox.put(_END)

    def _apply(self, core: EngineCore, command: _Command) -> None:
        if isinstance(command, _Add):
            core.add_request(command.request)
            self._outbox.put(command)  # tracked by the output processor before any record of it
        elif isinstance(command, _Abort):
            record = core.abort_request(command.request_id)
            if record is not None:
                self._outbox.put([record])
        else:
            core.stop_request(command)

    # ------------------------------------------------------------------ output thread
    def _run_outputs(self) -> None:
        processor = self.engine.output_processor
        try:
            while (item := self._outbox.get()) is not _END:
                if isinstance(item, _Add):
                    processor.add_request(item.request, item.parse_chat)
                    continue
                assert isinstance(item, list)  # one step's records
                processed = processor.process(item)
                if processed.stops:  # queued before the finals free the ids, so a reused id comes after
                    with self._wake:
                        self._inbox.extend(processed.stops)
                        self._wake.notify()
                self._deliver(processed.outputs)
        except BaseException as exc:  # noqa: BLE001 - every waiter must learn of it
            with self._lock:
                self._error = exc
        self._fail_all(self._error or EngineDeadError("the engine was shut down"))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        deliveries = []
        with self._lock:
            for output in outputs:
                target = self._streams.get(output.request_id)
                if target is not None:
                    deliveries.append((target, output))
                    if output.finished:
                        del self._streams[output.request_id]
        for target, output in deliveries:
            _put(target, output)

    def _fail_all(self, error: BaseException) -> None:
        """End every live stream with `error`; the engine takes no more requests."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
            targets = list(self._streams.values())
            self._streams.clear()
        for target in targets:
            _put(target, error)


def _put(target: _Target, item: object) -> None:
    """Hand an item to a request's queue on its event loop; a closed loop has no reader left."""
    loop, queue = target
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the loop closed in the meantime
        pass
