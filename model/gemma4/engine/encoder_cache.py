"""The encoder cache: media items' soft tokens kept on the workers' devices, keyed by content hash.

Encoding an image or an audio clip is a tower forward; the same content in another request, in a
request recomputed after preemption, or the rest of an item after a prefix-cache hit ended inside it
reuses the soft tokens instead. The core keeps the bookkeeping (`EncoderCacheManager`: which items the
workers hold, least recently used first, within a capacity in soft tokens) and tells the workers each
step which items to encode and which entries to drop; every worker holds the tensors
(`EncoderOutputs`) and builds the step's `SoftTokens` and bidirectional spans from them. An entry a
step reads is never dropped in that step.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from gemma4.engine.request import Request
from gemma4.media.inputs import MediaFeatures, MediaPlaceholder
from gemma4.modeling import SoftTokens


class EncoderCacheManager:
    """Which items' soft tokens the workers hold: content hash -> soft-token count, in LRU order."""

    def __init__(self, capacity_tokens: int) -> None:
        if capacity_tokens < 1:
            raise ValueError(f"the encoder cache needs a positive capacity, got {capacity_tokens}")
        self.capacity_tokens = capacity_tokens
        self._entries: OrderedDict[str, int] = OrderedDict()
        self.used_tokens = 0
        self.queries = 0
        self.hits = 0

    def __contains__(self, content_hash: str) -> bool:
        return content_hash in self._entries

    def use(self, item: MediaFeatures) -> bool:
        """A step reads `item`: True if the workers must encode it first (it is then held from now on)."""
        self.queries += 1
        if item.content_hash in self._entries:
            self._entries.move_to_end(item.content_hash)
            self.hits += 1
            return False
        self._entries[item.content_hash] = item.num_tokens
        self.used_tokens += item.num_tokens
        return True

    def evict(self, keep: set[str]) -> list[str]:
        """Drop least recently used entries, other than `keep` (what this step reads), until the cache
        is within its capacity; the dropped hashes, for the workers to free."""
        dropped = []
        for content_hash in list(self._entries):
            if self.used_tokens <= self.capacity_tokens:
                break
            if content_hash not in keep:
                self.used_tokens -= self._entries.pop(content_hash)
                dropped.append(content_hash)
        return dropped

    @property
    def usage(self) -> float:
        """Fraction of the capacity in use (above 1 only while one step reads more than the capacity)."""
        return self.used_tokens / self.capacity_tokens


def overlapping_items(request: Request, start: int, end: int) -> Iterable[tuple[int, MediaPlaceholder]]:
    """`(index, item)` of `request`'s media that overlap its tokens `[start, end)`, in prompt order."""
    for index, item in enumerate(request.media):
        if item.offset >= end:
            break
        if item.end > start:
            yield index, item


@dataclass(frozen=True)
class StepMedia:
    """A step's media on the device: the soft tokens to scatter, and the step-row ranges `[start, end)`
    of its bidirectional spans (the image and video-frame items, on the models that have them)."""

    soft_tokens: SoftTokens
    spans: list[tuple[int, int]]


class EncoderOutputs:
    """A worker's soft tokens by content hash; what stays is the core's `EncoderCacheManager`'s decision."""

    def __init__(self, encode: Callable[[MediaFeatures], torch.Tensor], synchronize: Callable[[], None]) -> None:
        self._encode = encode
        self._synchronize = synchronize
        self._outputs: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._outputs)

    def free(self, hashes: Sequence[str]) -> None:
        for content_hash in hashes:
            self._outputs.pop(content_hash, None)

    def encode(self, items: Sequence[MediaFeatures]) -> float:
        """Run the towers over `items` and keep their soft tokens; the seconds it took (device included)."""
        if not items:
            return 0.0
        began = time.perf_counter()
        for item in items:
            self._outputs[item.content_hash] = self._encode(item)
        self._synchronize()
        return time.perf_counter() - began

    def step_media(self, requests: Sequence[Request], num_tokens: Sequence[int], *, spans: bool) -> StepMedia | None:
        """The soft tokens of every placeholder the step computes (rows in the flattened step, whose
        tokens follow `requests` in order), and with `spans` the rows of each image/video-frame item."""
        rows: list[torch.Tensor] = []
        embeds: list[torch.Tensor] = []
        span_rows: list[tuple[int, int]] = []
        offset = 0
        for request, n in zip(requests, num_tokens):
            start = request.num_computed_tokens
            for _, item in overlapping_items(request, start, start + n):
                first, last = max(item.offset, start), min(item.end, start + n)
                output = self._outputs[item.features.content_hash]
                embeds.append(output[first - item.offset : last - item.offset])
                row = offset + first - start
                rows.append(torch.arange(row, row + last - first))
                if spans and item.features.modality != "audio":
                    span_rows.append((row, row + last - first))
            offset += n
        if not embeds:
            return None
        device = embeds[0].device
        soft = SoftTokens(torch.cat(rows).to(device), torch.cat(embeds))
        return StepMedia(soft, span_rows)
