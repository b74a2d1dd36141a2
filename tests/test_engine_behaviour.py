"""Engine behaviour: block accounting, sampling, stop strings, aborts, validation, streaming."""

from __future__ import annotations

import asyncio
import math
from dataclasses import fields

import pytest
import torch

from engine_fixtures import BLOCK_SIZE, mixed_prompts, write_checkpoint
from gemma4 import LLM, AsyncEngine, ChatPrompt, SamplingParams, chat
from gemma4.engine import EngineStats, FinishReason
from gemma4.engine.detokenizer import IncrementalDetokenizer
from gemma4.engine.kv_cache_manager import NULL_BLOCK
from gemma4.engine.outputs import LATENCY_BUCKET_BOUNDS, LatencyHistogram
from gemma4.engine.request import Request
from gemma4.engine.sampler import Sampler
from gemma4.engine.llm_engine import LLMEngine
from gemma4.tokenizer import load_tokenizer
from gemma4_platform.errors import invalid_from_value_error
from reference_models import SLIDING_WINDOW


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return write_checkpoint("e2b", tmp_path_factory.mktemp("e2b"))[1]


@pytest.fixture
def llm(checkpoint) -> LLM:
    return LLM(checkpoint, dtype=torch.float32, block_size=BLOCK_SIZE, max_num_batched_tokens=32, num_kv_blocks=128)


def run_to_completion(engine) -> dict:
    final = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            return final
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    raise AssertionError("engine did not finish")


def test_block_accounting(llm: LLM) -> None:
    engine = llm.engine
    cache = engine.runner.cache
    spec = engine.model.text_config
    stored = {layer for group in cache.groups for layer in group.layers}
    assert stored == {s.index for s in spec.layers if not s.shares_kv}  # KV-sharing layers hold nothing
    assert all(s.shares_kv for s in spec.layers[spec.first_kv_shared_layer :])

    for i, prompt in enumerate(mixed_prompts(8)):
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), request_id=f"r{i}")
    limit = math.ceil(SLIDING_WINDOW / BLOCK_SIZE) + 1
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        for request in engine.scheduler.running:
            if request.num_computed_tokens >= request.num_prompt_tokens:  # after prefill
                held = engine.kv.held_blocks(request.request_id)
                assert held["sliding"] <= limit
                assert held["full"] == math.ceil(request.num_computed_tokens / BLOCK_SIZE) or held["full"] == math.ceil(
                    (request.num_computed_tokens + 1) / BLOCK_SIZE
                )
                checked += 1
    assert checked > 20
    assert all(u.used_blocks == 0 for u in engine.kv.usage())


