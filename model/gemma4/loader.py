"""Loading the text decoder from a Hugging Face Gemma 4 checkpoint directory.

The whole checkpoint is checked against the full (unsharded) model first (names, shapes, dtypes,
file integrity), then the model, or one rank's shard of it (`gemma4.parallel.layout`), is
materialised from the meta device and filled one tensor at a time, each cast to the requested dtype
on its way to the device; a shard reads only its slices (`gemma4.parallel.sharding`). A checkpoint
with any problem raises `CheckpointError` listing every problem, and no model is returned: nothing
is half-loaded.

Names: the text decoder lives under `model.language_model.` in `Gemma4ForConditionalGeneration`
checkpoints (the official ones) and under `model.` in `Gemma4ForCausalLM` checkpoints. Tensors of
the vision/audio towers (`model.vision_tower.`, `model.embed_vision.`, audio alike) load with it,
replicated on every rank; the K/V projections that E2B/E4B checkpoints still carry for their
KV-sharing layers are the only tensors ignored.

`load_assistant` loads a `gemma4_assistant` drafter for a target the same way (its tensor names are
its parameter names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from gemma4.checkpoint import (
    FLOAT_DTYPES,
    CheckpointError,
    TensorEntry,
    checkpoint_name,
    index_checkpoint,
    read_tensors,
)
from gemma4.assistant import Gemma4Assistant
from gemma4.assistant_config import load_assistant_config
from gemma4.config import Gemma4Config, load_config
from gemma4.modeling import Gemma4ForCausalLM
from gemma4.parallel.comm import SINGLE, Collectives
from gemma4.parallel.layout import ParallelLayout
from gemma4.parallel.placement import ExpertPlacement
from gemma4.parallel.sharding import rank_shards

_SHARED_LAYER_UNUSED = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight")


def ignored_tensor_names(config: Gemma4Config) -> set[str]:
    """Text tensors a checkpoint may carry that the model does not use."""
    names = {
        checkpoint_name(config, f"model.layers.{spec.index}.{suffix}")
        for spec in config.text.layers
        if spec.shares_kv
        for suffix in _SHARED_LAYER_UNUSED
    }
    if config.text.tie_word_embeddings:
        names.add("lm_head.weight")  # a copy of the tied embedding, when a writer stores it
    return names


def plan_load(
    model: Gemma4ForCausalLM, config: Gemma4Config, entries: dict[str, TensorEntry]
) -> dict[str, TensorEntry]:
    """Match every persistent model tensor to a checkpoint entry, or raise listing all problems."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    wanted = {checkpoint_name(config, name): name for name in expected}
    return match_tensors(expected, wanted, entries, ignored_tensor_names(config))


def match_tensors(
    expected: Mapping[str, tuple[int, ...]],
    wanted: Mapping[str, str],
    entries: Mapping[str, TensorEntry],
    ignored: set[str],
    dtypes: Mapping[str, tuple[str, ...]] | None = None,
) -> dict[str, TensorEntry]:
    """Model tensor name -> its checkpoint entry, for `expected` (model name -> shape) found under
    `wanted` (checkpoint name -> model name); raise listing every missing, mis-shaped, mis-typed
    (`dtypes`, by model name; default floats) or unexpected (not `ignored`) tensor."""
    plan: dict[str, TensorEntry] = {}
    problems: list[str] = []
    for ckpt_name, model_name in wanted.items():
        entry = entries.get(ckpt_name)
        if entry is None:
            problems.append(f"missing tensor {ckpt_name!r} (expected shape {list(expected[model_name])})")
            continue
        allowed = (dtypes or {}).get(model_name, FLOAT_DTYPES)
        if entry.dtype not in allowed:
            problems.append(
                f"tensor {entry.describe()} has dtype {entry.dtype}; expected one of {', '.join(allowed)}"
            )
        if entry.shape != expected[model_name]:
            problems.append(
                f"tensor {entry.describe()} has shape {list(entry.shape)}, expected {list(expected[model_name])}"
            )
        plan[model_name] = entry
    for name, entry in entries.items():
        if name in wanted or name in ignored:
            continue
        problems.append(f"unexpected tensor {entry.describe()}")
    if problems:
        raise CheckpointError(problems)
    return plan


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    layout: ParallelLayout = ParallelLayout(),
    comm: Collectives = SINGLE,
    placements: Mapping[int, ExpertPlacement] | None = None,
) -> Gemma4ForCausalLM:
    """Load the Gemma 4 text model, or this rank's shard of it, from a checkpoint directory
    (`config.json` + safetensors). `placements` (MoE layer -> placement) defaults to balanced."""
    path = Path(path)
    config = load_config(path)
    entries = index_checkpoint(path)
    with torch.device("meta"):
        full = Gemma4ForCausalLM(config)
    plan = plan_load(full, config, entries)
    full_shapes = {name: tuple(t.shape) for name, t in full.state_dict().items()}
    with torch.device("meta"):
        model = Gemma4ForCausalLM(config, layout, comm, placements)
    shards = rank_shards(config.text, full_shapes, layout, model.expert_placements())
    local_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    wrong = {name: shard.shape for name, shard in shards.items() if shard.shape != local_shapes[name]}
    if wrong:
        raise RuntimeError(f"the model's shard shapes disagree with gemma4.parallel.sharding: {wrong}")

    model = model.to(dtype).to_empty(device=device)
    targets = model.state_dict(keep_vars=True)
    model_names = {entry.name: model_name for model_name, entry in plan.items()}
    with torch.no_grad():
        for entry, tensor in read_tensors(
            list(plan.values()), {entry.name: shards[name] for name, entry in plan.items()}
        ):
            targets[model_names[entry.name]].copy_(tensor.to(device=device, dtype=dtype))
    model.reset_buffers()
    return model.eval().requires_grad_(False)


def load_assistant(
    path: str | Path,
    target: Gemma4Config,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> Gemma4Assistant:
    """Load a `gemma4_assistant` drafter for `target` from its checkpoint directory (config.json +
    safetensors): ConfigError unless it fits the target, CheckpointError listing every tensor problem.
    Its `token_ordering` stays int64."""
    path = Path(path)
    config = load_assistant_config(path)
    entries = index_checkpoint(path)
    with torch.device("meta"):
        model = Gemma4Assistant(config, target.text)
    state = model.state_dict()
    expected = {name: tuple(t.shape) for name, t in state.items()}
    integer = {name: ("I64", "I32") for name, t in state.items() if not t.is_floating_point()}
    ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()  # a tied head's copy, if stored
    plan = match_tensors(expected, {name: name for name in expected}, entries, ignored, integer)
    model = model.to(dtype).to_empty(device=device)  # floats to `dtype`; token_ordering stays int64
    targets = model.state_dict(keep_vars=True)
    names = {entry.name: name for name, entry in plan.items()}
    with torch.no_grad():
        for entry, tensor in read_tensors(list(plan.values())):
            target_tensor = targets[names[entry.name]]
            target_tensor.copy_(tensor.to(device=device, dtype=target_tensor.dtype))
    model.reset_buffers()
    return model.eval().requires_grad_(False)
