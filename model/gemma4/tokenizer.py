"""Load a Gemma 4 checkpoint's tokenizer, its stop tokens and chat template, and turn chats into ids.

Text <-> ids is the ``tokenizers`` library on the checkpoint's ``tokenizer.json``. The rest of what a
server needs is spread over other files, gathered here once: stop ids from ``generation_config.json``,
special tokens from ``tokenizer_config.json``, and the chat template from ``chat_template.jinja`` (which
wins) or ``tokenizer_config.json``. Checkpoints without a template get the built-in renderer of their
variant's flavour (``gemma4.chat.render``).

Chat prompts are encoded injection-proof (``gemma4.chat.safe_tokenize``): control tokens come only from
the template's structure, never from client text. ``encode`` parses control tokens written in its text,
for trusted text such as raw ``Generate`` prompts; ``encode_plain`` is the strict form for untrusted text.
"""

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from gemma4.chat import check_variant, render
from gemma4.chat.safe_tokenize import SafeEncoder
from gemma4.config import load_config
from gemma4.special_tokens import BOS, DEFAULT_STOP_TOKENS, PAD

__all__ = ["Gemma4Tokenizer", "load_tokenizer"]


class Gemma4Tokenizer:
    """Encode/decode plus the chat format of one checkpoint; special ids come from its own vocabulary."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        variant: str,
        chat_template: str | None = None,
        eos_token_ids: Sequence[int] | None = None,
        bos_token: str = BOS.text,
        pad_token: str = PAD.text,
    ) -> None:
        self._tokenizer = tokenizer
        self._safe = SafeEncoder(tokenizer)
        self._variant = check_variant(variant)
        self._chat_template = chat_template
        self._bos_token_id = self._require_id(bos_token)
        self._pad_token_id = self._require_id(pad_token)
        if eos_token_ids is None:
            eos_token_ids = [
                token_id for token in DEFAULT_STOP_TOKENS if (token_id := self.token_to_id(token.text)) is not None
            ]
        self._eos_token_ids = tuple(eos_token_ids)

    def _require_id(self, token: str) -> int:
        token_id = self.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the vocabulary has no {token!r} token")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int:
        return self._bos_token_id

    @property
    def pad_token_id(self) -> int:
        return self._pad_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Generation stops on any of these."""
        return self._eos_token_ids

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's own template, or None when the built-in renderer is used."""
        return self._chat_template

    @property
    def variant(self) -> str:
        return self._variant

    @property
    def control_token_ids(self) -> frozenset[int]:
        """Ids of the special tokens and Gemma 4 markers: in ``encode_chat`` only the template writes them."""
        return self._safe.control_ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it become their single ids, no BOS is added.

        For trusted text only (raw prompts that spell out their own chat format keep working this way):
        whoever writes the text controls the turn structure. Use ``encode_plain`` for untrusted text.
        """
        # encode_batch releases the GIL (encode does not): a long text on a worker thread leaves the
        # serving event loop free.
        return self._tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` with no control token: marker strings in it are spelled as ordinary text."""
        return self._safe.encode_plain(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_str(self) -> str:
        """The ``tokenizers`` JSON of the vocabulary (grammar libraries build their token tables from it)."""
        return self._tokenizer.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        thinking: bool = False,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text, with the checkpoint's template if it has one, else the built-in renderer.

        Marker text in client strings is in there verbatim, indistinguishable from the template's own: do
        not tokenize this text with ``encode`` when the conversation is untrusted; ``encode_chat`` is the
        safe way to its ids.
        """
        return render(
            messages,
            tools=tools,
            thinking=thinking,
            variant=self._variant,
            add_generation_prompt=add_generation_prompt,
            template=self._chat_template,
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        thinking: bool = False,
        add_generation_prompt: bool = True,
        rewrite: Callable[[str], str] | None = None,
    ) -> list[int]:
        """Prompt token ids (starting with ``<bos>``, which the chat format writes).

        Control tokens come only from the template: marker strings in client text (contents, names, schemas,
        arguments, responses, reasoning) are encoded as plain text. Without such text the ids equal
        ``encode(apply_chat_template(...))``. ``rewrite`` edits the rendered text before encoding, with client
        strings hidden from it; its own text is trusted (``gemma4.media.prompt`` expands video markers so).
        """
        return self._safe.encode_chat(
            messages,
            tools=tools,
            thinking=thinking,
            variant=self._variant,
            add_generation_prompt=add_generation_prompt,
            template=self._chat_template,
            rewrite=rewrite,
        )


def load_tokenizer(path: str | Path, *, variant: str | None = None) -> Gemma4Tokenizer:
    """Load the tokenizer of the checkpoint directory ``path``.

    ``variant`` ("e2b", "e4b", "26b-a4b", "31b") picks the built-in chat renderer for checkpoints without
    a template; by default it is the family the checkpoint's config is shaped like.
    """
    directory = Path(path)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} not found: a Gemma 4 checkpoint needs a tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # tokenizers raises a bare Exception for unreadable files
        raise ValueError(f"{tokenizer_file} is not a valid tokenizers file: {error}") from error
    config = _read_json(directory / "tokenizer_config.json")
    if variant is None:
        variant = load_config(directory).family
    return Gemma4Tokenizer(
        tokenizer,
        variant=variant,
        chat_template=_read_chat_template(directory, config),
        eos_token_ids=_read_eos_ids(directory / "generation_config.json"),
        bos_token=_token_text(config.get("bos_token"), BOS.text),
        pad_token=_token_text(config.get("pad_token"), PAD.text),
    )


def _read_json(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``, or {} when the (optional) file is absent."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return data


def _read_chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        # Several named templates (transformers' format): the default one is the chat template.
        template = next((entry.get("template") for entry in template if entry.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{directory / 'tokenizer_config.json'}: chat_template must be a string")
    return template


def _read_eos_ids(file: Path) -> list[int] | None:
    """``eos_token_id`` of generation_config.json as a list, or None when it does not say."""
    eos = _read_json(file).get("eos_token_id")
    if eos is None:
        return None
    ids = [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{file}: eos_token_id must be an integer or a list of integers")
    return ids


def _token_text(value: Any, default: str) -> str:
    """A special token entry of tokenizer_config.json: a string or a serialized AddedToken."""
    if value is None:
        return default
    if isinstance(value, Mapping):
        return value["content"]
    return value
