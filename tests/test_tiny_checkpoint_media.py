"""The tiny checkpoint `scripts/serve` writes carries the variant's media towers: it loads with them in our
loader and in transformers, its media token ids are its tokenizer's, and images and audio become soft tokens
equal to the reference's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import gemma4
from gemma4.media.audio import audio_features
from gemma4.media.image import image_features
from gemma4.media.prompt import MediaTokenIds
from gemma4.special_tokens import AUDIO, AUDIO_END, AUDIO_START, IMAGE, IMAGE_END, IMAGE_START, VIDEO
from gemma4.tiny import tiny_config, write_tiny_checkpoint
from gemma4.tokenizer import load_tokenizer

TOWERS = {"e2b": ["audio_tower", "embed_audio", "embed_vision", "vision_tower"], "31b": ["embed_vision", "vision_tower"]}


@pytest.fixture(scope="module", params=list(TOWERS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    variant = request.param
    return variant, write_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{variant}"), variant=variant, seed=3)


def test_the_default_tiny_config_has_no_towers() -> None:
    config = tiny_config("e2b")
    assert config.vision is None and config.audio is None
    towers = tiny_config("26b-a4b", towers=True)
    assert towers.vision is not None and towers.audio is None
    assert towers.vision.hidden_size == 32 and towers.vision.num_hidden_layers == 2


def test_media_token_ids_are_the_tokenizers(checkpoint: tuple[str, Path]) -> None:
    _, path = checkpoint
    config = gemma4.load_model(path, dtype=torch.float32).config
    tid = load_tokenizer(path).token_to_id
    expected = MediaTokenIds(tid(IMAGE.text), tid(AUDIO.text), tid(VIDEO.text), tid(IMAGE_START.text),
                             tid(IMAGE_END.text), tid(AUDIO_START.text), tid(AUDIO_END.text))
    assert MediaTokenIds.of(config) == expected
    assert len(set(vars(expected).values())) == 7 and max(vars(expected).values()) < config.text.vocab_size


def test_towers_load_here_and_in_transformers_with_equal_soft_tokens(checkpoint: tuple[str, Path]) -> None:
    variant, path = checkpoint
    model = gemma4.load_model(path, dtype=torch.float32)
    assert sorted(model.towers) == TOWERS[variant]
    ref, info = transformers.Gemma4ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    rng = np.random.default_rng(0)
    image = image_features(Image.fromarray(rng.integers(0, 256, (90, 170, 3), dtype=np.uint8)), 70)
    with torch.no_grad():
        ours = model.encode_media(image)
        theirs = ref.model.get_image_features(image.pixel_values[None], image.position_ids[None]).pooler_output[0]
    assert ours.shape == (image.num_tokens, model.config.text.hidden_size)
    assert ours.std(dim=0).min() > 0  # the tokens differ: the random tower is not clamped flat
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if "audio_tower" not in model.towers:
        return
    t = np.arange(16_000) / 16_000
    clip = audio_features((0.3 * np.sin(2 * np.pi * 330.0 * t)).astype(np.float32))
    with torch.no_grad():
        ours = model.encode_media(clip)
        out = ref.model.get_audio_features(clip.input_features[None], clip.input_features_mask[None])
    assert ours.shape == (clip.num_tokens, model.config.text.hidden_size) == (25, model.config.text.hidden_size)
    torch.testing.assert_close(ours, out.pooler_output[0, : clip.num_tokens], atol=1e-5, rtol=1e-5)
