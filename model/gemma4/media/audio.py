"""Audio decoding and log-mel features, exact to transformers' `Gemma4AudioFeatureExtractor` for one clip.

Decoding: WAV (integer PCM) with the standard library's `wave`; FLAC, MP3, OGG and float WAV with
PyAV. Channels are averaged to mono, then any other rate is resampled to 16 kHz with FFmpeg's
swresample (PyAV's `AudioResampler`, its default windowed-sinc filter), so every format goes through
the same resampler.
"""

from __future__ import annotations

import io
import math
import wave

import av
import numpy as np
import torch

from gemma4.media.inputs import MediaError, MediaFeatures, audio_soft_tokens, content_digest

SAMPLE_RATE = 16000
MAX_SAMPLES = 480000  # 30 s: the extractor's max_length

_FRAME = 320  # 20 ms window
_HOP = 160  # 10 ms
_FFT = 512
_N_MEL = 128
_MEL_FLOOR = 1e-3
_PAD_MULTIPLE = 128


def decode_audio(data: bytes, *, where: str, truncate: bool = False) -> np.ndarray:
    """Decode audio bytes to fp32 mono 16 kHz samples; over 30 s is refused unless `truncate`."""
    try:
        channels, rate = _decode_wav(data)
    except (wave.Error, EOFError, ValueError):
        channels, rate = _decode_av(data, where)
    if channels.shape[1] == 0:
        raise MediaError(where, "audio has no samples")
    mono = channels.mean(axis=0, dtype=np.float32)
    if rate != SAMPLE_RATE:
        mono = _resample(mono, rate)
    if mono.shape[0] > MAX_SAMPLES:
        if not truncate:
            seconds = MAX_SAMPLES / SAMPLE_RATE
            raise MediaError(where, f"audio is {mono.shape[0] / SAMPLE_RATE:.2f} s, over the limit of {seconds:g} s")
        mono = mono[:MAX_SAMPLES]
    return np.ascontiguousarray(mono, dtype=np.float32)


def _decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Integer-PCM WAV -> ([channels, samples] fp32 in [-1, 1), rate). Raises wave.Error otherwise."""
    with wave.open(io.BytesIO(data), "rb") as reader:
        n_channels, width, rate = reader.getnchannels(), reader.getsampwidth(), reader.getframerate()
        raw = reader.readframes(reader.getnframes())
    if rate <= 0 or n_channels <= 0:
        raise ValueError("bad WAV header")
    usable = len(raw) - len(raw) % (width * n_channels)
    raw = raw[:usable]
    if width == 1:  # unsigned 8-bit
        values = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 3, 4):
        as_bytes = np.frombuffer(raw, dtype=np.uint8).reshape(-1, width)
        # Little-endian signed samples of any width: place them in the top bytes of an int32.
        padded = np.zeros((as_bytes.shape[0], 4), dtype=np.uint8)
        padded[:, 4 - width :] = as_bytes
        values = padded.view("<i4").reshape(-1).astype(np.float32) / 2.0**31
    else:
        raise ValueError(f"unsupported WAV sample width {width}")
    return values.reshape(-1, n_channels).T, rate


def _decode_av(data: bytes, where: str) -> tuple[np.ndarray, int]:
    """Any container/codec FFmpeg reads (first audio stream) -> ([channels, samples] fp32, rate)."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise MediaError(where, "no audio stream in the data")
            stream = container.streams.audio[0]
            # Planar float at the source layout and rate: only the sample format changes here.
            to_float = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=stream.rate)
            chunks = [
                out.to_ndarray()
                for frame in container.decode(stream)
                for out in to_float.resample(frame)
            ]
            chunks += [out.to_ndarray() for out in to_float.resample(None)]
            rate = stream.rate
    except MediaError:
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise MediaError(where, f"not decodable audio (accepted: WAV, FLAC, MP3, OGG): {exc}") from exc
    if not chunks or not rate:
        raise MediaError(where, "audio has no samples")
    return np.concatenate(chunks, axis=1).astype(np.float32), int(rate)


def _resample(mono: np.ndarray, rate: int) -> np.ndarray:
    """Mono fp32 at `rate` -> 16 kHz with swresample (flushed, so the tail is kept)."""
    frame = av.AudioFrame.from_ndarray(mono.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks = [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
    chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def _mel_filters() -> np.ndarray:
    """[FFT/2 + 1, 128] float64 triangular HTK filters over 0-8000 Hz, unnormalised."""
    bin_hz = np.linspace(0.0, SAMPLE_RATE // 2, _FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.float64(0.0)), _hz_to_mel(np.float64(8000.0)), _N_MEL + 2))
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_hz[:, None] - lower) / (center - lower)
    falling = (upper - bin_hz[:, None]) / (upper - center)
    return np.maximum(0.0, np.minimum(rising, falling))


_WINDOW = (0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(_FRAME) / _FRAME)).astype(np.float32)  # periodic Hann
_FILTERS = _mel_filters()


def audio_features(samples: np.ndarray) -> MediaFeatures:
    """Log-mel features [T, 128] fp32 and the valid-frame mask [T] of one 16 kHz mono clip.

    As the extractor does for one clip: right-pad with zeros to a multiple of 128 samples, prepend
    160 zeros (semicausal), frames of 320 every 160 samples; a frame is valid iff the last sample of
    its 321-sample unfold window is real audio, and invalid frames are zeroed.
    Samples past MAX_SAMPLES are dropped, as the extractor truncates (decode_audio refuses them first).
    """
    clip = np.asarray(samples, dtype=np.float32).reshape(-1)[:MAX_SAMPLES]
    n = clip.shape[0]
    padded_len = -(-n // _PAD_MULTIPLE) * _PAD_MULTIPLE
    signal = np.zeros(_FRAME // 2 + padded_len, dtype=np.float32)
    signal[_FRAME // 2 : _FRAME // 2 + n] = clip
    n_frames = max(0, (signal.shape[0] - (_FRAME + 1)) // _HOP + 1)
    starts = np.arange(n_frames) * _HOP
    frames = signal[starts[:, None] + np.arange(_FRAME)] * _WINDOW  # fp32, as the extractor computes
    magnitude = np.abs(np.fft.rfft(frames, n=_FFT, axis=-1))
    log_mel = np.log(magnitude @ _FILTERS + np.float64(_MEL_FLOOR)).astype(np.float32)
    mask = starts + _FRAME < _FRAME // 2 + n  # last window sample (index start + 320) is real audio
    log_mel = log_mel * mask[:, None]
    features = torch.from_numpy(np.ascontiguousarray(log_mel.reshape(n_frames, _N_MEL)))
    mask_t = torch.from_numpy(mask)
    return MediaFeatures(
        modality="audio",
        num_tokens=audio_soft_tokens(mask),
        content_hash=content_digest("audio", features, mask_t),
        input_features=features,
        input_features_mask=mask_t,
    )