def test_null_block_row_is_never_written_even_when_every_block_is_reused(checkpoint) -> None:
    blocks = 24
    llm = LLM(checkpoint, dtype=torch.float32, block_size=BLOCK_SIZE, max_num_batched_tokens=32, num_kv_blocks=blocks)
    engine = llm.engine
    llm.generate(mixed_prompts(8), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert all(pool.evictions > 0 for pool in engine.kv.pools)  # demand exceeded each pool: blocks were reused
    cache = engine.runner.cache
    for tensor in [*cache.values, *(k for k in cache.keys if k is not None)]:
        assert tensor.shape[1] == blocks + 1  # the usable blocks plus the null block
        assert torch.all(tensor[:, NULL_BLOCK] == 0)
        assert all(torch.any(tensor[:, b] != 0) for b in range(1, blocks + 1))  # every usable block was written
    assert all(u.num_blocks == blocks and u.used_blocks == 0 for u in engine.kv.usage())


def test_cache_salt_separates_prefix_cache_namespaces(llm: LLM) -> None:
    engine = llm.engine
    prompt = mixed_prompts(1)[0]
    hit = (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    def cached(cache_salt: str | None) -> int:
        engine.add_request(prompt, params, cache_salt=cache_salt)
        (out,) = run_to_completion(engine).values()
        return out.usage.cached_prompt_tokens

    assert [cached("tenant-a"), cached("tenant-a"), cached("tenant-b"), cached(None), cached(None)] == [0, hit, 0, 0, hit]

    async def through_async_engine() -> int:
        stream = await front.add_request(prompt, params, cache_salt="tenant-b")
        return [out async for out in stream][-1].usage.cached_prompt_tokens

    front = AsyncEngine(engine)
    try:
        assert asyncio.run(asyncio.wait_for(through_async_engine(), timeout=60)) == hit
    finally:
        front.shutdown()


@pytest.mark.parametrize("cache_salt", [5, b"bytes", "x" * 257])
def test_invalid_cache_salt_is_rejected(llm: LLM, cache_salt) -> None:
    with pytest.raises(ValueError, match="^cache_salt must be a string of at most 256 characters"):
        llm.engine.add_request([5, 6, 7], SamplingParams(), cache_salt=cache_salt)
    assert not llm.engine.has_unfinished_requests()


def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    prompts = mixed_prompts(6)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate([prompts[0]], params)[0].token_ids
    batched = llm.generate(prompts, params)[0].token_ids
    assert alone == batched
    other_seed = llm.generate([prompts[0]], SamplingParams(temperature=1.0, max_tokens=12, seed=99, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_sampling_filters_that_leave_one_token_are_greedy(llm: LLM) -> None:
    prompt = mixed_prompts(1)[0]
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].token_ids
    for params in (
        SamplingParams(temperature=0.7, top_k=1, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=0, top_p=1e-6, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=1.0, max_tokens=8, ignore_eos=True),
    ):
        assert llm.generate([prompt], params)[0].token_ids == greedy


def test_logprobs(llm: LLM) -> None:
    prompt = mixed_prompts(1)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 4
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and len(lp.top) == 3
        assert max(lp.top, key=lp.top.get) == token  # greedy picks the top raw logprob
        assert lp.logprob == pytest.approx(max(lp.top.values()))


@pytest.mark.parametrize(
    "penalties,expected",
    [
        ({}, [1.0, 2.0, -1.0, 4.0, 0.5, 3.0]),
        # Over prompt + output tokens {1, 2, 3}: positive logits divided, negative ones multiplied.
        ({"repetition_penalty": 2.0}, [1.0, 1.0, -2.0, 2.0, 0.5, 3.0]),
        # Over output tokens only, times their count (token 2 once, token 3 twice); prompt token 1 untouched.
        ({"frequency_penalty": 0.5}, [1.0, 2.0, -1.5, 3.0, 0.5, 3.0]),
        ({"presence_penalty": 0.25}, [1.0, 2.0, -1.25, 3.75, 0.5, 3.0]),
        ({"presence_penalty": -1.0}, [1.0, 2.0, 0.0, 5.0, 0.5, 3.0]),
        # Repetition first, then frequency and presence.
        ({"repetition_penalty": 2.0, "frequency_penalty": 0.5, "presence_penalty": 0.25}, [1.0, 1.0, -2.75, 0.75, 0.5, 3.0]),
    ],
)
def test_penalties_change_exactly_the_logits_they_should(penalties: dict, expected: list[float]) -> None:
    logits = torch.tensor([1.0, 2.0, -1.0, 4.0, 0.5, 3.0])
    request = Request("p", [1, 2], SamplingParams(temperature=0, **penalties), stop_token_ids=frozenset())
    for token in (2, 3, 3):
        request.append_token(token)
    assert Sampler.processed_logits(logits, request).tolist() == pytest.approx(expected)
    assert logits.tolist() == [1.0, 2.0, -1.0, 4.0, 0.5, 3.0]  # the model's logits are left alone


def test_each_penalty_changes_a_greedy_continuation_that_repeats(llm: LLM) -> None:
    prompt = mixed_prompts(1)[0]
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].token_ids
    first_repeat = next(i for i, t in enumerate(plain) if t in plain[:i])  # this continuation repeats a token
    for penalty in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **{penalty: 2.0})
        penalised = llm.generate([prompt], params)[0].token_ids
        assert penalised[: first_repeat + 1] != plain[: first_repeat + 1], penalty
        assert len(set(penalised)) == len(penalised), penalty  # a penalty of 2 outweighs these logit gaps
        if penalty != "repetition_penalty":  # output-only penalties leave the tokens before any repeat alone
            assert penalised[:first_repeat] == plain[:first_repeat], penalty


def test_stop_strings_are_cut_exactly_also_while_streaming(llm: LLM) -> None:
    prompt = mixed_prompts(2)[1]
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    text = full.text
    assert len(text) > 12
    stop = text[6:9]
    cut = text[: text.index(stop)]
    engine = llm.engine
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "\x00never"]), request_id="s")
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.delta_text)
            final = out
    assert final.finished and final.finish_reason == FinishReason.STOP and final.stop_reason == stop
    assert final.text == cut and "".join(deltas) == cut


