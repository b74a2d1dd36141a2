"""The paged drafter (`AssistantProposer`) against our dense drafter on the same K/V: a target's paged
cache filled by the model runner over two prompts of different lengths (one far past the sliding
window), drafted in one batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from assistant_reference import hf_assistant, hf_drafts, hf_prefill, hf_target, patch_all_shared_stacks
from gemma4.assistant import Gemma4Assistant, SharedKVAttention, draft_greedy
from gemma4.backends import select_ops
from gemma4.config import FULL, load_config
from gemma4.engine.kv_cache_manager import KVCacheManager
from gemma4.engine.model_runner import ModelRunner
from gemma4.engine.request import Request
from gemma4.engine.sampling_params import SamplingParams
from gemma4.engine.scheduler import ScheduledBatch
from gemma4.engine.paged_attention import key_scales
from gemma4.engine.spec_decode.assistant_proposer import AssistantProposer
from gemma4.kv_layout import NULL_BLOCK, cache_groups
from gemma4.loader import load_assistant, load_model
from gemma4.modeling import DenseAttention, Gemma4ForCausalLM
from gemma4.ops.rope import apply_rope, rope_at
from gemma4.tiny import write_tiny_assistant, write_tiny_checkpoint

BLOCK_SIZE = 4
PROMPT_LENS = (150, 23)  # 150: more than twice the window (64), so the sliding window starts mid-context
DRAFTS = 4


@dataclass
class Drafting:
    """A target's paged cache filled over `prompts`, and a proposer over it."""

    target: Gemma4ForCausalLM
    drafter: Gemma4Assistant
    runner: ModelRunner
    proposer: AssistantProposer
    hidden: torch.Tensor  # [2, H] the target's final-normed states at the prompts' last rows
    tokens: torch.Tensor  # [2] the target's greedy next tokens
    tables: list[list[list[int]]]
    prompts: list[list[int]]
    target_path: Path
    assistant_path: Path


def _drafting(root: Path, variant: str) -> Drafting:
    target_path = write_tiny_checkpoint(root / "target", variant=variant, towers=False)
    assistant_path = write_tiny_assistant(root / "assistant", load_config(target_path), seed=2)
    target = load_model(target_path, dtype=torch.float32)
    drafter = load_assistant(assistant_path, target.config, dtype=torch.float32)
    groups = cache_groups(target.text_config)
    num_blocks = {g.name: 64 for g in groups}
    runner = ModelRunner(
        target, groups, num_blocks, BLOCK_SIZE, max_num_seqs=4, max_num_batched_tokens=256, max_model_len=256,
        cuda_graphs=False, kernels="torch",
    )
    kv = KVCacheManager(groups, num_blocks, BLOCK_SIZE, enable_prefix_caching=False)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 400, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    requests = [Request(f"r{i}", p, SamplingParams(), frozenset()) for i, p in enumerate(prompts)]
    for r in requests:
        assert kv.allocate(r.request_id, r.token_ids, 0, r.num_tokens)
    logits, _ = runner.execute(ScheduledBatch(requests, list(PROMPT_LENS)), kv)  # fills the cache
    with torch.no_grad():
        hidden = torch.cat([_last_hidden(target, p) for p in prompts])
    proposer = AssistantProposer(
        drafter, target, runner.cache, runner.ops, key_scales(target), target.model.rotary[FULL].inv_freq
    )
    return Drafting(
        target, drafter, runner, proposer, hidden, logits[: len(requests)].argmax(-1),
        [kv.block_tables(r.request_id) for r in requests], prompts, target_path, assistant_path,
    )


