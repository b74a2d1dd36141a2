"""Speculative decoding in the engine: drafts verified in one forward, exactly the target's outputs.

The acceptance rule keeps a draft only when it equals the target's own draw at its position, so with
speculation on a request's tokens are those it gets with speculation off: greedy always, seeded
sampling too (a draw depends on the seed, the output index and the row's logits). An oracle
proposer that knows the reference continuation and corrupts some of its drafts exercises accepts,
rejections at every position, KV rollback and block accounting; unseeded sampling is checked
statistically against the target distribution.
"""

from __future__ import annotations


import pytest
import torch

from gemma4.engine.args import EngineArgs
from gemma4.engine.llm import random_weights_model
from gemma4.engine.llm_engine import LLMEngine
from gemma4.engine.request import Request
from gemma4.engine.sampler import SampleResult
from gemma4.engine.sampling_params import SamplingParams
from gemma4.engine.spec_decode.ngram import NgramProposer
from gemma4.engine.spec_decode.verify import verify
from gemma4.kv_layout import NULL_BLOCK
from gemma4.tiny import tiny_config

from engine_fixtures import mixed_prompts
from spec_fixtures import OracleProposer, with_proposer

VARIANTS = ("e2b", "e4b", "26b-a4b", "31b")
BLOCK = 4
K = 3


def _engine(
    model: torch.nn.Module, *, num_kv_blocks: int = 256, spec: str | None = None, seed: int = 0, max_num_seqs: int = 4
) -> LLMEngine:
    args = EngineArgs(
        block_size=BLOCK, max_num_seqs=max_num_seqs, max_num_batched_tokens=32, num_kv_blocks=num_kv_blocks, max_model_len=256,
        speculative_model=spec, num_speculative_tokens=K, seed=seed,
    )
    return LLMEngine(model, None, args)


def _check_blocks(engine: LLMEngine) -> None:
    """Every running request holds exactly the blocks of its computed tokens, and each pool's used
    blocks are exactly those the live tables reference."""
    kv = engine.kv
    live: list[set[int]] = [set() for _ in kv.pools]
    for request in engine.scheduler.running:
        for g, table in enumerate(kv.block_tables(request.request_id)):
            assert len(table) == -(-request.num_computed_tokens // BLOCK), (request.request_id, g, len(table))
            live[g].update(b for b in table if b != NULL_BLOCK)
    for g, pool in enumerate(kv.pools):
        assert pool.num_used == len(live[g]), (g, pool.num_used, len(live[g]))


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams], check: bool = True):
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(prompt, p, request_id=str(i))
    outputs: dict[str, object] = {}
    for _ in range(2000):  # bounded
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        if check:
            _check_blocks(engine)
    assert not engine.has_unfinished_requests()
    return [outputs[str(i)] for i in range(len(prompts))]


def _greedy(max_tokens: int = 20) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_outputs_equal_without_speculation_with_preemption_and_prefix_hits(variant: str) -> None:
    model = random_weights_model(tiny_config(variant), dtype=torch.float32, device="cpu")
    prompts = mixed_prompts(8, seed=1)
    params = [_greedy()] * len(prompts)
    reference = _run(_engine(model), prompts, params, check=False)
    references = [p + o.token_ids for p, o in zip(prompts, reference)]
    engine = with_proposer(_engine(model, num_kv_blocks=40, spec="ngram"), OracleProposer(references, 0.3, 512), K)
    for _ in range(2):  # the second round hits the prefix cache the first filled
        got = _run(engine, prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in reference]
    stats = engine.core.stats()
    assert stats.num_preemptions > 0 and stats.prefix_hit_tokens > 0
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert sum(stats.spec_accepted_per_position) == stats.spec_num_accepted_tokens
    assert all(n > 0 for n in stats.spec_accepted_per_position)  # accepts at every draft position
    assert all(c.used_blocks == 0 for c in stats.kv_cache)


