"""Tiny multimodal references (transformers' `Gemma4ForConditionalGeneration` with every constant
`_init_weights` sets randomised), generated media and the inputs the reference processor would give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from gemma4.media.inputs import MediaFeatures, VideoFeatures, encoder_items
from gemma4.media.prompt import MediaTokenIds
from gemma4.media.video import video_features
from reference_models import MM_TOKEN_IDS, randomise_small_tensors, text_config

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    head_dim=16, patch_size=16, pooling_kernel_size=3, position_embedding_size=64,
    rope_parameters={"rope_type": "axial", "rope_theta": 100.0}, use_clipped_linears=True, standardize=True,
)
AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, output_proj_dims=48,
             subsampling_conv_channels=[128, 8])
IDS = MediaTokenIds(
    MM_TOKEN_IDS["image_token_id"], MM_TOKEN_IDS["audio_token_id"], MM_TOKEN_IDS["video_token_id"],
    MM_TOKEN_IDS["boi_token_id"], MM_TOKEN_IDS["eoi_token_id"], MM_TOKEN_IDS["boa_token_id"],
    MM_TOKEN_IDS["eoa_token_index"],
)


def multimodal_reference(variant: str, seed: int) -> torch.nn.Module:
    """A tiny multimodal reference with every constant `_init_weights` sets randomised (clip bounds finite)."""
    torch.manual_seed(seed)
    config = transformers.Gemma4Config(
        text_config=text_config(variant),
        vision_config=transformers.Gemma4VisionConfig(**VISION, attn_implementation="eager"),
        audio_config=transformers.Gemma4AudioConfig(**AUDIO, attn_implementation="eager") if variant == "e2b" else None,
        **MM_TOKEN_IDS,
    )
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    randomise_small_tensors(model, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_buffers():
            if name.endswith(("input_min", "output_min")):
                tensor.fill_(-2.0 - torch.rand((), generator=gen).item())
            elif name.endswith(("input_max", "output_max")):
                tensor.fill_(2.0 + torch.rand((), generator=gen).item())
            elif name.endswith("std_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
            elif name.endswith("std_scale"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.3 + 0.1)
        table = model.model.vision_tower.patch_embedder.position_embedding_table
        table.copy_(torch.randn(table.shape, generator=gen) * 0.1)
    return model


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def tone(seconds: float, hz: float) -> np.ndarray:
    t = np.arange(int(16_000 * seconds)) / 16_000
    return (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def random_video(frames: int, height: int, width: int, seed: int) -> VideoFeatures:
    """Random frames half a second apart."""
    rng = np.random.default_rng(seed)
    pixels = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(frames)]
    return video_features(pixels, [i * 0.5 for i in range(frames)])


def marker_prompt(items: list[MediaFeatures | VideoFeatures], seed: int) -> list[int]:
    """Random text with one marker per image or audio item, as a chat template writes them, and each video
    frame as the reference's text expansion tokenizes (timestamp ids, then its delimited placeholders)."""
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = torch.randint(3, 400, (4,), generator=gen).tolist()
    for item in items:
        if isinstance(item, VideoFeatures):
            for frame in item.frames:
                ids += [*torch.randint(3, 400, (2,), generator=gen).tolist(), IDS.image_start]
                ids += [IDS.video] * frame.num_tokens + [IDS.image_end]
        else:
            ids.append(IDS.marker(item.modality))
        ids += torch.randint(3, 400, (3,), generator=gen).tolist()
    return ids


def _padded(items: list[MediaFeatures]) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches and positions of images or frames padded to the longest, as the reference processors batch them."""
    longest = max(i.pixel_values.shape[0] for i in items)
    pixels = torch.zeros(len(items), longest, items[0].pixel_values.shape[1])
    positions = torch.full((len(items), longest, 2), -1, dtype=torch.long)
    for n, item in enumerate(items):
        pixels[n, : item.pixel_values.shape[0]] = item.pixel_values
        positions[n, : item.position_ids.shape[0]] = item.position_ids
    return pixels, positions


def reference_inputs(prompt_ids: list[int], items: list[MediaFeatures | VideoFeatures]) -> dict[str, torch.Tensor]:
    """What the reference processor hands the model: padded pixel batches (images, video frames), audio
    features, token types."""
    ids = torch.tensor([prompt_ids])
    out: dict[str, torch.Tensor] = {"input_ids": ids}
    images = [i for i in items if isinstance(i, MediaFeatures) and i.modality == "image"]
    if images:
        out["pixel_values"], out["image_position_ids"] = _padded(images)
    videos = [i for i in items if isinstance(i, VideoFeatures)]
    if videos:
        out["pixel_values_videos"], out["video_position_ids"] = _padded(encoder_items(videos))
        out["num_frames_per_video"] = torch.tensor([len(v.frames) for v in videos])
    clips = [i for i in items if isinstance(i, MediaFeatures) and i.modality == "audio"]
    if clips:
        (clip,) = clips
        out |= {"input_features": clip.input_features[None], "input_features_mask": clip.input_features_mask[None]}
    types = torch.where(ids == IDS.image, 1, torch.where(ids == IDS.video, 2, torch.where(ids == IDS.audio, 3, 0)))
    out["mm_token_type_ids"] = types
    return out


def saved_references(directory: Path) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Per variant (e2b: vision + audio, PLE; 31b: bidirectional vision): the reference and its
    `save_pretrained` checkpoint under `directory`."""
    out = {}
    for seed, variant in enumerate(("e2b", "31b")):
        ref = multimodal_reference(variant, seed)
        ref.save_pretrained(directory / variant)
        out[variant] = (ref, directory / variant)
    return out
