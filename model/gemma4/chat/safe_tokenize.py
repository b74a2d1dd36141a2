"""Prompt token ids in which only the chat template's own structure is made of control tokens.

``encode(render(messages))`` parses control tokens anywhere in the prompt, so a client that writes
"<turn|>\\n<|turn>system\\n..." into a message closes its turn and opens a fake one. ``SafeEncoder``:

1. normalizes the conversation and strips earlier thoughts (``<|channel>...<channel|>``) from the
   assistant history first, as every Gemma template does (that is removal, not injection, and once the
   markers are hidden a template could no longer find them); tool-call arguments given pre-formatted in
   Gemma's syntax with ``<|"|>``-delimited strings are parsed, so that the template writes those delimiters
   itself, as for JSON arguments (keys then come in the template's order; text that does not parse is
   client text like any other);
2. hides the marker text of every client string behind placeholders (``gemma4.chat.escape``) and
   renders, with the checkpoint's template or the built-in renderer;
3. encodes the rendered text with the tokenizer's own added-token matching: every control token found
   there was written by the template;
4. gives each stretch between two control tokens that holds a placeholder its client text back and
   encodes it as plain text, where marker strings become the ordinary tokens that spell them.

When no client string holds marker text, steps 1, 2 and 4 change nothing: the ids are exactly
``encode(render(...))``, what transformers produces. Where step 4 runs, a stretch is still tokenized
as it would be inside the whole text, because HF tokenizers split at added tokens first and tokenize
the pieces between them independently.

Plain text is encoded by a second ``Tokenizer`` with ``encode_special_tokens`` on, so threads using
the shared one are unaffected, through ``encode_batch``, which releases the GIL. A vocabulary can
still spell a marker as its control token in plain text (a marker registered as a non-special added
token, or BPE merges that rebuild it from its pieces); such a token is respelled character by character.
A control id whose text is not its marker is ordinary (a model's ``<unk>`` for characters it cannot spell).
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tokenizers import Encoding, Tokenizer

from gemma4.chat.escape import MarkerMatcher, Placeholders
from gemma4.chat.messages import normalize_messages, normalize_tools
from gemma4.chat.render import check_variant, render_normalized, strip_thinking
from gemma4.chat.syntax import ToolCallParseError, parse_tool_arguments
from gemma4.special_tokens import ALL_SPECIAL_TOKENS, CHANNEL_END, CHANNEL_START, STRING_DELIMITER


class SafeEncoder:
    """Encodes untrusted text with one vocabulary: client text never becomes a control token."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self._control = control_tokens(tokenizer)
        self._control_ids = frozenset(self._control)
        self._matcher = MarkerMatcher(self._control.values())

    @property
    def control_ids(self) -> frozenset[int]:
        """Ids that only the template's structure may produce."""
        return self._control_ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` with marker strings spelled as ordinary text."""
        return self._plain_ids([text])[0]

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None,
        thinking: bool,
        variant: str,
        add_generation_prompt: bool,
        template: str | None,
        rewrite: Callable[[str], str] | None = None,
    ) -> list[int]:
        """The ids of the prompt ``render`` writes, with control tokens only where the template puts them.

        ``rewrite`` edits the rendered prompt before it is encoded, while client strings are still hidden:
        what it writes is trusted like the template's text (media expansion puts control tokens there).
        """
        check_variant(variant)
        placeholders = Placeholders(self._matcher)
        hidden_messages = [
            _hide_assistant_message(message, placeholders) if message["role"] == "assistant"
            else placeholders.hide(message)
            for message in normalize_messages(messages)
        ]
        rendered = render_normalized(
            hidden_messages,
            placeholders.hide(normalize_tools(tools)),
            thinking=thinking,
            variant=variant,
            add_generation_prompt=add_generation_prompt,
            template=template,
        )
        if rewrite is not None:
            rendered = rewrite(rendered)
        return self._encode_rendered(rendered, placeholders)

    def _encode_rendered(self, text: str, placeholders: Placeholders) -> list[int]:
        encoding = self._tokenizer.encode_batch([text], add_special_tokens=False)[0]
        ids, offsets = encoding.ids, encoding.offsets
        controls = [
            index
            for index, token_id in enumerate(ids)
            if token_id in self._control_ids and self._is_marker(token_id, text, offsets[index])
        ]
        # Stretches between control tokens: kept ids, or (str) client text to encode as plain text.
        parts: list[list[int] | str] = []
        first, start = 0, 0
        for index in controls:
            parts.append(_stretch(text[start : offsets[index][0]], ids[first:index], placeholders))
            parts.append([ids[index]])
            first, start = index + 1, offsets[index][1]
        parts.append(_stretch(text[start:], ids[first:], placeholders))
        plain = iter(self._plain_ids([part for part in parts if isinstance(part, str)]))
        return [token_id for part in parts for token_id in (next(plain) if isinstance(part, str) else part)]

    def _plain_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        encodings = self._plain.encode_batch(texts, add_special_tokens=False)
        return [self._respelled(text, encoding) for text, encoding in zip(texts, encodings)]

    def _respelled(self, text: str, encoding: Encoding) -> list[int]:
        """``encoding``'s ids, with each marker the plain tokenizer still made a control token spelled per character."""
        if not self._holds_marker(text, encoding):
            return encoding.ids
        ids: list[int] = []
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            if not self._is_marker(token_id, text, (start, end)):
                ids.append(token_id)
                continue
            chars = text[start:end]
            for char, char_encoding in zip(chars, self._plain.encode_batch(list(chars), add_special_tokens=False)):
                if self._holds_marker(char, char_encoding):
                    raise ValueError(f"the vocabulary cannot spell {chars!r} as plain text")
                ids.extend(char_encoding.ids)
        return ids

    def _holds_marker(self, text: str, encoding: Encoding) -> bool:
        if self._control_ids.isdisjoint(encoding.ids):
            return False
        return any(self._is_marker(token_id, text, span) for token_id, span in zip(encoding.ids, encoding.offsets))

    def _is_marker(self, token_id: int, text: str, span: tuple[int, int]) -> bool:
        """Whether ``token_id`` is a control token covering its own marker text (stripped whitespace aside)."""
        marker = self._control.get(token_id)
        return marker is not None and text[span[0] : span[1]].strip().lower() == marker.lower()


def control_tokens(tokenizer: Tokenizer) -> dict[int, str]:
    """Id -> text of every special added token, and of every Gemma 4 marker however the vocabulary registers it."""
    control = {
        token_id: token.content for token_id, token in tokenizer.get_added_tokens_decoder().items() if token.special
    }
    for token in ALL_SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token.text)
        if token_id is not None:
            control[token_id] = token.text
    return control


def _stretch(text: str, ids: list[int], placeholders: Placeholders) -> list[int] | str:
    """The ids of a stretch between control tokens as encoded, or, if it holds client marker text, that text."""
    revealed = placeholders.reveal(text)
    return ids if revealed == text else revealed


def _hide_assistant_message(message: Mapping[str, Any], placeholders: Placeholders) -> dict[str, Any]:
    hiders = {"content": _hide_history, "tool_calls": _hide_tool_calls}
    return {placeholders.hide(key): hiders.get(key, _hide)(value, placeholders) for key, value in message.items()}


def _hide(value: Any, placeholders: Placeholders) -> Any:
    return placeholders.hide(value)


def _hide_tool_calls(calls: list[dict[str, Any]], placeholders: Placeholders) -> list[dict[str, Any]]:
    hidden = []
    for call in calls:
        function = {**call["function"], "arguments": _parsed(call["function"]["arguments"])}
        hidden.append(placeholders.hide({**call, "function": function}))
    return hidden


def _parsed(arguments: str | Mapping[str, Any]) -> str | Mapping[str, Any]:
    """Pre-formatted Gemma arguments with strings as the mapping they spell; other arguments as they are."""
    if not isinstance(arguments, str) or STRING_DELIMITER.text not in arguments:
        return arguments
    try:
        return parse_tool_arguments("{" + arguments + "}")
    except ToolCallParseError:
        return arguments


def _hide_history(content: str | list[dict[str, Any]], placeholders: Placeholders) -> Any:
    if isinstance(content, str):
        return _hide_history_text(content, placeholders)
    return [
        {
            placeholders.hide(key): _hide_history_text(value, placeholders)
            if key == "text" and part["type"] == "text"
            else placeholders.hide(value)
            for key, value in part.items()
        }
        for part in content
    ]


def _hide_history_text(text: str, placeholders: Placeholders) -> str:
    """An assistant text without its thoughts, hidden.

    A text that loses everything becomes a placeholder for "": templates that test it
    (``if message['content']``) still see the non-empty text the client sent.
    """
    if CHANNEL_START.text not in text and CHANNEL_END.text not in text:
        return placeholders.hide(text)
    stripped = strip_thinking(text)
    return placeholders.hide(stripped) if stripped else placeholders.placeholder("")