def test_seeded_sampling_logprobs_min_tokens_and_stop_tokens_equal_without_speculation() -> None:
    model = random_weights_model(tiny_config("26b-a4b"), dtype=torch.float32, device="cpu")
    prompts = mixed_prompts(6, seed=2)
    plain = [
        SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=100 + i, max_tokens=16, logprobs=2, ignore_eos=True)
        for i in range(len(prompts))
    ]
    reference = _run(_engine(model), prompts, plain, check=False)
    # Stop at a token each reference produced after its 5th output (min_tokens keeps the early ones).
    params = [
        SamplingParams(
            temperature=0.9, top_k=20, top_p=0.9, seed=100 + i, max_tokens=16, logprobs=2, min_tokens=5,
            stop_token_ids=[o.token_ids[8]],
        )
        for i, o in enumerate(reference)
    ]
    want = _run(_engine(model), prompts, params, check=False)
    references = [p + o.token_ids for p, o in zip(prompts, reference)]
    engine = with_proposer(_engine(model, spec="ngram"), OracleProposer(references, 0.25, 512), K)
    got = _run(engine, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for g, w in zip(got, want):
        assert [lp.token_id for lp in g.logprobs] == [lp.token_id for lp in w.logprobs]
        for a, b in zip(g.logprobs, w.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert a.top.keys() == b.top.keys()
    assert engine.core.stats().spec_num_accepted_tokens > 0


def test_drafts_respect_max_tokens_and_the_context_limit() -> None:
    model = random_weights_model(tiny_config("31b"), dtype=torch.float32, device="cpu")
    prompts = mixed_prompts(4, seed=3)
    reference = _run(_engine(model), prompts, [_greedy(30)] * 4, check=False)
    references = [p + o.token_ids for p, o in zip(prompts, reference)]
    for max_tokens in (1, 2, 5):
        engine = with_proposer(_engine(model, spec="ngram"), OracleProposer(references, 0.0, 512), K)
        got = _run(engine, prompts, [_greedy(max_tokens)] * 4)
        assert [o.token_ids for o in got] == [o.token_ids[:max_tokens] for o in reference]


def test_ngram_drafting_gives_the_plain_greedy_outputs() -> None:
    model = random_weights_model(tiny_config("e4b"), dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(4)
    base = [torch.randint(3, 400, (10,), generator=gen).tolist() for _ in range(4)]
    prompts = [b + b + b[:4] for b in base]  # repeated text: the n-gram lookup has matches to draft from
    params = [_greedy(24)] * len(prompts)
    reference = _run(_engine(model), prompts, params, check=False)
    engine = _engine(model, spec="ngram")
    got = _run(engine, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in reference]
    stats = engine.core.stats()
    assert stats.spec_num_draft_tokens > 0
    assert sum(stats.spec_accepted_per_position) == stats.spec_num_accepted_tokens


def test_ngram_proposer_takes_the_longest_most_recent_match() -> None:
    proposer = NgramProposer(min_n=1, max_n=3)
    assert proposer.propose([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2) == [7, 1]  # the latest 3-gram match
    assert proposer.propose([5, 1, 2, 8, 4, 2], 3) == [8, 4, 2]  # 1-gram "2"
    assert proposer.propose([1, 2, 3], 2) == []
    assert proposer.propose([4, 4], 3) == [4]  # what follows the match, at most to the end
    assert proposer.propose([1, 2, 1], 0) == []
    with pytest.raises(ValueError):
        NgramProposer(min_n=0)


def test_verify_keeps_accepted_drafts_and_the_token_after_them() -> None:
    params = SamplingParams(temperature=0.0)
    a = Request("a", [1], params, frozenset(), spec_token_ids=[5, 6, 7])
    b = Request("b", [1], params, frozenset())
    c = Request("c", [1], params, frozenset(), spec_token_ids=[4])
    rows = [SampleResult(t, None) for t in (5, 6, 9, 3, 8, 4, 2)]  # a: 5 6 (9 != 7) 3; b: 8; c: 4 2
    verified = verify([a] * 4 + [b] + [c] * 2, rows)
    assert [[r.token_id for r in v.kept] for v in verified] == [[5, 6, 9], [8], [4, 2]]
    assert [v.last_row for v in verified] == [2, 4, 6]
    assert [v.num_accepted for v in verified] == [2, 0, 1]


def _chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value (cells with tiny expectations pooled into one)."""
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]]).double()
    exp = torch.cat([expected[big], expected[~big].sum()[None]]).double()
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    statistic = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), statistic / 2))


def test_sampled_tokens_follow_the_target_distribution() -> None:
    """The token at the first draft's position, drawn unseeded with speculation, is distributed as the
    target's own marginal there (computed exactly from the model), as it is without speculation."""
    vocab = 128
    model = random_weights_model(tiny_config("31b", vocab_size=vocab), dtype=torch.float32, device="cpu", seed=5)
    with torch.no_grad():  # sharpen the random model so the distribution has structure worth testing
        model.model.embed_tokens.weight.mul_(8.0)
    prompt = [3, 7, 11, 2, 5]
    temperature, n = 1.0, 1500
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt]))[0, -1] / temperature, -1)
        second = torch.stack([
            torch.softmax(model(torch.tensor([prompt + [t]]))[0, -1] / temperature, -1) for t in range(vocab)
        ])
    marginal = first @ second  # P(second output token)
    draft = int(marginal.argmax())  # drafted always: accepted about marginal[draft] of the time

    class FixedDraft:
        def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
            return [draft] * num_tokens

    params = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, max_tokens=3, ignore_eos=True)
    results = {}
    for spec, seed in ((False, 11), (True, 12)):
        engine = _engine(model, seed=seed, spec="ngram" if spec else None, max_num_seqs=16)
        if spec:
            with_proposer(engine, FixedDraft(), K)
        outs = _run(engine, [prompt] * n, [params] * n, check=False)
        results[spec] = torch.bincount(torch.tensor([o.token_ids[1] for o in outs]), minlength=vocab).float()
        if spec:
            stats = engine.core.stats()
            assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    for spec, counts in results.items():
        assert _chi_square_p(counts, marginal * n) > 1e-3, (spec, counts.tolist(), (marginal * n).tolist())
    # And a wrong distribution is told apart: the test can fail.
    assert _chi_square_p(results[True], first @ second.roll(1, dims=1) * n) < 1e-3


