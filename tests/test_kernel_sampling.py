"""The Triton draw (no sort) against the reference draw (sort / top-k, filters, race), under the interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from gemma4.engine.request import Request  # noqa: E402
from gemma4.engine.sampler import Sampler  # noqa: E402
from gemma4.engine.sampling_params import SamplingParams  # noqa: E402
from gemma4.kernels import sampling as kernel  # noqa: E402
from gemma4.ops import sampling as reference  # noqa: E402

ROWS = 5
TEMPERATURES = [0.3, 1.0, 2.0, 0.05, 1.0]  # 0.05: nearly greedy


def row_params(top_k: list[int], top_p: list[float], min_p: list[float]) -> tuple[torch.Tensor, ...]:
    return (
        torch.tensor(top_k, dtype=torch.int64),
        torch.tensor(TEMPERATURES, dtype=torch.float32),
        torch.tensor(top_p, dtype=torch.float32),
        torch.tensor(min_p, dtype=torch.float32),
    )


def keys_for(step: int, rows: int = ROWS) -> torch.Tensor:
    return reference.row_keys(reference.seed_keys(torch.arange(rows) * 7919 + 11), torch.full((rows,), step))


def candidate_count(top_k: torch.Tensor, vocab: int) -> int:
    """The reference's `k`: the largest top-k, or the whole row when some row has none (as the Sampler)."""
    return vocab if bool((top_k >= vocab).any()) else int(top_k.max())


# Per row (5 rows): top_k (V = none), top_p, min_p; and the rows where only the largest logit survives.
FILTERS = {
    "none": (["V"] * 5, [1.0] * 5, [0.0] * 5),
    "top_k": ([1, 2, 10, 100, 999], [1.0] * 5, [0.0] * 5),
    "top_p": (["V"] * 5, [1e-6, 0.1, 0.5, 0.9, 0.99], [0.0] * 5),  # 1e-6: only the largest survives
    "min_p": (["V"] * 5, [1.0] * 5, [0.01, 0.1, 0.5, 1.0, 0.0]),  # 1.0: only the largest survives
    "all": ([1, 40, "V", 300, 12], [0.9, 0.7, 0.95, 1e-6, 0.5], [0.05, 0.0, 0.1, 0.02, 0.3]),
}
GREEDY_ROWS = {"none": [], "top_k": [0], "top_p": [0], "min_p": [3], "all": [0, 3]}


def filters(name: str, vocab: int) -> tuple[torch.Tensor, ...]:
    top_k, top_p, min_p = FILTERS[name]
    return row_params([vocab if k == "V" else k for k in top_k], top_p, min_p)


@pytest.mark.parametrize("name", list(FILTERS))
def test_kernel_draw_equals_the_reference_for_each_filter(name: str) -> None:
    vocab = 1000  # not a multiple of the chunk (256): a partial last chunk
    logits = torch.randn(ROWS, vocab, generator=torch.Generator().manual_seed(len(name))) * 3
    logits[2, 5:40] = float("-inf")  # masked stop ids
    params = filters(name, vocab)
    k = candidate_count(params[0], vocab)
    for step in range(2):
        keys = keys_for(step)
        expected = reference.draw(logits, *params, keys, k)
        assert kernel.draw(logits, *params, keys, k).tolist() == expected.tolist()
        assert all(expected[i] == logits[i].argmax() for i in GREEDY_ROWS[name])


@pytest.mark.parametrize("name", ["none", "all"])
def test_grammar_masked_rows_draw_only_allowed_tokens(name: str) -> None:
    """Structured outputs leave a row a few finite logits among -inf (one row a single allowed token)."""
    vocab = 1000
    logits = torch.randn(ROWS, vocab, generator=torch.Generator().manual_seed(3)) * 3
    allowed = [[7], [1, 500, 999], [0, 255, 256, 257], list(range(600, 700)), [42, 43]]
    masked = torch.full_like(logits, float("-inf"))
    for i, ids in enumerate(allowed):
        masked[i, ids] = logits[i, ids]
    params = filters(name, vocab)
    k = candidate_count(params[0], vocab)
    for step in range(3):
        keys = keys_for(step)
        expected = reference.draw(masked, *params, keys, k)
        assert kernel.draw(masked, *params, keys, k).tolist() == expected.tolist()
        assert all(int(t) in ids for t, ids in zip(expected, allowed))


