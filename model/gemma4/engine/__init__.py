"""The inference engine: continuous batching over a paged, Gemma-4-aware KV cache, with streaming."""

from gemma4.engine.async_engine import AsyncEngine, EngineDeadError
from gemma4.engine.llm import LLM, random_weights_model
from gemma4.engine.llm_engine import ChatPrompt, EngineArgs, LLMEngine
from gemma4.engine.outputs import EngineStats, LatencyHistogram, RequestOutput, Usage
from gemma4.engine.request import FinishReason
from gemma4.engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncEngine",
    "EngineDeadError",
    "ChatPrompt",
    "EngineArgs",
    "EngineStats",
    "FinishReason",
    "LatencyHistogram",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "Usage",
    "random_weights_model",
]
