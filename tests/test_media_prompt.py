"""Prompt expansion of media markers equals tokenizing the text the reference processor writes."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

from gemma4.media.inputs import MediaError, MediaFeatures
from gemma4.media.prompt import MediaTokenIds, expand_prompt, expand_video
from gemma4.special_tokens import AUDIO, AUDIO_END, AUDIO_START, IMAGE, IMAGE_END, IMAGE_START, VIDEO
from gemma4.tiny_tokenizer import build_tiny_tokenizer
from gemma4.tokenizer import Gemma4Tokenizer

REFERENCE = SimpleNamespace(
    boi_token=IMAGE_START.text, eoi_token=IMAGE_END.text, image_token=IMAGE.text,
    boa_token=AUDIO_START.text, eoa_token=AUDIO_END.text, audio_token=AUDIO.text, video_token=VIDEO.text,
)


@pytest.fixture(scope="module")
def tokenizer() -> Gemma4Tokenizer:
    return Gemma4Tokenizer(build_tiny_tokenizer(), variant="e2b")


def _ids(tokenizer: Gemma4Tokenizer) -> MediaTokenIds:
    tid = tokenizer.token_to_id
    return MediaTokenIds(tid(IMAGE.text), tid(AUDIO.text), tid(VIDEO.text), tid(IMAGE_START.text),
                         tid(IMAGE_END.text), tid(AUDIO_START.text), tid(AUDIO_END.text))


def _item(modality: str, n: int) -> MediaFeatures:
    return MediaFeatures(modality, n, f"{modality}-{n}")  # type: ignore[arg-type]


def _audio_mask(tokens: int) -> np.ndarray:
    """A valid-frame mask the reference turns into `tokens` soft tokens (4 frames per token)."""
    return np.ones(4 * tokens, dtype=bool)


def test_image_and_audio_markers_expand_as_the_reference_text_tokenizes(tokenizer: Gemma4Tokenizer) -> None:
    text = f"<bos>Look\n\n{IMAGE.text}\n\nthen listen {AUDIO.text} and again\n\n{IMAGE.text}\n\n"
    items = [_item("image", 5), _item("audio", 3), _item("image", 2)]
    prompt = expand_prompt(tokenizer.encode(text), items, _ids(tokenizer))

    pieces = re.split(f"({re.escape(IMAGE.text)}|{re.escape(AUDIO.text)})", text)
    expanded, queue = [], iter(items)
    for piece in pieces:
        if piece == IMAGE.text:
            n = next(queue).num_tokens
            expanded.append(Gemma4Processor.replace_image_token(REFERENCE, {"num_soft_tokens_per_image": [n]}, 0))
        elif piece == AUDIO.text:
            mask = _audio_mask(next(queue).num_tokens)
            expanded.append(Gemma4Processor.replace_audio_token(REFERENCE, {"input_features_mask": [mask]}, 0))
        else:
            expanded.append(piece)
    expanded = "".join(expanded)
    assert prompt.token_ids == tokenizer.encode(expanded)
    ids = _ids(tokenizer)
    for placed, item in zip(prompt.media, items):
        marker = ids.marker(item.modality)
        assert placed.features is item
        assert prompt.token_ids[placed.offset : placed.end] == [marker] * item.num_tokens
        assert prompt.token_ids[placed.offset - 1] in (ids.image_start, ids.audio_start)
        assert prompt.token_ids[placed.end] in (ids.image_end, ids.audio_end)


def test_an_item_without_tokens_keeps_its_delimiters(tokenizer: Gemma4Tokenizer) -> None:
    prompt = expand_prompt(tokenizer.encode(f"a {AUDIO.text} b"), [_item("audio", 0)], _ids(tokenizer))
    ids = _ids(tokenizer)
    assert ids.audio_start in prompt.token_ids and ids.audio_end in prompt.token_ids
    assert prompt.media[0].length == 0


@pytest.mark.parametrize(
    "text,items,message",
    [
        (f"x {IMAGE.text}", [], "media marker 1 of the prompt is image, the parts give none"),
        (f"x {IMAGE.text}", [_item("audio", 1)], "media marker 1 of the prompt is image, the parts give audio"),
        ("x", [_item("image", 1)], r"1 media item\(s\) have no marker"),
    ],
)
def test_markers_and_parts_must_agree(tokenizer: Gemma4Tokenizer, text: str, items: list, message: str) -> None:
    with pytest.raises(MediaError, match=f"^messages\\[0\\]: {message}") as err:
        expand_prompt(tokenizer.encode(text), items, _ids(tokenizer), where="messages[0]")
    assert err.value.where == "messages[0]"


def test_video_text_is_the_reference_replacement() -> None:
    timestamps = [0.0, 1.5, 61.9, 3599.0]
    metadata = SimpleNamespace(fps=2.0, timestamps=timestamps)
    reference = Gemma4Processor.replace_video_token(
        REFERENCE, {"num_soft_tokens_per_video": [3], "video_metadata": [metadata]}, 0
    )
    ours = expand_video([3] * 4, timestamps, image_start=IMAGE_START.text, image_end=IMAGE_END.text, video_token=VIDEO.text)
    assert ours == reference
    assert ours.startswith("00:00 ") and "01:01 " in ours and "59:59 " in ours


def test_token_ids_come_from_the_config() -> None:
    from gemma4.config import variant_config

    ids = MediaTokenIds.of(variant_config("e2b"))
    assert (ids.image, ids.audio, ids.video, ids.image_start, ids.image_end) == (258880, 258881, 258884, 255999, 258882)
    assert (ids.audio_start, ids.audio_end) == (256000, 258883)
