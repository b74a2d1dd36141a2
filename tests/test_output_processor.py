"""The engine core / output processor split: delta outputs, stop strings across the split, and an
AsyncEngine whose add_request, abort and stats never wait for a step."""

from __future__ import annotations

import asyncio
import pickle
import threading

import pytest
import torch

from engine_fixtures import BLOCK_SIZE, mixed_prompts, write_checkpoint
from gemma4 import LLM, AsyncEngine, ChatPrompt, SamplingParams, chat
from gemma4.engine import EngineDeadError, FinishReason, RequestOutput, Usage
from gemma4.engine.outputs import RequestMetrics
from gemma4.tokenizer import load_tokenizer

LONG = 200
SAFETY_RELEASE_S = 60.0  # a blocked step is released after this anyway, so a regression fails instead of hanging


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return write_checkpoint("e2b", tmp_path_factory.mktemp("e2b"))[1]


def make_llm(checkpoint) -> LLM:
    return LLM(checkpoint, dtype=torch.float32, block_size=BLOCK_SIZE, max_num_batched_tokens=32, num_kv_blocks=160)


@pytest.fixture(scope="module")
def free(checkpoint) -> RequestOutput:
    """What the stop tests cut: a greedy run of PROMPT without stops."""
    return make_llm(checkpoint).generate([PROMPT], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]


PROMPT = mixed_prompts(2)[1]


@pytest.fixture(scope="module")
def stop(checkpoint, free) -> tuple[str, int]:
    """A stop string that one output token of `free` spells in plain characters, and the output length completing it."""
    decode = load_tokenizer(checkpoint).decode
    for k, token in enumerate(free.token_ids[1:], start=2):
        piece = decode([token])
        if len(piece) >= 2 and piece.isprintable() and "\ufffd" not in piece and piece not in decode(free.token_ids[: k - 1]):
            if decode(free.token_ids[:k]).endswith(piece):
                return piece, k
    raise AssertionError(f"no usable stop string in {free.text!r}")


def requests(free: RequestOutput, stop: tuple[str, int], long_tokens: int) -> dict[str, tuple[object, SamplingParams]]:
    """Several requests at once: long with logprobs, a stop string after min_tokens, chat, a stop token."""
    cut = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop[0], "\x00never"], min_tokens=1, logprobs=0)
    return {
        "long": (PROMPT, SamplingParams(temperature=0, max_tokens=long_tokens, ignore_eos=True, logprobs=2)),
        "stop": (PROMPT, cut),
        "chat": (
            ChatPrompt([{"role": "user", "content": "Hello there"}], thinking=True),
            SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
        ),
        "token": (PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[free.token_ids[5]])),
    }


def added_up(outputs: list[RequestOutput]) -> RequestOutput:
    """Check one request's outputs: only the last is final, only it holds totals, and the deltas add up to them."""
    *streamed, final = outputs
    assert final.finished and not any(o.finished for o in streamed)
    for o in streamed:
        assert (o.prompt_token_ids, o.token_ids, o.text, o.logprobs, o.usage, o.metrics) == (None,) * 6
        assert (o.finish_reason, o.stop_reason) == (None, None)
        assert len(o.delta_token_ids) == 1  # one token per step, never a repeat of earlier ones
    assert [t for o in outputs for t in o.delta_token_ids] == final.token_ids
    assert "".join(o.delta_text for o in outputs) == final.text
    if final.logprobs is None:
        assert all(o.delta_logprobs is None for o in outputs)
    else:
        assert [lp for o in outputs for lp in o.delta_logprobs] == final.logprobs
        assert [lp.token_id for lp in final.logprobs] == final.token_ids
    assert final.usage.completion_tokens == len(final.token_ids)
    assert len(final.metrics.inter_token_times) == len(final.token_ids) - 1
    return final


def check_finals(finals: dict[str, RequestOutput], free: RequestOutput, stop: tuple[str, int], long_tokens: int) -> None:
    cut, (string, completes) = finals["stop"], stop
    assert (cut.finish_reason, cut.stop_reason) == (FinishReason.STOP, string)
    assert cut.text == free.text[: free.text.index(string)]
    assert cut.token_ids == free.token_ids[:completes] and completes > 1  # after min_tokens=1
    assert len(cut.logprobs) == len(cut.token_ids)
    stop_id = free.token_ids[5]
    token = finals["token"]
    assert (token.finish_reason, token.stop_reason) == (FinishReason.STOP, stop_id)
    assert token.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    assert finals["chat"].logprobs is None
    long = finals["long"]
    assert long.finish_reason == FinishReason.LENGTH and len(long.token_ids) == long_tokens
    assert long.token_ids[:24] == free.token_ids


