"""Turning one step's logits into next tokens, per request's `SamplingParams` (torch reference op).

Order: penalties (repetition over prompt + output, presence/frequency over output), min_tokens
(stop ids masked), then greedy argmax, or temperature, top-k, top-p, min-p and a draw. A seeded
request draws from a generator seeded by (seed, output index), so its tokens do not depend on
batching, preemption or other requests. Logprobs are those of the model's raw distribution.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from gemma4.engine.request import Request


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


def _step_seed(seed: int, step: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator: torch.Generator | None = None
        self.seed = seed

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[SampleResult]:
        """`logits [N, vocab]` (row i for requests[i]) -> one token per request."""
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.sampling_params.logprobs is not None for r in requests) else None
        results = []
        for i, request in enumerate(requests):
            row = self.processed_logits(logits[i], request)
            params = request.sampling_params
            if params.greedy:
                token = int(torch.argmax(row))
            else:
                token = self._draw(row, request)
            lp = None
            if raw_logprobs is not None and params.logprobs is not None:
                top = torch.topk(raw_logprobs[i], params.logprobs) if params.logprobs else None
                lp = TokenLogprobs(
                    token_id=token,
                    logprob=float(raw_logprobs[i, token]),
                    top={} if top is None else dict(zip(top.indices.tolist(), top.values.tolist())),
                )
            results.append(SampleResult(token, lp))
        return results

    @staticmethod
    def processed_logits(row: torch.Tensor, request: Request) -> torch.Tensor:
        """One request's logits after its penalties and min_tokens mask (a copy when anything changes)."""
        params = request.sampling_params
        if params.uses_penalties:
            row = row.clone()
            output = torch.tensor(request.output_token_ids, dtype=torch.long, device=row.device)
            if params.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(request.token_ids)), dtype=torch.long, device=row.device)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
            if output.numel() and (params.presence_penalty or params.frequency_penalty):
                counts = torch.bincount(output, minlength=row.numel())[: row.numel()].to(row.dtype)
                row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
        if request.num_output_tokens < params.min_tokens and request.stop_token_ids:
            row = row.clone()
            ids = [t for t in request.stop_token_ids if t < row.numel()]
            row[ids] = float("-inf")
        return row

    def _draw(self, row: torch.Tensor, request: Request) -> int:
        params = request.sampling_params
        row = row / params.temperature
        if 0 < params.top_k < row.numel():
            kth = torch.topk(row, params.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop_sorted = cumulative - sorted_probs >= params.top_p  # keep the smallest set reaching top_p
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        if params.min_p > 0.0:
            probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        if params.seed is not None:
            generator = torch.Generator(device=row.device).manual_seed(_step_seed(params.seed, request.num_output_tokens))
        else:
            generator = self._shared_generator(row.device)
        return int(torch.multinomial(probs, 1, generator=generator))
