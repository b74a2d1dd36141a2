"""Prompt expansion: each media marker the chat template wrote becomes its delimiters and soft-token slots.

The template writes one marker token per media part (`<|image|>`, `<|audio|>`, `<|video|>`); the
processor of the reference replaces each with `<|image>` + N x `<|image|>` + `<image|>` (audio:
`<|audio>` + N x `<|audio|>` + `<audio|>`), N the item's soft-token count. Every token involved is a
control token, which HF tokenizers split at before anything else, so expanding the ids gives exactly
the ids of tokenizing the expanded text. Video needs text between its frames (timestamps) and is
expanded by `expand_video` at the text level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gemma4.config import Gemma4Config
from gemma4.media.inputs import MediaError, MediaFeatures, MediaPlaceholder, Modality, MultimodalPrompt


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
    """Replace the k-th image/audio marker in `token_ids` by the k-th item's delimited slots.

    `items` are the image and audio items in the order the template wrote their markers; each marker
    must have an item of its modality and every item a marker (MediaError otherwise: a client's text
    cannot add markers, so a mismatch means the parts and the template disagree).
    """
    markers = {ids.image: "image", ids.audio: "audio"}
    out: list[int] = []
    placed: list[MediaPlaceholder] = []
    queue = iter(items)
    for token in token_ids:
        modality = markers.get(token)
        if modality is None:
            out.append(token)
            continue
        item = next(queue, None)
        if item is None or item.modality != modality:
            found = "none" if item is None else item.modality
            raise MediaError(where, f"media marker {len(placed) + 1} of the prompt is {modality}, the parts give {found}")
        start, end = (ids.image_start, ids.image_end) if modality == "image" else (ids.audio_start, ids.audio_end)
        out.append(start)
        placed.append(MediaPlaceholder(len(out), item))
        out.extend([token] * item.num_tokens)
        out.append(end)
    left = sum(1 for _ in queue)
    if left:
        raise MediaError(where, f"{left} media item(s) have no marker in the rendered prompt")
    return MultimodalPrompt(out, tuple(placed))


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
