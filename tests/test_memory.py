"""The memory model against the checkpoints, the published tables and itself; the plan CLI; the engine's KV budget."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import torch

from gemma4.accelerators import GiB, get_accelerator
from gemma4.config import variant_config
from gemma4.engine.llm import LLM
from gemma4.engine.llm_engine import CPU_KV_CACHE_BYTES, EngineArgs, resolve_kv_cache_bytes
from gemma4.kv_layout import split_kv_budget
from gemma4.memory import (
    HOST_BASE_BYTES,
    PUBLISHED_DRAFTERS,
    WEIGHT_FORMATS,
    DrafterShape,
    ServingSpec,
    activation_bytes,
    check_layout,
    encoder_cache_bytes,
    checkpoint_bytes,
    drafter_param_count,
    drafter_weight_bytes,
    kv_bytes_per_sequence,
    kv_bytes_per_token,
    kv_cache_budget_bytes,
    load_drafter_shape,
    max_num_seqs,
    min_gpus,
    param_counts,
    plan,
    ple_table_bytes,
    rank_cache_groups,
    speculative_buffer_bytes,
    weight_bytes_per_gpu,
)
from gemma4.modeling import Gemma4ForCausalLM
from gemma4.tiny import tiny_assistant_config, tiny_config

REPO = Path(__file__).resolve().parents[1]
KEYS = Path(__file__).parent / "data" / "checkpoint-keys"
VARIANTS = {"E2B": "e2b", "E4B": "e4b", "26B-A4B": "26b-a4b", "31B": "31b"}


def key_numels(file: Path) -> dict[str, int]:
    """Parameters per top-level prefix (`model.language_model`, `model.vision_tower`, ...) of a key list."""
    out: dict[str, int] = {}
    for line in file.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split("\t")
        prefix = ".".join(name.split(".")[:2])
        out[prefix] = out.get(prefix, 0) + math.prod(int(d) for d in shape.strip("[]").split(",") if d.strip())
    return out


# ---------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_counts_equal_the_checkpoint_key_lists(name: str) -> None:
    counts = param_counts(VARIANTS[name])
    text = key_numels(KEYS / f"{name}.txt")
    towers = key_numels(KEYS / f"{name}.towers.txt")
    assert counts.text == text["model.language_model"]
    assert counts.vision == towers["model.vision_tower"] + towers["model.embed_vision"]
    assert counts.audio == towers.get("model.audio_tower", 0) + towers.get("model.embed_audio", 0)
    header = (KEYS / f"{name}.txt").read_text().splitlines()[2]  # "# total params (excl. tied lm_head): N"
    assert counts.total == int(header.rsplit(":", 1)[1])


def test_parameter_breakdown_matches_the_architecture_reference() -> None:
    billions = {v: round(param_counts(v).text / 1e9, 2) for v in VARIANTS.values()}
    assert billions == {"e2b": 4.63, "e4b": 7.46, "26b-a4b": 25.23, "31b": 30.70}
    assert round(param_counts("e2b").ple / 1e9, 2) == 2.35 and round(param_counts("e4b").ple / 1e9, 2) == 2.82
    assert round(param_counts("26b-a4b").experts / 1e9, 2) == 22.84
    assert round(param_counts("e2b").vision / 1e6, 1) == 168.5 and round(param_counts("e4b").audio / 1e6) == 309
    # E2B still stores k/v/k_norm for its 20 KV-sharing layers (16 sliding, 4 full); the model never loads them.
    assert param_counts("e2b").unused_kv == 16 * (2 * 256 * 1536 + 256) + 4 * (2 * 512 * 1536 + 512)
    assert param_counts("31b").unused_kv == 0


@pytest.mark.parametrize("variant", list(VARIANTS.values()))
def test_loaded_parameters_equal_our_model(variant: str) -> None:
    """The inventory counts exactly what our model holds (on the shrunken config of each variant)."""
    config = tiny_config(variant)
    with torch.device("meta"):
        model = Gemma4ForCausalLM(config)
    held = sum(t.numel() for t in model.state_dict().values())
    assert held == param_counts(config).text
    bf16 = weight_bytes_per_gpu(config, weight_dtype="bf16", ple_on_device=True)
    assert sum(bf16.values()) == 2 * held


# The seeds' table: total params (towers included) x 2 / 1 / 0.5 bytes, nominal params and figures as printed.
SEED_TABLE = {
    "e2b": ("5.1", ("10.2", "5.1", "2.6")),
    "e4b": ("8", ("16", "8", "4")),
    "26b-a4b": ("26", ("52", "26", "13")),
    "31b": ("31", ("62", "31", "15.5")),
}


def _half_unit(printed: str) -> float:
    decimals = len(printed.partition(".")[2])
    return 0.5 * 10**-decimals


@pytest.mark.parametrize("variant", list(SEED_TABLE))
def test_checkpoint_bytes_reproduce_the_seeds_table(variant: str) -> None:
    nominal, figures = SEED_TABLE[variant]
    assert abs(param_counts(variant).stored / 1e9 - float(nominal)) <= _half_unit(nominal)
    for dtype, printed in zip(("fp16", "int8", "int4"), figures):
        width = WEIGHT_FORMATS[dtype].bytes_per_param
        # The figures are the nominal count times the width, rounded as printed.
        tolerance = width * _half_unit(nominal) + _half_unit(printed)
        assert abs(checkpoint_bytes(variant, dtype) / 1e9 - float(printed)) <= tolerance


# The anchors' weights column (performance-anchors s3.5): 31B/26B text only, E2B/E4B everything on the device.
ANCHOR_WEIGHTS_GB = [
    ("31b", "bf16", ("text",), False, 61.4),
    ("31b", "fp8", ("text",), False, 32.1),
    ("26b-a4b", "bf16", ("text",), False, 50.4),
    ("26b-a4b", "fp8", ("text",), False, 25.9),
    ("e4b", "bf16", "all", True, 16.0),
    ("e2b", "bf16", "all", True, 10.2),
]


@pytest.mark.parametrize("variant,dtype,modalities,ple,gb", ANCHOR_WEIGHTS_GB)
def test_weights_per_gpu_match_the_anchors(variant: str, dtype: str, modalities, ple: bool, gb: float) -> None:
    weights = weight_bytes_per_gpu(
        variant_config(variant), weight_dtype=dtype, modalities=modalities, ple_on_device=ple
    )
    assert sum(weights.values()) / 1e9 == pytest.approx(gb, rel=0.015)


def test_quantised_weights_keep_the_embedding_in_bf16_and_pay_for_scales() -> None:
    config = variant_config("31b")
    bf16 = weight_bytes_per_gpu(config, weight_dtype="bf16")
    for dtype, overhead in (("fp8", 4 / 128**2), ("int8", 4 / 5376), ("int4", 2 / 128)):
        quant = weight_bytes_per_gpu(config, weight_dtype=dtype)
        assert quant["embedding"] == bf16["embedding"]
        width = WEIGHT_FORMATS[dtype].bytes_per_param
        # Decoder matmuls at the format's width plus scales; norms (a few hundred thousand) stay 16-bit.
        assert quant["decoder"] / (bf16["decoder"] / 2) == pytest.approx(width + overhead, rel=2e-3)
    assert WEIGHT_FORMATS["int4"].matrix_bytes(5376, 21504) / (5376 * 21504 * 0.5) == pytest.approx(1.03125)


def test_tensor_and_expert_parallel_split_the_weights() -> None:
    config = variant_config("26b-a4b")
    one = weight_bytes_per_gpu(config)
    ep2 = weight_bytes_per_gpu(config, tensor_parallel=2, expert_parallel=2)
    tp2 = weight_bytes_per_gpu(config, tensor_parallel=2, expert_parallel=1)
    assert ep2["experts"] == tp2["experts"] == one["experts"] // 2
    assert ep2["embedding"] == one["embedding"] // 2
    # Replicated norms/router keep the decoder a little above half.
    assert one["decoder"] // 2 < ep2["decoder"] < one["decoder"] * 0.51
    with pytest.raises(ValueError, match="expert_parallel=3"):
        weight_bytes_per_gpu(config, tensor_parallel=4, expert_parallel=3)
    with pytest.raises(ValueError, match="does not divide the attention heads"):
        weight_bytes_per_gpu(variant_config("31b"), tensor_parallel=3)


def test_redundant_experts_add_expert_slots_to_every_ep_rank() -> None:
    """Each EP rank holds (E + R) / ep experts' shards; nothing else changes."""
    config = variant_config("26b-a4b")
    experts = config.text.num_experts
    assert experts is not None
    for tp, ep, redundant in ((2, 2, 2), (4, 4, 8), (4, 2, 4), (1, 1, 3)):
        plain = weight_bytes_per_gpu(config, tensor_parallel=tp, expert_parallel=ep)
        more = weight_bytes_per_gpu(config, tensor_parallel=tp, expert_parallel=ep, redundant_experts=redundant)
        per_expert = plain["experts"] * ep // experts  # one expert's shard on one rank
        assert more["experts"] == (experts + redundant) // ep * per_expert
        assert {k: v for k, v in more.items() if k != "experts"} == {k: v for k, v in plain.items() if k != "experts"}
    with pytest.raises(ValueError, match="redundant_experts=3 must be a multiple of expert_parallel=2"):
        weight_bytes_per_gpu(config, tensor_parallel=2, expert_parallel=2, redundant_experts=3)
    with pytest.raises(ValueError, match="redundant_experts must be >= 0"):
        check_layout(config.text, 2, 2, -2)
    with pytest.raises(ValueError, match="redundant_experts applies to the MoE variant"):
        weight_bytes_per_gpu(variant_config("31b"), redundant_experts=2)


