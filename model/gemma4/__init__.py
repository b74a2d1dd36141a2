"""Gemma 4: our implementation of Google's Gemma 4 family (config, model, loading, tokenizer, chat).

Importing `gemma4` (or `gemma4.config`) must not import torch: the operator uses the config and the
memory model on images without it. The torch-backed entry points are resolved lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gemma4.config import Gemma4Config, Gemma4TextConfig, load_config, variant_config

if TYPE_CHECKING:
    from gemma4.engine import LLM, AsyncEngine, ChatPrompt, EngineArgs, LLMEngine, SamplingParams
    from gemma4.loader import load_model
    from gemma4.modeling import Gemma4ForCausalLM
    from gemma4.tokenizer import load_tokenizer

_LAZY = {
    "LLM": "gemma4.engine",
    "SamplingParams": "gemma4.engine",
    "ChatPrompt": "gemma4.engine",
    "AsyncEngine": "gemma4.engine",
    "EngineArgs": "gemma4.engine",
    "LLMEngine": "gemma4.engine",
    "load_model": "gemma4.loader",
    "Gemma4ForCausalLM": "gemma4.modeling",
    "load_tokenizer": "gemma4.tokenizer",
}

__all__ = ["Gemma4Config", "Gemma4TextConfig", "load_config", "variant_config", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gemma4' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
