"""From the engine core's per-step records to `RequestOutput`s: text, stop strings, chat parsing.

Per request it keeps an incremental detokenizer (stop strings with their `min_tokens` semantics,
see `gemma4.engine.detokenizer`), a chat stream parser when asked, and what the final output
totals (token ids, logprobs, token times). Streamed outputs carry only what is new.

A stop string ends a request here first: the final output (finish reason STOP) is cut at the
token that completed it and its usage counts only the tokens up to there; `process` returns a
`StopRequest` for the core to free the request. Records the core made for it in the meantime (when
this runs on its own thread, behind the core) are dropped. Nothing here touches the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from gemma4.chat import ChatDelta, StreamParser
from gemma4.engine.core import CoreOutput, StopRequest
from gemma4.engine.detokenizer import Decoder, IncrementalDetokenizer
from gemma4.engine.outputs import FinishedStats, RequestMetrics, RequestOutput, Usage
from gemma4.engine.request import FinishReason, Request
from gemma4.engine.sampler import TokenLogprobs


@dataclass
class _RequestState:
    """One request's text state and totals; the fields copied from its Request never change."""

    prompt_token_ids: list[int]
    arrival_time: float
    detokenizer: IncrementalDetokenizer | None
    chat_parser: StreamParser | None
    logprobs: list[TokenLogprobs] | None  # None unless the request asked for logprobs
    media_tokens: dict[str, int] = field(default_factory=dict)  # the prompt's soft tokens per modality
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class ProcessedOutputs:
    outputs: list[RequestOutput]
    stops: list[StopRequest]  # requests a stop string ended: the core must stop them


class OutputProcessor:
    """Single-threaded; `finished_stats` is replaced (never mutated), so other threads may read it."""

    def __init__(self, tokenizer: Decoder | None) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}
        self.finished_stats = FinishedStats.empty()

    def add_request(self, request: Request, parse_chat: bool) -> None:
        """Track a request before the core's first record for it arrives."""
        params = request.sampling_params
        text = self.tokenizer is not None
        self._states[request.request_id] = _RequestState(
            prompt_token_ids=request.prompt_token_ids,
            arrival_time=request.arrival_time,
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop, params.min_tokens) if text else None,
            chat_parser=StreamParser() if text and parse_chat else None,
            logprobs=[] if params.logprobs is not None else None,
        )
        for item in request.media:
            tokens = self._states[request.request_id].media_tokens
            tokens[item.features.modality] = tokens.get(item.features.modality, 0) + item.length

    def process(self, records: Iterable[CoreOutput]) -> ProcessedOutputs:
        """One output per record of a request still tracked here."""
        outputs, stops = [], []
        for record in records:
            state = self._states.get(record.request_id)
            if state is None:
                continue  # a stop string ended it here while the core sampled on
            new, logprobs, reason, stop_reason = self._take_tokens(state, record)
            if isinstance(stop_reason, str) and record.finish_reason is None:
                stops.append(StopRequest(record.request_id, stop_reason))
            outputs.append(self._output(state, record, new, logprobs, reason, stop_reason))
        return ProcessedOutputs(outputs, stops)

    @staticmethod
    def _take_tokens(
        state: _RequestState, record: CoreOutput
    ) -> tuple[list[int], list[TokenLogprobs] | None, FinishReason | None, int | str | None]:
        """Detokenize the record's tokens (a stop token is not text), cutting at a completed stop string."""
        new, reason, stop_reason = record.new_token_ids, record.finish_reason, record.stop_token
        detokenizer = state.detokenizer
        if detokenizer is not None:
            text_tokens = new[:-1] if record.stop_token is not None else new
            for i, token in enumerate(text_tokens):
                detokenizer.add_token(token)
                if detokenizer.stopped_on is not None:
                    new, reason, stop_reason = new[: i + 1], FinishReason.STOP, detokenizer.stopped_on
                    break
        logprobs = None if record.new_logprobs is None else record.new_logprobs[: len(new)]
        state.token_ids += new
        state.token_times += [record.timestamp] * len(new)
        if state.logprobs is not None and logprobs:
            state.logprobs += logprobs
        return new, logprobs, reason, stop_reason

    def _output(
        self,
        state: _RequestState,
        record: CoreOutput,
        new: list[int],
        logprobs: list[TokenLogprobs] | None,
        reason: FinishReason | None,
        stop_reason: int | str | None,
    ) -> RequestOutput:
        finished = reason is not None
        delta_text = ""
        chat_deltas: list[ChatDelta] = []
        detokenizer = state.detokenizer
        if detokenizer is not None:
            if finished and reason != FinishReason.STOP:
                detokenizer.flush()
            delta_text = detokenizer.take_delta(finished)
            if state.chat_parser is not None:
                chat_deltas = state.chat_parser.feed(delta_text) if delta_text else []
                if finished:
                    chat_deltas += state.chat_parser.finish()
        if not finished:
            return RequestOutput(record.request_id, new, delta_text, logprobs, chat_deltas)
        del self._states[record.request_id]
        times = state.token_times
        final = RequestOutput(
            request_id=record.request_id,
            delta_token_ids=new,
            delta_text=delta_text,
            delta_logprobs=logprobs,
            chat_deltas=chat_deltas,
            finished=True,
            finish_reason=reason,
            stop_reason=stop_reason,
            prompt_token_ids=state.prompt_token_ids,
            token_ids=state.token_ids,
            text=detokenizer.streamed_text if detokenizer is not None else "",
            logprobs=state.logprobs,
            usage=Usage(
                len(state.prompt_token_ids),
                len(state.token_ids),
                record.num_cached_prompt_tokens,
                image_tokens=state.media_tokens.get("image", 0),
                audio_tokens=state.media_tokens.get("audio", 0),
                video_tokens=state.media_tokens.get("video", 0),
            ),
            metrics=RequestMetrics(
                arrival_time=state.arrival_time,
                first_token_time=times[0] if times else None,
                last_token_time=times[-1] if times else None,
                inter_token_times=tuple(b - a for a, b in zip(times, times[1:])),
                num_preemptions=record.num_preemptions,
            ),
        )
        self.finished_stats = self.finished_stats.add(final, record.timestamp)
        return final
