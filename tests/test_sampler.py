"""The batched sampler against per-row references: filters, penalties, seeds, the distribution, logprobs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gemma4.engine.request import Request
from gemma4.engine.sampler import Sampler
from gemma4.engine.sampling_params import SamplingParams
from gemma4.ops.sampling import filtered_probs, mix64, race, row_keys, seed_keys

VOCAB = 50


def make_request(request_id: str, params: SamplingParams, prompt: tuple[int, ...] = (1, 2, 3), stop: frozenset[int] = frozenset()) -> Request:
    return Request(request_id, list(prompt), params, stop_token_ids=stop)


def reference_probs(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The per-row, full-vocabulary filters the batched ones must equal (unnormalised like theirs)."""
    row = row / params.temperature
    if 0 < params.top_k < row.numel():
        kth = torch.topk(row, params.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop_sorted = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs


MIXED = [
    SamplingParams(temperature=1.0, top_k=5, top_p=1.0),
    SamplingParams(temperature=0.7, top_k=12, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=0, top_p=0.9),
    SamplingParams(temperature=0.5, top_k=VOCAB + 10, top_p=0.95, min_p=0.1),
    SamplingParams(temperature=2.0, top_k=3, top_p=0.5, min_p=0.2),
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.3),
    SamplingParams(temperature=1.0, top_k=1),
]


def batched_probs(logits: torch.Tensor, params: list[SamplingParams], k: int) -> torch.Tensor:
    """`filtered_probs` on each row's best `k` candidates (k = vocab: the full sort), scattered back to `[M, V]`."""
    vocab = logits.shape[-1]
    candidates, ids = torch.topk(logits, k, dim=-1) if k < vocab else torch.sort(logits, dim=-1, descending=True)
    probs = filtered_probs(
        candidates,
        torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params]),
        torch.tensor([p.temperature for p in params]),
        torch.tensor([p.top_p for p in params]),
        torch.tensor([p.min_p for p in params]),
    )
    return torch.zeros_like(logits).scatter(1, ids, probs)


def test_the_noise_hash_is_splitmix64() -> None:
    mask = (1 << 64) - 1

    def splitmix(z: int) -> int:
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & mask
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask
        return z ^ (z >> 31)

    values = [0, 1, 2**63 - 1, 2**63, 12_345_678_901_234, mask]
    signed = torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in values], dtype=torch.int64)
    assert [v & mask for v in mix64(signed).tolist()] == [splitmix(v) for v in values]