@pytest.fixture(scope="module", params=["e2b", "e4b", "26b-a4b", "31b"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Drafting:
    return _drafting(tmp_path_factory.mktemp(request.param), request.param)


def _last_hidden(target: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """The target's final-normed hidden state at the prompt's last row, `[1, H]`."""
    positions = torch.arange(len(prompt))[None]
    return target.hidden_states(torch.tensor([prompt]), positions, DenseAttention(positions, target.ops))[:, -1]


def _cached_kv(runner: ModelRunner, target, layer: int, table: list[int], length: int):
    """Keys and values `[1, length, kv_heads, D]` of `layer` read back from the paged cache (the oracle of
    the op's gather; K-as-V keys re-derived from the values as the target defines them)."""
    gi, li = runner.cache.location[layer]
    values = runner.cache.values[gi][li][table].flatten(0, 1)[:length][None]
    if runner.cache.keys[gi] is not None:
        return runner.cache.keys[gi][li][table].flatten(0, 1)[:length][None], values
    cos, sin = rope_at(torch.arange(length)[None], target.model.rotary[FULL].inv_freq)
    return apply_rope(values * key_scales(target)[layer], cos, sin), values


def test_paged_drafts_equal_dense_drafts_on_the_cached_kv(setup) -> None:
    target, drafter, runner, proposer = setup.target, setup.drafter, setup.runner, setup.proposer
    hidden, tokens, tables = setup.hidden, setup.tokens, setup.tables
    with torch.no_grad():
        drafts, logits = proposer.draft(hidden, tokens, list(PROMPT_LENS), tables, DRAFTS)
    assert drafts.shape == (2, DRAFTS) and drafts.dtype == torch.int64
    for r, length in enumerate(PROMPT_LENS):
        kv = {}
        for spec in drafter.layers:
            gi, _ = runner.cache.location[spec.kv_source]
            kv[spec.kv_source] = _cached_kv(runner, target, spec.kv_source, tables[r][gi], length)
        with torch.no_grad():
            expected, expected_logits = draft_greedy(
                drafter, target.model.embed_tokens, tokens[r : r + 1], hidden[r : r + 1],
                torch.tensor([[length]]), SharedKVAttention(kv, torch.tensor([length])), DRAFTS,
            )
        assert drafts[r].tolist() == expected[0].tolist()
        torch.testing.assert_close(logits[r], expected_logits[0], atol=1e-4, rtol=1e-4)
    assert proposer.propose(hidden, tokens, list(PROMPT_LENS), tables, DRAFTS).tolist() == drafts.tolist()


def test_sliding_blocks_before_the_drafters_window_are_not_read(setup) -> None:
    """Released (null) sliding blocks before key `pos - W - 1` change nothing; one inside the window fails
    the debug check (on in the tests)."""
    runner, proposer = setup.runner, setup.proposer
    hidden, tokens, tables = setup.hidden, setup.tokens, setup.tables
    groups = runner.cache.groups
    sliding = next(gi for gi, g in enumerate(groups) if g.sliding_window is not None)
    length, window = PROMPT_LENS[0], groups[sliding].sliding_window
    first_read = (length - window - 1) // BLOCK_SIZE
    released = [list(t) for t in tables[0]]
    released[sliding][:first_read] = [NULL_BLOCK] * first_read
    with torch.no_grad():
        before = proposer.propose(hidden, tokens, list(PROMPT_LENS), tables, DRAFTS)
        after = proposer.propose(hidden, tokens, list(PROMPT_LENS), [released, tables[1]], DRAFTS)
    assert after.tolist() == before.tolist()
    released[sliding][first_read] = NULL_BLOCK
    with pytest.raises(RuntimeError, match="null block, inside the drafter's window"):
        proposer.propose(hidden, tokens, list(PROMPT_LENS), [released, tables[1]], DRAFTS)


def test_bad_inputs_are_rejected(setup) -> None:
    proposer, hidden, tokens, tables = setup.proposer, setup.hidden, setup.tokens, setup.tables
    with pytest.raises(ValueError, match="positions"):
        proposer.propose(hidden[:1], tokens[:1], list(PROMPT_LENS), tables, DRAFTS)
    with pytest.raises(ValueError, match="num_tokens"):
        proposer.propose(hidden, tokens, list(PROMPT_LENS), tables, 0)


def test_paged_drafts_equal_transformers_candidate_generator(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fed transformers' next token and hidden state, the batched paged drafts over our cache are the
    candidate generator's over transformers' own K/V."""
    patch_all_shared_stacks(monkeypatch)
    reference, assistant = hf_target(setup.target_path), hf_assistant(setup.assistant_path)
    tokens, hidden, expected, expected_logits = [], [], [], []
    for prompt in setup.prompts:
        ids = torch.tensor([prompt])
        out, token = hf_prefill(reference, ids)
        drafts, logits = hf_drafts(reference, assistant, ids, out, token, DRAFTS)
        tokens.append(token[0])
        hidden.append(out.hidden_states[-1][:, -1])
        expected.append(drafts[0].tolist())
        expected_logits.append(logits[0])
    with torch.no_grad():
        drafts, logits = setup.proposer.draft(torch.cat(hidden), torch.cat(tokens), list(PROMPT_LENS), setup.tables, DRAFTS)
    assert drafts.tolist() == expected
    # The two caches differ by float rounding (two implementations of the target), which later steps amplify.
    torch.testing.assert_close(logits[:, 0], torch.stack(expected_logits)[:, 0], atol=1e-3, rtol=1e-3)


def test_triton_kernels_draft_what_the_reference_ops_draft(tmp_path: Path) -> None:
    """Over one cache, the Triton ops (interpreted on the CPU: attention plan, paged attention, norms)
    draft what the torch ops draft (31B-shaped: K-as-V full layers and plain sliding ones, both read paths)."""
    setup = _drafting(tmp_path, "31b")
    target = setup.target
    ops = select_ops("cpu", "triton")
    assert ops.kernels == "triton"
    kernels = AssistantProposer(
        load_assistant(setup.assistant_path, target.config, dtype=torch.float32), target, setup.runner.cache, ops,
        key_scales(target), target.model.rotary[FULL].inv_freq,
    )
    args = (setup.hidden, setup.tokens, list(PROMPT_LENS), setup.tables, DRAFTS)
    with torch.no_grad():
        want, want_logits = setup.proposer.draft(*args)
        got, got_logits = kernels.draft(*args)
    assert got.tolist() == want.tolist()
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
