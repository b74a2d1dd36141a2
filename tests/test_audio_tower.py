"""gemma4.audio: the audio tower (and tower + embed_audio) against transformers 5.23 on a tiny random config, fp32.

Everything transformers' `_init_weights` sets to constants is randomised (norm weights, per_dim_scale, the clip
bounds, set to finite values that clip a part of each clipped linear's inputs and outputs), and the weights are
redrawn at unit-gain scale so every term moves the output.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.gemma4 import configuration_gemma4 as hf_cfg
from transformers.models.gemma4 import modeling_gemma4 as hf_mod

from gemma4.audio import Gemma4AudioModel
from gemma4.config import ConfigError, Gemma4AudioConfig
from gemma4.tower_layers import MultimodalEmbedder

TOL = 1e-5
LENGTHS = (3, 17, 40, 130)
MEL = 128
TEXT_HIDDEN = 64


def _hf_model() -> hf_mod.Gemma4Model:
    """The notes' tiny multimodal model without vision: text decoder, audio tower, embed_audio."""
    text = hf_cfg.Gemma4TextConfig(
        vocab_size=300, hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, global_head_dim=64, layer_types=["sliding_attention", "full_attention"],
        sliding_window=8, hidden_size_per_layer_input=16, vocab_size_per_layer_input=300,
    )
    audio = hf_cfg.Gemma4AudioConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, output_proj_dims=48,
        subsampling_conv_channels=[128, 8],
    )
    config = hf_cfg.Gemma4Config(
        text_config=text, audio_config=audio, vision_config=None, audio_token_id=293, boa_token_id=294,
        eoa_token_index=295, image_token_id=290, boi_token_id=291, eoi_token_id=292, video_token_id=296,
    )
    for c in (config, text, audio):
        c._attn_implementation = "eager"
    return hf_mod.Gemma4Model(config).eval()


