"""Structured outputs on the engine: a tiny random-weight model sampled at temperature 1 always writes what the
constraint allows (JSON schemas, JSON objects, regexes, choices, thinking first), across seeds, batching
and preemption; bad constraints fail when the request is added; draft masks and `accepts` for speculation."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import jsonschema
import pytest
import torch

from engine_fixtures import small_config
from json_schemas import MAX_TOKENS
from json_schemas import SCHEMAS as NAMED_SCHEMAS
from spec_fixtures import OracleProposer, with_proposer
from gemma4 import LLM, SamplingParams
from gemma4.engine import FinishReason
from gemma4.engine.args import EngineArgs
from gemma4.engine.llm_engine import LLMEngine
from gemma4.engine.request import Request
from gemma4.engine.sampler import Sampler
from gemma4.engine.structured_output.bitmask import allocate, allowed_ids, set_tokens
from gemma4.engine.structured_output.compiler import GrammarCompiler
from gemma4.engine.structured_output.params import StructuredOutputParams
from gemma4.engine.structured_output.state import StructuredOutputs
from gemma4.engine.worker import Worker, WorkerConfig
from gemma4.special_tokens import CHANNEL_END, CHANNEL_START
from gemma4.tiny import write_tiny_checkpoint
from gemma4.tiny_tokenizer import build_tiny_tokenizer
from gemma4.tokenizer import Gemma4Tokenizer

SEEDS = (0, 1, 2, 3, 4)
ENGINE = dict(dtype=torch.float32, block_size=16, max_num_seqs=32, max_num_batched_tokens=256)
SCHEMAS = list(NAMED_SCHEMAS.values())  # the ten bounded schemas the API tests use too


@pytest.fixture(scope="module")
def tokenizer() -> Gemma4Tokenizer:
    return Gemma4Tokenizer(build_tiny_tokenizer(), variant="e2b")


def make_llm(tokenizer: Gemma4Tokenizer, **overrides) -> LLM:
    """A few-layer random-weight model (the same weights every time) with the tiny tokenizer."""
    return LLM(small_config("e2b"), tokenizer=tokenizer, **{**ENGINE, "num_kv_blocks": 512, **overrides})


@pytest.fixture(scope="module")
def llm(tokenizer: Gemma4Tokenizer) -> LLM:
    return make_llm(tokenizer)


@contextmanager
def biased(llm: LLM, bias: Mapping[int, float]) -> Iterator[None]:
    """The model with `bias` added to some tokens' logits: a stand-in for a model that likes those tokens."""
    model = llm.engine.model
    plain = model.compute_logits
    ids = torch.tensor(list(bias))
    values = torch.tensor(list(bias.values()))

    def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        logits = plain(hidden)
        return logits.index_add(1, ids, values.expand(logits.shape[0], -1).to(logits.dtype))

    model.compute_logits = compute_logits
    try:
        yield
    finally:
        del model.compute_logits


def structured(seed: int, **constraint) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, seed=seed, structured=StructuredOutputParams(**constraint))


def answer_text(llm: LLM, token_ids: list[int]) -> str:
    """The text after the thought block (all of it if there is none), without the stop token."""
    end = llm.tokenizer.token_to_id(CHANNEL_END.text)
    start = token_ids.index(end) + 1 if end in token_ids else 0
    return llm.tokenizer.decode(token_ids[start:], skip_special_tokens=True)