def test_stop_strings_count_only_after_min_tokens_and_never_cut_running_text(llm: LLM) -> None:
    prompt = mixed_prompts(6)[5]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].token_ids
    decode = llm.tokenizer.decode
    texts = [decode(free[:k]) for k in range(len(free) + 1)]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # this output decodes the same token by token
    text = texts[-1]
    stop = next(p for p in map(decode, ([t] for t in free)) if len(p) >= 2 and text.count(p) == 2)
    first, second = text.index(stop), text.index(stop, text.index(stop) + 1)
    first_k = next(k for k, t in enumerate(texts) if stop in t)  # the output token completing the first match
    second_k = next(k for k, t in enumerate(texts) if t.count(stop) == 2)
    engine = llm.engine

    def run(min_tokens: int):
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], min_tokens=min_tokens)
        engine.add_request(prompt, params, request_id="m")
        streamed, final = "", None
        while engine.has_unfinished_requests():
            for out in engine.step():
                streamed += out.delta_text
                assert out.text == (streamed if out.finished else None)  # the final text is exactly what was streamed
                final = out
        return final

    # A match completed by token min_tokens + 1 or later stops the request; one completed earlier does not.
    for min_tokens, ids, cut in [
        (first_k - 1, free[:first_k], first),
        (first_k, free[:second_k], second),
        (second_k - 1, free[:second_k], second),
        (second_k, free, len(text)),
    ]:
        final = run(min_tokens)
        assert final.token_ids == ids, min_tokens
        assert final.text == decode(final.token_ids)[:cut] == text[:cut]
        stopped = cut < len(text)
        assert final.finish_reason == (FinishReason.STOP if stopped else FinishReason.LENGTH)
        assert final.stop_reason == (stop if stopped else None)


def test_detokenizer_min_tokens_and_hold_back() -> None:
    class OneCharPerToken:
        def decode(self, ids, skip_special_tokens: bool = False) -> str:
            return "".join(map(chr, ids))

    def detokenize(text: str, stop: tuple[str, ...], min_tokens: int) -> tuple[str, str | None]:
        detok = IncrementalDetokenizer(OneCharPerToken(), stop, min_tokens)
        streamed = ""
        for token in map(ord, text):
            detok.add_token(token)
            streamed += detok.take_delta(finished=False)
            assert detok.text.startswith(streamed)
            if detok.stopped_on is not None:
                break
            assert len(detok.text) - len(streamed) <= max(map(len, stop)) - 1  # hold-back bounded by the longest stop
        streamed += detok.take_delta(finished=True)
        assert streamed == detok.text
        return detok.text, detok.stopped_on

    text = "ab|cd|ef"  # token k is character k (1-based)
    assert detokenize(text, ("|",), 0) == ("ab", "|")
    assert detokenize(text, ("|",), 2) == ("ab", "|")  # the first "|" is token 3: after min_tokens
    assert detokenize(text, ("|",), 3) == ("ab|cd", "|")
    assert detokenize(text, ("|",), 6) == (text, None)
    # A match counts by the token that completes it, even when it starts earlier.
    assert detokenize(text, ("cd|",), 5) == ("ab|", "cd|")
    assert detokenize(text, ("cd|",), 6) == (text, None)
    # A match that came too early is not found again by later searches (which look back as far as the
    # longest stop string); a later match of it still stops.
    assert detokenize("xyzw-q", ("yzw", "a-longer-stop"), 4) == ("xyzw-q", None)
    assert detokenize("xyzw-yzw", ("yzw", "a-longer-stop"), 4) == ("xyzw-", "yzw")


def test_stop_token_ids_and_min_tokens(llm: LLM) -> None:
    prompt = mixed_prompts(1)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].token_ids
    stop_id = free[3]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id], ignore_eos=True))[0]
    assert out.finish_reason == FinishReason.STOP and out.stop_reason == stop_id
    assert out.token_ids == free[: free.index(stop_id) + 1]
    late = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[free[0]], min_tokens=2, ignore_eos=True)
    )[0]
    assert free[0] not in late.token_ids[:2]


def test_abort_mid_generation_frees_blocks_at_once(llm: LLM) -> None:
    engine = llm.engine
    for i, prompt in enumerate(mixed_prompts(4)):
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), request_id=f"a{i}")
    for _ in range(5):
        engine.step()
    assert any(u.used_blocks for u in engine.kv.usage())
    outputs = [engine.abort_request(f"a{i}") for i in range(4)]
    assert all(o.finished and o.finish_reason == FinishReason.ABORT for o in outputs)
    assert all(u.used_blocks == 0 for u in engine.kv.usage())
    assert not engine.has_unfinished_requests()
    assert engine.abort_request("a0") is None


