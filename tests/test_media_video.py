"""Video decoding, sampling and frame features: videos encoded here with PyAV from frames of known colours
(MP4, MOV, WebM; the truth needs no decoder), transformers' own PyAV reader and sampling, and its PIL
image processor on the frames."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
from transformers.video_utils import default_sample_indices_fn, read_video_pyav

from gemma4.media.inputs import MediaError
from gemma4.media.video import decode_video, video_features

MAX_PIXELS = 1_000_000
N_FRAMES = 40
FPS = 10


def _colour(i: int) -> np.ndarray:
    """Frame i's flat colour: levels 32 (red) and 48 (green) apart, so lossy coding keeps the index readable."""
    return np.array([16 + 32 * (i % 8), 16 + 48 * (i // 8), 128], dtype=np.uint8)


def _frames(n: int, height: int = 48, width: int = 64) -> list[np.ndarray]:
    return [np.broadcast_to(_colour(i), (height, width, 3)).copy() for i in range(n)]


def _encode(frames: list[np.ndarray], container: str, codec: str, fps: int = FPS) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def _index_of(frame: np.ndarray) -> int:
    red, green = frame[..., 0].mean(), frame[..., 1].mean()
    return round((red - 16) / 32) + 8 * round((green - 16) / 48)


FORMATS = {"mp4": ("mp4", "libx264"), "mov": ("mov", "mpeg4"), "webm": ("webm", "libvpx"),
           "webm-vp9": ("webm", "libvpx-vp9")}


@pytest.fixture(scope="module")
def videos() -> dict[str, bytes]:
    return {name: _encode(_frames(N_FRAMES), *spec) for name, spec in FORMATS.items()}


@pytest.mark.parametrize("name", list(FORMATS))
def test_frames_are_sampled_uniformly_with_their_times(videos: dict[str, bytes], name: str) -> None:
    frames, times = decode_video(videos[name], where="v", max_pixels=MAX_PIXELS)
    expected = np.arange(32) * N_FRAMES // 32
    assert len(frames) == 32 and all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    assert [_index_of(f) for f in frames] == expected.tolist()
    for frame, index in zip(frames, expected):
        assert np.abs(frame.reshape(-1, 3).mean(0) - _colour(index)).max() < 8
    assert times == pytest.approx((expected / FPS).tolist())


def test_mp4_equals_transformers_pyav_reader(videos: dict[str, bytes]) -> None:
    frames, times = decode_video(videos["mp4"], where="v", max_pixels=MAX_PIXELS, num_frames=8)

    def sample(metadata, **kwargs):
        return default_sample_indices_fn(metadata, num_frames=8)

    reference, metadata = read_video_pyav(io.BytesIO(videos["mp4"]), sample)
    np.testing.assert_array_equal(np.stack(frames), reference)
    assert times == metadata.timestamps


def _audio_only_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make,kwargs,message",
    [
        (_png, {}, "unsupported or unrecognised video container"),
        (lambda: b"RIFF\x00\x00\x00\x00AVI LIST", {}, "unsupported or unrecognised video container"),
        (lambda: _encode(_frames(N_FRAMES), "matroska", "libx264"), {}, "unsupported or unrecognised video container"),
        (lambda: b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4, {}, "not a decodable video|no video stream"),
        (_audio_only_mp4, {}, "no video stream"),
        (lambda: _encode(_frames(N_FRAMES), "mp4", "libx264"), {"max_pixels": 64 * 47},
         "64x48 = 3072 pixels, over the limit of 3008"),
        (lambda: _encode(_frames(10), "mp4", "libx264"), {}, "has 10 frames, fewer than the 32 sampled"),
        (lambda: _encode(_frames(10), "webm", "libvpx"), {"num_frames": 4, "max_decoded_frames": 8},
         "more than 8 frames"),
        (lambda: _encode(_frames(N_FRAMES), "mp4", "libx264"), {"max_decoded_frames": 30}, "over the limit of 30"),
    ],
)
def test_bad_videos_are_refused_naming_the_part(make, kwargs: dict, message: str) -> None:
    args = {"max_pixels": MAX_PIXELS, **kwargs}
    with pytest.raises(MediaError, match=message) as err:
        decode_video(make(), where="messages[0].content[1]", **args)
    assert err.value.where == "messages[0].content[1]"


def test_truncated_video_is_refused(videos: dict[str, bytes]) -> None:
    data = videos["webm"]
    with pytest.raises(MediaError, match="^messages: "):
        decode_video(data[: len(data) // 3], where="messages", max_pixels=MAX_PIXELS)


def test_frame_features_are_the_image_processors_with_a_divide() -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (90, 160, 3), dtype=np.uint8) for _ in range(3)]
    frames.append(frames[0].copy())
    video = video_features(frames, [0.0, 0.5, 1.0, 1.5])
    assert video.timestamps == (0.0, 0.5, 1.0, 1.5) and len(video.frames) == 4
    reference = Gemma4ImageProcessorPil(max_soft_tokens=70)([Image.fromarray(f) for f in frames], return_tensors="np")
    for n, item in enumerate(video.frames):
        assert item.modality == "video"
        patches = item.pixel_values.shape[0]
        assert item.num_tokens == reference["num_soft_tokens_per_image"][n] == patches // 9 <= 70
        np.testing.assert_array_equal(item.pixel_values.numpy(), reference["pixel_values"][n][:patches])
        np.testing.assert_array_equal(item.position_ids.numpy(), reference["image_position_ids"][n][:patches])
        # The video processor's rescale, `x.float() / 255`, gives exactly these values.
        levels = torch.round(item.pixel_values * 255).to(torch.uint8)
        assert torch.equal(levels.float() / 255, item.pixel_values)
    hashes = [item.content_hash for item in video.frames]
    assert len(set(hashes[:3])) == 3 and hashes[3] == hashes[0]
    with pytest.raises(ValueError, match="2 frames but 1 timestamps"):
        video_features(frames[:2], [0.0])
