"""Tiny random-weight Gemma 4 checkpoints written by transformers itself (the reference).

Each tiny config is shaped like one released variant (same features, small sizes). Every 1-D
weight (norms, router scales) and every layer scalar is randomised, so that mistakes such as Gemma
3's `1 + w` norm or a forgotten scalar change the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

S, F = "sliding_attention", "full_attention"
VOCAB = 512
# Multimodal placeholder and delimiter ids inside the tiny vocabulary.
MM_TOKEN_IDS = dict(
    image_token_id=500, boi_token_id=501, eoi_token_id=502, audio_token_id=503,
    boa_token_id=504, eoa_token_index=505, video_token_id=506,
)
ROPE = {
    S: {"rope_type": "default", "rope_theta": 10_000.0},
    F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
SLIDING_WINDOW = 8

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, head_dim=32, global_head_dim=64,
    sliding_window=SLIDING_WINDOW, final_logit_softcapping=30.0, rope_parameters=ROPE,
    initializer_range=0.05, attn_implementation="eager",
)

# Tiny text configs shaped like each released variant.
TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    # PLE + KV sharing + double-wide MLP on the shared layers, 4:1 pattern.
    "e2b": dict(
        intermediate_size=96, num_hidden_layers=10, num_key_value_heads=1, layer_types=[S, S, S, S, F] * 2,
        hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=4,
        use_double_wide_mlp=True,
    ),
    # PLE + KV sharing, 5:1 pattern, two KV heads.
    "e4b": dict(
        intermediate_size=128, num_hidden_layers=12, num_key_value_heads=2, layer_types=[S] * 5 + [F] + [S] * 5 + [F],
        hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=4,
    ),
    # MoE beside the dense MLP, K-as-V global layers with fewer KV heads.
    "26b-a4b": dict(
        intermediate_size=48, num_hidden_layers=6, num_key_value_heads=2, num_global_key_value_heads=1,
        attention_k_eq_v=True, hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=8,
        top_k_experts=2, moe_intermediate_size=16, use_bidirectional_attention="vision",
    ),
    # Dense with K-as-V global layers.
    "31b": dict(
        intermediate_size=128, num_hidden_layers=12, num_key_value_heads=2, num_global_key_value_heads=1,
        attention_k_eq_v=True, hidden_size_per_layer_input=0, use_bidirectional_attention="vision",
    ),
}

VISION_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    head_dim=16, patch_size=4, pooling_kernel_size=2, position_embedding_size=64,
    rope_parameters={"rope_type": "axial", "rope_theta": 100.0},
)
AUDIO_CONFIG = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, output_proj_dims=48, subsampling_conv_channels=[16, 4]
)


def text_config(variant: str) -> transformers.Gemma4TextConfig:
    return transformers.Gemma4TextConfig(**_COMMON, **TEXT_CONFIGS[variant])


def randomise_small_tensors(model: torch.nn.Module, seed: int) -> None:
    """Give every 1-D weight and layer scalar a random value around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.dim() == 1 and (name.endswith(("weight", "layer_scalar", "scale"))):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)


def build_reference(variant: str, multimodal: bool, seed: int = 0) -> torch.nn.Module:
    """A transformers Gemma 4 model (fp32, eval) with a tiny config shaped like `variant`."""
    torch.manual_seed(seed)
    text = text_config(variant)
    if multimodal:
        audio = transformers.Gemma4AudioConfig(**AUDIO_CONFIG) if variant in ("e2b", "e4b") else None
        config = transformers.Gemma4Config(
            text_config=text, vision_config=transformers.Gemma4VisionConfig(**VISION_CONFIG),
            audio_config=audio, **MM_TOKEN_IDS,
        )
        model = transformers.Gemma4ForConditionalGeneration(config)
    else:
        model = transformers.Gemma4ForCausalLM(text)
    randomise_small_tensors(model, seed)
    return model.eval()


def save_reference(model: torch.nn.Module, directory: Path, *, sharded: bool) -> Path:
    """`save_pretrained` in the real checkpoint format (safetensors, real tensor names)."""
    model.save_pretrained(directory, max_shard_size="200KB" if sharded else "10GB")
    return directory


def reference_greedy(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' own greedy generation (with its KV cache), new tokens only, never stopping early."""
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, do_sample=False,
        eos_token_id=[], pad_token_id=0,
    )
    return out[:, input_ids.shape[1]:]
