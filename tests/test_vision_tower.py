"""Parity of our vision tower (and tower + `embed_vision`) with transformers 5.23 on a tiny random config.

Everything transformers initialises to constants (norm weights, position table, clip bounds, std_bias /
std_scale) is randomised so those terms are seen; clip bounds are finite and do clip.
"""

from __future__ import annotations


import pytest
import torch
import transformers as hf
from gemma4.config import Gemma4VisionConfig
from gemma4.tower_layers import MultimodalEmbedder
from gemma4.vision import Gemma4VisionModel
from transformers.models.gemma4 import modeling_gemma4 as hf_gemma4

TOL = 1e-5
GRIDS = ((3, 3), (6, 3), (3, 12))  # (rows, columns) of patches
TEXT_HIDDEN = 64


def _ours_config(clipped: bool, standardize: bool) -> Gemma4VisionConfig:
    return Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, patch_size=16, pooling_kernel_size=3, position_embedding_size=64,
        use_clipped_linears=clipped, standardize=standardize, rope_theta=100.0,
    )


def _hf_vision_config(ours: Gemma4VisionConfig) -> hf.Gemma4VisionConfig:
    raw = ours.to_hf_dict()
    raw.pop("model_type")
    config = hf.Gemma4VisionConfig(**raw)
    config._attn_implementation = "eager"
    return config


