"""Turning one step's logits into next tokens for a batch of requests, on the logits' device.

Order, per request's `SamplingParams`: penalties (repetition over prompt + output, presence and
frequency over output), the min_tokens mask (stop ids), then greedy argmax, or temperature, top-k,
top-p, min-p and a draw. The tensor work is in `gemma4.ops.sampling`; this module keeps what each
request needs across steps: its parameters, its seed (a request without one gets one drawn once from
the sampler's generator, so `Sampler(seed=s)` runs repeat) and, only for requests with penalties, a
row of device penalty state that grows by the tokens appended since the last step. A draw depends on
(seed, output index) and the row's logits only, so tokens do not change with batching or preemption.
Logprobs are those of the model's raw distribution. One device-to-host copy per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemma4.engine.request import Request
from gemma4.ops.sampling import apply_penalties, filtered_probs, mask_tokens, race, record_tokens, row_keys

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


@dataclass
class _RowState:
    """What the sampler keeps for one request between steps."""

    seed: int
    top_k: int  # the vocabulary size when top-k is off
    filters: tuple[float, float, float]  # temperature, top_p, min_p
    penalties: tuple[float, float, float]  # repetition, presence, frequency
    stop_ids: tuple[int, ...]  # masked while fewer than min_tokens outputs exist; empty if min_tokens is 0
    penalty_slot: int | None  # its row of the penalty state, None without penalties
    counted: int = 0  # how many of the request's tokens the penalty state holds


class Sampler:
    """Batched sampling with per-request state; `remove` a request when it finishes or is aborted."""

    def __init__(self, vocab_size: int, device: torch.device | str, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._generator = torch.Generator().manual_seed(seed)
        self._rows: dict[str, _RowState] = {}
        self._seen = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)
        self._counts = torch.zeros((0, vocab_size), dtype=torch.int32, device=device)
        self._free_slots: list[int] = []

    def remove(self, request_id: str) -> None:
        """Forget a request's state (unknown ids are ignored); it is rebuilt from its tokens if seen again."""
        state = self._rows.pop(request_id, None)
        if state is not None and state.penalty_slot is not None:
            self._free_slots.append(state.penalty_slot)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[SampleResult]:
        """`logits [N, vocab]` (row i for requests[i]; rows past len(requests) are padding) -> one token per request."""
        n = len(requests)
        if logits.dim() != 2 or logits.shape[0] < n or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be [>= {n}, {self.vocab_size}], got {list(logits.shape)}")
        if logits.device != self.device:
            raise ValueError(f"logits are on {logits.device}, the sampler on {self.device}")
        if n == 0:
            return []
        logits = logits[:n].float()
        states = [self._state(r) for r in requests]
        processed = self._processed(logits, requests, states)
        tokens = torch.argmax(processed, dim=-1)
        drawn = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        bounded = [i for i in drawn if states[i].top_k < self.vocab_size]
        unbounded = [i for i in drawn if states[i].top_k >= self.vocab_size]
        if bounded:
            self._draw(processed, tokens, bounded, requests, states, max(states[i].top_k for i in bounded))
        if unbounded:
            self._draw(processed, tokens, unbounded, requests, states, self.vocab_size)
        return self._results(logits, tokens, requests)

    @staticmethod
    def processed_logits(row: torch.Tensor, request: Request) -> torch.Tensor:
        """One request's logits `[V]` after its penalties and min_tokens mask, from its tokens alone
        (the state a preempted or newly seen request starts from); the input is left alone."""
        sampler = Sampler(row.numel(), row.device)
        return sampler._processed(row[None].float(), [request], [sampler._state(request)])[0]

    # ------------------------------------------------------------------ per-request state
    def _state(self, request: Request) -> _RowState:
        state = self._rows.get(request.request_id)
        if state is None:
            params = request.sampling_params
            seed = params.seed
            if seed is None:
                seed = 0 if params.greedy else int(torch.randint(0, _SEED_RANGE, (), generator=self._generator))
            state = _RowState(
                seed=seed,
                top_k=params.top_k if 0 < params.top_k < self.vocab_size else self.vocab_size,
                filters=(params.temperature, params.top_p, params.min_p),
                penalties=(params.repetition_penalty, params.presence_penalty, params.frequency_penalty),
                stop_ids=tuple(sorted(t for t in request.stop_token_ids if t < self.vocab_size)) if params.min_tokens else (),
                penalty_slot=self._acquire_slot() if params.uses_penalties else None,
            )
            self._rows[request.request_id] = state
        return state

    def _acquire_slot(self) -> int:
        """A zeroed row of the penalty state, growing it (doubling) when none is free."""
        if not self._free_slots:
            capacity = self._seen.shape[0]
            grow = max(1, capacity)
            self._seen = torch.cat([self._seen, self._seen.new_zeros((grow, self.vocab_size))])
            self._counts = torch.cat([self._counts, self._counts.new_zeros((grow, self.vocab_size))])
            self._free_slots.extend(range(capacity + grow - 1, capacity - 1, -1))
        slot = self._free_slots.pop()
        self._seen[slot] = False
        self._counts[slot] = 0
        return slot

    def _upload(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A small host list as a device tensor, through pinned memory on CUDA so the copy never waits."""
        tensor = torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ the step
    def _processed(self, logits: torch.Tensor, requests: list[Request], states: list[_RowState]) -> torch.Tensor:
        """`logits` after penalties and the min_tokens mask; the same tensor when no row has either."""
        penalised = [i for i, s in enumerate(states) if s.penalty_slot is not None]
        if penalised:
            self._record_new_tokens([requests[i] for i in penalised], [states[i] for i in penalised])
            index = self._upload([(i, states[i].penalty_slot) for i in penalised], torch.int64)
            rows, slots = index[:, 0], index[:, 1]
            strengths = self._upload([states[i].penalties for i in penalised], torch.float32)
            changed = apply_penalties(
                logits.index_select(0, rows), self._seen[slots], self._counts[slots],
                strengths[:, 0], strengths[:, 1], strengths[:, 2],
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
            update = self._upload([slots, tokens, is_output], torch.int64)
            record_tokens(self._seen, self._counts, update[0], update[1], update[2])

    def _draw(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        rows: list[int],
        requests: list[Request],
        states: list[_RowState],
        k: int,
    ) -> None:
        """Draw the `rows` of `tokens` in place from their `k` best candidates (k = vocab: the full sort)."""
        index = self._upload(rows, torch.int64)
        subset = logits if len(rows) == logits.shape[0] else logits.index_select(0, index)
        if k < self.vocab_size:
            candidates, ids = torch.topk(subset, k, dim=-1)
        else:
            candidates, ids = torch.sort(subset, dim=-1, descending=True)
        filters = self._upload([states[i].filters for i in rows], torch.float32)
        ints = self._upload([(states[i].top_k, states[i].seed, requests[i].num_output_tokens) for i in rows], torch.int64)
        probs = filtered_probs(candidates, ints[:, 0], filters[:, 0], filters[:, 1], filters[:, 2])
        tokens.index_copy_(0, index, race(probs, ids, row_keys(ints[:, 1], ints[:, 2])))

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
        """The step's one device-to-host copy (into pinned memory on CUDA, then one synchronize)."""
        if self.device.type != "cuda":
            return packed.cpu()
        host = packed.to("cpu", non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host