def test_batched_filters_equal_a_per_row_reference_for_mixed_parameters() -> None:
    logits = torch.randn(len(MIXED), VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    expected = torch.stack([reference_probs(row, p) for row, p in zip(logits, MIXED)])
    assert (expected > 0).sum(dim=-1).tolist() != [VOCAB] * len(MIXED)  # the filters do bite
    torch.testing.assert_close(batched_probs(logits, MIXED, VOCAB), expected, rtol=1e-5, atol=1e-7)


def test_top_p_over_the_top_k_candidates_equals_the_full_sort() -> None:
    bounded = [p for p in MIXED if 0 < p.top_k < VOCAB]
    logits = torch.randn(len(bounded), VOCAB, generator=torch.Generator().manual_seed(1)) * 2
    max_k = max(p.top_k for p in bounded)
    over_k = batched_probs(logits, bounded, max_k)
    torch.testing.assert_close(over_k, batched_probs(logits, bounded, VOCAB), rtol=1e-5, atol=1e-7)
    # The draw sees only token ids and probabilities, so both candidate sets draw the same tokens.
    candidates, ids = torch.topk(logits, max_k, dim=-1)
    full, full_ids = torch.sort(logits, dim=-1, descending=True)
    args = [torch.tensor([p.top_k for p in bounded])] + [torch.tensor([getattr(p, a) for p in bounded]) for a in ("temperature", "top_p", "min_p")]
    for step in range(20):
        keys = row_keys(seed_keys(torch.arange(len(bounded))), torch.full((len(bounded),), step))
        assert race(filtered_probs(candidates, *args), ids, keys).tolist() == race(filtered_probs(full, *args), full_ids, keys).tolist()


def test_sampled_tokens_stay_inside_each_rows_filtered_support_also_without_top_k() -> None:
    logits = torch.randn(len(MIXED), VOCAB, generator=torch.Generator().manual_seed(2)) * 3
    support = [set(torch.nonzero(reference_probs(row, p)).flatten().tolist()) for row, p in zip(logits, MIXED)]
    sampler = Sampler(VOCAB, "cpu", seed=3)
    drawn: list[set[int]] = [set() for _ in MIXED]
    for step in range(30):
        requests = [make_request(f"r{i}-{step}", p) for i, p in enumerate(MIXED)]
        for i, result in enumerate(sampler.sample(logits, requests)):
            drawn[i].add(result.token_id)
    assert all(d <= s for d, s in zip(drawn, support))
    assert len(drawn[2]) > 1 and len(drawn[5]) > 1  # top_k=0 rows draw, from more than one token
    assert drawn[-1] == {int(torch.argmax(logits[-1]))}  # top_k=1 is greedy


def test_greedy_rows_equal_argmax_of_the_processed_logits_as_penalty_state_grows() -> None:
    gen = torch.Generator().manual_seed(4)
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.8),
        SamplingParams(temperature=0, presence_penalty=0.05, frequency_penalty=0.15),  # small: counts decide
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, top_k=8, frequency_penalty=-0.5, seed=5),
        SamplingParams(temperature=0, repetition_penalty=0.6, presence_penalty=-1.0),
    ]
    sampler = Sampler(VOCAB, "cpu")
    requests = [make_request(f"g{i}", p, prompt=tuple(range(i, i + 6))) for i, p in enumerate(params)]
    base = torch.randn(len(requests) + 2, VOCAB, generator=gen) * 0.5  # steady logits, so tokens would repeat
    changed_by_penalties = 0
    for step in range(16):
        if step == 6:  # a finished request's slot is reused by a new one, whose state must start empty
            sampler.remove("g1")
            requests[1] = make_request("g1b", params[1], prompt=(7, 7, 9))
        logits = base + 0.05 * torch.randn(len(requests) + 2, VOCAB, generator=gen)  # two padding rows
        results = sampler.sample(logits, requests)
        for i, (request, result) in enumerate(zip(requests, results)):
            if request.sampling_params.greedy:
                processed = Sampler.processed_logits(logits[i], request)
                assert result.token_id == int(torch.argmax(processed))
                changed_by_penalties += result.token_id != int(torch.argmax(logits[i]))
            request.append_token(result.token_id)
    assert changed_by_penalties > 5


def test_min_tokens_masks_stop_ids_until_enough_outputs() -> None:
    stop = frozenset({4, 9, VOCAB + 3})  # an id outside the vocabulary is ignored
    request = make_request("m", SamplingParams(temperature=0, min_tokens=3), stop=stop)
    logits = torch.zeros(1, VOCAB)
    logits[0, 9], logits[0, 4], logits[0, 17] = 5.0, 4.0, 3.0
    sampler = Sampler(VOCAB, "cpu")
    tokens = []
    for _ in range(5):
        token = sampler.sample(logits, [request])[0].token_id
        request.append_token(token)
        tokens.append(token)
    assert tokens == [17, 17, 17, 9, 9]


