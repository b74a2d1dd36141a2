"""transformers' assistant drafter as the reference: its target and drafter from our tiny checkpoints, and
its candidate generator's greedy drafts.

transformers 5.23 needs two patches to run the drafter at all (test-side only):
* `Gemma4TextConfig.kv_sharing_modes` raises for a stack whose layers are all KV-shared (it looks for a
  producer among no layers), so no `Gemma4AssistantForCausalLM` can be built; `patch_all_shared_stacks`
  returns "reuse" for every layer of such a stack (what the assistant means) and defers to the original
  else.
* A target without KV-sharing layers (26B/31B) returns empty `shared_kv_states`: the "store" marks are
  only set when some layer shares. `hf_target` sets them on the last layer of each type, as
  `kv_sharing_modes` documents ("the last non-consumer layer of each type stores its KV states ...
  assistant models read them").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator
from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig as HFTextConfig


def patch_all_shared_stacks(monkeypatch: pytest.MonkeyPatch) -> None:
    original = HFTextConfig.kv_sharing_modes.fget

    def modes(config: HFTextConfig) -> list[str | None]:
        if config.num_kv_shared_layers == config.num_hidden_layers:
            return ["reuse"] * config.num_hidden_layers
        return original(config)

    monkeypatch.setattr(HFTextConfig, "kv_sharing_modes", property(modes))


def hf_target(path: Path) -> torch.nn.Module:
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    text = model.config.text_config
    if not text.num_kv_shared_layers:
        layers = model.model.language_model.layers
        for kind in set(text.layer_types):
            last = max(i for i, t in enumerate(text.layer_types) if t == kind)
            layers[last].self_attn.store_full_length_kv = True
    return model


def hf_assistant(path: Path) -> torch.nn.Module:
    return transformers.Gemma4AssistantForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def hf_prefill(target: torch.nn.Module, prompt: torch.Tensor):
    """The target's outputs over `prompt [1, L]` as the candidate generator needs them (hidden states, shared
    KV states), and its greedy next token `[1, 1]`."""
    with torch.no_grad():
        out = target(input_ids=prompt, output_hidden_states=True, return_shared_kv_states=True)
    return out, out.logits[:, -1].argmax(-1, keepdim=True)


def hf_drafts(
    target: torch.nn.Module, assistant: torch.nn.Module, prompt: torch.Tensor, out, token: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate generator's first round after the prefill: drafts `[1, k]` and logits `[1, k, vocab]`."""
    assistant.generation_config.num_assistant_tokens = k
    generator = SinglePositionMultiTokenCandidateGenerator(
        assistant, target.get_input_embeddings(), transformers.GenerationConfig(max_length=10_000)
    )
    with torch.no_grad():
        candidates, logits = generator.get_candidates(torch.cat([prompt, token], dim=1), {}, out, False, 0)
    return candidates[:, prompt.shape[1] + 1 :], logits
