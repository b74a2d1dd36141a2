"""OpenAI's audio API (`/v1/audio/transcriptions`, `/v1/audio/translations`) as chat prompts over the audio.

The multipart form (`file`, `model`, optional `prompt`, `language`, `response_format` json|text,
`temperature`) becomes one user turn: the audio, then the instruction (`TRANSCRIBE` or `TRANSLATE`,
with the language and the prompt as context when given). The answer is the model's reply text:
`{"text": ..., "usage": ...}` or, for `response_format: text`, the bare text. The body is bounded
before it is parsed (the caller reads it with the request size limit); errors about the audio part
name the form field `file`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from gemma4.engine import RequestOutput

from gemma4_platform.backend import media_tokens
from gemma4_platform.errors import InvalidArgument, ServingError
from gemma4_platform.openai_schemas import ChatTurn

TRANSCRIBE = "Transcribe this audio."
TRANSLATE = "Translate this audio into English."
AUDIO_PART = "messages[0].content[0]"  # where the Frontend names the uploaded audio
MAX_FORM_FIELDS = 16


@dataclass(frozen=True)
class AudioForm:
    """A transcription or translation request, parsed from its form."""

    file: bytes
    model: str | None = None
    prompt: str | None = None
    language: str | None = None
    response_format: Literal["json", "text"] = "json"
    temperature: float | None = None

    def messages(self, instruction: str) -> list[dict[str, Any]]:
        """One user turn: the audio, then what to do with it."""
        text = instruction
        if self.language:
            text += f" The speech is in {self.language}."
        if self.prompt:
            text += f" Context: {self.prompt}"
        parts = [{"type": "audio", "audio": {"data": self.file}}, {"type": "text", "text": text}]
        return [{"role": "user", "content": parts}]

    def sampling(self) -> dict[str, Any]:
        """Greedy unless the client asks for a temperature (OpenAI's default is 0)."""
        return {"temperature": 0.0 if self.temperature is None else self.temperature}


async def parse_audio_form(body: bytes, content_type: str) -> AudioForm:
    """The form of an already size-checked body; a missing or malformed field is a 400 naming it."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidArgument("expected a multipart/form-data body with the audio in `file`", field="file")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode("latin-1"))]}
    try:
        form = await Request(scope, receive).form(max_files=1, max_fields=MAX_FORM_FIELDS)
    except (MultiPartException, HTTPException) as exc:
        detail = exc.detail if isinstance(exc, HTTPException) else exc.message
        raise InvalidArgument(f"malformed multipart form: {detail}", field="file") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidArgument("file: the audio file is missing", field="file")
        data = await upload.read()
        fields = {name: _text_field(form, name) for name in ("model", "prompt", "language", "response_format")}
        temperature = _text_field(form, "temperature")
    finally:
        await form.close()
    response_format = fields.pop("response_format") or "json"
    if response_format not in ("json", "text"):
        raise InvalidArgument(
            f"response_format: {response_format!r} is not supported (json or text)", field="response_format"
        )
    return AudioForm(data, response_format=response_format, temperature=_float(temperature), **fields)


def _text_field(form: Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidArgument(f"{name}: expected a text field, not a file", field=name)
    return value or None


def _float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise InvalidArgument(f"temperature: {text!r} is not a number", field="temperature") from None


def as_file_error(error: ServingError) -> ServingError:
    """An error about the audio part, naming the form field the client sent it in."""
    if error.field is None or not error.field.startswith(AUDIO_PART):
        return error
    return error.with_message(error.message.replace(AUDIO_PART, "file"), field=error.field.replace(AUDIO_PART, "file"))


async def audio_result(outputs: AsyncIterator[RequestOutput]) -> tuple[str, RequestOutput]:
    """The reply text and the final output of a generation."""
    turn, final = ChatTurn(), None
    async for final in outputs:
        turn.add(final.chat_deltas)
    if final is None:
        raise ServingError("the engine returned no output")
    return turn.content, final


def audio_response(text: str, final: RequestOutput, response_format: str) -> Response:
    """OpenAI's transcription body: JSON with the text and token usage, or the bare text."""
    if response_format == "text":
        return PlainTextResponse(text)
    usage = final.usage
    audio = media_tokens(usage)["audio_tokens"]
    return JSONResponse({
        "text": text,
        "usage": {
            "type": "tokens",
            "input_tokens": usage.prompt_tokens,
            "input_token_details": {"audio_tokens": audio, "text_tokens": usage.prompt_tokens - audio},
            "output_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
    })