def _seeded_tokens(sampler: Sampler, request: Request, row_logits: list[torch.Tensor], position: int, others: int, drop_at: int | None = None) -> list[int]:
    """Generate with `request` at batch row `position` among `others` unrelated requests."""
    gen = torch.Generator().manual_seed(100 + position)
    tokens = []
    for step, row in enumerate(row_logits):
        if step == drop_at:
            sampler.remove(request.request_id)  # preemption: state gone, rebuilt from the tokens
        batch = [make_request(f"o{step}-{j}", SamplingParams(temperature=1.0, top_k=j * 3, seed=j if j % 2 else None)) for j in range(others)]
        batch.insert(position, request)
        logits = torch.randn(len(batch), VOCAB, generator=gen)
        logits[position] = row
        token = sampler.sample(logits, batch)[position].token_id
        request.append_token(token)
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1234),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, frequency_penalty=0.3, seed=1234),
])
def test_seeded_rows_do_not_depend_on_batch_position_or_preemption(params: SamplingParams) -> None:
    row_logits = list(torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(6)) * 0.5)
    alone = _seeded_tokens(Sampler(VOCAB, "cpu"), make_request("s", params), row_logits, 0, 0)
    assert len(set(alone)) > 2
    for position in range(8):
        assert _seeded_tokens(Sampler(VOCAB, "cpu", seed=position), make_request("s", params), row_logits, position, 7) == alone
    assert _seeded_tokens(Sampler(VOCAB, "cpu"), make_request("s", params), row_logits, 3, 7, drop_at=4) == alone
    other = replace(params, seed=99)
    assert _seeded_tokens(Sampler(VOCAB, "cpu"), make_request("s", other), row_logits, 0, 0) != alone


def test_unseeded_rows_repeat_with_the_sampler_seed() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(7))

    def run(seed: int) -> list[int]:
        sampler = Sampler(VOCAB, "cpu", seed=seed)
        requests = [make_request(f"u{i}", SamplingParams(temperature=1.0, top_k=0, top_p=1.0)) for i in range(4)]
        out = []
        for _ in range(4):
            for request, result in zip(requests, sampler.sample(logits, requests)):
                request.append_token(result.token_id)
                out.append(result.token_id)
        return out

    assert run(1) == run(1) != run(2)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05),
])
def test_draw_frequencies_match_the_filtered_softmax(params: SamplingParams) -> None:
    vocab, n = 8, 4000
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    expected = reference_probs(row, params)
    expected = expected / expected.sum()
    requests = [make_request(f"d{i}", replace(params, seed=i)) for i in range(n)]
    tokens = [r.token_id for r in Sampler(vocab, "cpu").sample(row.expand(n, vocab).contiguous(), requests)]
    frequencies = torch.bincount(torch.tensor(tokens), minlength=vocab).double() / n
    assert torch.all(frequencies[expected == 0] == 0)
    torch.testing.assert_close(frequencies, expected.double(), atol=0.025, rtol=0)


def test_logprobs_are_the_raw_log_softmax_with_sorted_top_n() -> None:
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(8)) * 2
    logits[5] = float("nan")  # a padding row
    wanted = [None, 0, 3, 20, 5]
    requests = [
        make_request(f"l{i}", SamplingParams(temperature=0 if i % 2 else 1.0, logprobs=n, repetition_penalty=1.5, seed=i))
        for i, n in enumerate(wanted)
    ]
    for request in requests:
        request.append_token(int(torch.argmax(logits[0])))
    raw = torch.log_softmax(logits[:5], dim=-1)
    results = Sampler(VOCAB, "cpu").sample(logits, requests)
    assert len(results) == 5 and results[0].logprobs is None
    for i, (n, result) in enumerate(zip(wanted, results)):
        if n is None:
            continue
        lp = result.logprobs
        assert lp.token_id == result.token_id
        assert lp.logprob == pytest.approx(float(raw[i, result.token_id]), abs=1e-6)
        top = torch.topk(raw[i], n) if n else None
        assert list(lp.top) == ([] if top is None else top.indices.tolist())
        assert list(lp.top.values()) == pytest.approx([] if top is None else top.values.tolist(), abs=1e-6)
        assert list(lp.top.values()) == sorted(lp.top.values(), reverse=True)


def test_logits_of_the_wrong_shape_are_refused() -> None:
    sampler = Sampler(VOCAB, "cpu")
    request = make_request("x", SamplingParams())
    with pytest.raises(ValueError, match="logits must be"):
        sampler.sample(torch.zeros(1, VOCAB + 1), [request])
    with pytest.raises(ValueError, match="logits must be"):
        sampler.sample(torch.zeros(0, VOCAB), [request])
