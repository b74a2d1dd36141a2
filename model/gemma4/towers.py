"""The media towers a multimodal checkpoint declares, and one media item through its tower and embedder.

They sit beside the text decoder as `towers.{vision_tower, embed_vision, audio_tower, embed_audio}`,
whose names below `towers.` are the checkpoint's below `model.` (`gemma4.checkpoint.checkpoint_name`).
On a rank of a multi-device replica they are replicated (small next to the decoder): every rank
encodes the same items and scatters the same soft tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from gemma4.audio import Gemma4AudioModel
from gemma4.config import CAUSAL_LM_ARCHITECTURE, Gemma4Config
from gemma4.media.inputs import MediaFeatures, audio_soft_tokens
from gemma4.tower_layers import ClippableLinear, MultimodalEmbedder
from gemma4.vision import Gemma4VisionModel


def build_towers(config: Gemma4Config) -> nn.ModuleDict:
    """The towers and embedders of `config` (none for a text-only `Gemma4ForCausalLM` checkpoint)."""
    towers = nn.ModuleDict()
    if config.architecture == CAUSAL_LM_ARCHITECTURE:
        return towers
    hidden = config.text.hidden_size
    if config.vision is not None:
        towers["vision_tower"] = Gemma4VisionModel(config.vision)
        towers["embed_vision"] = MultimodalEmbedder(config.vision.hidden_size, hidden, config.vision.rms_norm_eps)
    if config.audio is not None:
        towers["audio_tower"] = Gemma4AudioModel(config.audio)
        towers["embed_audio"] = MultimodalEmbedder(config.audio.output_proj_dims, hidden, config.audio.rms_norm_eps)
    return towers


def reset_tower_constants(towers: nn.ModuleDict) -> None:
    """Give the buffers a checkpoint carries their as-built values: clip bounds +-inf, standardisation 0 / 1.

    For towers materialised from the meta device with random weights (no checkpoint), whose buffers
    hold whatever the weight filler wrote; a clamp to [1, 1] would make every soft token the same.
    """
    with torch.no_grad():
        for module in towers.modules():
            if isinstance(module, ClippableLinear) and module.clipped:
                for name in ("input_min", "output_min"):
                    getattr(module, name).fill_(float("-inf"))
                for name in ("input_max", "output_max"):
                    getattr(module, name).fill_(float("inf"))
            elif isinstance(module, Gemma4VisionModel) and module.config.standardize:
                module.std_bias.zero_()
                module.std_scale.fill_(1.0)


def encode_item(towers: nn.ModuleDict, item: MediaFeatures) -> torch.Tensor:
    """The soft tokens `[item.num_tokens, H_text]` of one image, video frame or audio clip."""
    kind = "audio" if item.modality == "audio" else "vision"
    if f"{kind}_tower" not in towers:
        raise ValueError(f"this checkpoint has no {kind} tower for {item.modality} input")
    tower, embedder = towers[f"{kind}_tower"], towers[f"embed_{kind}"]
    weight = embedder.embedding_projection.weight
    if kind == "vision":
        assert item.pixel_values is not None and item.position_ids is not None
        tokens = tower.encode(item.pixel_values.to(weight.device), item.position_ids.to(weight.device))
    else:
        assert item.input_features is not None and item.input_features_mask is not None
        tokens = tower.encode(
            item.input_features.to(weight.device, weight.dtype), item.input_features_mask.to(weight.device)
        )
    if tokens.shape[0] != item.num_tokens:
        raise ValueError(f"the {item.modality} encoder gave {tokens.shape[0]} tokens for an item of {item.num_tokens}")
    return embedder(tokens.to(weight.dtype))


def check_media_item(config: Gemma4Config, item: MediaFeatures, where: str) -> None:
    """Raise ValueError (starting with `where`) unless `item` is what its tower can encode into exactly
    `item.num_tokens` soft tokens: checked before a request is queued, so a malformed item never fails
    a step that other requests share."""
    vision, audio = config.vision, config.audio
    has_tower = audio is not None if item.modality == "audio" else vision is not None
    if config.architecture == CAUSAL_LM_ARCHITECTURE or not has_tower:
        raise ValueError(f"{where}: this checkpoint has no encoder for {item.modality} input")
    if item.modality == "audio":
        features, mask = item.input_features, item.input_features_mask
        if features is None or mask is None or features.dim() != 2 or features.shape[1] != 128:
            raise ValueError(f"{where}: audio needs input_features [T, 128] and input_features_mask [T]")
        if not features.is_floating_point() or mask.dtype != torch.bool or mask.shape != features.shape[:1]:
            raise ValueError(f"{where}: audio features must be floating point with a boolean mask of T frames")
        expected = audio_soft_tokens(mask)
    else:
        assert vision is not None
        pixels, positions, k = item.pixel_values, item.position_ids, vision.pooling_kernel_size
        width = 3 * vision.patch_size**2
        if pixels is None or positions is None or pixels.dim() != 2 or pixels.shape[1] != width:
            raise ValueError(f"{where}: {item.modality} needs pixel_values [P, {width}] and position_ids [P, 2]")
        if not pixels.is_floating_point() or positions.dtype != torch.int64 or positions.shape != (pixels.shape[0], 2):
            raise ValueError(f"{where}: pixel_values must be floating point with int64 position_ids [P, 2]")
        cols = int(positions[:, 0].max()) + 1 if positions.numel() else 0
        rows = pixels.shape[0] // cols if cols > 0 else 0
        index = torch.arange(rows * cols)
        grid = torch.stack([index % max(cols, 1), index // max(cols, 1)], dim=-1)
        if not rows or rows % k or cols % k or rows * cols != pixels.shape[0] or not torch.equal(positions, grid):
            raise ValueError(f"{where}: patches must form a row-major grid whose sides are multiples of {k}")
        if max(rows, cols) > vision.position_embedding_size:
            table = vision.position_embedding_size
            raise ValueError(f"{where}: {rows}x{cols} patches exceed the position table ({table})")
        expected = rows * cols // k**2
    if item.num_tokens != expected:
        raise ValueError(f"{where}: the item declares {item.num_tokens} soft tokens; its features give {expected}")
