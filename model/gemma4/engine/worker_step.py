"""What the engine core sends its workers each step: plain picklable data, as small as the step allows.

A worker keeps a mirror of every request it has been sent (prompt, media, sampling parameters, the
tokens so far, block tables), so a step carries only what changed: the data of requests scheduled for
the first time, then per scheduled request its computed count, the tokens it computes this step and
its block tables' new entries, and the tokens sampled since it was last sent; the ids of requests
that ended since the last step; and the encoder cache's work: which media items to encode (each sent
once, with its request) and which cached soft tokens to drop. `StepDeltas` is the core's side of the
mirror: what every worker holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gemma4.engine.request import Request
from gemma4.engine.sampler import SampleResult
from gemma4.engine.sampling_params import SamplingParams
from gemma4.engine.scheduler import ScheduledBatch
from gemma4.media.inputs import MediaPlaceholder


@dataclass(frozen=True)
class NewRequestData:
    """A request the workers have not seen: what its mirror and its sampler row are built from."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    stop_token_ids: frozenset[int]
    media: tuple[MediaPlaceholder, ...] = ()


@dataclass(frozen=True)
class ScheduledSequence:
    """One scheduled request: compute its tokens `[num_computed_tokens, num_computed_tokens + num_tokens)`.

    `new_token_ids` extend the worker's copy of the request's tokens: those sampled since it was last
    sent (a decode's input token; after a preemption, what its recomputation needs beyond the prompt).
    `table_updates[g]` is `(replace, blocks)` for cache group g: `blocks` are appended to the worker's
    table, or replace it whole (a table the KV manager rebuilt, after preemption or for a new request).
    `spec_token_ids` are the draft tokens computed (and verified) after the request's tokens this step.
    """

    request_id: str
    num_computed_tokens: int
    num_tokens: int
    new_token_ids: list[int]
    table_updates: list[tuple[bool, list[int]]]
    spec_token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerStep:
    """One step for every worker; `finished_request_ids` are dropped before `new_requests` are added
    (so an id that ended may come back as a new request in the same step). `encoder_frees` are dropped
    from the encoder cache, then `encoder_inputs` (request id, index into its media) are encoded,
    before the forward."""

    new_requests: list[NewRequestData] = field(default_factory=list)
    sequences: list[ScheduledSequence] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    encoder_inputs: list[tuple[str, int]] = field(default_factory=list)
    encoder_frees: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StepOutput:
    """What rank 0 returns for a step: per request that sampled (in batch order) the tokens it keeps
    (one, or with speculative decoding its accepted drafts and the token after them) and the draft
    tokens proposed to follow them (empty without speculation), and the seconds its encoders ran
    before the forward (device time included)."""

    samples: list[list[SampleResult]]
    encoder_seconds: float = 0.0
    drafts: list[list[int]] = field(default_factory=list)


class StepDeltas:
    """What the workers hold of each request the core has sent them, and the ids that ended since.

    Per request and cache group: the KV manager's table list last sent and how many of its entries
    went out. Block tables only grow while a sequence lives (entries a sliding group releases are
    never read again); a new list object means the KV manager rebuilt the table, sent whole.
    """

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}
        self._finished: list[str] = []

    def finish(self, request_id: str) -> None:
        """A request ended: its mirror is dropped with the next step (nothing to drop if never sent)."""
        if self._sent.pop(request_id, None) is not None:
            self._finished.append(request_id)

    def build(self, batch: ScheduledBatch, tables: list[list[list[int]]]) -> WorkerStep:
        """The step for `batch`; `tables[i]` are `batch.requests[i]`'s block tables (per group)."""
        new: list[NewRequestData] = []
        sequences: list[ScheduledSequence] = []
        for request, n, request_tables in zip(batch.requests, batch.num_tokens, tables):
            sent = self._sent.get(request.request_id)
            if sent is None:
                new.append(_new_request(request))
                sent = self._sent[request.request_id] = _Sent([([], 0)] * len(request_tables), request.num_prompt_tokens)
            updates = []
            for g, table in enumerate(request_tables):
                source, count = sent.tables[g]
                replace = source is not table
                updates.append((replace, table[0 if replace else count :]))
                sent.tables[g] = (table, len(table))
            tokens = request.token_ids[sent.num_tokens :]
            sent.num_tokens = request.num_tokens
            sequences.append(
                ScheduledSequence(
                    request.request_id, request.num_computed_tokens, n, tokens, updates, list(request.spec_token_ids)
                )
            )
        encode = [(request.request_id, index) for request, index in batch.encoder_inputs]
        step = WorkerStep(new, sequences, self._finished, encode, list(batch.encoder_frees))
        self._finished = []
        return step


@dataclass
class _Sent:
    """What the workers hold of one request: per cache group (the table list sent, entries sent), and its token count."""

    tables: list[tuple[list[int], int]]
    num_tokens: int


def _new_request(request: Request) -> NewRequestData:
    return NewRequestData(
        request.request_id, list(request.prompt_token_ids), request.sampling_params, request.stop_token_ids,
        request.media,
    )
