"""Render a checkpoint's own Jinja chat template the way Hugging Face transformers does.

Templates come from checkpoint directories, so they are untrusted code: they run in Jinja's immutable
sandbox. The environment matches transformers' (``trim_blocks``, ``lstrip_blocks``, loop controls, a
non-escaping ``tojson``, ``raise_exception``, ``strftime_now``) so a template renders here exactly as it
does there. Every template failure surfaces as ``ValueError``.
"""

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gemma4.special_tokens import BOS


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"chat template syntax error on line {error.lineno}: {error.message}") from error


def render_template(
    source: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None,
    thinking: bool,
    add_generation_prompt: bool,
) -> str:
    """Render ``source`` with the variables Gemma templates read."""
    template = _compile(source)
    try:
        return template.render(
            messages=messages,
            tools=tools,
            bos_token=BOS.text,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=thinking,
        )
    except (jinja2.TemplateError, TypeError) as error:
        raise ValueError(f"chat template failed to render: {error}") from error
