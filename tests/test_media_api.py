"""Images, audio and video through both doors: the OpenAI HTTP API (uvicorn, the `openai` client, httpx) and the
gRPC API (grpc.aio), over one Frontend whose backend records what reaches the engine and answers "ok".

The media are made here (Pillow PNG/JPEG, numpy WAV through `wave`); URLs are served by a local http.server on
127.0.0.1, the only allow-listed host. Every refusal must name the part and leave other requests alone.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import http.server
import io
import socketserver
import threading
import time
import wave
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import grpc
import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from gemma4.chat import ChatDelta
from gemma4.engine import FinishReason, RequestOutput, Usage
from gemma4.engine.outputs import RequestMetrics
from gemma4.media.image import decode_image, image_features
from gemma4.special_tokens import AUDIO, IMAGE, VIDEO
from gemma4.tiny_tokenizer import write_tiny_tokenizer
from gemma4.tokenizer import load_tokenizer
from gemma4_platform.api.v1 import serving_pb2 as pb
from gemma4_platform.api.v1.serving_pb2_grpc import Gemma4ServingStub
from gemma4_platform.backend import EngineRequest
from gemma4_platform.frontend import Frontend, GatewayPolicy, ModelDescription
from gemma4_platform.graph import served_modalities
from gemma4_platform.grpc_convert import usage_to_proto
from gemma4_platform.grpc_service import Gemma4ServingService
from gemma4_platform.openai_api import build_openai_app
from gemma4_platform.openai_schemas import usage_body
from gemma4_platform.settings import LimitSettings
from test_grpc_service import ServerLoop, rpc_error
from test_openai_api import serving

MAX_MODEL_LEN = 4096
LIMITS = LimitSettings(
    max_media_items=4,
    max_media_bytes=400_000,
    max_image_pixels=200_000,
    max_prompt_tokens=1000,
    media_url_hosts=("127.0.0.1",),
    media_url_timeout_s=1.0,
)


# ---------------------------------------------------------------------------------------- media
def png(width: int = 64, height: int = 48, colour: tuple[int, int, int] = (200, 30, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(width: int = 96, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 140, 220)).save(buffer, format="JPEG")
    return buffer.getvalue()


def noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress (for the byte limit)."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440.0 * t) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(samples.tobytes())
    return buffer.getvalue()


def mp4(frames: int = 36, width: int = 64, height: int = 48) -> bytes:
    """An MPEG-4 video whose frames darken one step each."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            pixels = np.full((height, width, 3), 250 - 5 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes = b"", mime: str = "image/png", **options: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(data or png(), mime), **options}}


def audio_part(data: bytes = b"", audio_format: str = "wav") -> dict[str, Any]:
    encoded = base64.b64encode(data or wav()).decode()
    return {"type": "input_audio", "input_audio": {"data": encoded, "format": audio_format}}


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "Describe."}, *parts]}]


# ---------------------------------------------------------------------------------------- servers
class RecordingBackend:
    """Answers every request with "ok" and records the requests it was given."""

    def __init__(self) -> None:
        self.requests: list[EngineRequest] = []

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.requests.append(request)
        yield RequestOutput(request.request_id, delta_token_ids=[7], chat_deltas=[ChatDelta("content", "ok")])
        yield RequestOutput(
            request.request_id,
            delta_token_ids=[106],
            finished=True,
            finish_reason=FinishReason.STOP,
            stop_reason=106,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=[7, 106],
            text="ok",
            usage=Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=2),
            metrics=RequestMetrics(0.0, None, None, (), 0),
        )


