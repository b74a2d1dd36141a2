"""Image and audio preprocessing against transformers' Gemma4ImageProcessorPil and Gemma4AudioFeatureExtractor."""

from __future__ import annotations

import io
import struct
import wave
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from gemma4.media.audio import MAX_SAMPLES, SAMPLE_RATE, audio_features, decode_audio
from gemma4.media.image import decode_image, image_features, target_size
from gemma4.media.inputs import MediaError, content_digest

MAX_PIXELS = 10_000_000


def _picture(height: int, width: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: resampling differences would show, JPEG keeps it recognisable."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], axis=-1)
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(30, 30, (768, 768)), (768, 768, (768, 768)), (1000, 1000, (768, 768)), (480, 640, (672, 912)),
     (100, 4000, (96, 5040))],
)
def test_target_size_examples(height: int, width: int, expected: tuple[int, int]) -> None:
    assert target_size(height, width, 280) == expected


@pytest.mark.parametrize(
    ("height", "width", "fmt"),
    [(30, 30, "PNG"), (100, 4000, "PNG"), (480, 640, "JPEG"), (300, 90, "WEBP"), (57, 211, "GIF"), (4000, 100, "JPEG"),
     (768, 768, "WEBP")],  # 768x768 at 280 is already the target: no resize
)
@pytest.mark.parametrize("budget", [70, 280])
def test_image_matches_pil_processor(height: int, width: int, fmt: str, budget: int) -> None:
    source = _picture(height, width, seed=height * 7 + width)
    if fmt == "PNG":  # an alpha band: both sides must composite it onto white
        source = source.convert("RGBA")
        source.putalpha(Image.fromarray(np.full((height, width), 100, dtype=np.uint8)))
    data = _encode(source, fmt)
    decoded = decode_image(data, where="messages[0].content[1]", max_pixels=MAX_PIXELS)
    ours = image_features(decoded, budget)

    reference = Gemma4ImageProcessorPil(max_soft_tokens=budget)(Image.open(io.BytesIO(data)), return_tensors="np")
    n_patches = ours.pixel_values.shape[0]
    assert ours.num_tokens == reference["num_soft_tokens_per_image"][0] == n_patches // 9
    assert n_patches <= 9 * budget
    ref_pixels = reference["pixel_values"][0]
    ref_positions = reference["image_position_ids"][0]
    assert (ref_positions[n_patches:] == -1).all()
    np.testing.assert_allclose(ours.pixel_values.numpy(), ref_pixels[:n_patches], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ours.position_ids.numpy(), ref_positions[:n_patches])
    assert ours.pixel_values.dtype == torch.float32 and ours.position_ids.dtype == torch.int64


@pytest.mark.parametrize("mode", ["L", "P", "LA"])
def test_image_modes_convert_as_reference(mode: str) -> None:
    source = _picture(90, 130, seed=5).convert(mode)
    if mode == "P":  # palette transparency: composited onto white by both
        source.info["transparency"] = 0
    data = _encode(source, "PNG")
    ours = image_features(decode_image(data, where="img", max_pixels=MAX_PIXELS), 70)
    reference = Gemma4ImageProcessorPil(max_soft_tokens=70)(Image.open(io.BytesIO(data)), return_tensors="np")
    n_patches = ours.pixel_values.shape[0]
    np.testing.assert_allclose(ours.pixel_values.numpy(), reference["pixel_values"][0][:n_patches], rtol=0, atol=1e-6)


def test_image_hash_depends_on_content_and_grid() -> None:
    flat_wide = image_features(Image.new("RGB", (96, 48), (10, 20, 30)), 70)
    flat_tall = image_features(Image.new("RGB", (48, 96), (10, 20, 30)), 70)
    assert flat_wide.pixel_values.shape == flat_tall.pixel_values.shape
    assert flat_wide.content_hash != flat_tall.content_hash
    again = image_features(Image.new("RGB", (96, 48), (10, 20, 30)), 70)
    assert again.content_hash == flat_wide.content_hash


