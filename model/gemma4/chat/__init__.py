"""Gemma 4 chat format: render messages into a prompt, parse what the model generates.

* ``render`` writes the prompt with a checkpoint's own Jinja template (sandboxed, as transformers does)
  or, for checkpoints without one, with a built-in Python renderer that reproduces the official large
  (26B-A4B/31B) and small (E2B/E4B) templates exactly (``gemma4.chat.render``).
* Before either path, ``normalize_messages`` validates the messages and maps OpenAI-style input onto
  the template's native conventions: ``role: "tool"`` messages become ``tool_responses`` on the
  assistant message that made the calls (name resolved through ``tool_call_id``), a final answer after
  them continues that turn, and JSON-string tool arguments are decoded (``gemma4.chat.messages``).
* ``parse`` and ``StreamParser`` split generated text into thinking, answer and ``ToolCall`` objects; tool
  arguments use Gemma's own value syntax, formatted and parsed by ``gemma4.chat.syntax``.
"""

from gemma4.chat.messages import normalize_messages, normalize_tools
from gemma4.chat.parse import ChatDelta, ParsedOutput, StreamParser, ToolCall, parse
from gemma4.chat.render import VARIANTS, check_variant, render
from gemma4.chat.syntax import ToolCallParseError, format_tool_arguments, parse_tool_arguments

__all__ = [
    "VARIANTS",
    "ChatDelta",
    "ParsedOutput",
    "StreamParser",
    "ToolCall",
    "ToolCallParseError",
    "check_variant",
    "format_tool_arguments",
    "normalize_messages",
    "normalize_tools",
    "parse",
    "parse_tool_arguments",
    "render",
]
