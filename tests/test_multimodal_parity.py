"""Images, video and audio end to end through the model, exact to `Gemma4ForConditionalGeneration`: a
checkpoint written by transformers' `save_pretrained` loads with its towers, our preprocessing feeds both
models (video frames as `pixel_values_videos`), and the logits agree with the soft tokens placed by our
prompt expansion (bidirectional image and video-frame blocks on the vision-bidirectional shape)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gemma4
from gemma4.media.audio import audio_features
from gemma4.media.image import image_features
from gemma4.media.inputs import encoder_items
from gemma4.media.prompt import expand_prompt
from gemma4.modeling import SoftTokens
from multimodal_reference import (
    IDS,
    marker_prompt,
    random_image,
    random_video,
    reference_inputs,
    saved_references,
    tone,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    return saved_references(tmp_path_factory.mktemp("references"))


CASES = {
    # PLE + audio: images of two aspect ratios and budgets, and a 1.37 s clip.
    "e2b": lambda: [image_features(random_image(96, 200, 0), 70), audio_features(tone(1.37, 440.0)),
                    image_features(random_image(300, 120, 1), 140)],
    # Bidirectional image blocks on the sliding layers.
    "31b": lambda: [image_features(random_image(150, 150, 2), 70), image_features(random_image(64, 300, 3), 70)],
    # Video frames (causal), between an image and a clip.
    "e2b-video": lambda: [image_features(random_image(80, 80, 4), 70), random_video(3, 90, 160, 5),
                          audio_features(tone(0.5, 300.0))],
    # Each video frame its own bidirectional block, next to an image's.
    "31b-video": lambda: [random_video(4, 120, 90, 6), image_features(random_image(100, 140, 7), 70)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_media_logits_match_transformers(checkpoints, case: str) -> None:
    variant = case.split("-")[0]
    ref, path = checkpoints[variant]
    model = gemma4.load_model(path, dtype=torch.float32)
    assert sorted(model.towers) == (
        ["audio_tower", "embed_audio", "embed_vision", "vision_tower"] if variant == "e2b" else ["embed_vision", "vision_tower"]
    )
    items = CASES[case]()
    prompt = expand_prompt(marker_prompt(items, seed=5), encoder_items(items), IDS)
    with torch.no_grad():
        expected = ref(**reference_inputs(prompt.token_ids, items)).logits[0]
        embeds = [model.encode_media(p.features) for p in prompt.media]
        rows = torch.cat([torch.arange(p.offset, p.end) for p in prompt.media])
        span_ids = torch.full((1, len(prompt.token_ids)), -1)
        for n, placed in enumerate(prompt.media):
            if placed.features.modality in ("image", "video"):
                span_ids[0, placed.offset : placed.end] = n
        ids = torch.tensor([prompt.token_ids])
        actual = model(ids, soft_tokens=SoftTokens(rows, torch.cat(embeds)), span_ids=span_ids)[0]
        text_only = model(ids)[0]
    assert [e.shape[0] for e in embeds] == [i.num_tokens for i in encoder_items(items)]
    assert expected.std() > 0.1
    assert (actual - expected).abs().max().item() <= 3e-4
    assert (text_only - expected).abs().max().item() > 1e-2  # the media reach the logits


def test_an_item_without_a_tower_is_refused(checkpoints) -> None:
    _, path = checkpoints["31b"]
    model = gemma4.load_model(path, dtype=torch.float32)
    with pytest.raises(ValueError, match="no audio tower"):
        model.encode_media(audio_features(tone(1.0, 300.0)))
