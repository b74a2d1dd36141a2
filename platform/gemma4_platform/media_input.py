"""The media parts of a chat request: found and bounded on the event loop, then loaded on a worker.

Both doors hand the Frontend chat dicts. The OpenAI routes pass OpenAI's part shapes: `image_url`
(`{"url", "detail", "max_soft_tokens"}`), `input_audio` (`{"data": base64, "format"}`) and `video_url`
(`{"url"}`), where a URL is a `data:` URL or an http(s) URL on `limits.media_url_hosts`. The gRPC
conversion passes raw bytes: `{"type": "image"|"audio"|"video", <type>: {"data": bytes, "mime_type",
"max_soft_tokens"}}`. `find_media` turns either into `MediaSource`s (cheap checks only: counts, sizes,
MIME types, budgets, URL hosts) and gives back the messages with bare `{"type": modality}` parts, which
is all the chat template renders. `load_media` (blocking: the Frontend runs it on its media pool)
fetches, decodes and preprocesses one source. Every refusal is a `MediaError` whose `where` names the
part (`messages[1].content[0]`).

Image budget (soft tokens per image): `max_soft_tokens` (70, 140, 280, 560, 1120) when given, else
OpenAI's `detail`: `low` = 70, `high` = 1120, `auto` (the default) = 280.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gemma4.media.audio import audio_features, decode_audio
from gemma4.media.image import ALLOWED_BUDGETS, DEFAULT_IMAGE_BUDGET, decode_image, image_features
from gemma4.media.inputs import MediaError, MediaFeatures, Modality, VideoFeatures
from gemma4.media.video import decode_video, video_features

from gemma4_platform.media_fetch import check_media_url, fetch_media_url
from gemma4_platform.settings import LimitSettings

# Content part types (OpenAI's and the template's own) and the modality each carries.
MEDIA_PART_TYPES: dict[str, Modality] = {
    "image": "image", "image_url": "image", "audio": "audio", "input_audio": "audio", "video": "video",
    "video_url": "video",
}
DETAIL_BUDGETS = {"low": 70, "auto": DEFAULT_IMAGE_BUDGET, "high": 1120}
MIME_TYPES: dict[Modality, frozenset[str]] = {
    "image": frozenset({"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}),
    "audio": frozenset({
        "audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave", "audio/flac", "audio/x-flac", "audio/mpeg",
        "audio/mp3", "audio/ogg",
    }),
    "video": frozenset({"video/mp4", "video/webm", "video/quicktime"}),
}
AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg"}


@dataclass(frozen=True)
class MediaSource:
    """One media part, checked but not yet loaded: inline `data`, or a `url` on the allow-list."""

    where: str
    modality: Modality
    data: bytes | None = None
    url: str | None = None
    mime_type: str | None = None
    budget: int = DEFAULT_IMAGE_BUDGET  # images: the most soft tokens the image may take


@dataclass(frozen=True)
class MediaOptions:
    """Request-level media switches."""

    truncate_audio: bool = False  # audio over 30 s: keep the first 30 s instead of refusing it


def part_modality(part: Any) -> Modality | None:
    """The modality of a content part, None for text and anything that is not a media part."""
    return MEDIA_PART_TYPES.get(part.get("type")) if isinstance(part, Mapping) else None


def find_media(messages: Sequence[Any], limits: LimitSettings) -> tuple[list[Any], list[MediaSource]]:
    """The messages with each media part reduced to its marker, and the parts' sources in prompt order."""
    sources: list[MediaSource] = []
    out: list[Any] = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list) or not any(part_modality(p) for p in content):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            modality = part_modality(part)
            if modality is None:
                parts.append(part)
                continue
            where = f"messages[{i}].content[{j}]"
            if len(sources) == limits.max_media_items:
                raise MediaError(where, f"more than limits.max_media_items ({limits.max_media_items}) media parts")
            sources.append(_source(part, modality, where, limits))
            parts.append({"type": modality})
        out.append({**message, "content": parts})
    return out, sources


def _source(part: Mapping[str, Any], modality: Modality, where: str, limits: LimitSettings) -> MediaSource:
    kind = part["type"]
    value = part.get(kind, part.get("url"))  # the HF chat format also writes {"type": "image", "url": ...}
    if kind == "input_audio":
        return _input_audio(value, where, limits)
    budget = _budget(value, f"{where}.{kind}") if modality == "image" else DEFAULT_IMAGE_BUDGET
    if isinstance(value, str):
        return _from_url(value, modality, where, budget, limits)
    if isinstance(value, Mapping) and isinstance(value.get("data"), (bytes, bytearray)):
        data = bytes(value["data"])
        _check_size(len(data), where, limits)
        mime = _check_mime(value.get("mime_type") or None, modality, where)
        return MediaSource(where, modality, data=data, mime_type=mime, budget=budget)
    if isinstance(value, Mapping) and isinstance(value.get("url"), str):
        return _from_url(value["url"], modality, where, budget, limits)
    raise MediaError(where, f"expected {kind}.url (a data: or http(s) URL)")


