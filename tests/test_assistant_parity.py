"""Parity of our assistant drafter with transformers' `Gemma4AssistantForCausalLM` and its candidate
generator (`SinglePositionMultiTokenCandidateGenerator`), on tiny checkpoints of all four variants
(transformers patched to run it at all: see `assistant_reference`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from assistant_reference import hf_assistant as load_hf_assistant
from assistant_reference import hf_drafts, hf_prefill, patch_all_shared_stacks
from assistant_reference import hf_target as load_hf_target
from gemma4.assistant import SharedKVAttention, draft_greedy
from gemma4.assistant_config import Gemma4AssistantConfig, load_assistant_config
from gemma4.checkpoint import CheckpointError
from gemma4.config import ConfigError, load_config
from gemma4.loader import load_assistant, load_model
from gemma4.memory import DrafterShape, drafter_param_count, drafter_weight_bytes
from gemma4.modeling import DenseAttention
from gemma4.tiny import write_tiny_assistant, write_tiny_checkpoint

VARIANTS = ("e2b", "e4b", "26b-a4b", "31b")
DRAFTS = 3


@pytest.fixture(autouse=True)
def all_shared_stacks_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_all_shared_stacks(monkeypatch)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    out = {}
    for variant in VARIANTS:
        root = tmp_path_factory.mktemp(variant)
        target = write_tiny_checkpoint(root / "target", variant=variant, towers=False)
        out[variant] = (target, write_tiny_assistant(root / "assistant", load_config(target), seed=1))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prompt_len", [9, 90])  # 90 > sliding window + 1 (65): the flipped window cuts
def test_drafts_logits_and_states_match_transformers(checkpoints, variant: str, prompt_len: int) -> None:
    target_path, assistant_path = checkpoints[variant]
    hf_target, hf_assistant = load_hf_target(target_path), load_hf_assistant(assistant_path)
    target = load_model(target_path, dtype=torch.float32)
    drafter = load_assistant(assistant_path, target.config, dtype=torch.float32)
    assert (drafter.masked_embedding is not None) == variant.startswith("e")

    prompt = torch.randint(3, 400, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    positions = torch.arange(prompt_len)[None]
    out, token = hf_prefill(hf_target, prompt)
    candidates, hf_logits = hf_drafts(hf_target, hf_assistant, prompt, out, token, DRAFTS)
    with torch.no_grad():
        # HF's hidden_states[-1] is the final-normed state, what our target's `hidden_states` returns.
        ours_hidden = target.hidden_states(prompt, positions, DenseAttention(positions, target.ops))
        torch.testing.assert_close(ours_hidden, out.hidden_states[-1], atol=1e-3, rtol=1e-3)
        kv = out.shared_kv_states
        producers = {spec.attention_type: spec.kv_source for spec in drafter.layers}
        shared = {producers[kind]: (k.transpose(1, 2), v.transpose(1, 2)) for kind, (k, v) in kv.items()}
        attention = SharedKVAttention(shared, torch.tensor([prompt_len]))
        drafts, logits = draft_greedy(
            drafter, target.model.embed_tokens, token[:, 0], out.hidden_states[-1][:, -1],
            torch.tensor([[prompt_len]]), attention, DRAFTS,
        )
        # One step against the model directly: the projected state too.
        step_in = torch.cat([hf_target.get_input_embeddings()(token), out.hidden_states[-1][:, -1:]], dim=-1)
        hf_step = hf_assistant(
            inputs_embeds=step_in, position_ids=torch.tensor([[prompt_len]]), shared_kv_states=kv, use_cache=False
        )
        step_logits, projected = drafter(step_in, torch.tensor([[prompt_len]]), attention)

    assert drafts.tolist() == candidates.tolist()
    torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step_logits, hf_step.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(projected, hf_step.last_hidden_state, atol=1e-4, rtol=1e-4)


def test_an_untied_head_is_its_own_lm_head(checkpoints, tmp_path: Path) -> None:
    """With `tie_word_embeddings: false` the drafter scores with `lm_head.weight`, as transformers does."""
    target_path, assistant_path = checkpoints["31b"]
    tensors = load_file(assistant_path / "model.safetensors")
    tensors["lm_head.weight"] = (0.05 * torch.randn(tensors["model.embed_tokens.weight"].shape)).to(torch.bfloat16)
    untied = tmp_path / "untied"
    untied.mkdir()
    save_file(tensors, untied / "model.safetensors")
    raw = json.loads((assistant_path / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": False}))
    hf_target, hf_assistant = load_hf_target(target_path), load_hf_assistant(untied)
    target = load_model(target_path, dtype=torch.float32)
    drafter = load_assistant(untied, target.config, dtype=torch.float32)
    prompt = torch.randint(3, 400, (1, 20), generator=torch.Generator().manual_seed(5))
    out, token = hf_prefill(hf_target, prompt)
    candidates, hf_logits = hf_drafts(hf_target, hf_assistant, prompt, out, token, DRAFTS)
    producers = {spec.attention_type: spec.kv_source for spec in drafter.layers}
    shared = {producers[kind]: (k.transpose(1, 2), v.transpose(1, 2)) for kind, (k, v) in out.shared_kv_states.items()}
    with torch.no_grad():
        drafts, logits = draft_greedy(
            drafter, target.model.embed_tokens, token[:, 0], out.hidden_states[-1][:, -1], torch.tensor([[20]]),
            SharedKVAttention(shared, torch.tensor([20])), DRAFTS,
        )
    assert drafts.tolist() == candidates.tolist()
    torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=1e-4)


def test_sliding_layers_see_the_last_window_plus_one_keys(checkpoints) -> None:
    """The drafted logits move when key `len - W - 1` changes and not when key `len - W - 2` does."""
    target_path, assistant_path = checkpoints["31b"]
    target = load_model(target_path, dtype=torch.float32)
    drafter = load_assistant(assistant_path, target.config, dtype=torch.float32)
    window, length = target.text_config.sliding_window, 90
    gen = torch.Generator().manual_seed(0)
    kv = {}
    for spec in drafter.layers:
        shape = (1, length, spec.num_kv_heads, spec.head_dim)
        kv[spec.kv_source] = (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    full_source = next(s.kv_source for s in drafter.layers if not s.is_sliding)
    x = torch.randn(1, 1, 2 * target.text_config.hidden_size, generator=gen)
    positions = torch.tensor([[length]])

    def logits_with(key: int, layer: int) -> torch.Tensor:
        changed = {i: (k.clone(), v.clone()) for i, (k, v) in kv.items()}
        changed[layer][0][:, key] += 3.0
        with torch.no_grad():
            return drafter(x, positions, SharedKVAttention(changed, torch.tensor([length])))[0]

    with torch.no_grad():
        base = drafter(x, positions, SharedKVAttention(kv, torch.tensor([length])))[0]
    sliding_source = next(s.kv_source for s in drafter.layers if s.is_sliding)
    assert not torch.equal(logits_with(length - window - 1, sliding_source), base)
    assert torch.equal(logits_with(length - window - 2, sliding_source), base)
    assert not torch.equal(logits_with(0, full_source), base)


def test_config_rules_and_target_fit(checkpoints, tmp_path: Path) -> None:
    target_path, assistant_path = checkpoints["e2b"]
    raw = load_assistant_config(assistant_path).to_hf_dict()
    for key, value, message in [
        ("hidden_size_per_layer_input", 16, "hidden_size_per_layer_input must be 0"),
        ("enable_moe_block", True, "enable_moe_block"),
        ("use_double_wide_mlp", True, "use_double_wide_mlp"),
        ("vocab_size_per_layer_input", 512, "vocab_size_per_layer_input must be 0"),
        ("num_kv_shared_layers", 2, "all layers of an assistant must be KV-shared"),
    ]:
        broken = {**raw, "text_config": {**raw["text_config"], key: value}}
        with pytest.raises(ConfigError, match=message):
            Gemma4AssistantConfig.from_hf_dict(broken)
    with pytest.raises(ConfigError, match="num_centroids"):
        Gemma4AssistantConfig.from_hf_dict({**raw, "num_centroids": 7})
    config = Gemma4AssistantConfig.from_hf_dict(raw)
    other = load_config(checkpoints["31b"][0]).text  # hidden 128 as well, other head geometry
    with pytest.raises(ConfigError, match="num_kv_heads"):
        config.check_fits(other)
    narrow = Gemma4AssistantConfig.from_hf_dict({**raw, "backbone_hidden_size": 64})
    with pytest.raises(ConfigError, match="backbone_hidden_size"):
        narrow.check_fits(load_config(target_path).text)


@pytest.mark.parametrize("variant", ["e2b", "31b"])  # with and without the masked embedder
def test_weight_count_and_bytes_are_the_loaded_drafters(checkpoints, variant: str) -> None:
    target_path, assistant_path = checkpoints[variant]
    drafter = load_assistant(assistant_path, load_config(target_path), dtype=torch.bfloat16)
    shape = DrafterShape.of(load_assistant_config(assistant_path))  # what the memory model prices
    scalars = sum(b.numel() for name, b in drafter.named_buffers() if name.endswith("layer_scalar"))
    assert drafter_param_count(shape) == sum(p.numel() for p in drafter.parameters()) + scalars
    stored = drafter.state_dict().values()  # weights, layer scalars, token_ordering
    assert drafter_weight_bytes(shape, "bf16") == sum(t.numel() * t.element_size() for t in stored)


def test_loader_names_missing_unexpected_and_misshaped_tensors(checkpoints, tmp_path: Path) -> None:
    target_path, assistant_path = checkpoints["e4b"]
    tensors = load_file(assistant_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(2, 2)
    tensors["post_projection.weight"] = tensors["post_projection.weight"][:, :-1].contiguous()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((assistant_path / "config.json").read_text())
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_assistant(broken, load_config(target_path), dtype=torch.float32)
    text = str(info.value)
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in text
    assert "unexpected tensor 'model.layers.0.self_attn.k_proj.weight'" in text
    assert "'post_projection.weight' in model.safetensors has shape" in text