def test_flat_rows_draw_the_token_with_the_least_noise() -> None:
    """Equal logits: the winner is decided by the noise alone, over the whole row (bit-exact hash and log)."""
    vocab = 1000
    logits = torch.zeros(ROWS, vocab)
    params = filters("none", vocab)
    keys = keys_for(3)
    expected = reference.draw(logits, *params, keys, vocab)
    noise = reference.exponential_noise(keys, torch.arange(vocab).expand(ROWS, vocab))
    assert expected.tolist() == torch.argmin(noise, dim=-1).tolist()
    assert kernel.draw(logits, *params, keys, vocab).tolist() == expected.tolist()


def test_kernel_draw_equals_the_reference_on_a_larger_row() -> None:
    vocab = 32_768  # every filter on a long row (too slow at 262,144 here); the real size's 2048-logit chunks
    logits = torch.randn(ROWS, vocab, generator=torch.Generator().manual_seed(9)) * 2
    params = row_params([vocab, 50, vocab, 1, 2000], [1.0, 0.9, 0.8, 1.0, 0.95], [0.0, 0.05, 0.0, 0.0, 0.01])
    keys = keys_for(5)
    assert kernel.block_for(vocab) == kernel.block_for(kernel.SHIPPED_VOCAB)
    expected = reference.draw(logits, *params, keys, vocab)
    assert kernel.draw(logits, *params, keys, vocab).tolist() == expected.tolist()


def test_kernel_draw_equals_the_reference_at_gemmas_vocabulary() -> None:
    vocab = kernel.SHIPPED_VOCAB  # two rows only: ~10 s in the interpreter
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(1)) * 2
    params = (torch.tensor([vocab] * 2), torch.tensor([1.0, 0.7]), torch.tensor([1.0, 0.8]), torch.tensor([0.0] * 2))
    keys = keys_for(2, rows=2)
    assert kernel.draw(logits, *params, keys, vocab).tolist() == reference.draw(logits, *params, keys, vocab).tolist()


def test_sampler_with_the_kernel_draw_gives_the_reference_tokens() -> None:
    vocab = 50
    params = [
        SamplingParams(temperature=1.0, top_k=5, top_p=1.0, seed=1),
        SamplingParams(temperature=0.7, top_k=12, top_p=0.8, seed=2),
        SamplingParams(temperature=1.3, top_k=0, top_p=0.9),
        SamplingParams(temperature=0.5, top_k=0, top_p=1.0, min_p=0.1, min_tokens=2),  # stop ids masked
        SamplingParams(temperature=0),
    ]
    logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(4)) * 2
    logits[3, 7] = logits[3].max() + 5  # a stop id that would win
    samplers = [Sampler(vocab, "cpu", seed=5), Sampler(vocab, "cpu", seed=5, draw=kernel.draw)]
    requests = [
        [Request(f"r{i}", [1, 2], p, stop_token_ids=frozenset({7})) for i, p in enumerate(params)] for _ in samplers
    ]
    for _ in range(3):
        tokens = []
        for sampler, batch in zip(samplers, requests):
            tokens.append([r.token_id for r in sampler.sample(logits, batch)])
            for request, token in zip(batch, tokens[-1]):
                request.append_token(token)
        assert tokens[0] == tokens[1]


def test_kernel_draw_compiles_into_one_graph() -> None:
    vocab = 300
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(2))
    top_k, temperature = torch.tensor([vocab, 8, 30]), torch.tensor([1.0, 0.8, 1.5])
    top_p, min_p = torch.tensor([0.9, 1.0, 0.6]), torch.tensor([0.0, 0.1, 0.0])
    keys = keys_for(1, rows=3)

    def fn(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return kernel.draw(logits * 1.0, top_k, temperature, top_p, min_p, keys, vocab)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert compiled(logits, keys).tolist() == fn(logits, keys).tolist()
    assert fn(logits, keys).tolist() == reference.draw(logits, top_k, temperature, top_p, min_p, keys, vocab).tolist()
