"""Turn chat messages into a Gemma 4 prompt, with the checkpoint's template or the built-in renderer.

The built-in renderer is plain Python that reproduces the official templates byte for byte, for
checkpoints that ship without one. Google ships two flavours (golden tests pin both against the
templates in ``tests/data``):

* large (26B-A4B, 31B; the "interleaved" revision): the system turn opens with ``<|think|>\\n`` when
  thinking is on; reasoning is re-emitted before tool calls that follow the last user turn; an assistant
  message that calls tools right after a tool response continues the open model turn; and with thinking
  off the generation prompt pre-fills an empty thought, ``<|channel>thought\\n<channel|>``.
* small (E2B, E4B): ``<|think|>`` without the newline, no reasoning replay, every message opens its own
  turn, and the generation prompt ends at ``<|turn>model\\n``.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gemma4.chat.declarations import format_tool_declaration
from gemma4.chat.messages import normalize_messages, normalize_tools
from gemma4.chat.syntax import format_tool_arguments
from gemma4.chat.template import render_template
from gemma4.special_tokens import (
    AUDIO,
    BOS,
    CHANNEL_END,
    CHANNEL_START,
    IMAGE,
    THINK,
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_END,
    TOOL_RESPONSE_END,
    TOOL_RESPONSE_START,
    TOOL_START,
    TURN_END,
    TURN_START,
    VIDEO,
)


@dataclass(frozen=True)
class _Flavour:
    """How one family of checkpoints' template differs from the other."""

    think_marker: str
    replay_reasoning: bool
    continue_after_tool_response: bool
    prefill_empty_thought: bool


_LARGE = _Flavour(THINK.text + "\n", True, True, True)
_SMALL = _Flavour(THINK.text, False, False, False)
_FLAVOURS = {"e2b": _SMALL, "e4b": _SMALL, "26b-a4b": _LARGE, "31b": _LARGE}
VARIANTS: tuple[str, ...] = tuple(_FLAVOURS)

EMPTY_THOUGHT = f"{CHANNEL_START.text}thought\n{CHANNEL_END.text}"
_MEDIA = {"image": f"\n\n{IMAGE.text}\n\n", "audio": AUDIO.text, "video": f"\n\n{VIDEO.text}\n\n"}


def check_variant(variant: str) -> str:
    """The canonical (lower-case) variant name; ``ValueError`` for names that are not a released variant."""
    name = variant.lower() if isinstance(variant, str) else variant
    if name not in _FLAVOURS:
        raise ValueError(f"unknown Gemma 4 variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return name


def render(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool = False,
    variant: str = "31b",
    add_generation_prompt: bool = True,
    template: str | None = None,
) -> str:
    """The prompt text for ``messages``: rendered with ``template`` if given, else by the built-in renderer."""
    check_variant(variant)
    return render_normalized(
        normalize_messages(messages),
        normalize_tools(tools),
        thinking=thinking,
        variant=variant,
        add_generation_prompt=add_generation_prompt,
        template=template,
    )


def render_normalized(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    *,
    thinking: bool,
    variant: str,
    add_generation_prompt: bool,
    template: str | None,
) -> str:
    """``render`` for messages and tools that already went through ``normalize_messages``/``normalize_tools``.

    Safe tokenization (``gemma4.chat.safe_tokenize``) rewrites the client strings of the normalized
    conversation before rendering it, so it needs this step on its own.
    """
    flavour = _FLAVOURS[check_variant(variant)]
    if template is not None:
        return render_template(
            template, messages, tools=tools, thinking=thinking, add_generation_prompt=add_generation_prompt
        )
    return _render_builtin(messages, tools, thinking, flavour, add_generation_prompt)


def strip_thinking(text: str) -> str:
    """Earlier model turns are re-rendered without their ``<|channel>...<channel|>`` thoughts."""
    return "".join(part.split(CHANNEL_START.text)[0] for part in text.split(CHANNEL_END.text)).strip()


def _render_builtin(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    thinking: bool,
    flavour: _Flavour,
    add_generation_prompt: bool,
) -> str:
    out = [BOS.text]
    if messages[0]["role"] in ("system", "developer"):
        system, messages = messages[0], messages[1:]
    else:
        system = None
    if thinking or tools or system is not None:
        out.append(f"{TURN_START.text}system\n")
        if thinking:
            out.append(flavour.think_marker)
        if system is not None:
            out.append(system["content"].strip())
        for tool in tools or ():
            out.append(TOOL_START.text + format_tool_declaration(tool) + TOOL_END.text)
        out.append(f"{TURN_END.text}\n")

    last_user = max((i for i, message in enumerate(messages) if message["role"] == "user"), default=-1)
    after_tool_response = False
    for index, message in enumerate(messages):
        role = "model" if message["role"] == "assistant" else message["role"]
        tool_calls = message.get("tool_calls")
        tool_responses = message.get("tool_responses")
        content = message.get("content")
        if not (flavour.continue_after_tool_response and after_tool_response and tool_calls):
            out.append(f"{TURN_START.text}{role}\n")
        after_tool_response = False
        if tool_calls:
            reasoning = message.get("reasoning_content")
            if flavour.replay_reasoning and reasoning and index > last_user:
                out.append(f"{CHANNEL_START.text}thought\n{reasoning}{CHANNEL_END.text}")
            out.extend(_format_tool_call(call["function"]) for call in tool_calls)
        if tool_responses:
            out.extend(_format_tool_response(response) for response in tool_responses)
            after_tool_response = True
        if isinstance(content, str):
            out.append(strip_thinking(content) if role == "model" else content.strip())
        elif content is not None:
            for part in content:
                if part["type"] == "text":
                    out.append(strip_thinking(part["text"]) if role == "model" else part["text"].strip())
                else:
                    out.append(_MEDIA[part["type"]])
                    after_tool_response = False
        if not (tool_responses and not content):
            out.append(f"{TURN_END.text}\n")

    if add_generation_prompt:
        if not after_tool_response:
            out.append(f"{TURN_START.text}model\n")
        if flavour.prefill_empty_thought and not thinking:
            out.append(EMPTY_THOUGHT)
    return "".join(out)


def _format_tool_call(function: Mapping[str, Any]) -> str:
    arguments = function["arguments"]
    body = format_tool_arguments(arguments) if isinstance(arguments, Mapping) else "{" + arguments + "}"
    return f"{TOOL_CALL_START.text}call:{function['name']}{body}{TOOL_CALL_END.text}"


def _format_tool_response(response: Mapping[str, Any]) -> str:
    result = response["response"]
    body = format_tool_arguments(result if isinstance(result, Mapping) else {"value": result})
    return f"{TOOL_RESPONSE_START.text}response:{response['name']}{body}{TOOL_RESPONSE_END.text}"
