"""The inference engine: continuous batching over a paged, Gemma-4-aware KV cache, with streaming, on
one device or on a replica's ranks (executors of workers)."""

from gemma4.engine.async_engine import AsyncEngine
from gemma4.engine.core import EngineDeadError
from gemma4.engine.executor import Executor, MultiprocExecutor, UniprocExecutor, WorkerFailure
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
    "Executor",
    "FinishReason",
    "LatencyHistogram",
    "LLMEngine",
    "MultiprocExecutor",
    "RequestOutput",
    "SamplingParams",
    "UniprocExecutor",
    "Usage",
    "WorkerFailure",
    "random_weights_model",
]