def test_every_json_schema_output_parses_and_validates(llm: LLM) -> None:
    params = [structured(seed, json_schema=json.dumps(schema)) for schema in SCHEMAS for seed in SEEDS]
    outputs = llm.generate(["Tell me about the weather"] * len(params), params)
    documents = set()
    for i, output in enumerate(outputs):
        schema = SCHEMAS[i // len(SEEDS)]
        assert output.finish_reason == FinishReason.STOP, (schema, output.text)  # the grammar ended it
        assert output.token_ids[-1] in llm.tokenizer.eos_token_ids
        document = json.loads(output.text)
        jsonschema.validate(document, schema)
        documents.add(output.text)
    assert len(documents) > len(SCHEMAS)  # seeds make different documents


# A Gemma 4 tool call as a Lark grammar: special tokens unquoted, a JSON schema embedded in a rule.
TOOL_CALL_GRAMMAR = r"""start: <|tool_call> "call:" NAME "{" "location:" <|"|> /[a-z]{1,6}/ <|"|> "," "args:" args "}" <tool_call|>
NAME: /get_[a-z]{1,5}/
args: %json{"x-guidance": {"whitespace_flexible": false}, "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2}
"""
TOOL_CALL_TEXT = r'<\|tool_call>call:get_[a-z]{1,5}\{location:<\|"\|>[a-z]{1,6}<\|"\|>,args:\[([0-9](,[0-9])?)?\]\}<tool_call\|>'


def test_json_object_regex_choice_and_grammar(llm: LLM) -> None:
    quote, close = (llm.tokenizer.encode(c)[0] for c in '"}')
    choices = ("yes", "no", "maybe later")
    pattern = r"[a-z]{2,5}-[0-9]{1,3}"
    params = (
        [structured(seed, json_object=True) for seed in SEEDS]
        + [structured(seed, regex=pattern) for seed in SEEDS]
        + [structured(seed, choice=choices) for seed in SEEDS]
        + [structured(seed, grammar=TOOL_CALL_GRAMMAR) for seed in SEEDS]
    )
    with biased(llm, {quote: 6.0, close: 6.0}):  # strings and objects close soon: an object fits max_tokens
        outputs = llm.generate(["Answer me"] * len(params), params)
    texts = [o.text for o in outputs]
    assert all(o.finish_reason == FinishReason.STOP for o in outputs), texts
    n = len(SEEDS)
    assert all(isinstance(json.loads(t), dict) for t in texts[:n]), texts
    assert all(re.fullmatch(pattern, t) for t in texts[n : 2 * n]), texts
    assert all(t in choices for t in texts[2 * n : 3 * n]), texts
    assert all(re.fullmatch(TOOL_CALL_TEXT, t) for t in texts[3 * n :]), texts


def test_thinking_leaves_the_thought_free_and_constrains_the_answer(llm: LLM) -> None:
    tokenizer = llm.tokenizer
    start, end = tokenizer.token_to_id(CHANNEL_START.text), tokenizer.token_to_id(CHANNEL_END.text)
    schema = SCHEMAS[0]
    seeds = range(6)
    thinking = [SamplingParams(max_tokens=MAX_TOKENS, seed=s, structured=StructuredOutputParams(
        json_schema=json.dumps(schema), thinking=True)) for s in seeds]
    plain = [structured(s, json_schema=json.dumps(schema)) for s in seeds]
    with biased(llm, {start: 6.0, end: 4.0}):  # a model keen to think, and to stop thinking
        thought_outputs = llm.generate(["Think first"] * len(thinking), thinking)
        plain_outputs = llm.generate(["Think first"] * len(plain), plain)
    free_tokens = set()
    for output in thought_outputs:
        ids = output.token_ids
        assert ids[0] == start and end in ids, ids  # it thought, and closed the thought
        free_tokens.update(ids[1 : ids.index(end)])
        jsonschema.validate(json.loads(answer_text(llm, ids)), schema)
    assert free_tokens - {start, end, tokenizer.encode("{")[0]}  # the thought is not held to the grammar
    for output in plain_outputs:  # without thinking the markers are as forbidden as any other non-JSON token
        assert start not in output.token_ids and end not in output.token_ids
        jsonschema.validate(json.loads(output.text), schema)
    with biased(llm, {end: 6.0}):  # the first token opens a thought or starts the answer: either way it is valid
        either = llm.generate(["Think first"] * len(thinking), thinking)
    assert {o.token_ids[0] == start for o in either} == {True, False}
    for output in either:
        jsonschema.validate(json.loads(answer_text(llm, output.token_ids)), schema)


def test_ignore_eos_repeats_eos_after_the_finished_grammar(llm: LLM) -> None:
    params = SamplingParams(max_tokens=12, seed=0, ignore_eos=True, structured=StructuredOutputParams(choice=("done",)))
    (output,) = llm.generate(["Finish"], params)
    eos = set(llm.tokenizer.eos_token_ids)
    first = next(i for i, t in enumerate(output.token_ids) if t in eos)
    assert llm.tokenizer.decode(output.token_ids[:first]) == "done" and len(output.token_ids) == 12
    assert set(output.token_ids[first:]) <= eos  # EOS did not stop it, and nothing but EOS may follow


@pytest.mark.parametrize(
    "constraint,message",
    [
        (dict(json_schema='{"type": "objectx"}'), "structured json_schema: .*objectx"),
        (dict(json_schema="{not json"), "structured json_schema is not valid JSON"),
        (dict(json_schema='{"type": "array", "uniqueItems": true}'), "structured json_schema: .*uniqueItems"),
        (dict(regex="a(b"), "structured regex: .*unclosed group"),
        (dict(grammar="start: foo\n"), "structured grammar: .*unknown name"),
        (dict(grammar="start: <|no_such_token>\n"), "structured grammar: .*unknown special token"),
        (dict(choice=()), "structured choice must be a non-empty list"),
        (dict(regex="a", choice=("a",)), "structured must set exactly one of .*got regex, choice"),
        (dict(), "structured must set exactly one of .*got none"),
    ],
)
def test_invalid_constraints_fail_when_added(llm: LLM, constraint: dict, message: str) -> None:
    engine = llm.engine
    with pytest.raises(ValueError, match=message):
        engine.add_request("hi", SamplingParams(structured=StructuredOutputParams(**constraint)))
    assert not engine.has_unfinished_requests()  # nothing was queued


def test_an_engine_without_a_tokenizer_refuses_structured_requests(llm: LLM) -> None:
    engine = LLMEngine(llm.engine.model, None, llm.engine.args)
    with pytest.raises(ValueError, match="structured outputs need a tokenizer"):
        engine.add_request([5, 6], SamplingParams(structured=StructuredOutputParams(regex="a")))


def test_preemption_mid_generation_keeps_outputs_valid_and_unchanged(tokenizer: Gemma4Tokenizer, llm: LLM) -> None:
    schemas = SCHEMAS[:4]
    params = [structured(seed, json_schema=json.dumps(schema)) for schema in schemas for seed in SEEDS]
    prompts = ["Describe the city"] * len(params)
    roomy = llm.generate(prompts, params)
    # Room for one request's prompt and max_tokens, not for all twenty at once.
    tight = make_llm(tokenizer, block_size=4, num_kv_blocks=-(-(MAX_TOKENS + 10) // 4), max_num_batched_tokens=32)
    squeezed = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    for i, (a, b) in enumerate(zip(roomy, squeezed)):
        jsonschema.validate(json.loads(b.text), schemas[i // len(SEEDS)])
        assert a.token_ids == b.token_ids  # seeded: preemption and batching change nothing


def test_greedy_and_seeded_runs_repeat(llm: LLM) -> None:
    schema = json.dumps(SCHEMAS[1])
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured=StructuredOutputParams(json_schema=schema))]
    params += [structured(seed, json_schema=schema) for seed in SEEDS]
    first = llm.generate(["Same again"] * len(params), params)
    second = llm.generate(["Same again"] * len(params), params)
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    jsonschema.validate(json.loads(first[0].text), SCHEMAS[1])


# ---------------------------------------------------------------------- the worker-side pieces directly
def _request(tokenizer: Gemma4Tokenizer, constraint: StructuredOutputParams, output: str = "") -> Request:
    request = Request("r", [2, 5], SamplingParams(structured=constraint), frozenset(tokenizer.eos_token_ids))
    request.token_ids.extend(tokenizer.encode(output) if output else [])
    return request


def test_draft_rows_are_masked_after_each_prefix_and_rolled_back(tokenizer: Gemma4Tokenizer) -> None:
    vocab = tokenizer.vocab_size
    outputs = StructuredOutputs(GrammarCompiler(tokenizer, vocab))
    request = _request(tokenizer, StructuredOutputParams(regex="xyz"), "x")
    y, z, q = (tokenizer.encode(c)[0] for c in "yzq")
    eos = set(tokenizer.eos_token_ids)

    mask = outputs.masks([(request, (y, z))])
    assert [allowed_ids(row, vocab) for row in mask] == [[y], [z], sorted(eos)]
    mask = outputs.masks([(request, (q, z))])  # q is rejected: the later row is never kept, anything goes
    assert allowed_ids(mask[0], vocab) == [y] and allowed_ids(mask[1], vocab) == list(range(vocab))
    assert outputs.accepts(request, [y, z, tokenizer.eos_token_ids[0]]) == 3
    assert outputs.accepts(request, [y, q, z]) == 1
    assert allowed_ids(outputs.masks([(request, ())])[0], vocab) == [y]  # drafts left the matcher where it was
    request.token_ids.append(y)  # the engine kept y
    assert allowed_ids(outputs.masks([(request, ())])[0], vocab) == [z]
    outputs.remove("r")  # forgotten: rebuilt from the request's tokens
    assert allowed_ids(outputs.masks([(request, ())])[0], vocab) == [z]


def test_a_kept_token_the_grammar_rejects_leaves_only_stop_tokens(tokenizer: Gemma4Tokenizer) -> None:
    vocab = tokenizer.vocab_size
    outputs = StructuredOutputs(GrammarCompiler(tokenizer, vocab))
    request = _request(tokenizer, StructuredOutputParams(regex="xyz"), "q")  # as if sampled without the mask
    assert allowed_ids(outputs.masks([(request, ())])[0], vocab) == sorted(tokenizer.eos_token_ids)
    assert outputs.accepts(request, tokenizer.encode("xyz")) == 0


def test_thought_rows_allow_all_but_stop_tokens(tokenizer: Gemma4Tokenizer) -> None:
    vocab = tokenizer.vocab_size
    outputs = StructuredOutputs(GrammarCompiler(tokenizer, vocab))
    start, end = tokenizer.token_to_id(CHANNEL_START.text), tokenizer.token_to_id(CHANNEL_END.text)
    constraint = StructuredOutputParams(choice=("ok",), thinking=True)
    fresh = _request(tokenizer, constraint)
    o = tokenizer.encode("ok")[0]
    assert allowed_ids(outputs.masks([(fresh, ())])[0], vocab) == sorted({o, start})
    thinking = _request(tokenizer, constraint, f"{CHANNEL_START.text}thought\nhmm")
    thinking.request_id = "thinking"
    allowed = allowed_ids(outputs.masks([(thinking, ())])[0], vocab)
    assert set(allowed) == set(range(vocab)) - set(tokenizer.eos_token_ids)
    assert outputs.accepts(thinking, [end, o]) == 2 and outputs.accepts(thinking, [end, end]) == 1


def test_sampler_masks_before_filters_and_reports_raw_logprobs() -> None:
    vocab = 64
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    requests = [Request(f"r{i}", [1], SamplingParams(temperature=t, logprobs=0, seed=3), frozenset()) for i, t in enumerate((0, 1))]
    allowed = allocate(2, vocab)
    allowed[:] = 0
    set_tokens(allowed[0], [7], True)
    set_tokens(allowed[1], [9, 11], True)
    results = Sampler(vocab, "cpu").sample(logits, requests, allowed=allowed)
    assert results[0].token_id == 7 and results[1].token_id in (9, 11)
    raw = torch.log_softmax(logits, dim=-1)
    for result, row in zip(results, raw):
        assert result.logprobs.logprob == pytest.approx(row[result.token_id].item(), abs=1e-5)


def test_a_worker_built_from_a_checkpoint_loads_its_tokenizer(tmp_path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path, variant="e2b", towers=False)
    args = EngineArgs(block_size=16, num_kv_blocks=32, max_num_batched_tokens=64)
    worker = Worker(WorkerConfig.of(checkpoint, torch.float32, "cpu", args), 0, None)
    worker.init_cache(worker.num_kv_blocks())
    request = _request(worker.tokenizer, StructuredOutputParams(choice=("yes",)))
    mask = worker.structured.masks([(request, ())])
    assert allowed_ids(mask[0], worker.model.text_config.vocab_size) == worker.tokenizer.encode("y")[:1]


def test_compiled_grammars_are_cached_up_to_the_bound(tokenizer: Gemma4Tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size, cache_size=2)
    a, b, c = (StructuredOutputParams(regex=r) for r in ("a+", "b+", "c+"))
    first = compiler.matcher(a)
    assert compiler.matcher(a) is not first  # each request gets its own matcher ...
    for params in (a, b, c):
        compiler.validate(params)
    assert compiler.num_cached == 2  # ... copied from at most cache_size compiled grammars


def test_speculative_decoding_keeps_structured_outputs_unchanged(tokenizer: Gemma4Tokenizer, llm: LLM) -> None:
    """Drafts are cut where the grammar rejects them and verified under the masks of their rows: with
    speculation the seeded structured outputs are those without it (oracle drafts, some wrong)."""
    schemas = SCHEMAS[:5]
    params = [structured(seed, json_schema=json.dumps(schema)) for schema in schemas for seed in SEEDS[:2]]
    prompts = ["Describe the city"] * len(params)
    want = llm.generate(prompts, params)
    spec = make_llm(tokenizer, speculative_model="ngram", num_speculative_tokens=4)
    references = [list(o.prompt_token_ids) + list(o.token_ids) for o in want]
    with_proposer(spec.engine, OracleProposer(references, 0.3, spec.engine.vocab_size), 4)
    got = spec.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for i, output in enumerate(got):
        jsonschema.validate(json.loads(output.text), schemas[i // 2])
    stats = spec.engine.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