@pytest.mark.parametrize(
    "prompt,kwargs,message",
    [
        ([], {}, "prompt must not be empty"),
        ("", {}, "prompt must not be empty"),
        ([1, 2, 99999], {}, "prompt token id 99999 is outside the vocabulary"),
        (list(range(3, 13)), {"max_tokens": 120}, "exceeds max_model_len \\(128\\)"),
        ([5], {"stop_token_ids": [600]}, "stop_token_ids contains 600"),
        ({"role": "user"}, {}, "prompt must be a string, a list of token ids, a list of chat messages or a ChatPrompt"),
    ],
)
def test_invalid_requests_fail_before_allocation(checkpoint, prompt, kwargs, message) -> None:
    llm = LLM(checkpoint, dtype=torch.float32, block_size=BLOCK_SIZE, max_model_len=128, max_num_batched_tokens=32, num_kv_blocks=64)
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request(prompt, SamplingParams(**kwargs))
    assert not llm.engine.has_unfinished_requests()
    assert all(u.used_blocks == 0 for u in llm.engine.kv.usage())


NO_TOKENIZER = "no tokenizer"
SMALL = SamplingParams(max_tokens=2)


@pytest.mark.parametrize(
    "prompt,params,options,field",
    [
        ([], SMALL, {}, "prompt"),
        ([1, 2, 99999], SMALL, {}, "prompt"),
        ({"role": "user"}, SMALL, {}, "prompt"),
        (list(range(3, 13)), SamplingParams(max_tokens=120), {}, "prompt"),  # over max_model_len
        (list(range(3, 30)), SamplingParams(max_tokens=8), {}, "prompt"),  # over the full-attention pool
        ([5], SamplingParams(stop_token_ids=[600]), {}, "stop_token_ids"),
        ([5], {"max_tokens": 2}, {}, "params"),
        ([5], SMALL, {"priority": "high"}, "priority"),
        ([5], SMALL, {"priority": True}, "priority"),
        ([5], SMALL, {"cache_salt": 5}, "cache_salt"),
        ([5], SMALL, {"request_id": "taken"}, "request_id"),  # a request still in flight has it
        ("text", SMALL, {NO_TOKENIZER: True}, "prompt"),
        (ChatPrompt([{"role": "user", "content": "hi"}]), SMALL, {NO_TOKENIZER: True}, "prompt"),
        ([5], SamplingParams(stop=["x"]), {NO_TOKENIZER: True}, "stop"),
    ],
)
def test_request_errors_start_with_the_field_name(checkpoint, prompt, params, options, field) -> None:
    llm = LLM(checkpoint, dtype=torch.float32, block_size=BLOCK_SIZE, max_model_len=128, max_num_batched_tokens=4, num_kv_blocks=6)
    options = dict(options)
    engine = LLMEngine(llm.engine.model, None, llm.engine.args) if options.pop(NO_TOKENIZER, False) else llm.engine
    engine.add_request([5, 6], SMALL, request_id="taken")
    with pytest.raises(ValueError) as error:
        engine.add_request(prompt, params, **options)
    assert invalid_from_value_error(error.value).field == field, str(error.value)  # what the gateway reports
    assert [r.request_id for r in engine.scheduler.waiting] == ["taken"]  # nothing else was queued


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -1}, "temperature must be in \\[0.0, 100.0\\], got -1"),
        ({"top_p": 0}, "top_p must be in \\(0.0, 1.0\\], got 0"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"min_p": 1.5}, "min_p must be in"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"stop": [1]}, "stop\\[0\\] must be a non-empty string"),
        ({"stop": 5}, "stop must be a string or a list of strings"),
        ({"stop_token_ids": "7"}, "stop_token_ids must be a list of token ids"),
        ({"seed": -3}, "seed must be an integer"),
        ({"logprobs": 50}, "logprobs must be an integer in \\[0, 20\\]"),
        ({"repetition_penalty": 0}, "repetition_penalty must be in"),
        ({"presence_penalty": 3}, "presence_penalty must be in"),
    ],
)
def test_invalid_sampling_params(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_defaults_are_gemma4_recommended() -> None:
    params = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 0.95, 64)
    assert SamplingParams(temperature=0).greedy


