"""Prompt expansion: each media marker the chat template wrote becomes its delimiters and soft-token slots.

The template writes one marker token per media part (`<|image|>`, `<|audio|>`, `<|video|>`); the
processor of the reference replaces each with `<|image>` + N x `<|image|>` + `<image|>` (audio:
`<|audio>` + N x `<|audio|>` + `<audio|>`), N the item's soft-token count. Every token involved is a
control token, which HF tokenizers split at before anything else, so expanding the ids gives exactly
the ids of tokenizing the expanded text. Video needs text between its frames (timestamps) and is
expanded at the text level (`expand_video`), before tokenization, as the reference does:
`encode_multimodal_chat` does both for a chat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gemma4.config import Gemma4Config
from gemma4.media.inputs import (
    MediaError,
    MediaFeatures,
    MediaPlaceholder,
    Modality,
    MultimodalPrompt,
    VideoFeatures,
    encoder_items,
)
from gemma4.tokenizer import Gemma4Tokenizer


@dataclass(frozen=True)
class MediaTokenIds:
    """The control-token ids of media in a checkpoint's vocabulary."""

    image: int
    audio: int
    video: int
    image_start: int
    image_end: int
    audio_start: int
    audio_end: int

    @classmethod
    def of(cls, config: Gemma4Config) -> MediaTokenIds:
        ids = (config.image_token_id, config.audio_token_id, config.video_token_id, config.boi_token_id,
               config.eoi_token_id, config.boa_token_id, config.eoa_token_id)
        if any(i is None for i in ids):
            raise ValueError("this checkpoint's config does not define the media token ids")
        return cls(*ids)  # type: ignore[arg-type]

    def marker(self, modality: Modality) -> int:
        return {"image": self.image, "audio": self.audio, "video": self.video}[modality]


def expand_prompt(
    token_ids: Sequence[int], items: Sequence[MediaFeatures], ids: MediaTokenIds, *, where: str = "messages"
) -> MultimodalPrompt:
    """Replace the k-th image/audio marker in `token_ids` by the k-th item's delimited slots, and place video
    frames on their runs of `<|video|>` ids (already expanded in the text, see `encode_multimodal_chat`).

    `items` are the images, audio clips and video frames in prompt order; each marker (each run of video
    ids) must have an item of its modality and every item a marker (MediaError otherwise: a client's text
    cannot add markers, so a mismatch means the parts and the template disagree).
    """
    markers = {ids.image: "image", ids.audio: "audio", ids.video: "video"}
    out: list[int] = []
    placed: list[MediaPlaceholder] = []
    queue = iter(items)
    index = 0
    while index < len(token_ids):
        token = token_ids[index]
        modality = markers.get(token)
        index += 1
        if modality is None:
            out.append(token)
            continue
        item = next(queue, None)
        if item is None or item.modality != modality:
            found = "none" if item is None else item.modality
            raise MediaError(where, f"media marker {len(placed) + 1} of the prompt is {modality}, the parts give {found}")
        if modality == "video":
            run = 1
            while index < len(token_ids) and token_ids[index] == token:
                run, index = run + 1, index + 1
            if run != item.num_tokens:
                raise MediaError(where, f"video frame at media item {len(placed) + 1} has {run} slots for "
                                        f"{item.num_tokens} soft tokens")
            placed.append(MediaPlaceholder(len(out), item))
            out.extend([token] * run)
            continue
        start, end = (ids.image_start, ids.image_end) if modality == "image" else (ids.audio_start, ids.audio_end)
        out.append(start)
        placed.append(MediaPlaceholder(len(out), item))
        out.extend([token] * item.num_tokens)
        out.append(end)
    left = sum(1 for _ in queue)
    if left:
        raise MediaError(where, f"{left} media item(s) have no marker in the rendered prompt")
    return MultimodalPrompt(out, tuple(placed))


def encode_multimodal_chat(
    tokenizer: Gemma4Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    items: Sequence[MediaFeatures | VideoFeatures],
    ids: MediaTokenIds,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool = False,
    where: str = "messages",
) -> MultimodalPrompt:
    """The chat's prompt ids (as `tokenizer.encode_chat`) with every media marker expanded and placed.

    `items` are the media of the messages' image, audio and video parts, in message and part order. Each
    `<|video|>` marker the template wrote becomes its frames' text (`expand_video`) before tokenization,
    so the timestamps tokenize with their neighbours as in the reference; client text stays hidden from
    that step and can never add a marker. Each frame is then its own placeholder.
    """
    videos = [item for item in items if isinstance(item, VideoFeatures)]
    text_of = tokenizer.id_to_token
    video_marker = text_of(ids.video)
    if video_marker is None or (videos and None in (text_of(ids.image_start), text_of(ids.image_end))):
        raise ValueError("the media token ids are not in this tokenizer's vocabulary")

    def expand_videos(rendered: str) -> str:
        pieces = rendered.split(video_marker)
        if len(pieces) - 1 != len(videos):
            raise MediaError(where, f"the rendered prompt has {len(pieces) - 1} video marker(s), the parts give "
                                    f"{len(videos)} video(s)")
        expanded = [
            expand_video([frame.num_tokens for frame in video.frames], video.timestamps,
                         image_start=str(text_of(ids.image_start)), image_end=str(text_of(ids.image_end)),
                         video_token=video_marker)
            for video in videos
        ]
        return pieces[0] + "".join(text + piece for text, piece in zip(expanded, pieces[1:]))

    token_ids = tokenizer.encode_chat(messages, tools=tools, thinking=thinking, rewrite=expand_videos)
    return expand_prompt(token_ids, encoder_items(items), ids, where=where)


def video_timestamp(seconds: float) -> str:
    """`mm:ss` as the reference writes a frame's time (whole seconds, truncated)."""
    total = int(seconds)
    return f"{total // 60:02d}:{total % 60:02d}"


def expand_video(frame_tokens: Sequence[int], timestamps: Sequence[float], *, image_start: str, image_end: str,
                 video_token: str) -> str:
    """The text that replaces a `<|video|>` marker: per frame `mm:ss <|image>` + N x `<|video|>` + `<image|>`,
    frames joined by spaces (the delimiters are the image ones)."""
    if len(frame_tokens) != len(timestamps):
        raise ValueError("one timestamp per frame")
    return " ".join(
        f"{video_timestamp(t)} {image_start}{video_token * n}{image_end}" for n, t in zip(frame_tokens, timestamps)
    )