def test_redundant_experts_are_priced_by_the_plan_and_the_engine_budget_alike() -> None:
    spec = ServingSpec("26b-a4b", accelerator="l4", gpus=4, redundant_experts=8)
    copies, plain = plan(spec), plan(dataclasses.replace(spec, redundant_experts=0))
    assert copies.feasible and (copies.tensor_parallel, copies.expert_parallel) == (4, 4)
    extra = copies.weights_per_gpu["experts"] - plain.weights_per_gpu["experts"]
    assert extra == plain.weights_per_gpu["experts"] * 8 // variant_config("26b-a4b").text.num_experts
    assert plain.kv_cache_bytes_per_gpu - copies.kv_cache_bytes_per_gpu == extra
    acc = get_accelerator("l4")
    assert copies.kv_cache_bytes_per_gpu == kv_cache_budget_bytes(
        variant_config("26b-a4b"), weight_dtype="bf16", device_memory_bytes=acc.memory_bytes,
        usable_fraction=acc.usable_fraction, max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens, tensor_parallel=4, expert_parallel=4,
        redundant_experts=8)
    # Auto layouts skip EP degrees that do not divide the redundant slots; explicit ones are refused.
    assert plan(dataclasses.replace(spec, gpus=None)).expert_parallel == 4
    skipped = plan(dataclasses.replace(spec, gpus=None, redundant_experts=2))
    assert not skipped.feasible and "on 2 x l4" in (skipped.reason or "")
    with pytest.raises(ValueError, match="multiple of expert_parallel=4"):
        plan(dataclasses.replace(spec, redundant_experts=2))
    with pytest.raises(ValueError, match="redundant_experts applies to the MoE variant"):
        ServingSpec("e4b", redundant_experts=2)