def test_detokenizer_streams_multibyte_text_exactly(checkpoint) -> None:
    tokenizer = load_tokenizer(checkpoint)
    text = "naïve café — 世界 🎉 done"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = []
    for token in ids:
        detok.add_token(token)
        pieces.append(detok.take_delta(finished=False))
    detok.flush()
    pieces.append(detok.take_delta(finished=True))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_chat_prompt_outputs_are_chat_parsed(llm: LLM) -> None:
    prompt = ChatPrompt([{"role": "user", "content": "Hello there"}], thinking=True)
    engine = llm.engine
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), request_id="c")
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas += out.chat_deltas
            final = out
    parsed = chat.parse(final.text)
    assert "".join(d.text for d in deltas if d.kind == "content") == parsed.content
    assert final.prompt_token_ids[0] == llm.tokenizer.bos_token_id


def test_async_engine_streams_and_aborts(checkpoint) -> None:
    llm = LLM(checkpoint, dtype=torch.float32, block_size=BLOCK_SIZE, max_num_batched_tokens=32, num_kv_blocks=128)
    expected = llm.generate(mixed_prompts(6), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine = AsyncEngine(llm.engine)

    async def collect(prompt) -> list[int]:
        tokens = []
        stream = await engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        async for out in stream:
            tokens += out.delta_token_ids
        return tokens

    async def main() -> None:
        results = await asyncio.gather(*(collect(p) for p in mixed_prompts(6)))
        assert results == [o.token_ids for o in expected]
        stream = await engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()  # a consumer that goes away aborts its request, at the next step boundary
        while not (engine.stats().finished_requests["abort"] == 1 and engine.stats().num_running == 0):
            await asyncio.sleep(0.01)  # bounded by the timeout below
        assert all(g.used_blocks == 0 for g in engine.stats().kv_cache)
        with pytest.raises(ValueError, match="prompt must not be empty"):
            await engine.add_request([], SamplingParams())

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=60))
    finally:
        engine.shutdown()


def test_priority_runs_first_and_fcfs_otherwise(checkpoint) -> None:
    llm = LLM(checkpoint, dtype=torch.float32, block_size=BLOCK_SIZE, max_num_seqs=1, max_num_batched_tokens=32, num_kv_blocks=64)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request([5, 6, 7], params, request_id="first", priority=1)
    engine.add_request([5, 6, 8], params, request_id="second", priority=1)
    engine.add_request([5, 6, 9], params, request_id="urgent", priority=0)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["urgent", "first", "second"]


def test_generate_accepts_chat_messages_and_validates_all_first(llm: LLM) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    out = llm.generate(messages, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out) == 1 and out[0].prompt_token_ids == llm.tokenizer.encode_chat(messages)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate([[5, 6], []], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()


def test_stats_summarise_finished_requests_timings_in_fixed_size_histograms(llm: LLM) -> None:
    assert "recent_requests" not in {f.name for f in fields(EngineStats)}
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outputs = llm.generate(mixed_prompts(3), params) + llm.generate(mixed_prompts(2, seed=1), params)
    stats = llm.engine.stats()
    ttfts = [o.metrics.time_to_first_token for o in outputs]
    gaps = [g for o in outputs for g in o.metrics.inter_token_times]
    assert len(gaps) == 5 * 4
    for histogram, values in ((stats.time_to_first_token, ttfts), (stats.inter_token_latency, gaps)):
        bounds = histogram.bucket_bounds
        assert bounds == LATENCY_BUCKET_BOUNDS and len(histogram.counts) == len(bounds) + 1
        assert histogram.count == len(values) and histogram.total == pytest.approx(sum(values))
        edges = list(zip((-math.inf, *bounds), (*bounds, math.inf)))
        assert histogram.counts == tuple(sum(lo < v <= hi for v in values) for lo, hi in edges)
    assert stats.e2e_latency.count == 5 and stats.e2e_latency.total >= stats.time_to_first_token.total
    assert stats.generation_tokens_total == 25 and stats.finished_requests["length"] == 5


def test_latency_histogram_buckets_include_their_upper_bound() -> None:
    histogram = LatencyHistogram.empty((0.1, 1.0)).add([0.05, 0.1, 0.5, 1.0, 7.0])
    assert histogram == LatencyHistogram((0.1, 1.0), (2, 2, 1), pytest.approx(8.65), 5)
    assert LatencyHistogram.empty((0.1, 1.0)).add([]) == LatencyHistogram((0.1, 1.0), (0, 0, 0), 0.0, 0)
