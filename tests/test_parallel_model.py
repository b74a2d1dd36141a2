"""Tensor- and expert-parallel model shards over gloo: the sharded forward equals the single-process
one, the shards hold exactly the bytes `gemma4.memory` prices, and a placement change keeps outputs.

One pool of four spawned ranks serves every case (2-rank cases run on ranks 0-1 over a subgroup).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma4.loader
from gemma4.checkpoint import SINGLE_FILE, CheckpointError
from gemma4.config import load_config
from gemma4.loader import load_model
from gemma4.memory import weight_bytes_per_gpu
from gemma4.modeling import Gemma4ForCausalLM
from gemma4.parallel.comm import Collectives
from gemma4.parallel.layout import ParallelLayout
from gemma4.parallel.placement import ExpertPlacement
from gemma4.parallel.procs import RankProcesses
from gemma4.tiny import write_tiny_checkpoint
from parallel_harness import POOL_SIZE, ModelRank

VARIANTS = ("31b", "e2b", "26b-a4b")
# (variant, tensor_parallel, expert_parallel)
LAYOUTS = [
    ("31b", 2, 1),
    ("31b", 4, 1),
    ("e2b", 2, 1),
    ("e2b", 4, 1),
    ("26b-a4b", 2, 1),
    ("26b-a4b", 2, 2),
    ("26b-a4b", 4, 2),
    ("26b-a4b", 4, 4),
]
SEQ_LEN = 80  # past the tiny configs' sliding window (64)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {v: write_tiny_checkpoint(tmp_path_factory.mktemp(v), variant=v, seed=3) for v in VARIANTS}


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, SEQ_LEN), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path], input_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, dict]]:
    """Single-process fp32 logits and expert loads of each variant on `input_ids`."""
    out = {}
    for variant, path in checkpoints.items():
        model = load_model(path, dtype=torch.float32, device="cpu")
        with torch.inference_mode():
            out[variant] = (model(input_ids), model.expert_load())
    return out


@pytest.fixture(scope="module")
def pool():
    ranks = RankProcesses(POOL_SIZE, ModelRank, env={"OMP_NUM_THREADS": "1"})
    yield ranks
    ranks.close()


def _sharded_logits(pool: RankProcesses, input_ids: torch.Tensor, tp: int) -> list[torch.Tensor]:
    results = pool.call("logits", input_ids)
    assert all(r is None for r in results[tp:])
    return results[:tp]


def _assert_matches(logits: list[torch.Tensor], expected: torch.Tensor) -> None:
    """Every rank has the full logits, equal to the single-process ones up to summation order."""
    for rank_logits in logits:
        assert rank_logits.shape == expected.shape and rank_logits.dtype == torch.float32
        torch.testing.assert_close(rank_logits, expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(rank_logits.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize(("variant", "tp", "ep"), LAYOUTS, ids=[f"{v}-tp{t}-ep{e}" for v, t, e in LAYOUTS])
def test_sharded_forward_equals_single_process(pool, checkpoints, reference, input_ids, variant, tp, ep) -> None:
    sizes = pool.call("load", checkpoints[variant], tp, ep)
    expected_logits, expected_load = reference[variant]
    _assert_matches(_sharded_logits(pool, input_ids, tp), expected_logits)

    config = load_config(checkpoints[variant])
    priced = weight_bytes_per_gpu(
        config, weight_dtype="fp32", tensor_parallel=tp, expert_parallel=ep, ple_on_device=True, modalities="all"
    )
    assert sizes[:tp] == [sum(priced.values())] * tp  # the towers too: replicated on every rank
    assert pool.call("expert_load")[:tp] == [expected_load] * tp


def _shuffled(placement: ExpertPlacement, seed: int) -> ExpertPlacement:
    """Another valid placement with the same shape: every expert once, other hot copies, shuffled."""
    rng = random.Random(seed)
    e, slots = placement.num_experts, placement.slots_per_group
    physical = list(range(e)) + [rng.randrange(e) for _ in range(len(placement.physical()) - e)]
    rng.shuffle(physical)
    groups = tuple(tuple(physical[g * slots : (g + 1) * slots]) for g in range(placement.expert_parallel))
    return ExpertPlacement(e, groups)


def test_redundant_experts_and_a_placement_change(pool, checkpoints, reference, input_ids) -> None:
    """tp4/ep4 with 4 redundant slots, then every MoE layer moved to another placement between steps."""
    path = checkpoints["26b-a4b"]
    sizes = pool.call("load", path, 4, 4, 4)
    priced = weight_bytes_per_gpu(
        load_config(path), weight_dtype="fp32", tensor_parallel=4, expert_parallel=4, redundant_experts=4,
        ple_on_device=True, modalities="all",
    )
    assert sizes == [sum(priced.values())] * 4  # the memory model prices the redundant slots the ranks hold
    expected_logits, _ = reference["26b-a4b"]
    _assert_matches(_sharded_logits(pool, input_ids, 4), expected_logits)

    before = pool.call("expert_placements")[0]
    assert before and all(p.slots_per_group == 5 for p in before.values())
    after = {layer: _shuffled(p, seed=layer) for layer, p in before.items()}
    assert all(after[layer].slots != before[layer].slots for layer in before)
    pool.call("set_expert_placements", after, path)
    assert pool.call("expert_placements") == [after] * POOL_SIZE
    _assert_matches(_sharded_logits(pool, input_ids, 4), expected_logits)


def test_checkpoint_problems_raise_before_allocation_with_a_layout(
    checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sharded load validates the whole checkpoint against the full shapes first, as a single one does."""
    target = tmp_path / "broken"
    target.mkdir()
    for file in checkpoints["26b-a4b"].iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    prefix = "model.language_model."
    tensors = load_file(target / SINGLE_FILE)
    del tensors[prefix + "layers.0.experts.down_proj"]
    tensors[prefix + "embed_tokens.weight"] = tensors[prefix + "embed_tokens.weight"][:256]  # a rank's shard
    save_file(tensors, target / SINGLE_FILE, metadata={"format": "pt"})

    def forbidden(*args, **kwargs):
        raise AssertionError("the checkpoint must be validated before anything is allocated or read")

    monkeypatch.setattr(gemma4.loader, "read_tensors", forbidden)
    monkeypatch.setattr(Gemma4ForCausalLM, "to_empty", forbidden)
    with pytest.raises(CheckpointError) as caught:
        load_model(target, dtype=torch.float32, layout=ParallelLayout(2, 2, 0), comm=Collectives(2, 0))
    text = "\n".join(caught.value.problems)
    assert "missing tensor 'model.language_model.layers.0.experts.down_proj'" in text
    assert "'model.language_model.embed_tokens.weight' in model.safetensors has shape [256, 128], expected [512, 128]" in text