def test_ple_table_lives_on_the_host_unless_asked() -> None:
    config = variant_config("e4b")
    off = weight_bytes_per_gpu(config)
    on = weight_bytes_per_gpu(config, ple_on_device=True)
    assert "ple" not in off and on["ple"] == ple_table_bytes(config.text) == 262_144 * 42 * 256 * 2
    host, device = ServingSpec("e4b", max_model_len=4096, ple_on_device=False), ServingSpec("e4b", max_model_len=4096)
    assert plan(device).per_gpu.weights == plan(host).per_gpu.weights + on["ple"]
    assert plan(host).host_memory_bytes >= HOST_BASE_BYTES + on["ple"]  # the pod holds the table instead


# ---------------------------------------------------------------------------- KV cache

# Hand-computed from the architecture reference (s4, s6, s15.7): layers x KV heads x head_dim x (K, V) x 2 bytes.
KV_PER_TOKEN = {
    "e2b": {"sliding": 12 * 1 * 256 * 2 * 2, "full": 3 * 1 * 512 * 2 * 2},  # 12,288 / 6,144
    "e4b": {"sliding": 20 * 2 * 256 * 2 * 2, "full": 4 * 2 * 512 * 2 * 2},  # 40,960 / 16,384
    "26b-a4b": {"sliding": 25 * 8 * 256 * 2 * 2, "full": 5 * 2 * 512 * 1 * 2},  # 204,800 / 10,240 (K=V once)
    "31b": {"sliding": 50 * 16 * 256 * 2 * 2, "full": 10 * 4 * 512 * 1 * 2},  # 819,200 / 40,960 (K=V once)
}
WINDOW = {"e2b": 512, "e4b": 512, "26b-a4b": 1024, "31b": 1024}