def _budget(value: Any, where: str) -> int:
    if not isinstance(value, Mapping):
        return DEFAULT_IMAGE_BUDGET
    budget = value.get("max_soft_tokens")
    if budget is not None:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget not in ALLOWED_BUDGETS:
            raise MediaError(f"{where}.max_soft_tokens", f"{budget!r} is not one of {ALLOWED_BUDGETS}")
        return budget
    detail = value.get("detail", "auto")
    if detail not in DETAIL_BUDGETS:
        raise MediaError(f"{where}.detail", f"{detail!r} is not one of {', '.join(DETAIL_BUDGETS)}")
    return DETAIL_BUDGETS[detail]


def _input_audio(value: Any, where: str, limits: LimitSettings) -> MediaSource:
    if not isinstance(value, Mapping) or not isinstance(value.get("data"), str):
        raise MediaError(where, "an input_audio part needs input_audio.data (base64) and input_audio.format")
    audio_format = value.get("format")
    if audio_format not in AUDIO_FORMATS:
        raise MediaError(f"{where}.input_audio.format", f"{audio_format!r} is not one of {', '.join(AUDIO_FORMATS)}")
    data = _base64(value["data"], f"{where}.input_audio.data", limits)
    return MediaSource(where, "audio", data=data, mime_type=AUDIO_FORMATS[audio_format])


def _from_url(url: str, modality: Modality, where: str, budget: int, limits: LimitSettings) -> MediaSource:
    if url[:5].lower() == "data:":
        mime, data = _data_url(url, where, limits)
        return MediaSource(where, modality, data=data, mime_type=_check_mime(mime, modality, where), budget=budget)
    check_media_url(url, limits.media_url_hosts, where)
    return MediaSource(where, modality, url=url, budget=budget)


def _data_url(url: str, where: str, limits: LimitSettings) -> tuple[str | None, bytes]:
    """`data:[<mime>][;base64],<payload>`: the MIME type (None when absent) and the decoded bytes."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise MediaError(where, "a data: URL needs a ',' before its payload")
    params = header.split(";")
    if "base64" in params[1:]:
        return params[0].strip().lower() or None, _base64(payload, where, limits)
    data = urllib.parse.unquote_to_bytes(payload)
    _check_size(len(data), where, limits)
    return params[0].strip().lower() or None, data


def _base64(text: str, where: str, limits: LimitSettings) -> bytes:
    _check_size(len(text) // 4 * 3, where, limits)  # checked before decoding anything
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(where, f"invalid base64 ({exc})") from None


def _check_size(size: int, where: str, limits: LimitSettings) -> None:
    if size > limits.max_media_bytes:
        raise MediaError(where, f"{size} bytes of media, more than limits.max_media_bytes ({limits.max_media_bytes})")


def _check_mime(mime: Any, modality: Modality, where: str) -> str | None:
    if mime is None:
        return None
    accepted = MIME_TYPES[modality]
    if not isinstance(mime, str) or mime.lower() not in accepted:
        names = ", ".join(sorted(accepted))
        raise MediaError(where, f"MIME type {mime!r} is not an accepted {modality} type ({names})")
    return mime.lower()


def load_media(source: MediaSource, limits: LimitSettings, options: MediaOptions) -> MediaFeatures | VideoFeatures:
    """Fetch (URL sources), decode and preprocess one part into what the encoders take."""
    data = source.data
    if data is None:
        assert source.url is not None
        data, mime = fetch_media_url(
            source.url,
            where=source.where,
            hosts=limits.media_url_hosts,
            timeout_s=limits.media_url_timeout_s,
            max_bytes=limits.max_media_bytes,
        )
        # A server that says what it sent must send the part's modality; an unlabelled body is sniffed.
        if mime is not None and mime not in ("application/octet-stream", "binary/octet-stream"):
            _check_mime(mime, source.modality, source.where)
    if source.modality == "image":
        return image_features(decode_image(data, where=source.where, max_pixels=limits.max_image_pixels), source.budget)
    if source.modality == "audio":
        return audio_features(decode_audio(data, where=source.where, truncate=options.truncate_audio))
    frames, timestamps = decode_video(data, where=source.where, max_pixels=limits.max_image_pixels)
    return video_features(frames, timestamps)