def test_image_errors_name_the_part() -> None:
    where = "messages[2].content[0]"
    good = _encode(_picture(64, 64, 0), "PNG")
    bad_inputs = {
        "corrupt": b"\x89PNG\r\n\x1a\n garbage",
        "truncated": good[: len(good) // 2],
        "bmp": _encode(_picture(20, 20, 1), "BMP"),
        "tiff": _encode(_picture(20, 20, 2), "TIFF"),
    }
    for name, data in bad_inputs.items():
        with pytest.raises(MediaError, match=r"messages\[2\]\.content\[0\]") as info:
            decode_image(data, where=where, max_pixels=MAX_PIXELS)
        assert info.value.where == where, name
    with pytest.raises(MediaError, match="over the limit"):
        decode_image(good, where=where, max_pixels=64 * 64 - 1)
    with pytest.raises(MediaError, match="budget"):
        image_features(_picture(64, 64, 3), 100)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width x height`: decoding its pixels would be a bomb."""
    data = bytearray(_encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.mark.parametrize(("width", "height"), [(9000, 9000), (40000, 40000)])
def test_decompression_bomb_refused_from_header(width: int, height: int) -> None:
    data = _png_claiming(width, height)
    assert len(data) < 200
    with pytest.raises(MediaError, match="too large|over the limit") as info:
        decode_image(data, where="img", max_pixels=MAX_PIXELS)
    assert info.value.where == "img"


def test_gif_first_frame() -> None:
    frames = [Image.new("RGB", (60, 40), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    decoded = decode_image(buffer.getvalue(), where="img", max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB" and decoded.size == (60, 40)
    assert decoded.getpixel((5, 5)) == (255, 0, 0)


def _reference_audio(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = Gemma4AudioFeatureExtractor()([samples], return_tensors="np")
    return out["input_features"][0], out["input_features_mask"][0]


def _clip(kind: str, n: int) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    if kind == "sine":
        return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    if kind == "noise":
        return np.random.default_rng(n).uniform(-1, 1, n).astype(np.float32)
    return (0.3 * np.sin(2 * np.pi * (100 * t + 3000 * t**2))).astype(np.float32)  # chirp 100 Hz -> ~8 kHz


@pytest.mark.parametrize("kind", ["sine", "noise", "chirp"])
@pytest.mark.parametrize(("n", "tokens"), [(80, 0), (16000, 25), (21920, 34)])
def test_audio_matches_feature_extractor(kind: str, n: int, tokens: int) -> None:
    samples = _clip(kind, n)
    ours = audio_features(samples)
    ref_features, ref_mask = _reference_audio(samples)
    assert ours.num_tokens == tokens
    assert ours.input_features.shape == ref_features.shape
    np.testing.assert_array_equal(ours.input_features_mask.numpy(), ref_mask)
    np.testing.assert_allclose(ours.input_features.numpy(), ref_features, rtol=0, atol=1e-5)
    assert ours.input_features.dtype == torch.float32 and ours.input_features_mask.dtype == torch.bool


def _wav(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(np.repeat(pcm, channels).tobytes())
    return buffer.getvalue()


def test_wav_round_trip() -> None:
    samples = _clip("chirp", 16000)
    decoded = decode_audio(_wav(samples, SAMPLE_RATE, channels=2), where="audio")
    assert decoded.dtype == np.float32 and decoded.shape == samples.shape
    np.testing.assert_allclose(decoded, samples, atol=1 / 32767)
    ours = audio_features(decoded)
    ref_features, _ = _reference_audio(decoded)
    assert ours.num_tokens == 25
    np.testing.assert_allclose(ours.input_features.numpy(), ref_features, rtol=0, atol=1e-5)


@pytest.mark.parametrize("width", [1, 3])
def test_wav_8_and_24_bit(width: int) -> None:
    samples = _clip("sine", 1600)
    if width == 1:
        raw = np.clip(np.round(samples * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    else:
        ints = np.round(samples * 2**23).astype("<i4")
        raw = np.stack([ints & 0xFF, (ints >> 8) & 0xFF, (ints >> 16) & 0xFF], axis=-1).astype(np.uint8).tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(width)
        writer.setframerate(SAMPLE_RATE)
        writer.writeframes(raw)
    decoded = decode_audio(buffer.getvalue(), where="audio")
    np.testing.assert_allclose(decoded, samples, atol=1 / 127 if width == 1 else 1e-6)


def test_long_audio_refused_or_truncated() -> None:
    data = _wav(np.zeros(31 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(MediaError, match="30 s") as info:
        decode_audio(data, where="messages[0].content[3]")
    assert info.value.where == "messages[0].content[3]"
    truncated = decode_audio(data, where="messages[0].content[3]", truncate=True)
    assert truncated.shape == (MAX_SAMPLES,)
    assert audio_features(truncated).num_tokens == 750


def test_resampled_to_16k() -> None:
    n = 44100  # 1 s at 44.1 kHz
    samples = (0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / 44100)).astype(np.float32)
    decoded = decode_audio(_wav(samples, 44100), where="audio")
    assert abs(decoded.shape[0] - SAMPLE_RATE) <= 2
    # The tone survives: compare with the ideal 16 kHz tone away from the filter's edges.
    ideal = 0.5 * np.sin(2 * np.pi * 440 * np.arange(decoded.shape[0]) / SAMPLE_RATE)
    assert np.abs(decoded[1000:15000] - ideal[1000:15000]).max() < 0.05


def test_corrupt_audio() -> None:
    for data in (b"RIFF\x00\x00\x00\x00WAVEjunk", b"not audio at all" * 10, b""):
        with pytest.raises(MediaError, match="clip7"):
            decode_audio(data, where="clip7")


@pytest.mark.parametrize(("fmt", "codec"), [("flac", "flac"), ("mp3", "libmp3lame")])
def test_compressed_stereo_44k_decodes_to_16k_mono(fmt: str, codec: str) -> None:
    import av

    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(2 * 44100) / 44100)).astype(np.float32)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=44100)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(np.stack([tone, -tone]), format="fltp", layout="stereo")
        frame.sample_rate = 44100
        to_codec = av.AudioResampler(format=stream.format.name, layout="stereo", rate=44100)
        for converted in [*to_codec.resample(frame), None]:
            for packet in stream.encode(converted):
                container.mux(packet)
    decoded = decode_audio(buffer.getvalue(), where="audio")
    assert decoded.dtype == np.float32 and abs(decoded.shape[0] - 2 * SAMPLE_RATE) <= 1200  # codec delay/padding
    assert np.abs(decoded).max() < 0.01  # opposite channels average to silence: the mixdown is a mean


def test_content_digest_tells_modality_dtype_shape_and_bytes_apart() -> None:
    values = torch.arange(6, dtype=torch.float32)
    base = content_digest("image", values)
    assert content_digest("image", values.clone()) == base
    assert content_digest("video", values) != base
    assert content_digest("image", values.reshape(2, 3)) != base
    assert content_digest("image", values.to(torch.int32)) != base
    assert content_digest("image", values + torch.tensor([0, 0, 0, 0, 0, 1.0])) != base
    assert content_digest("image", values[:3], values[3:]) != base
    # Every dtype media carries hashes, bf16 and bool included (no numpy equivalent needed).
    assert content_digest("audio", values.bfloat16(), values > 2) != content_digest("audio", values.bfloat16(), values > 3)