@pytest.mark.parametrize("variant", list(KV_PER_TOKEN))
def test_kv_bytes_per_token_and_sequence(variant: str) -> None:
    text = variant_config(variant).text
    per_token = KV_PER_TOKEN[variant]
    assert kv_bytes_per_token(text) == per_token
    assert kv_bytes_per_token(text, "fp8") == {g: n // 2 for g, n in per_token.items()}
    for length in (4096, 32768):  # sliding layers keep only their window
        expected = per_token["sliding"] * WINDOW[variant] + per_token["full"] * length
        assert kv_bytes_per_sequence(text, length) == expected
    assert kv_bytes_per_sequence(text, 300) == (per_token["sliding"] + per_token["full"]) * 300


def test_kv_sequence_sizes_match_the_anchors_r3_table() -> None:
    """R3 (bf16, K and V stored separately) in MB; E-models have no K=V layers so they match exactly."""
    assert round(kv_bytes_per_sequence(variant_config("e2b").text, 4096) / 1e6) == 31
    assert round(kv_bytes_per_sequence(variant_config("e2b").text, 32768) / 1e6) == 208
    assert round(kv_bytes_per_sequence(variant_config("e4b").text, 32768) / 1e6) == 558
    # 31B with both K and V on the global layers would be R3's 3,523 MB; K=V once saves 40,960 B/token there.
    assert round((kv_bytes_per_sequence(variant_config("31b").text, 32768) + 40_960 * 32768) / 1e6) == 3523


def test_kv_heads_split_across_tensor_parallel_ranks_with_replication() -> None:
    assert kv_bytes_per_token(variant_config("31b").text, tensor_parallel=2) == {"sliding": 409_600, "full": 20_480}
    # 8 ranks: 16 sliding heads split to 2; 4 global heads cannot split 8 ways, so each rank keeps one.
    assert kv_bytes_per_token(variant_config("31b").text, tensor_parallel=8) == {"sliding": 102_400, "full": 10_240}
    assert kv_bytes_per_token(variant_config("e2b").text, tensor_parallel=2) == KV_PER_TOKEN["e2b"]


# ---------------------------------------------------------------------------- activations


def test_sampler_transient_grows_with_the_sampled_rows() -> None:
    config = variant_config("31b")
    small = activation_bytes(config, tokens=2048, sampled_rows=16)
    large = activation_bytes(config, tokens=2048, sampled_rows=1024)
    # 1,024 rows of fp32 logits + sort temporaries over 262,144 entries dominate.
    assert large - small > (1024 - 16) * 262_144 * 4
    assert activation_bytes(config, tokens=4096, sampled_rows=16) > small


def test_encoder_cache_is_soft_tokens_of_text_hidden_in_the_model_dtype() -> None:
    config = variant_config("e4b")
    hidden = config.text.hidden_size
    image = ("text", "image")
    assert encoder_cache_bytes(config, modalities=image, max_num_batched_tokens=2048) == 2 * 2048 * hidden * 2
    assert encoder_cache_bytes(config, modalities="all", max_num_batched_tokens=512, encoder_cache_tokens=300,
                               activation_width=4) == 300 * hidden * 4
    # Text only: the engine builds no cache.
    assert encoder_cache_bytes(config, modalities=("text",), max_num_batched_tokens=2048) == 0
    assert encoder_cache_bytes(variant_config("31b"), modalities="all", max_num_batched_tokens=2048) > 0


def test_plan_leaves_room_for_the_encoder_cache_when_media_is_served() -> None:
    spec = ServingSpec("e4b", modalities=("image",), max_model_len=4096)
    hidden = variant_config("e4b").text.hidden_size
    default = plan(spec)
    assert default.per_gpu.encoder_cache == 2 * spec.max_num_batched_tokens * hidden * 2
    assert default.per_gpu.total <= default.per_gpu.capacity
    larger = plan(dataclasses.replace(spec, encoder_cache_tokens=3 * spec.max_num_batched_tokens))
    # Only the cache differs, and the KV budget shrinks by exactly its growth.
    assert larger.per_gpu.encoder_cache - default.per_gpu.encoder_cache == spec.max_num_batched_tokens * hidden * 2
    assert default.kv_cache_bytes_per_gpu - larger.kv_cache_bytes_per_gpu == spec.max_num_batched_tokens * hidden * 2
    assert plan(dataclasses.replace(spec, modalities=("text",))).per_gpu.encoder_cache == 0
    # fp32 weights compute (and cache) in fp32; quantised weights still in bf16.
    fp32 = plan(dataclasses.replace(spec, weight_dtype="fp32"))
    assert fp32.per_gpu.encoder_cache == 2 * default.per_gpu.encoder_cache
    assert plan(dataclasses.replace(spec, weight_dtype="int8")).per_gpu.encoder_cache == default.per_gpu.encoder_cache
    acc = get_accelerator(spec.accelerator)
    assert default.kv_cache_bytes_per_gpu == kv_cache_budget_bytes(
        variant_config("e4b"), weight_dtype="bf16", device_memory_bytes=acc.memory_bytes,
        usable_fraction=acc.usable_fraction, max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=2048,
        modalities=("image",),
    )
    with pytest.raises(ValueError, match="encoder_cache_tokens must be a positive integer or None"):
        dataclasses.replace(spec, encoder_cache_tokens=0)


def test_an_infeasible_media_plan_names_the_encoder_cache() -> None:
    result = plan(ServingSpec("31b", modalities="all", accelerator="l4", gpus=1))
    assert not result.feasible and "activations, the encoder cache, graphs" in result.reason
    assert "encoder cache" not in plan(ServingSpec("31b", accelerator="l4", gpus=1)).reason


# ---------------------------------------------------------------------------- plan


def test_plan_reproduces_the_anchors_fits_table_roughly() -> None:
    """31B bf16 on one H100 at 4K is single-digit sequences (anchors: 9); fp8 weights give several times more."""
    bf16 = max_num_seqs(ServingSpec("31b", max_model_len=4096, gpus=1))
    fp8 = max_num_seqs(ServingSpec("31b", weight_dtype="fp8", max_model_len=4096, gpus=1))
    assert 1 <= bf16 <= 9 and fp8 >= 3 * bf16
    assert max_num_seqs(ServingSpec("31b", max_model_len=4096, gpus=1, accelerator="h200-141gb")) > 4 * bf16
    # The KV room after weights is the anchors' (10.6 GB) within what activations and overheads take.
    budget = plan(ServingSpec("31b", max_model_len=4096, gpus=1)).kv_cache_bytes_per_gpu
    assert 0.8 * 10.6e9 < budget < 1.3 * 10.6e9
    assert max_num_seqs(ServingSpec("e2b", max_model_len=4096)) > 500


def test_auto_layout_picks_the_smallest_gpu_count_that_fits() -> None:
    spec = ServingSpec("31b", max_model_len=32768, max_num_seqs=16)
    chosen = plan(spec)
    assert chosen.feasible and chosen.gpus_per_replica == chosen.tensor_parallel == 2 == min_gpus(spec)
    assert not plan(dataclasses.replace(spec, gpus=1)).feasible
    assert chosen.per_gpu.total <= chosen.per_gpu.capacity
    assert chosen.kv_cache_bytes_per_gpu >= chosen.per_gpu.kv_cache


def test_moe_auto_layout_uses_expert_parallel_over_all_gpus() -> None:
    chosen = plan(ServingSpec("26b-a4b", max_model_len=32768, max_num_seqs=64))
    assert chosen.feasible and chosen.gpus_per_replica > 1
    assert chosen.expert_parallel == chosen.tensor_parallel == chosen.gpus_per_replica
    assert plan(ServingSpec("26b-a4b", max_model_len=4096)).gpus_per_replica == 1


def test_infeasible_plan_says_why_and_what_would_fit() -> None:
    result = plan(ServingSpec("31b", accelerator="l4", gpus=1))
    assert not result.feasible
    assert "does not fit on 1 x l4" in result.reason and "57.18 GiB" in result.reason
    assert result.max_num_seqs_at_max_model_len == 0 and result.kv_cache_bytes_per_gpu == 0
    assert any(s.startswith("use 8 x l4") for s in result.suggestions)
    # Every suggestion was checked: the GPU count it names fits.
    assert plan(ServingSpec("31b", accelerator="l4", gpus=8)).feasible

    both = plan(ServingSpec("31b", max_model_len=32768, gpus=1)).suggestions
    assert "use fp8 weights and an fp8 KV cache: fits on 1 x h100-80gb" in both  # neither change alone fits
    assert plan(ServingSpec("31b", weight_dtype="fp8", kv_dtype="fp8", max_model_len=32768, gpus=1)).feasible

    kv_bound = plan(ServingSpec("31b", weight_dtype="fp8", max_model_len=4096, gpus=1))
    assert not kv_bound.feasible and kv_bound.reason.startswith("the KV cache for 16 sequences x 4096 tokens")
    assert "use an fp8 KV cache: fits on 1 x h100-80gb" in kv_bound.suggestions
    assert plan(ServingSpec("31b", weight_dtype="fp8", kv_dtype="fp8", max_model_len=4096, gpus=1)).feasible
    seqs = next(s for s in kv_bound.suggestions if s.startswith("lower max_num_seqs"))
    n = int(seqs.split()[3])
    assert plan(ServingSpec("31b", weight_dtype="fp8", max_model_len=4096, gpus=1, max_num_seqs=n)).feasible


def test_fp8_needs_an_accelerator_that_has_it() -> None:
    result = plan(ServingSpec("31b", weight_dtype="fp8", accelerator="a100-80gb", max_model_len=4096, max_num_seqs=4))
    assert not result.feasible and "no FP8 support" in result.reason
    assert any(s.startswith(("use int8 weights", "use int4 weights")) for s in result.suggestions)


def test_max_num_seqs_is_the_largest_concurrency_that_fits() -> None:
    spec = ServingSpec("26b-a4b", max_model_len=32768, gpus=1)
    n = max_num_seqs(spec)
    assert n > 1
    assert plan(dataclasses.replace(spec, max_num_seqs=n)).feasible
    assert not plan(dataclasses.replace(spec, max_num_seqs=n + 1)).feasible
    assert min_gpus(ServingSpec("31b", max_model_len=262_144, max_num_seqs=512, accelerator="l4")) is None


def test_plan_and_engine_budget_use_the_same_arithmetic() -> None:
    spec = ServingSpec("31b", weight_dtype="fp8", kv_dtype="fp8", max_model_len=32768, max_num_seqs=8)
    result = plan(spec)
    acc = get_accelerator(spec.accelerator)
    budget = kv_cache_budget_bytes(
        variant_config("31b"), weight_dtype="fp8", device_memory_bytes=acc.memory_bytes,
        usable_fraction=acc.usable_fraction, max_num_seqs=8, max_num_batched_tokens=2048,
    )
    assert budget == result.kv_cache_bytes_per_gpu
    groups = rank_cache_groups(variant_config("31b").text, result.tensor_parallel)
    assert result.kv_blocks == split_kv_budget(
        groups, budget, block_size=16, kv_dtype_bytes=1, max_num_seqs=8, max_model_len=32768,
        max_num_batched_tokens=2048,
    )
    used = sum(result.kv_blocks[g.name] * g.bytes_per_block(16, 1) for g in groups)
    assert used <= budget


def test_plan_to_dict_is_json() -> None:
    result = plan(ServingSpec("e2b", modalities="all", max_model_len=4096))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["feasible"] is True and data["reason"] is None
    assert set(data["per_gpu"]) == {
        "weights", "kv_cache", "activations", "encoder_cache", "cuda_graphs", "runtime_overhead", "headroom", "total",
        "capacity", "speculative",
    }
    assert set(data["weights_per_gpu"]) == {"embedding", "decoder", "ple", "vision", "audio"}
    assert data["spec"]["variant"] == "e2b" and data["accelerator"] == "h100-80gb"
    assert data["host_memory_bytes"] > 4 * GiB


def test_spec_names_are_canonical() -> None:
    spec = ServingSpec("Gemma-4-31B-it", accelerator=" H100-80GB")
    assert (spec.variant, spec.accelerator) == ("31b", "h100-80gb")
    assert plan(spec).accelerator == "h100-80gb"


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"variant": "70b"}, "unknown Gemma 4 variant"),
        ({"weight_dtype": "nf4"}, "unknown weight dtype 'nf4'"),
        ({"kv_dtype": "int4"}, "unknown KV cache dtype"),
        ({"accelerator": "b200"}, "unknown accelerator"),
        ({"variant": "31b", "modalities": ("text", "audio")}, "no audio input"),
        ({"gpus": 2, "tensor_parallel": 4}, "gpus \\(2\\) and tensor_parallel \\(4\\) differ"),
        ({"max_model_len": 1 << 20}, "exceeds the model's context"),
        ({"max_num_seqs": 0}, "max_num_seqs must be a positive integer"),
    ],
)
def test_invalid_specs_are_rejected(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServingSpec(**{"variant": "e4b", **changes})


def test_layouts_the_model_cannot_take_are_rejected() -> None:
    with pytest.raises(ValueError, match="expert_parallel applies to the MoE variant"):
        plan(ServingSpec("31b", expert_parallel=2))
    with pytest.raises(ValueError, match="tensor_parallel=3 does not divide"):
        plan(ServingSpec("31b", gpus=3))


# ---------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gemma4_platform.cli", "plan", *args],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )


def test_plan_cli_prints_a_table() -> None:
    out = run_cli("--variant", "31b", "--dtype", "fp8", "--kv-dtype", "fp8", "--accelerator", "h100-80gb",
                  "--max-model-len", "32768", "--max-num-seqs", "16")
    assert out.returncode == 0, out.stderr
    expected = plan(ServingSpec("31b", weight_dtype="fp8", kv_dtype="fp8", max_model_len=32768))
    assert "per GPU" in out.stdout and "per replica" in out.stdout and out.stdout.rstrip().endswith("Fits.")
    weights_row = next(line for line in out.stdout.splitlines() if line.startswith("weights "))
    assert f"{expected.per_gpu.weights / GiB:.2f} GiB" in weights_row


def test_plan_cli_exits_2_with_the_reason_when_it_does_not_fit() -> None:
    out = run_cli("--variant", "31b", "--accelerator", "l4", "--gpus", "1")
    assert out.returncode == 2
    assert "Does not fit: 31b with bf16 weights does not fit on 1 x l4" in out.stdout
    assert "What would fit:" in out.stdout and "  - use 8 x l4 per replica" in out.stdout
    bad = run_cli("--variant", "26b-a4b", "--modalities", "audio")
    assert bad.returncode == 2 and "no audio input" in bad.stderr


def test_plan_cli_prints_the_encoder_cache_of_a_media_plan() -> None:
    out = run_cli("--variant", "e4b", "--modalities", "image,audio", "--encoder-cache-tokens", "8192")
    assert out.returncode == 0, out.stderr
    expected = plan(ServingSpec("e4b", modalities=("image", "audio"), encoder_cache_tokens=8192))
    row = next(line for line in out.stdout.splitlines() if line.startswith("encoder cache "))
    assert f"{expected.per_gpu.encoder_cache / GiB:.2f} GiB" in row
    assert "encoder cache" not in run_cli("--variant", "e4b").stdout


def test_plan_cli_prints_the_drafter_and_speculation_buffers() -> None:
    out = run_cli("--variant", "e2b", "--speculative", "assistant", "--num-speculative-tokens", "3")
    assert out.returncode == 0, out.stderr
    expected = plan(ServingSpec("e2b", speculative="assistant", num_speculative_tokens=3))
    row = next(line for line in out.stdout.splitlines() if line.startswith("speculative decoding (3 drafts) "))
    assert f"{expected.per_gpu.speculative / GiB:.2f} GiB" in row
    assert any(line.startswith("  drafter ") for line in out.stdout.splitlines())
    assert "speculative" not in run_cli("--variant", "e2b").stdout
    bad = run_cli("--variant", "e2b", "--num-speculative-tokens", "3")
    assert bad.returncode == 2 and "num_speculative_tokens needs speculative" in bad.stderr


def test_plan_cli_json_is_the_plan() -> None:
    out = run_cli("--variant", "26b-a4b", "--max-model-len", "32768", "--max-num-seqs", "64", "--json")
    assert out.returncode == 0, out.stderr
    expected = plan(ServingSpec("26b-a4b", max_model_len=32768, max_num_seqs=64, modalities=("text",)))
    assert json.loads(out.stdout) == json.loads(json.dumps(expected.to_dict()))


def test_memory_model_does_not_import_torch() -> None:
    code = "import sys, gemma4.memory, gemma4.accelerators; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO / "model"), "PATH": ""})
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------- engine wiring


def _engine_blocks(**engine_args) -> dict[str, int]:
    llm = LLM(tiny_config("31b"), dtype=torch.float32, max_num_batched_tokens=64, **engine_args)
    return {usage.name: usage.num_blocks for usage in llm.engine.kv.usage()}


def _split(budget: int) -> dict[str, int]:
    config = tiny_config("31b")
    return split_kv_budget(
        rank_cache_groups(config.text), budget, block_size=16, kv_dtype_bytes=4, max_num_seqs=64,
        max_model_len=config.text.max_position_embeddings, max_num_batched_tokens=64,
    )


def test_engine_budget_on_cpu_is_the_fixed_default_and_explicit_budgets_are_kept() -> None:
    assert EngineArgs().kv_cache_memory_bytes is None
    assert _engine_blocks() == _split(CPU_KV_CACHE_BYTES) == _split(1 << 30)
    assert _engine_blocks(kv_cache_memory_bytes=64 << 20) == _split(64 << 20)
    with pytest.raises(ValueError, match="kv_cache_memory_bytes must be a positive integer or None"):
        EngineArgs(kv_cache_memory_bytes=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        EngineArgs(gpu_memory_utilization=1.5)


class _FakeCudaModel:
    """Just what `resolve_kv_cache_bytes` reads: a config, its loaded towers and a parameter on a CUDA device."""

    def __init__(self, variant: str, *, towers: bool = True) -> None:
        self.config = variant_config(variant)
        self.towers = {"vision_tower": None, "audio_tower": None} if towers else {}

    def parameters(self):
        yield SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)


def test_engine_budget_on_cuda_comes_from_the_memory_model(monkeypatch: pytest.MonkeyPatch) -> None:
    total = get_accelerator("h100-80gb").memory_bytes
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total))
    args = EngineArgs(max_num_seqs=16, gpu_memory_utilization=0.9)
    budget = resolve_kv_cache_bytes(_FakeCudaModel("e4b"), args)  # type: ignore[arg-type]
    media = dict(modalities=("text", "image", "video", "audio"), encoder_cache_tokens=2 * 2048)
    assert budget == kv_cache_budget_bytes(
        variant_config("e4b"), weight_dtype="bf16", device_memory_bytes=total, usable_fraction=0.9,
        max_num_seqs=16, max_num_batched_tokens=2048, ple_on_device=True, cuda_graphs=True, **media,
    )
    # Without CUDA graphs the engine does not reserve their memory.
    eager = resolve_kv_cache_bytes(_FakeCudaModel("e4b"), EngineArgs(max_num_seqs=16, cuda_graphs=False))  # type: ignore[arg-type]
    assert eager == kv_cache_budget_bytes(
        variant_config("e4b"), weight_dtype="bf16", device_memory_bytes=total, usable_fraction=0.9,
        max_num_seqs=16, max_num_batched_tokens=2048, ple_on_device=True, cuda_graphs=False, **media,
    ) > budget
    # A model loaded without towers reserves nothing for them, their activations or an encoder cache.
    text_only = resolve_kv_cache_bytes(_FakeCudaModel("e4b", towers=False), args)  # type: ignore[arg-type]
    assert text_only == kv_cache_budget_bytes(
        variant_config("e4b"), weight_dtype="bf16", device_memory_bytes=total, usable_fraction=0.9,
        max_num_seqs=16, max_num_batched_tokens=2048, ple_on_device=True, cuda_graphs=True,
    ) > budget
    # The engine keeps the PLE table on the GPU: ~14.9 GB of E4B weights come off the 0.9 x 80 GiB.
    assert 50 * GiB < budget < int(0.9 * total) - 14 * GiB
    with pytest.raises(ValueError, match="no GPU memory for a KV cache"):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=8 * GiB))
        resolve_kv_cache_bytes(_FakeCudaModel("31b"), args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- speculative decoding
TINY_DRAFTER = DrafterShape(
    hidden_size=64, backbone_hidden_size=48, intermediate_size=128, num_attention_heads=4,
    layer_head_dims=(32, 32, 64), vocab_size=512, use_ordered_embeddings=True, num_centroids=16,
)


def test_drafter_parameters_are_counted_tensor_by_tensor() -> None:
    h, b, i, heads, vocab = 64, 48, 128, 4, 512
    layer = lambda d: heads * d * h + d + h * heads * d + 4 * h + 1 + 3 * i * h  # noqa: E731  q, q_norm, o, norms, scalar, MLP
    expected = vocab * h + h + 2 * b * h + b * h + layer(32) * 2 + layer(64) + 16 * h  # tied head once, centroids
    assert drafter_param_count(TINY_DRAFTER) == expected
    plain = dataclasses.replace(TINY_DRAFTER, use_ordered_embeddings=False)
    assert drafter_param_count(plain) == expected - 16 * h
    # bf16 weights plus the int64 token_ordering buffer; without ordered embeddings, no buffer.
    assert drafter_weight_bytes(TINY_DRAFTER, "bf16") == 2 * expected + 8 * vocab
    assert drafter_weight_bytes(plain, "fp32") == 4 * (expected - 16 * h)


def test_drafter_shape_reads_an_assistant_config_json(tmp_path: Path) -> None:
    config = tiny_assistant_config(tiny_config("e2b"))
    raw = config.to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(raw))
    shape = load_drafter_shape(tmp_path)
    text = config.text
    assert shape == DrafterShape(
        hidden_size=text.hidden_size, backbone_hidden_size=config.backbone_hidden_size,
        intermediate_size=text.intermediate_size, num_attention_heads=text.num_attention_heads,
        layer_head_dims=tuple(layer.head_dim for layer in text.layers), vocab_size=text.vocab_size,
        use_ordered_embeddings=True, num_centroids=config.num_centroids,
    )
    assert shape.use_ordered_embeddings and len(set(shape.layer_head_dims)) == 2  # sliding and full head sizes
    with pytest.raises(ValueError, match="expected 'gemma4_assistant'"):
        DrafterShape.from_hf_dict({**raw, "model_type": "gemma4_text"})
    with pytest.raises(ValueError, match="no config.json"):
        load_drafter_shape(tmp_path / "missing")


