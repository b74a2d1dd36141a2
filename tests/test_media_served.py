"""Media end to end on the tiny checkpoint's engine (random-weight vision and audio towers): the `openai` client
and gRPC send an image and an audio clip, the engine encodes them, and usage counts their soft tokens.

One uvicorn server and one grpc.aio server over the same Frontend and engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch

import gemma4
from gemma4.config import load_config
from gemma4.media.audio import audio_features, decode_audio
from gemma4.media.image import decode_image, image_features
from gemma4.tiny import write_tiny_checkpoint
from gemma4_platform.api.v1 import serving_pb2 as pb
from gemma4_platform.api.v1.serving_pb2_grpc import Gemma4ServingStub
from gemma4_platform.backend import LocalBackend
from gemma4_platform.frontend import Frontend, ModelDescription
from gemma4_platform.grpc_service import Gemma4ServingService
from gemma4_platform.openai_api import build_openai_app
from test_grpc_service import ServerLoop
from test_media_api import audio_part, image_part, png, user, wav
from test_openai_api import serving


@dataclass
class Served:
    url: str
    grpc: Gemma4ServingStub
    frontend: Frontend

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    checkpoint: Path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-media"), variant="e2b")
    config = load_config(checkpoint)
    llm = gemma4.LLM(checkpoint, dtype=torch.float32, max_num_batched_tokens=512, num_kv_blocks=256)
    engine = gemma4.AsyncEngine(llm.engine)
    model = ModelDescription("tiny", config.family, 4096, config.text.vocab_size, config.modalities)
    frontend = Frontend(llm.tokenizer, model, LocalBackend(engine))
    loop = ServerLoop()
    try:
        with serving(build_openai_app(lambda: frontend)) as url:
            yield Served(url, loop.serve(Gemma4ServingService(frontend)), frontend)
    finally:
        loop.close()
        engine.shutdown()


IMAGE_TOKENS = image_features(decode_image(png(), where="x", max_pixels=10**6), 70).num_tokens
AUDIO_TOKENS = audio_features(decode_audio(wav(), where="x")).num_tokens


def test_the_tiny_checkpoint_serves_images_and_audio(served: Served) -> None:
    assert {"image", "audio"} <= set(served.frontend.model.modalities)


def test_openai_chat_with_an_image_and_audio_counts_their_tokens(served: Served) -> None:
    response = served.client().chat.completions.create(
        model="tiny", messages=user(image_part(detail="low"), audio_part()), max_tokens=4, temperature=0
    )
    assert response.usage.completion_tokens >= 1
    details = response.usage.prompt_tokens_details.model_dump()
    counts = (details["image_tokens"], details["audio_tokens"], details["video_tokens"])
    assert counts == (IMAGE_TOKENS, AUDIO_TOKENS, 0)
    assert response.usage.prompt_tokens > IMAGE_TOKENS + AUDIO_TOKENS


def test_transcription_of_a_wav_upload(served: Served) -> None:
    files = {"file": ("clip.wav", wav(), "audio/wav")}
    response = httpx.post(f"{served.url}/v1/audio/transcriptions", files=files, data={"model": "tiny"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["text"], str)
    assert body["usage"]["input_token_details"]["audio_tokens"] == AUDIO_TOKENS


def test_grpc_chat_with_image_bytes_streams_a_reply(served: Served) -> None:
    message = pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="Describe."), pb.Part(image=pb.ImageInput(data=png()))])
    request = pb.ChatRequest(messages=[message], sampling=pb.SamplingParams(max_tokens=4, temperature=0))
    chunks = list(served.grpc.ChatStream(request, timeout=60))
    assert chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    budget_280 = image_features(decode_image(png(), where="x", max_pixels=10**6), 280).num_tokens
    assert chunks[-1].usage.image_tokens == budget_280 and chunks[-1].usage.completion_tokens >= 1