def _inputs(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel-like frames for clips of LENGTHS frames, right-padded with zeros, and their masks."""
    frames = max(LENGTHS)
    mel = torch.log(torch.rand(len(LENGTHS), frames, MEL, generator=gen) * 4 + 1e-3)
    mask = torch.arange(frames)[None, :] < torch.tensor(LENGTHS)[:, None]
    return mel * mask[..., None], mask


def _observed_ranges(model: hf_mod.Gemma4Model, features: torch.Tensor, mask: torch.Tensor) -> dict:
    seen: dict[str, tuple[float, float]] = {}
    hooks = []
    for name, module in model.audio_tower.named_modules():
        if isinstance(module, hf_mod.Gemma4ClippableLinear):
            def hook(mod, args, out, name=name):  # noqa: ANN001 - torch's hook signature
                seen[name] = (args[0].abs().max().item(), out.abs().max().item())
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model.audio_tower(features, mask)
    for h in hooks:
        h.remove()
    return seen


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    hf = _hf_model()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("per_dim_scale"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        features, mask = _inputs(gen)
        for name, (amax_in, amax_out) in _observed_ranges(hf, features, mask).items():
            module = hf.audio_tower.get_submodule(name)
            fractions = (torch.rand(4, generator=gen) * 0.3 + 0.6).tolist()
            module.input_min.fill_(-fractions[0] * amax_in)
            module.input_max.fill_(fractions[1] * amax_in)
            module.output_min.fill_(-fractions[2] * amax_out)
            module.output_max.fill_(fractions[3] * amax_out)

    config = Gemma4AudioConfig.from_hf_dict(hf.config.audio_config.to_dict(), source="test")
    ours = Gemma4AudioModel(config).eval()
    ours.load_state_dict(hf.audio_tower.state_dict(), strict=True)
    embedder = MultimodalEmbedder(config.output_proj_dims, TEXT_HIDDEN, config.rms_norm_eps).eval()
    embedder.load_state_dict(hf.embed_audio.state_dict(), strict=True)
    return hf, ours, embedder, features, mask


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def test_padded_batch_matches_transformers(models) -> None:
    hf, ours, embedder, features, mask = models
    with torch.no_grad():
        ref = hf.audio_tower(features, mask, return_dict=True)
        ref_embedded = hf.get_audio_features(features, mask, return_dict=True).pooler_output
        hidden, valid = ours(features, mask)
        embedded = embedder(hidden)
    assert torch.equal(valid, ref.attention_mask)
    assert valid.sum(-1).tolist() == [-(-(-(-n // 2)) // 2) for n in LENGTHS]
    assert hidden.shape == ref.last_hidden_state.shape == (len(LENGTHS), 33, 48)
    assert hidden.abs().max() > 0.1  # the comparison is not between near-zero tensors
    assert _max_diff(hidden, ref.last_hidden_state) < TOL  # padding rows included
    assert _max_diff(embedded, ref_embedded) < TOL


def test_clip_bounds_clip(models) -> None:
    """The randomised bounds are active, so the parity tests above see the clamps."""
    hf, _, _, features, mask = models
    seen = _observed_ranges(hf, features, mask)
    clipped = 0
    for name, (amax_in, _) in seen.items():
        module = hf.audio_tower.get_submodule(name)
        clipped += amax_in > min(-module.input_min.item(), module.input_max.item())
    assert clipped >= len(seen) // 2


def test_encode_one_clip_at_a_time(models) -> None:
    hf, ours, embedder, features, mask = models
    with torch.no_grad():
        ref = hf.audio_tower(features, mask, return_dict=True)
        ref_embedded = hf.get_audio_features(features, mask, return_dict=True).pooler_output
        for i, n in enumerate(LENGTHS):
            expected = ref.last_hidden_state[i][ref.attention_mask[i]]
            trimmed = ours.encode(features[i, :n], mask[i, :n])
            padded = ours.encode(features[i], mask[i])
            assert trimmed.shape == padded.shape == (int(mask[i, ::2][::2].sum()), 48)
            assert _max_diff(trimmed, expected) < TOL
            assert _max_diff(padded, expected) < TOL
            assert _max_diff(embedder(trimmed), ref_embedded[i][ref.attention_mask[i]]) < TOL


def test_clip_too_short_for_a_token(models) -> None:
    """10 ms of audio: the extractor pads to 128 frames and marks none valid, so there are no soft tokens."""
    hf, ours, _, features, _ = models
    frames = torch.zeros(128, MEL)
    none_valid = torch.zeros(128, dtype=torch.bool)
    with torch.no_grad():
        ref = hf.audio_tower(frames[None], none_valid[None], return_dict=True)
        tokens = ours.encode(frames, none_valid)
        hidden, valid = ours(frames[None], none_valid[None])
    assert tokens.shape == (0, 48)
    assert not ref.attention_mask.any() and not valid.any()
    assert _max_diff(hidden, ref.last_hidden_state) < TOL


def test_config_round_trip_through_transformers() -> None:
    assert Gemma4AudioConfig.from_hf_dict(hf_cfg.Gemma4AudioConfig().to_dict(), source="hf") == Gemma4AudioConfig()
    tiny = Gemma4AudioConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, output_proj_dims=48,
                             subsampling_conv_channels=(128, 8), attention_logit_cap=30.0, gradient_clipping=5.0)
    hf = hf_cfg.Gemma4AudioConfig(**tiny.to_hf_dict())
    assert hf.subsampling_conv_channels == [128, 8] and hf.attention_logit_cap == 30.0
    assert Gemma4AudioConfig.from_hf_dict(hf.to_dict(), source="hf") == tiny


def test_unsupported_attention_geometry_is_refused() -> None:
    """Only geometries where transformers' relative shift means "distance d uses table row d" are accepted."""
    with pytest.raises(ConfigError, match="attention geometry"):
        Gemma4AudioModel(Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           attention_chunk_size=4))


def test_bf16_tower_matches_cast_transformers_tower(models) -> None:
    """In bf16 too (both towers cast with `.to`): the relative-position table is computed in the tower's dtype."""
    hf, ours, _, features, mask = models
    hf_bf16 = copy.deepcopy(hf.audio_tower).to(torch.bfloat16)
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    with torch.no_grad():
        ref = hf_bf16(features, mask, return_dict=True).last_hidden_state
        hidden, _ = ours_bf16(features, mask)
    assert hidden.dtype == ref.dtype == torch.bfloat16
    assert _max_diff(hidden.float(), ref.float()) < 1e-2
