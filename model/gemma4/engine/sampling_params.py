"""Per-request sampling parameters, validated before anything is allocated.

Unspecified values take Gemma 4's recommended defaults (temperature 1.0, top-p 0.95, top-k 64, the
converter's `generation_config.json`); `temperature=0` means greedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gemma4.engine.structured_output.params import StructuredOutputParams

GEMMA4_DEFAULT_TEMPERATURE = 1.0
GEMMA4_DEFAULT_TOP_P = 0.95
GEMMA4_DEFAULT_TOP_K = 64
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    `top_k=0` and `top_p=1.0` disable those filters; `seed` makes sampling reproducible per
    request (also across preemption and batching); `stop_token_ids=None` means the model's EOS ids;
    `stop` strings are cut from the output exactly. The first `min_tokens` output tokens are
    generated whatever they are: no stop token is drawn and no stop string counts before the
    token after them (see `gemma4.engine.detokenizer`). `structured` constrains the answer (after a
    thought block, in thinking mode) to a grammar.
    """

    max_tokens: int = 256
    temperature: float = GEMMA4_DEFAULT_TEMPERATURE
    top_p: float = GEMMA4_DEFAULT_TOP_P
    top_k: int = GEMMA4_DEFAULT_TOP_K
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    structured: StructuredOutputParams | None = None

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
        object.__setattr__(self, "stop", stop)
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
                raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
            ids = tuple(self.stop_token_ids)
            for i, t in enumerate(ids):
                if not _is_int(t) or t < 0:
                    raise ValueError(f"stop_token_ids[{i}] must be a non-negative integer, got {t!r}")
            object.__setattr__(self, "stop_token_ids", ids)
        self._validate_numbers()

    def _validate_numbers(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        _check_range("temperature", self.temperature, 0.0, 100.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, 100.0, low_open=True)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")