def _randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Random weights of unit-ish scale; clip bounds finite and inside the activations' range."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:  # position table
                p.copy_(torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            leaf = name.rsplit(".", 1)[-1]
            bound = 0.6 + 0.6 * torch.rand((), generator=gen)
            if leaf in ("input_min", "output_min"):
                b.copy_(-bound)
            elif leaf in ("input_max", "output_max"):
                b.copy_(bound)
            elif leaf == "std_bias":
                b.copy_(3 * torch.randn(b.shape, generator=gen))
            elif leaf == "std_scale":  # about 1 / the features' spread (~sqrt(d)), as standardising means
                b.copy_((0.5 + torch.rand(b.shape, generator=gen)) / b.shape[0] ** 0.5)


def _positions(rows: int, cols: int) -> torch.Tensor:
    """As the processor builds them: meshgrid 'xy' (x = column, y = row), row-major patches."""
    xs, ys = torch.meshgrid(torch.arange(cols), torch.arange(rows), indexing="xy")
    return torch.stack((xs, ys), dim=-1).reshape(-1, 2)


def _batch(gen: torch.Generator, patch_dim: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    items = [(torch.rand(r * c, patch_dim, generator=gen), _positions(r, c)) for r, c in GRIDS]
    longest = max(px.shape[0] for px, _ in items)
    pixels = torch.zeros(len(items), longest, patch_dim)
    positions = torch.full((len(items), longest, 2), -1, dtype=torch.long)
    for i, (px, pos) in enumerate(items):
        pixels[i, : px.shape[0]] = px
        positions[i, : pos.shape[0]] = pos
    return pixels, positions, items


def _build(clipped: bool, standardize: bool):
    gen = torch.Generator().manual_seed(1234 + 2 * clipped + standardize)
    ours_cfg = _ours_config(clipped, standardize)
    hf_cfg = _hf_vision_config(ours_cfg)
    text_cfg = hf.Gemma4TextConfig(
        vocab_size=300, hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, global_head_dim=64, layer_types=["sliding_attention", "full_attention"],
        sliding_window=8, hidden_size_per_layer_input=16, vocab_size_per_layer_input=300,
    )
    text_cfg._attn_implementation = "eager"
    full = hf.Gemma4Config(text_config=text_cfg, vision_config=hf_cfg, image_token_id=290, boi_token_id=291,
                           eoi_token_id=292, audio_token_id=293, boa_token_id=294, eoa_token_index=295,
                           video_token_id=296)
    full._attn_implementation = "eager"
    hf_model = hf_gemma4.Gemma4Model(full).eval()
    _randomise(hf_model.vision_tower, gen)
    _randomise(hf_model.embed_vision, gen)
    tower = Gemma4VisionModel(ours_cfg).eval()
    tower.load_state_dict(hf_model.vision_tower.state_dict(), strict=True)
    embedder = MultimodalEmbedder(ours_cfg.hidden_size, TEXT_HIDDEN, ours_cfg.rms_norm_eps).eval()
    embedder.load_state_dict(hf_model.embed_vision.state_dict(), strict=True)
    return gen, ours_cfg, hf_model, tower, embedder


@pytest.mark.parametrize("clipped", [True, False])
@pytest.mark.parametrize("standardize", [True, False])
@torch.no_grad()
def test_tower_and_embedder_match_transformers(clipped: bool, standardize: bool) -> None:
    gen, cfg, hf_model, tower, embedder = _build(clipped, standardize)
    pixels, positions, items = _batch(gen, 3 * cfg.patch_size**2)

    ref = hf_model.get_image_features(pixel_values=pixels, image_position_ids=positions)
    tokens, valid = tower(pixels, positions)
    assert tokens.shape == (len(GRIDS), pixels.shape[1] // 9, cfg.hidden_size)
    assert valid.sum(dim=-1).tolist() == [r * c // 9 for r, c in GRIDS]
    assert not tokens[~valid].any()
    tower_diff = (tokens[valid] - ref.last_hidden_state).abs().max().item()
    assert tower_diff < TOL, tower_diff

    ours_soft = embedder(tokens[valid])
    ref_soft = torch.cat(ref.pooler_output)
    embed_diff = (ours_soft - ref_soft).abs().max().item()
    assert embed_diff < TOL, embed_diff

    # One by one through encode: each unpadded image matches transformers on it alone, and matches our padded
    # batch as closely as transformers' own padded and unpadded runs agree (padding changes the matmul shapes,
    # so fp32 rounding, amplified over the layers, differs by a few ulps of the largest outputs).
    offset = 0
    for i, (px, pos) in enumerate(items):
        single = tower.encode(px, pos)
        assert single.shape == (px.shape[0] // 9, cfg.hidden_size)
        hf_single = hf_model.vision_tower(pixel_values=px[None], pixel_position_ids=pos[None]).last_hidden_state
        single_diff = (single - hf_single).abs().max().item()
        assert single_diff < TOL, single_diff
        hf_padding_noise = (hf_single - ref.last_hidden_state[offset : offset + len(single)]).abs().max().item()
        offset += len(single)
        padding_diff = (single - tokens[i][valid[i]]).abs().max().item()
        assert padding_diff <= max(TOL, 2 * hf_padding_noise), (padding_diff, hf_padding_noise)
        print(f"image {i}: encode vs transformers {single_diff:.2e}, encode vs padded {padding_diff:.2e} "
              f"(transformers' own {hf_padding_noise:.2e})")
    print(f"clipped={clipped} standardize={standardize} tower {tower_diff:.2e} tower+embedder {embed_diff:.2e}")


@torch.no_grad()
def test_clip_bounds_and_standardisation_take_effect() -> None:
    """The randomised constants matter: lifting the clip bounds or the standardisation changes the output."""
    gen, cfg, _, tower, _ = _build(True, True)
    pixels, positions, _ = _batch(gen, 3 * cfg.patch_size**2)
    tokens, valid = tower(pixels, positions)
    for name, buf in tower.named_buffers():
        if name.endswith(("_min", "_max")):
            buf.copy_(buf.sign() * float("inf"))
    unclipped, _ = tower(pixels, positions)
    assert (unclipped - tokens)[valid].abs().max().item() > 1e-2
    tower.std_bias.zero_()
    tower.std_scale.fill_(1.0)
    plain, _ = tower(pixels, positions)
    assert (plain - unclipped)[valid].abs().max().item() > 1e-2


@pytest.mark.parametrize("clipped", [True, False])
@pytest.mark.parametrize("standardize", [True, False])
def test_config_round_trip_through_transformers(clipped: bool, standardize: bool) -> None:
    ours = Gemma4VisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, patch_size=14, pooling_kernel_size=2, position_embedding_size=128, rope_theta=250.0,
        use_clipped_linears=clipped, standardize=standardize, rms_norm_eps=1e-5,
    )
    theirs = _hf_vision_config(ours)
    assert theirs.rope_parameters["rope_theta"] == 250.0
    back = Gemma4VisionConfig.from_hf_dict(theirs.to_dict(), source="test")
    assert back == ours


def test_released_vision_configs_read_their_rope_base() -> None:
    raw = {"hidden_size": 1152, "rope_parameters": {"rope_type": "axial", "rope_theta": 100.0}, "standardize": True}
    assert Gemma4VisionConfig.from_hf_dict(raw, source="test").rope_theta == 100.0
    with pytest.raises(ValueError, match="axial"):
        Gemma4VisionConfig.from_hf_dict({"rope_parameters": {"rope_type": "default"}}, source="test")