def test_streamed_deltas_add_up_to_the_final_output_and_stay_small(checkpoint, free, stop) -> None:
    llm = make_llm(checkpoint)
    engine = llm.engine
    for request_id, (prompt, params) in requests(free, stop, LONG).items():
        engine.add_request(prompt, params, request_id=request_id)
    outputs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    finals = {request_id: added_up(outs) for request_id, outs in outputs.items()}
    check_finals(finals, free, stop, LONG)
    chat_deltas = [d for o in outputs["chat"] for d in o.chat_deltas]
    parsed = chat.parse(finals["chat"].text)
    assert "".join(d.text for d in chat_deltas if d.kind == "content") == parsed.content
    assert "".join(d.text for d in chat_deltas if d.kind == "thinking") == (parsed.thinking or "")
    # The long generation's deltas carry each generated token once; a streamed output's size does not grow.
    long = outputs["long"]
    assert sum(len(o.delta_token_ids) for o in long) == LONG == finals["long"].usage.completion_tokens
    sizes = [len(pickle.dumps(o)) for o in long[:-1]]
    assert max(sizes[-20:]) < 2 * min(sizes[:20])
    assert all(u.used_blocks == 0 for u in engine.kv.usage())


def test_async_engine_streams_the_same_deltas(checkpoint, free, stop) -> None:
    long_tokens = 40
    expected = make_llm(checkpoint).generate(
        [prompt for prompt, _ in requests(free, stop, long_tokens).values()],
        [params for _, params in requests(free, stop, long_tokens).values()],
    )
    front = AsyncEngine(make_llm(checkpoint).engine)

    async def collect(request_id: str, prompt, params) -> list[RequestOutput]:
        stream = await front.add_request(prompt, params, request_id=request_id)
        return [out async for out in stream]

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(rid, *r) for rid, r in requests(free, stop, long_tokens).items()))

    try:
        streams = asyncio.run(asyncio.wait_for(main(), timeout=120))
    finally:
        front.shutdown()
    finals = {outs[-1].request_id: added_up(outs) for outs in streams}
    check_finals(finals, free, stop, long_tokens)
    for final, want in zip(finals.values(), expected):
        assert (final.token_ids, final.text, final.finish_reason, final.stop_reason) == (
            want.token_ids, want.text, want.finish_reason, want.stop_reason
        )
    stats = front.stats()
    assert stats.finished_requests["stop"] == 2 and stats.finished_requests["length"] == 2
    assert stats.num_running == 0 and all(g.used_blocks == 0 for g in stats.kv_cache)


def test_a_stop_string_found_behind_the_core_stops_the_request_there(checkpoint, free, stop) -> None:
    """The output processor may run behind the core (AsyncEngine): tokens sampled after the stop string
    completed are dropped, usage counts the cut tokens, and stopping frees the blocks."""
    engine = make_llm(checkpoint).engine
    core, processor = engine.core, engine.output_processor
    stop, completes = stop
    engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]), request_id="s")
    records = []
    while len(records) < completes + 2:
        records += core.step()  # the core samples on past the stop string: it knows nothing of text
    assert "s" in core.requests and any(u.used_blocks for u in engine.kv.usage())
    processed = processor.process(records)
    (final,) = [o for o in processed.outputs if o.finished]
    kept = len(final.token_ids)
    assert processed.outputs[-1] is final and len(processed.outputs) == kept  # later records were dropped
    assert kept == completes and final.token_ids == free.token_ids[:kept]
    assert (final.finish_reason, final.stop_reason, final.text) == (FinishReason.STOP, stop, free.text[: free.text.index(stop)])
    assert final.usage == Usage(len(PROMPT), kept, 0)
    assert [(s.request_id, s.stop_string) for s in processed.stops] == [("s", stop)]
    core.stop_request(processed.stops[0])
    assert "s" not in core.requests and not engine.has_unfinished_requests()
    assert all(u.used_blocks == 0 for u in engine.kv.usage())
    stats = engine.stats()
    assert stats.finished_requests["stop"] == 1 and stats.inter_token_latency.count == kept - 1
    assert stats.generation_tokens_total == len(records)  # what the model sampled, dropped tokens included
    assert core.step() == [] and processor.process([]).outputs == []


