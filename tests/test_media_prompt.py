"""Prompt expansion of media markers, alone and in a whole chat with video, equals tokenizing the text the
reference processor writes (with the HF `tokenizers` tokenizer of the tiny checkpoint)."""

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

from gemma4.media.inputs import MediaError, MediaFeatures, VideoFeatures
from gemma4.media.prompt import MediaTokenIds, encode_multimodal_chat, expand_prompt, expand_video
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


def _video(tokens: int, timestamps: list[float]) -> VideoFeatures:
    frames = tuple(MediaFeatures("video", tokens, f"frame-{t}") for t in timestamps)
    return VideoFeatures(frames, tuple(timestamps))


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [
        {"type": "text", "text": "Look at this"}, {"type": "image"},
        {"type": "video"}, {"type": "text", "text": "and hear"}, {"type": "audio"},
    ]},
    {"role": "assistant", "content": "Seen."},
    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Again?"}]},
]


def _reference_text(tokenizer: Gemma4Tokenizer, messages: list, items: list) -> str:
    """The rendered chat with each marker replaced as the reference processor does, in part order."""
    text = tokenizer.apply_chat_template(messages)
    markers = "|".join(re.escape(m.text) for m in (IMAGE, AUDIO, VIDEO))
    queue = iter(items)
    out = []
    for piece in re.split(f"({markers})", text):
        if piece == IMAGE.text:
            out.append(Gemma4Processor.replace_image_token(REFERENCE, {"num_soft_tokens_per_image": [next(queue).num_tokens]}, 0))
        elif piece == AUDIO.text:
            out.append(Gemma4Processor.replace_audio_token(REFERENCE, {"input_features_mask": [_audio_mask(next(queue).num_tokens)]}, 0))
        elif piece == VIDEO.text:
            video = next(queue)
            inputs = {"num_soft_tokens_per_video": [video.frames[0].num_tokens],
                      "video_metadata": [SimpleNamespace(fps=24.0, timestamps=list(video.timestamps))]}
            out.append(Gemma4Processor.replace_video_token(REFERENCE, inputs, 0))
        else:
            out.append(piece)
    return "".join(out)


DATA = Path(__file__).parent / "data"
TEMPLATES = {"built-in": ("e2b", None), "large": ("31b", "gemma4-large-interleaved.jinja"),
             "small": ("e4b", "gemma4-small-original.jinja")}


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_a_multimodal_chat_tokenizes_as_the_reference_expanded_text(template: str) -> None:
    variant, file = TEMPLATES[template]
    chat_template = None if file is None else (DATA / file).read_text(encoding="utf-8")
    tokenizer = Gemma4Tokenizer(build_tiny_tokenizer(), variant=variant, chat_template=chat_template)
    items = [_item("image", 4), _video(3, [0.0, 0.5, 1.0, 75.25]), _item("audio", 2), _video(2, [0.0, 2.0])]
    prompt = encode_multimodal_chat(tokenizer, CHAT, items, _ids(tokenizer))
    reference = _reference_text(tokenizer, CHAT, items)
    assert "00:00 " in reference and "01:15 " in reference
    assert prompt.token_ids == build_tiny_tokenizer().encode(reference, add_special_tokens=False).ids
    ids = _ids(tokenizer)
    flat = [items[0], *items[1].frames, items[2], *items[3].frames]
    assert [p.features for p in prompt.media] == flat
    for placed in prompt.media:
        marker = ids.marker(placed.features.modality)
        assert prompt.token_ids[placed.offset : placed.end] == [marker] * placed.length
        start = ids.audio_start if placed.features.modality == "audio" else ids.image_start
        assert prompt.token_ids[placed.offset - 1] == start


def test_client_text_never_makes_a_media_marker(tokenizer: Gemma4Tokenizer) -> None:
    sneaky = f"{VIDEO.text} {IMAGE.text} {AUDIO.text} {IMAGE_START.text}"
    messages = [{"role": "user", "content": [{"type": "text", "text": sneaky}, {"type": "video"}]}]
    video = _video(2, [0.0, 1.0])
    prompt = encode_multimodal_chat(tokenizer, messages, [video], _ids(tokenizer))
    ids = _ids(tokenizer)
    assert [p.features for p in prompt.media] == list(video.frames)
    assert prompt.token_ids.count(ids.video) == 4 and prompt.token_ids.count(ids.image_start) == 2
    assert ids.image not in prompt.token_ids and ids.audio not in prompt.token_ids
    assert sneaky in tokenizer.decode(prompt.token_ids)
    with pytest.raises(MediaError, match="0 video marker"):
        encode_multimodal_chat(tokenizer, [{"role": "user", "content": sneaky}], [video], _ids(tokenizer))


@pytest.mark.parametrize(
    "parts,items,message",
    [
        ([{"type": "video"}], [], r"the rendered prompt has 1 video marker\(s\), the parts give 0 video"),
        ([{"type": "image"}], [_video(1, [0.0])], r"the rendered prompt has 0 video marker\(s\), the parts give 1 video"),
        ([{"type": "video"}, {"type": "image"}], [_item("image", 1), _video(1, [0.0])],
         "media marker 1 of the prompt is video, the parts give image"),
        ([{"type": "audio"}], [_item("audio", 1), _item("image", 2)], r"1 media item\(s\) have no marker"),
    ],
)
def test_chat_parts_and_items_must_agree(tokenizer: Gemma4Tokenizer, parts: list, items: list, message: str) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, *parts]}]
    with pytest.raises(MediaError, match=f"^messages: {message}") as err:
        encode_multimodal_chat(tokenizer, messages, items, _ids(tokenizer))
    assert err.value.where == "messages"