def test_the_published_e2b_drafter_has_about_78m_parameters() -> None:
    assert 76e6 < drafter_param_count(PUBLISHED_DRAFTERS["e2b"]) < 80e6
    for variant, drafter in PUBLISHED_DRAFTERS.items():
        assert drafter.backbone_hidden_size == variant_config(variant).text.hidden_size


def test_speculative_buffers_are_verify_logits_plus_the_drafter_steps() -> None:
    text = variant_config("e2b").text
    # n-gram drafting: only the verification step's max_num_seqs x (1 + k) fp32 logits rows.
    assert speculative_buffer_bytes(text, num_tokens=2, max_num_seqs=16, drafter=None) == 16 * 3 * 262_144 * 4
    assert speculative_buffer_bytes(text, num_tokens=0, max_num_seqs=16, drafter=None) == 0
    drafter = PUBLISHED_DRAFTERS["e2b"]
    with_drafter = speculative_buffer_bytes(text, num_tokens=2, max_num_seqs=16, drafter=drafter)
    # k steps of max_num_seqs rows, each with fp32 vocabulary logits and the hidden-state buffers.
    assert with_drafter - 16 * 3 * 262_144 * 4 > 2 * 16 * 262_144 * 4


def test_speculation_shrinks_the_kv_budget_by_exactly_its_weights_and_buffers() -> None:
    config = variant_config("e2b")
    common = dict(weight_dtype="bf16", device_memory_bytes=80 * GiB, usable_fraction=0.9, max_num_seqs=16,
                  max_num_batched_tokens=2048)
    base = kv_cache_budget_bytes(config, **common)
    drafter = PUBLISHED_DRAFTERS["e2b"]
    ngram = kv_cache_budget_bytes(config, **common, speculative_tokens=2)
    assert base - ngram == 16 * 3 * 262_144 * 4
    assistant = kv_cache_budget_bytes(config, **common, speculative_tokens=2, drafter=drafter)
    assert base - assistant == drafter_weight_bytes(drafter, "bf16") + speculative_buffer_bytes(
        config.text, num_tokens=2, max_num_seqs=16, drafter=drafter)