def blocking_first_step(engine) -> tuple[threading.Event, threading.Event, threading.Event]:
    """Make the engine's next forward wait until released; returns (entered, release, resumed)."""
    entered, release, resumed = threading.Event(), threading.Event(), threading.Event()
    execute = engine.runner.execute

    def execute_after_release(batch, kv, **kwargs):
        if not entered.is_set():
            entered.set()
            release.wait(SAFETY_RELEASE_S)
            resumed.set()
        return execute(batch, kv, **kwargs)

    engine.runner.execute = execute_after_release
    return entered, release, resumed


def test_add_request_abort_and_stats_return_while_a_step_runs(checkpoint) -> None:
    llm = make_llm(checkpoint)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = llm.generate([[5, 6, 7]], params)[0].token_ids
    entered, release, resumed = blocking_first_step(llm.engine)
    front = AsyncEngine(llm.engine)

    async def main() -> None:
        long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
        first = await front.add_request(PROMPT, long, request_id="first")
        assert await asyncio.to_thread(entered.wait, SAFETY_RELEASE_S)  # the step thread is inside the forward
        second = await asyncio.wait_for(front.add_request([5, 6, 7], params, request_id="second"), timeout=10)
        with pytest.raises(ValueError, match="^request_id 'second' is already in use"):
            await asyncio.wait_for(front.add_request([5, 6], params, request_id="second"), timeout=10)
        stats = front.stats()
        assert front.abort("first")
        assert not resumed.is_set()  # all of the above returned while the step was still blocked
        assert stats.num_running == 0  # the snapshot from before the blocked step
        release.set()
        aborted = [out async for out in first]  # aborted at the end of the step that was blocked
        assert [len(o.delta_token_ids) for o in aborted] == [1, 0] and aborted[-1].finish_reason == FinishReason.ABORT
        assert added_up(aborted).usage.completion_tokens == 1
        outs = [out async for out in second]
        assert added_up(outs).token_ids == expected
        while front.stats().num_running or front.stats().num_waiting:
            await asyncio.sleep(0.01)  # the last snapshot is published after the last step
        assert all(g.used_blocks == 0 for g in front.stats().kv_cache)
        assert not front.abort("second")  # finished: nothing to abort

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=120))
    finally:
        release.set()
        front.shutdown()


def test_a_failed_step_ends_every_stream_and_shutdown_ends_the_rest(checkpoint) -> None:
    llm = make_llm(checkpoint)
    engine = llm.engine
    entered, release, _ = blocking_first_step(engine)
    blocked = engine.runner.execute

    def fail_once_released(batch, kv, **kwargs):
        blocked(batch, kv, **kwargs)
        raise RuntimeError("device lost")

    engine.runner.execute = fail_once_released
    front = AsyncEngine(engine)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)

    async def main() -> None:
        streams = [await front.add_request(p, params) for p in mixed_prompts(3)]
        assert await asyncio.to_thread(entered.wait, SAFETY_RELEASE_S)
        release.set()
        for stream in streams:
            with pytest.raises(EngineDeadError, match="device lost"):
                async for _ in stream:
                    pass
        assert not front.is_running
        with pytest.raises(EngineDeadError):
            await front.add_request([5, 6], params)

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=120))
    finally:
        release.set()
        front.shutdown()

    running = AsyncEngine(make_llm(checkpoint).engine)

    async def shut_down_while_running() -> None:
        stream = await running.add_request([5, 6, 7], params)
        await anext(stream)
        await asyncio.to_thread(running.shutdown)  # stops after the step in progress
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass
        assert not running.is_running

    asyncio.run(asyncio.wait_for(shut_down_while_running(), timeout=120))


def test_only_final_outputs_carry_totals() -> None:
    totals = dict(
        prompt_token_ids=[1], token_ids=[2], text="x", usage=Usage(1, 1), metrics=RequestMetrics(0.0, 1.0, 1.0, (), 0)
    )
    RequestOutput("r", [2], "x", finished=True, finish_reason=FinishReason.LENGTH, **totals)
    with pytest.raises(ValueError, match="only the final output carries totals"):
        RequestOutput("r", [2], "x", text="x")
    with pytest.raises(ValueError, match="only the final output carries totals"):
        RequestOutput("r", [2], finish_reason=FinishReason.STOP)
    with pytest.raises(ValueError, match="missing: \\['usage'\\]"):
        RequestOutput("r", [2], finished=True, finish_reason=FinishReason.STOP, **{**totals, "usage": None})
