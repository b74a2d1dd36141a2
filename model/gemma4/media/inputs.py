"""What a preprocessed media item is, as the gateway, the engine and the encoders exchange it.

Plain data with CPU tensors (picklable: items cross to replicas through Ray's object store and to
rank processes). An image, one video frame and one audio clip are each one `MediaFeatures`: one
encoder call, one run of soft tokens in the prompt (`MediaPlaceholder`). A video is its frames, each
its own item and its own bidirectional block, with the timestamps the prompt shows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

import torch

Modality = Literal["image", "video", "audio"]
MODALITIES: tuple[Modality, ...] = ("image", "video", "audio")


class MediaError(ValueError):
    """Media a client sent that cannot be used; `where` names the part (`messages[1].content[0]`)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where


def content_digest(modality: str, *tensors: torch.Tensor) -> str:
    """Hex blake2b of the modality and each tensor's dtype, shape and bytes: a `MediaFeatures.content_hash`."""
    digest = hashlib.blake2b(modality.encode() + b"\0")
    for tensor in tensors:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{flat.dtype}:{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class MediaFeatures:
    """One encoder input. Images and video frames: `pixel_values [P, 3 * patch^2]` fp32 in [0, 1] and
    `position_ids [P, 2]` int64 (x = column, y = row), P = pooling_kernel^2 * num_tokens, no padding.
    Audio: `input_features [T, 128]` fp32 log-mel and `input_features_mask [T]` bool.

    `content_hash` (hex) is a digest of the modality and the tensors: the same content gives the same
    soft tokens, so it keys the encoder cache and is mixed into prefix-cache block hashes.
    """

    modality: Modality
    num_tokens: int
    content_hash: str
    pixel_values: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    input_features: torch.Tensor | None = None
    input_features_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class VideoFeatures:
    """A sampled video: one item per frame, and each frame's time in seconds (what the prompt shows)."""

    frames: tuple[MediaFeatures, ...]
    timestamps: tuple[float, ...]


@dataclass(frozen=True)
class MediaPlaceholder:
    """Where one item's soft tokens go: prompt positions `[offset, offset + features.num_tokens)`."""

    offset: int
    features: MediaFeatures

    @property
    def length(self) -> int:
        return self.features.num_tokens

    @property
    def end(self) -> int:
        return self.offset + self.features.num_tokens


@dataclass(frozen=True)
class MultimodalPrompt:
    """Expanded prompt ids and the media placed in them (in prompt order, non-overlapping)."""

    token_ids: list[int]
    media: tuple[MediaPlaceholder, ...] = ()


def encoder_items(items: Iterable[MediaFeatures | VideoFeatures]) -> list[MediaFeatures]:
    """The encoder inputs of `items` in prompt order: each video's frames in its place."""
    return [frame for item in items for frame in (item.frames if isinstance(item, VideoFeatures) else (item,))]


def audio_soft_tokens(mask: np.ndarray | torch.Tensor) -> int:
    """The soft tokens of an audio clip with valid-frame `mask [T]`: its valid frames after the tower's two
    stride-2 subsamplings."""
    return int(mask[::2][::2].sum())
