"""Video decoding and frame sampling as transformers' Gemma 4 video path does it, and the frames' features.

Decoding is PyAV from memory, as `transformers.video_utils.read_video_pyav`: the frame count and rate
from the stream header (`frames`, `average_rate`; 24 fps when unknown), frames
`arange(n) * total // n`, RGB24, timestamps `index / fps`. Only the MP4/MOV and WebM demuxers are
opened (chosen from the magic bytes, so FFmpeg never probes playlist or network formats), and the work is
bounded: the header's size is checked before decoding and at most `max_decoded_frames` are decoded.

Each sampled frame is preprocessed as an image (`gemma4.media.image`) at budget 70. The reference video
processor rescales with a float32 divide by 255 where images multiply by 1/255 in float64; for every
uint8 value both give the same float32, so the image path is exact for frames too. Its resize is
torchvision's (antialiased bicubic on uint8), which cannot run here; frames are resized as images are
(Pillow bicubic, what `Gemma4ImageProcessorPil` does), within two grey levels of it.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator, Sequence

import av
import numpy as np
from PIL import Image

from gemma4.media.image import image_features
from gemma4.media.inputs import MediaError, VideoFeatures

DEFAULT_NUM_FRAMES = 32
VIDEO_BUDGET = 70
DEFAULT_FPS = 24.0

_FORMATS = "MP4, MOV, WebM"
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_WEBM_DOCTYPE = b"\x42\x82\x84webm"  # the EBML header's DocType element: "webm" (not "matroska")
# ISO base media (MP4, MOV) files start with a box: size, then one of these types.
_MOV_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")


def decode_video(
    data: bytes,
    *,
    where: str,
    max_pixels: int,
    num_frames: int = DEFAULT_NUM_FRAMES,
    max_decoded_frames: int = 10_000,
) -> tuple[list[np.ndarray], list[float]]:
    """Decode `data` and sample `num_frames` frames uniformly: (RGB uint8 [H, W, 3] frames, seconds of each).

    MediaError for another container, corrupt data, no video stream, frames over `max_pixels`, fewer
    than `num_frames` frames, or a video needing more than `max_decoded_frames` decoded frames.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    demuxer = _demuxer(data, where)
    try:
        with av.open(io.BytesIO(data), mode="r", format=demuxer) as container:
            stream = _video_stream(container, where, max_pixels)
            total = stream.frames
            rate = float(stream.average_rate) if stream.average_rate else 0.0
        if total <= 0:  # the header does not say (WebM): count by decoding
            with av.open(io.BytesIO(data), mode="r", format=demuxer) as container:
                total = 0
                for total, _ in enumerate(_frames(container, where, max_pixels), start=1):
                    if total > max_decoded_frames:
                        raise MediaError(where, f"the video has more than {max_decoded_frames} frames, "
                                                "over the limit decoded")
        if total < num_frames:
            raise MediaError(where, f"the video has {total} frames, fewer than the {num_frames} sampled")
        indices = np.arange(num_frames, dtype=np.int64) * total // num_frames
        if indices[-1] >= max_decoded_frames:
            raise MediaError(where, f"the video has {total} frames, over the limit of {max_decoded_frames} decoded")
        wanted = set(indices.tolist())
        frames: list[np.ndarray] = []
        with av.open(io.BytesIO(data), mode="r", format=demuxer) as container:
            decoded = itertools.islice(_frames(container, where, max_pixels), int(indices[-1]) + 1)
            for index, frame in enumerate(decoded):
                if index in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
    except MediaError:
        raise
    except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
        raise MediaError(where, f"not a decodable video (accepted: {_FORMATS}): {exc}") from exc
    if len(frames) < num_frames:
        raise MediaError(where, f"the video decodes to fewer frames than the {total} its header gives")
    fps = rate or DEFAULT_FPS
    return frames, [int(index) / fps for index in indices]


def _demuxer(data: bytes, where: str) -> str:
    """FFmpeg's demuxer for the container `data` starts like, or MediaError for any other container."""
    if data[:4] == _EBML_MAGIC and _WEBM_DOCTYPE in data[:64]:
        return "matroska"
    if data[4:8] in _MOV_BOXES:
        return "mov"
    raise MediaError(where, f"unsupported or unrecognised video container (accepted: {_FORMATS})")


def _video_stream(container: av.container.InputContainer, where: str, max_pixels: int) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise MediaError(where, "no video stream in the data")
    stream = container.streams.video[0]
    _check_size(stream.codec_context.width, stream.codec_context.height, where, max_pixels)
    return stream


def _frames(container: av.container.InputContainer, where: str, max_pixels: int) -> Iterator[av.VideoFrame]:
    """The first video stream's frames in order, each size-checked (a stream may change size midway)."""
    stream = _video_stream(container, where, max_pixels)
    for frame in container.decode(stream):
        _check_size(frame.width, frame.height, where, max_pixels)
        yield frame


def _check_size(width: int, height: int, where: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise MediaError(where, f"video frames have an empty size {width}x{height}")
    if width * height > max_pixels:
        raise MediaError(where, f"video frames are {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")


def video_features(
    frames: Sequence[np.ndarray], timestamps: Sequence[float], budget: int = VIDEO_BUDGET
) -> VideoFeatures:
    """Each RGB uint8 [H, W, 3] frame resized and patchified as an image at `budget`, as one `video` item."""
    if len(frames) != len(timestamps):
        raise ValueError(f"{len(frames)} frames but {len(timestamps)} timestamps")
    items = []
    for frame in frames:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"a frame must be RGB uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
        items.append(image_features(Image.fromarray(frame), budget, modality="video"))
    return VideoFeatures(tuple(items), tuple(float(t) for t in timestamps))