def test_plan_prices_the_published_drafter_and_the_variant_default_tokens() -> None:
    base = plan(ServingSpec("31b", accelerator="h200-141gb"))
    spec = ServingSpec("31b", accelerator="h200-141gb", speculative="assistant")
    assert spec.speculative_tokens == 6 and spec.drafter == PUBLISHED_DRAFTERS["31b"]
    assistant = plan(spec)
    drafter = drafter_weight_bytes(PUBLISHED_DRAFTERS["31b"], "bf16")
    assert assistant.weights_per_gpu["drafter"] == drafter
    assert base.kv_cache_bytes_per_gpu - assistant.kv_cache_bytes_per_gpu == drafter + assistant.per_gpu.speculative
    assert assistant.per_gpu.total == sum(
        v for k, v in assistant.per_gpu.to_dict().items() if k not in ("capacity", "total"))
    ngram = plan(ServingSpec("31b", accelerator="h200-141gb", speculative="ngram", num_speculative_tokens=3))
    assert "drafter" not in ngram.weights_per_gpu
    assert base.kv_cache_bytes_per_gpu - ngram.kv_cache_bytes_per_gpu == 16 * 4 * 262_144 * 4
    json.dumps(assistant.to_dict())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"speculative": "eagle"}, "speculative must be one of ngram, assistant"),
        ({"num_speculative_tokens": 2}, "num_speculative_tokens needs speculative"),
        ({"speculative": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer"),
    ],
)
def test_invalid_speculative_specs_are_rejected(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServingSpec("e2b", **changes)


def test_engine_budget_prices_the_drafter_it_is_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    total = get_accelerator("h100-80gb").memory_bytes
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total))
    raw = tiny_assistant_config(tiny_config("e4b")).to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model = _FakeCudaModel("e4b", towers=False)
    common = dict(weight_dtype="bf16", device_memory_bytes=total, usable_fraction=0.9, max_num_seqs=16,
                  max_num_batched_tokens=2048, ple_on_device=True, cuda_graphs=True)
    args = EngineArgs(max_num_seqs=16, speculative_model=str(tmp_path), num_speculative_tokens=3)
    assert resolve_kv_cache_bytes(model, args) == kv_cache_budget_bytes(  # type: ignore[arg-type]
        variant_config("e4b"), **common, speculative_tokens=3, drafter=DrafterShape.from_hf_dict(raw))
    ngram = EngineArgs(max_num_seqs=16, speculative_model="ngram")  # the variant's default: 4 for E4B
    assert resolve_kv_cache_bytes(model, ngram) == kv_cache_budget_bytes(  # type: ignore[arg-type]
        variant_config("e4b"), **common, speculative_tokens=4)
    with pytest.raises(ValueError, match="speculative_model: .*no config.json"):
        resolve_kv_cache_bytes(model, EngineArgs(speculative_model=str(tmp_path / "nowhere")))  # type: ignore[arg-type]
