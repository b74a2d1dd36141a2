"""Turning one step's logits into next tokens for a batch of requests, on the logits' device.

Order, per request's `SamplingParams`: penalties (repetition over prompt + output, presence and
frequency over output), the min_tokens mask (stop ids), then greedy argmax, or temperature, top-k,
top-p, min-p and a draw. The tensor work is in `gemma4.ops.sampling`; this module keeps what each
request needs across steps: a row of a device parameter table (written once, so a step uploads only
slot numbers and output indices) holding its filters, penalties and scrambled seed (a request without
one gets one drawn once from the sampler's generator, so `Sampler(seed=s)` runs repeat) and, only for
requests with penalties, a row of device penalty state that grows by the tokens appended since the
last step. A draw depends on
(seed, output index) and the row's logits only, so tokens do not change with batching or preemption.
Logprobs are those of the model's raw distribution. One device-to-host copy per step.

Structured outputs: `allowed`, a host token bitmask per row (`gemma4.engine.structured_output`), sets the
logits of disallowed tokens to -inf before everything above (the raw logprobs are unmasked); a structured
request's grammar, not min_tokens, decides when it may stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gemma4.backends import backend_of
from gemma4.engine.request import Request
from gemma4.engine.structured_output.bitmask import apply_bitmask
from gemma4.ops import sampling
from gemma4.ops.sampling import apply_penalties, mask_tokens, record_tokens, row_keys, seed_keys

# (logits, top_k, temperature, top_p, min_p, row keys, k) -> tokens: `gemma4.ops.sampling.draw`'s signature.
DrawFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor
]

_SEED_RANGE = 2**63 - 1


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's logprob and the top-n alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprobs: TokenLogprobs | None


class _SlotTable:
    """Device tensors with one row per slot (a request's), growing by doubling; released slots are reused."""

    def __init__(self, device: torch.device, **columns: tuple[tuple[int, ...], torch.dtype]) -> None:
        self.tensors = {name: torch.zeros((0, *shape), dtype=dtype, device=device) for name, (shape, dtype) in columns.items()}
        self._free: list[int] = []

    def acquire(self) -> int:
        """A zeroed slot."""
        if not self._free:
            capacity = next(iter(self.tensors.values())).shape[0]
            grow = max(1, capacity)
            self.tensors = {name: torch.cat([t, t.new_zeros((grow, *t.shape[1:]))]) for name, t in self.tensors.items()}
            self._free.extend(range(capacity + grow - 1, capacity - 1, -1))
        slot = self._free.pop()
        for tensor in self.tensors.values():
            tensor[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)


@dataclass
class _RowState:
    """What the sampler keeps on the host for one request between steps."""

    slot: int  # its row of the parameter table
    top_k: int  # the vocabulary size when top-k is off
    stop_ids: tuple[int, ...]  # masked while fewer than min_tokens outputs exist; empty if min_tokens is 0
    penalty_slot: int | None  # its row of the penalty state, None without penalties
    counted: int = 0  # how many of the request's tokens the penalty state holds


# Columns of the parameter table.
_TEMPERATURE, _TOP_P, _MIN_P, _REPETITION, _PRESENCE, _FREQUENCY = range(6)
_TOP_K, _SEED_KEY = range(2)


class Sampler:
    """Batched sampling with per-request state; `remove` a request when it finishes or is aborted.

    `draw` turns the non-greedy rows' logits into tokens (the torch reference, or a kernel with its signature).
    """

    def __init__(
        self, vocab_size: int, device: torch.device | str, seed: int = 0, draw: DrawFn = sampling.draw
    ) -> None:
        self.vocab_size = vocab_size
        self._draw_fn = draw
        self._backend = backend_of(device)
        device = self.device = self._backend.indexed(device)
        self._generator = torch.Generator().manual_seed(seed)
        self._rows: dict[str, _RowState] = {}
        self._params = _SlotTable(device, floats=((6,), torch.float32), ints=((2,), torch.int64))
        self._penalty = _SlotTable(device, seen=((vocab_size,), torch.bool), counts=((vocab_size,), torch.int32))

    def remove(self, request_id: str) -> None:
        """Forget a request's state (unknown ids are ignored); it is rebuilt from its tokens if seen again."""
        state = self._rows.pop(request_id, None)
        if state is not None:
            self._params.release(state.slot)
            if state.penalty_slot is not None:
                self._penalty.release(state.penalty_slot)

    def sample(
        self, logits: torch.Tensor, requests: list[Request], allowed: torch.Tensor | None = None
    ) -> list[SampleResult]:
        """`logits [N, vocab]` (row i for requests[i]; rows past len(requests) are padding) -> one token per request.

        `allowed`: a host bitmask `[len(requests), ceil(vocab / 32)]` of the tokens each row may take, or None."""
        n = len(requests)
        if logits.dim() != 2 or logits.shape[0] < n or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be [>= {n}, {self.vocab_size}], got {list(logits.shape)}")
        if logits.device != self.device:
            raise ValueError(f"logits are on {logits.device}, the sampler on {self.device}")
        if n == 0:
            return []
        logits = logits[:n].float()
        states = self._states(requests)
        masked = logits if allowed is None else apply_bitmask(logits, allowed.to(self.device, non_blocking=True))
        processed = self._processed(masked, requests, states)
        drawn = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if len(drawn) < n:
            tokens = processed.max(dim=-1).indices  # the first maximum, as argmax; faster on the CPU
        else:
            tokens = torch.empty(n, dtype=torch.int64, device=self.device)
        if drawn:
            step = self._upload([s.slot for s in states] + [r.num_output_tokens for r in requests], torch.int64).view(2, n)
            slots, output_index = step[0], step[1]
            bounded = [i for i in drawn if states[i].top_k < self.vocab_size]
            unbounded = [i for i in drawn if states[i].top_k >= self.vocab_size]
            if bounded:
                k = max(states[i].top_k for i in bounded)
                tokens = self._draw(processed, tokens, bounded, slots, output_index, k)
            if unbounded:
                tokens = self._draw(processed, tokens, unbounded, slots, output_index, self.vocab_size)
        return self._results(logits, tokens, requests)

    @staticmethod
    def processed_logits(row: torch.Tensor, request: Request) -> torch.Tensor:
        """One request's logits `[V]` after its penalties and min_tokens mask, from its tokens alone
        (the state a preempted or newly seen request starts from); the input is left alone."""
        sampler = Sampler(row.numel(), row.device)
        return sampler._processed(row[None].float(), [request], sampler._states([request]))[0]

    # ------------------------------------------------------------------ per-request state
    def _states(self, requests: list[Request]) -> list[_RowState]:
        """Each request's state; those seen for the first time get slots and their parameter rows written."""
        states = []
        new: list[tuple[int, Request]] = []
        for request in requests:
            state = self._rows.get(request.request_id)
            if state is None:
                params = request.sampling_params
                state = _RowState(
                    slot=self._params.acquire(),
                    top_k=params.top_k if 0 < params.top_k < self.vocab_size else self.vocab_size,
                    stop_ids=tuple(sorted(t for t in request.stop_token_ids if t < self.vocab_size))
                    if params.min_tokens and params.structured is None else (),
                    penalty_slot=self._penalty.acquire() if params.uses_penalties else None,
                )
                self._rows[request.request_id] = state
                new.append((state.slot, request))
            states.append(state)
        if new:
            self._write_params(new)
        return states

    def _write_params(self, new: list[tuple[int, Request]]) -> None:
        """Fill the parameter rows of newly seen requests (a request without a seed gets one drawn here)."""
        floats, ints = [], []
        for _, request in new:
            p = request.sampling_params
            seed = p.seed
            if seed is None:
                seed = 0 if p.greedy else int(torch.randint(0, _SEED_RANGE, (), generator=self._generator))
            floats.append((p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty))
            ints.append((self._rows[request.request_id].top_k, seed))
        slots = self._upload([slot for slot, _ in new], torch.int64)
        ints_t = self._upload(ints, torch.int64)
        table = self._params.tensors
        table["floats"][slots] = self._upload(floats, torch.float32)
        table["ints"][slots] = torch.stack([ints_t[:, _TOP_K], seed_keys(ints_t[:, _SEED_KEY])], dim=1)

    def _upload(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A small host list as a device tensor, through pinned memory where the backend pins (the copy never waits)."""
        tensor = torch.tensor(values, dtype=dtype)
        if self._backend.pinned_memory:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ the step
    def _processed(self, logits: torch.Tensor, requests: list[Request], states: list[_RowState]) -> torch.Tensor:
        """`logits` after penalties and the min_tokens mask; the same tensor when no row has either."""
        penalised = [i for i, s in enumerate(states) if s.penalty_slot is not None]
        if penalised:
            self._record_new_tokens([requests[i] for i in penalised], [states[i] for i in penalised])
            m = len(penalised)
            index = self._upload(
                penalised + [states[i].penalty_slot for i in penalised] + [states[i].slot for i in penalised], torch.int64
            ).view(3, m)
            rows, pool = index[0], self._penalty.tensors
            strengths = self._params.tensors["floats"][index[2]]
            changed = apply_penalties(
                logits.index_select(0, rows), pool["seen"][index[1]], pool["counts"][index[1]],
                strengths[:, _REPETITION], strengths[:, _PRESENCE], strengths[:, _FREQUENCY],
            )
            logits = logits.index_copy(0, rows, changed)
        mask_rows: list[int] = []
        mask_ids: list[int] = []
        for i, (request, state) in enumerate(zip(requests, states)):
            if state.stop_ids and request.num_output_tokens < request.sampling_params.min_tokens:
                mask_rows.extend([i] * len(state.stop_ids))
                mask_ids.extend(state.stop_ids)
        if mask_rows:
            pairs = self._upload([mask_rows, mask_ids], torch.int64)
            logits = mask_tokens(logits, pairs[0], pairs[1])
        return logits

    def _record_new_tokens(self, requests: list[Request], states: list[_RowState]) -> None:
        """Add each request's tokens appended since the last step (all of them when first seen)."""
        slots: list[int] = []
        tokens: list[int] = []
        is_output: list[int] = []
        for request, state in zip(requests, states):
            new = request.token_ids[state.counted :]
            if new:
                slots.extend([state.penalty_slot] * len(new))
                tokens.extend(new)
                prompt_left = max(request.num_prompt_tokens - state.counted, 0)
                is_output.extend([0] * prompt_left + [1] * (len(new) - prompt_left))
                state.counted = request.num_tokens
        if tokens:
            update = self._upload(slots + tokens + is_output, torch.int64).view(3, len(tokens))
            record_tokens(self._penalty.tensors["seen"], self._penalty.tensors["counts"], update[0], update[1], update[2])

    def _draw(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        rows: list[int],
        slots: torch.Tensor,
        output_index: torch.Tensor,
        k: int,
    ) -> torch.Tensor:
        """`tokens` with `rows` drawn from their `k` best candidates (k = vocab: the full sort)."""
        everyone = len(rows) == logits.shape[0]
        index = None if everyone else self._upload(rows, torch.int64)
        if index is not None:
            logits, slots, output_index = logits.index_select(0, index), slots.index_select(0, index), output_index.index_select(0, index)
        floats, ints = self._params.tensors["floats"][slots], self._params.tensors["ints"][slots]
        drawn = self._draw_fn(
            logits, ints[:, _TOP_K], floats[:, _TEMPERATURE], floats[:, _TOP_P], floats[:, _MIN_P],
            row_keys(ints[:, _SEED_KEY], output_index), k,
        )
        if index is None:
            return drawn
        return tokens.index_copy(0, index, drawn)

    def _results(self, logits: torch.Tensor, tokens: torch.Tensor, requests: list[Request]) -> list[SampleResult]:
        """Gather logprobs for the rows that asked, copy everything to the host at once, build the results."""
        n = len(requests)
        asked = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
        top_n = max((requests[i].sampling_params.logprobs for i in asked), default=0)
        parts = [tokens.to(torch.int32)]
        if asked:
            index = self._upload(asked, torch.int64)
            rows = logits if len(asked) == n else logits.index_select(0, index)
            raw = torch.log_softmax(rows, dim=-1)
            parts.append(raw.gather(1, tokens.index_select(0, index)[:, None]).view(torch.int32).flatten())
            if top_n:
                top = torch.topk(raw, top_n, dim=-1)
                parts += [top.indices.to(torch.int32).flatten(), top.values.view(torch.int32).flatten()]
        host = self._to_host(torch.cat(parts))
        token_ids = host[:n].tolist()
        lp_of: dict[int, TokenLogprobs] = {}
        if asked:
            m = len(asked)
            logprobs = host[n : n + m].view(torch.float32).tolist()
            top_ids = host[n + m : n + m + m * top_n].view(m, top_n).tolist()
            top_values = host[n + m + m * top_n :].view(torch.float32).view(m, top_n).tolist()
            for j, i in enumerate(asked):
                wanted = requests[i].sampling_params.logprobs
                top = dict(zip(top_ids[j][:wanted], top_values[j][:wanted]))
                lp_of[i] = TokenLogprobs(token_id=token_ids[i], logprob=logprobs[j], top=top)
        return [SampleResult(token_ids[i], lp_of.get(i)) for i in range(n)]

    def _to_host(self, packed: torch.Tensor) -> torch.Tensor:
        """The step's one device-to-host copy (see `Backend.to_host`)."""
        return self._backend.to_host(packed)