def test_stop_strings_end_text_outputs_where_they_do_without_speculation(tmp_path) -> None:
    from gemma4.engine.llm import LLM
    from gemma4.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "tiny", variant="e2b", towers=False)
    prompts = ["the cat sat on the mat and", "a quick brown fox", "numbers one two three"]
    plain = LLM(path, dtype=torch.float32, block_size=BLOCK, max_num_batched_tokens=32, num_kv_blocks=128)
    free = plain.generate(prompts, _greedy(24))
    # Stop strings cut from the middle of each reference text, so they complete mid-step.
    stops = [o.text[len(o.text) // 2 : len(o.text) // 2 + 3] for o in free]
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[s]) for s in stops if s.strip()]
    assert len(params) == len(prompts)
    want = plain.generate(prompts, params)
    assert all(o.finish_reason == "stop" for o in want)
    spec = LLM(path, dtype=torch.float32, block_size=BLOCK, max_num_batched_tokens=32, num_kv_blocks=128,
               speculative_model="ngram", num_speculative_tokens=K)
    references = [list(o.prompt_token_ids) + list(o.token_ids) for o in free]
    with_proposer(spec.engine, OracleProposer(references, 0.2, spec.engine.vocab_size), K)
    got = spec.generate(prompts, params)
    assert [o.text for o in got] == [o.text for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert spec.engine.core.stats().spec_num_accepted_tokens > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_assistant_drafting_gives_the_plain_greedy_outputs(tmp_path, variant: str) -> None:
    """Gemma 4's drafter over the target's paged cache (random weights: its drafts are mostly rejected),
    with chunked prefill, prompts past the sliding window, preemption and prefix hits."""
    from gemma4.engine.llm import LLM
    from gemma4.tiny import tiny_config as target_config
    from gemma4.tiny import write_tiny_assistant, write_tiny_checkpoint

    target = write_tiny_checkpoint(tmp_path / "target", variant=variant, towers=False)
    drafter = write_tiny_assistant(tmp_path / "drafter", target_config(variant))
    prompts = mixed_prompts(6, seed=5) + [list(range(3, 90))]  # one past the window
    args = dict(dtype=torch.float32, block_size=BLOCK, max_num_batched_tokens=32, max_model_len=256)
    want = [o.token_ids for o in LLM(target, num_kv_blocks=256, **args).generate(prompts, _greedy(16))]
    spec = LLM(target, num_kv_blocks=48, speculative_model=str(drafter), num_speculative_tokens=K, **args)
    for _ in range(2):
        assert [o.token_ids for o in spec.generate(prompts, _greedy(16))] == want
    stats = spec.engine.stats()
    assert stats.spec_num_draft_tokens > 0 and stats.num_preemptions > 0 and stats.prefix_hit_tokens > 0
    assert all(g.used_blocks == 0 for g in stats.kv_cache)