class MediaHost(http.server.BaseHTTPRequestHandler):
    """/img.png, /big (over the byte limit), /slow (past the fetch timeout), /away (redirects off the list)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/away":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/img.png")
            self.end_headers()
            return
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for byte in png():
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.01)
            return
        body = {"/img.png": png(), "/big": b"\0" * 500_000, "/text": b"hello"}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain" if self.path == "/text" else "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@dataclasses.dataclass
class Servers:
    http: str
    grpc: Gemma4ServingStub
    media: str
    backend: RecordingBackend
    frontend: Frontend

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.http}/v1", api_key="unused", max_retries=0, timeout=30)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.http}{path}", timeout=30, **kwargs)

    def chat(self, messages: list[dict[str, Any]], **fields: Any) -> httpx.Response:
        body = {"model": "tiny", "messages": messages, "max_tokens": 4, **fields}
        return self.post("/v1/chat/completions", json=body)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    directory: Path = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(directory)
    model = ModelDescription("tiny", "e2b", MAX_MODEL_LEN, 512, ("text", "image", "video", "audio"))
    backend = RecordingBackend()
    frontend = Frontend(load_tokenizer(directory, variant="e2b"), model, backend, policy=GatewayPolicy(limits=LIMITS))
    media = socketserver.ThreadingTCPServer(("127.0.0.1", 0), MediaHost)
    media.daemon_threads = True
    threading.Thread(target=media.serve_forever, daemon=True).start()
    loop = ServerLoop()
    try:
        with serving(build_openai_app(lambda: frontend)) as url:
            stub = loop.serve(Gemma4ServingService(frontend))
            yield Servers(url, stub, f"http://127.0.0.1:{media.server_address[1]}", backend, frontend)
    finally:
        loop.close()
        media.shutdown()


def last_media(servers: Servers) -> list[tuple[str, int]]:
    request = servers.backend.requests[-1]
    return [(p.features.modality, p.length) for p in request.media]


# ---------------------------------------------------------------------------------------- OpenAI
def test_openai_client_sends_an_image_and_an_audio_clip(servers: Servers) -> None:
    image = png(300, 200)
    response = servers.client().chat.completions.create(
        model="tiny", messages=user(image_part(image, detail="low"), audio_part()), max_tokens=4
    )
    assert response.choices[0].message.content == "ok"
    request = servers.backend.requests[-1]
    expected_image = image_features(decode_image(image, where="x", max_pixels=10**6), 70).num_tokens
    assert [(p.features.modality, p.length) for p in request.media][0] == ("image", expected_image)
    assert request.media[1].features.modality == "audio" and request.media[1].length == 25  # 1 s: 25 soft tokens
    tokenizer = servers.frontend.tokenizer
    image_id, audio_id = tokenizer.token_to_id(IMAGE.text), tokenizer.token_to_id(AUDIO.text)
    for placed, marker in zip(request.media, (image_id, audio_id)):
        assert set(request.prompt_token_ids[placed.offset : placed.end]) == {marker}
    assert response.usage.prompt_tokens == len(request.prompt_token_ids)


@pytest.mark.parametrize(
    ("options", "budget"), [({}, 280), ({"detail": "low"}, 70), ({"detail": "high", "max_soft_tokens": 140}, 140)]
)
def test_image_budget_from_detail_or_max_soft_tokens(servers: Servers, options: dict[str, Any], budget: int) -> None:
    image = jpeg()
    assert servers.chat(user(image_part(image, "image/jpeg", **options))).status_code == 200
    expected = image_features(decode_image(image, where="x", max_pixels=10**6), budget).num_tokens
    assert last_media(servers) == [("image", expected)]


def test_audio_over_30_s_needs_truncate_audio(servers: Servers) -> None:
    long_clip = audio_part(wav(31.0, rate=4000))
    refused = servers.chat(user(long_clip))
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "messages[0].content[1]" and "30 s" in refused.json()["error"]["message"]
    assert servers.chat(user(long_clip), truncate_audio=True).status_code == 200
    assert last_media(servers) == [("audio", 750)]  # the first 30 s


def test_a_video_becomes_its_sampled_frames(servers: Servers) -> None:
    """32 frames, each its own placeholder; at this server's prompt limit they do not fit (naming the part),
    with a larger one they do."""
    video = {"type": "video_url", "video_url": {"url": data_url(mp4(), "video/mp4")}}
    response = servers.chat(user(video))
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0].content[1]"
    assert "prompt limit" in response.json()["error"]["message"]
    roomy = dataclasses.replace(servers.frontend.policy, limits=LIMITS.model_copy(update={"max_prompt_tokens": 4000}))
    frontend = Frontend(servers.frontend.tokenizer, servers.frontend.model, servers.backend, policy=roomy)
    prompt = asyncio.run(frontend.chat_prompt(user(video)))
    assert [p.features.modality for p in prompt.media] == ["video"] * 32
    video_id = servers.frontend.tokenizer.token_to_id(VIDEO.text)
    for placed in prompt.media:
        assert set(prompt.token_ids[placed.offset : placed.end]) == {video_id}
    assert "00:04" in servers.frontend.tokenizer.decode(prompt.token_ids)  # frame times, mm:ss


def test_an_allow_listed_url_is_fetched(servers: Servers) -> None:
    part = {"type": "image_url", "image_url": {"url": f"{servers.media}/img.png", "detail": "low"}}
    assert servers.chat(user(part)).status_code == 200
    assert last_media(servers)[0][0] == "image"


BAD_PARTS: dict[str, tuple[dict[str, Any], str, str]] = {
    "corrupt image": (image_part(b"not an image"), "", "not a decodable image"),
    "bad base64": ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "", "base64"),
    "wrong MIME type": (image_part(png(), "text/plain"), "", "MIME type"),
    "image over the pixel limit": (image_part(png(500, 500)), "", "pixels"),
    "part over the byte limit": (image_part(noise_png(400, 400)), "", "max_media_bytes"),
    "bad detail": (image_part(detail="ultra"), ".image_url.detail", "ultra"),
    "bad max_soft_tokens": (image_part(max_soft_tokens=100), ".image_url.max_soft_tokens", "100"),
    "bad audio format": (audio_part(audio_format="aiff"), ".input_audio.format", "aiff"),
    "corrupt audio": (audio_part(b"RIFF....WAVEjunk"), "", "audio"),
    "host not allowed": ({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}, "", "not allowed"),
    "no url": ({"type": "image_url", "image_url": {"detail": "low"}}, "", "image_url.url"),
    "ftp url": ({"type": "video_url", "video_url": {"url": "ftp://127.0.0.1/a.mp4"}}, "", "http(s)"),
    "not a video": ({"type": "video_url", "video_url": {"url": data_url(png(), "video/mp4")}}, "", ""),
    "redirect off the list": ({"type": "image_url", "image_url": {"url": "MEDIA/away"}}, "", "redirects"),
    "URL body over the byte limit": ({"type": "image_url", "image_url": {"url": "MEDIA/big"}}, "", "bytes"),
    "URL too slow": ({"type": "image_url", "image_url": {"url": "MEDIA/slow"}}, "", "longer than"),
    "URL of another type": ({"type": "image_url", "image_url": {"url": "MEDIA/text"}}, "", "MIME type"),
    "URL not found": ({"type": "image_url", "image_url": {"url": "MEDIA/missing"}}, "", "404"),
    "too many soft tokens": (image_part(detail="high"), "", "prompt limit"),  # 1120 > limits.max_prompt_tokens
}


@pytest.mark.parametrize("case", BAD_PARTS)
def test_bad_media_is_400_naming_the_part(servers: Servers, case: str) -> None:
    part, suffix, message = BAD_PARTS[case]
    if "MEDIA" in str(part):
        part = {**part, "image_url": {"url": part["image_url"]["url"].replace("MEDIA", servers.media)}}
    response = servers.chat(user(part))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == f"messages[0].content[1]{suffix}", error
    assert error["message"].startswith(f"messages[0].content[1]{suffix}: ") and message in error["message"], error


def test_too_many_media_parts(servers: Servers) -> None:
    response = servers.chat(user(*[image_part(detail="low")] * 5))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[0].content[5]"
    assert "max_media_items" in response.json()["error"]["message"]


def test_a_bad_request_leaves_a_concurrent_good_one_alone(servers: Servers) -> None:
    slow_bad = {"type": "image_url", "image_url": {"url": f"{servers.media}/slow"}}
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(servers.chat, user(slow_bad))
        time.sleep(0.1)
        good = pool.submit(servers.chat, user(image_part(detail="low"), audio_part()))
        assert good.result().status_code == 200
        assert good.result().json()["choices"][0]["message"]["content"] == "ok"
        assert bad.result().status_code == 400


def test_usage_reports_media_tokens_per_modality() -> None:
    usage = Usage(400, 3, cached_prompt_tokens=16, image_tokens=280, audio_tokens=25, video_tokens=0)
    details = usage_body(usage)["prompt_tokens_details"]
    assert details == {"cached_tokens": 16, "image_tokens": 280, "audio_tokens": 25, "video_tokens": 0}
    proto = usage_to_proto(usage)
    assert (proto.image_tokens, proto.audio_tokens, proto.video_tokens, proto.prompt_tokens) == (280, 25, 0, 400)


# ---------------------------------------------------------------------------------------- transcriptions
@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/audio/translations"])
def test_transcription_of_a_wav_upload(servers: Servers, path: str) -> None:
    files = {"file": ("clip.wav", wav(), "audio/wav")}
    response = servers.post(path, files=files, data={"model": "tiny", "language": "fr", "prompt": "A tone."})
    assert response.status_code == 200, response.text
    assert response.json()["text"] == "ok"
    assert response.json()["usage"]["input_tokens"] == len(servers.backend.requests[-1].prompt_token_ids)
    assert last_media(servers) == [("audio", 25)]
    prompt = servers.frontend.tokenizer.decode(servers.backend.requests[-1].prompt_token_ids)
    assert ("Transcribe" if "transcriptions" in path else "Translate") in prompt and "fr" in prompt
    plain = servers.post(path, files=files, data={"response_format": "text"})
    assert (plain.status_code, plain.text) == (200, "ok")


def test_openai_client_transcribes(servers: Servers) -> None:
    result = servers.client().audio.transcriptions.create(model="tiny", file=("clip.wav", wav(), "audio/wav"))
    assert result.text == "ok"


@pytest.mark.parametrize(
    ("files", "data", "param"),
    [
        (None, {"model": "tiny"}, "file"),
        ({"file": ("clip.wav", b"garbage", "audio/wav")}, {}, "file"),
        ({"file": ("clip.wav", wav(31.0, rate=4000), "audio/wav")}, {}, "file"),
        ({"file": ("clip.wav", wav(), "audio/wav")}, {"response_format": "srt"}, "response_format"),
        ({"file": ("clip.wav", wav(), "audio/wav")}, {"temperature": "warm"}, "temperature"),
    ],
)
def test_bad_transcription_requests(servers: Servers, files: Any, data: dict[str, str], param: str) -> None:
    response = servers.post("/v1/audio/transcriptions", files=files, data=data)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_transcription_naming_another_model_is_404(servers: Servers) -> None:
    response = servers.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav())}, data={"model": "whisper-1"})
    assert response.status_code == 404


# ---------------------------------------------------------------------------------------- gRPC
def grpc_chat(*parts: pb.Part, **fields: Any) -> pb.ChatRequest:
    message = pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="Describe."), *parts])
    return pb.ChatRequest(messages=[message], sampling=pb.SamplingParams(max_tokens=4), **fields)


def test_grpc_chat_with_image_bytes_streams_a_reply(servers: Servers) -> None:
    image = pb.Part(image=pb.ImageInput(data=png(), mime_type="image/png", max_soft_tokens=70))
    chunks = list(servers.grpc.ChatStream(grpc_chat(image, pb.Part(audio=pb.AudioInput(data=wav()))), timeout=30))
    assert "".join(c.text for c in chunks) == "ok"
    assert chunks[-1].usage.prompt_tokens == len(servers.backend.requests[-1].prompt_token_ids)
    expected = image_features(decode_image(png(), where="x", max_pixels=10**6), 70).num_tokens
    assert last_media(servers) == [("image", expected), ("audio", 25)]
    counted = servers.grpc.CountTokens(grpc_chat(image), timeout=30).prompt_tokens
    assert counted == len(servers.backend.requests[-1].prompt_token_ids) - 27  # without the audio's 25 + delimiters


@pytest.mark.parametrize(
    ("part", "fields", "where"),
    [
        (pb.Part(image=pb.ImageInput(data=b"junk")), {}, "messages[0].parts[1]"),
        (pb.Part(image=pb.ImageInput(data=png(), mime_type="audio/wav")), {}, "messages[0].parts[1]"),
        (pb.Part(image=pb.ImageInput(data=png(), max_soft_tokens=3)), {}, "messages[0].parts[1].image.max_soft_tokens"),
        (pb.Part(audio=pb.AudioInput(data=wav(31.0, rate=4000))), {}, "messages[0].parts[1]"),
    ],
)
def test_grpc_bad_media_is_invalid_argument(
    servers: Servers, part: pb.Part, fields: dict[str, Any], where: str
) -> None:
    error = rpc_error(lambda: list(servers.grpc.ChatStream(grpc_chat(part, **fields), timeout=30)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(f"{where}: "), error.details()


def test_grpc_truncate_audio(servers: Servers) -> None:
    part = pb.Part(audio=pb.AudioInput(data=wav(31.0, rate=4000)))
    reply = servers.grpc.Chat(grpc_chat(part, truncate_audio=True), timeout=30)
    assert reply.text == "ok" and last_media(servers) == [("audio", 750)]


def test_media_url_hosts_are_host_names() -> None:
    assert LimitSettings(media_url_hosts=("Images.Example.com",)).media_url_hosts == ("images.example.com",)
    for bad in ("https://images.example.com", "host:8080", "a/b", ""):
        with pytest.raises(ValueError, match="not a host name"):
            LimitSettings(media_url_hosts=(bad,))


def test_served_modalities_follow_the_checkpoint_and_the_setting() -> None:
    e2b = ("text", "image", "video", "audio")
    assert served_modalities(e2b, "all") == e2b
    assert served_modalities(e2b, ("image",)) == ("text", "image")
    assert served_modalities(("text", "image", "video"), ("audio", "video")) == ("text", "video")
