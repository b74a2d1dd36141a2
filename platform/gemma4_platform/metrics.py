"""Prometheus metrics of replicas and gateways, served together on the gateway's `/metrics`.

Replicas keep their own registry (engine gauges refreshed from `stats()`, request histograms
observed as requests finish) and publish its text to a small hub actor every few seconds; the
gateway merges the latest text of every live replica with its own metrics. Names follow vLLM's where
dashboards and autoscalers already use them (`vllm:*`); ours are `gemma4_*`. `docs/metrics.md` lists
every one, and a test checks the list against a live scrape.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gemma4.engine import EngineStats, FinishReason, RequestOutput
from gemma4.engine.outputs import LATENCY_BUCKET_BOUNDS
from gemma4.parallel.placement import ExpertPlacement, balanced_placement, group_loads, imbalance

LATENCY_BUCKETS = LATENCY_BUCKET_BOUNDS  # the engine's own latency histograms use the same bounds
TOKEN_BUCKETS = (1, 8, 32, 128, 512, 2048, 8192, 32768, 131072)
STALE_AFTER_S = 10.0  # a replica that stopped publishing this long ago is gone (killed, not stopped)
MEDIA_MODALITIES = ("image", "audio", "video")  # exported from the start, so per-modality rates are defined


class ReplicaMetrics:
    """One replica's engine metrics (labels: model_name, replica). `speculative_tokens` drafts per step (0:
    no speculative decoding) are exported per draft position from the first update on."""

    def __init__(self, model_name: str, replica: str, *, moe_top_experts: int = 8, speculative_tokens: int = 0) -> None:
        self.registry = CollectorRegistry()
        self._labels = {"model_name": model_name, "replica": replica}
        names = list(self._labels)
        r = self.registry
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", names, registry=r)
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch.", names, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage of the fullest cache group (0-1).", names, registry=r)
        self.group_usage = Gauge(
            "gemma4_kv_cache_usage_ratio", "KV-cache usage per cache group (0-1).", names + ["group"], registry=r
        )
        self.group_blocks = Gauge(
            "gemma4_kv_cache_blocks", "KV-cache blocks per cache group and state.", names + ["group", "state"], registry=r
        )
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", names, registry=r
        )
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.", names, registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Requests preempted (recomputed later).", names, registry=r)
        # Multimodal requests, the encoder's work and its output cache (the engine's cumulative counts).
        self.media_requests = Counter(
            "gemma4_media_requests", "Requests added with at least one media item.", names, registry=r
        )
        self.media_items = Counter(
            "gemma4_media_items", "Media items of added requests per modality (a video counts its frames).",
            names + ["modality"], registry=r,
        )
        self.encoder_items = Counter(
            "gemma4_encoder_items", "Media items the encoders ran on (encoder-cache misses) per modality.",
            names + ["modality"], registry=r,
        )
        self.encoder_cache_queries = Counter(
            "gemma4_encoder_cache_queries", "Media items looked up in the encoder-output cache.", names, registry=r
        )
        self.encoder_cache_hits = Counter(
            "gemma4_encoder_cache_hits", "Media items served from the encoder-output cache.", names, registry=r
        )
        self.encoder_seconds = Counter("gemma4_encoder_seconds", "Encoder compute time.", names, registry=r)
        self.encoder_cache_usage = Gauge(
            "gemma4_encoder_cache_usage_ratio", "Encoder-output cache usage of its token capacity (0-1).", names,
            registry=r,
        )
        # Speculative decoding, as vLLM names it: acceptance rate = accepted / draft tokens, mean acceptance
        # length = 1 + accepted / drafts (each verification step also yields the target's own token).
        self.spec_drafts = Counter(
            "vllm:spec_decode_num_drafts", "Speculative drafts proposed (one per request and verification step).",
            names, registry=r,
        )
        self.spec_draft_tokens = Counter(
            "vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.", names, registry=r
        )
        self.spec_accepted_tokens = Counter(
            "vllm:spec_decode_num_accepted_tokens", "Draft tokens the target accepted.", names, registry=r
        )
        self.spec_accepted_per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos", "Accepted draft tokens per draft position (0 = first).",
            names + ["position"], registry=r,
        )
        self.speculative_tokens = speculative_tokens
        self._seen: dict[tuple[Counter, str], float] = {}  # last seen cumulative engine counts, by counter and label
        # Per-expert load with bounded cardinality: layer totals and imbalance (one series per MoE layer) and
        # the `moe_top_experts` hottest (layer, expert) pairs; the full matrix is on /debug/moe/experts.
        self.moe_top_experts = moe_top_experts
        self.layer_tokens = Gauge(
            "gemma4_moe_layer_tokens", "Expert assignments per MoE layer (cumulative; tokens x top-k).",
            names + ["layer"], registry=r,
        )
        self.hot_expert_tokens = Gauge(
            "gemma4_moe_hot_expert_tokens", "Tokens routed to the replica's hottest (layer, expert) pairs (cumulative).",
            names + ["layer", "expert"], registry=r,
        )
        self.num_experts = Gauge("gemma4_moe_num_experts", "Experts per MoE layer.", names, registry=r)
        self.expert_imbalance = Gauge(
            "gemma4_moe_expert_imbalance_ratio", "Max over mean tokens per expert, per MoE layer.",
            names + ["layer"], registry=r,
        )
        # Expert parallelism: load per EP rank (summed over layers) and per-layer rank imbalance, under each
        # layer's current placement; a replica without EP is one rank holding every expert.
        self.rank_tokens = Counter(
            "gemma4_moe_rank_tokens", "Expert assignments served per EP rank, summed over MoE layers.",
            names + ["rank"], registry=r,
        )
        self.rank_imbalance = Gauge(
            "gemma4_moe_rank_imbalance_ratio",
            "Max over mean expert assignments per EP rank under the current placement, per MoE layer (cumulative).",
            names + ["layer"], registry=r,
        )
        self.redundant_experts = Gauge(
            "gemma4_moe_redundant_experts", "Redundant expert slots per MoE layer (extra copies of hot experts).",
            names, registry=r,
        )
        self.placement_changes = Counter(
            "gemma4_moe_placement_changes", "MoE layer placements replaced since the replica started.",
            names, registry=r,
        )
        self._expert_counts: dict[int, list[int]] = {}  # last seen cumulative counts, for per-rank increments
        self._placements: dict[int, ExpertPlacement] = {}  # last seen placements, to count changes
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", names, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", names, registry=r)
        self.request_success = Counter(
            "vllm:request_success", "Finished requests by finish reason.", names + ["finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", names, buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between output tokens.", names, buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency from arrival to finish.", names,
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.request_prompt_tokens = Histogram(
            "vllm:request_prompt_tokens", "Prompt length of finished requests.", names, buckets=TOKEN_BUCKETS, registry=r
        )
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens", "Output length of finished requests.", names, buckets=TOKEN_BUCKETS,
            registry=r,
        )

    def observe_finished(self, output: RequestOutput) -> None:
        """Record a finished request's tokens and timings."""
        lab = self._labels
        m = output.metrics
        self.prompt_tokens.labels(**lab).inc(output.usage.prompt_tokens)
        self.generation_tokens.labels(**lab).inc(output.usage.completion_tokens)
        reason = output.finish_reason.value if output.finish_reason else FinishReason.ABORT.value
        self.request_success.labels(**lab, finished_reason=reason).inc()
        if m.time_to_first_token is not None:
            self.ttft.labels(**lab).observe(m.time_to_first_token)
        for gap in m.inter_token_times:
            self.itl.labels(**lab).observe(gap)
        end = m.last_token_time if m.last_token_time is not None else time.monotonic()
        self.e2e.labels(**lab).observe(max(0.0, end - m.arrival_time))
        self.request_prompt_tokens.labels(**lab).observe(output.usage.prompt_tokens)
        self.request_generation_tokens.labels(**lab).observe(output.usage.completion_tokens)

    def update_engine(
        self,
        stats: EngineStats,
        expert_load: dict[int, list[int]],
        placements: dict[int, ExpertPlacement] | None = None,
    ) -> None:
        """Refresh from the engine's stats and cumulative expert counts; `placements` (per MoE layer) are
        where the experts live now, None when the replica has no expert parallelism."""
        lab = self._labels
        self.waiting.labels(**lab).set(stats.num_waiting)
        self.running.labels(**lab).set(stats.num_running)
        self.kv_usage.labels(**lab).set(stats.kv_cache_usage)
        for group in stats.kv_cache:
            self.group_usage.labels(**lab, group=group.name).set(group.usage)
            self.group_blocks.labels(**lab, group=group.name, state="used").set(group.used_blocks)
            self.group_blocks.labels(**lab, group=group.name, state="total").set(group.num_blocks)
        self.encoder_cache_usage.labels(**lab).set(stats.encoder_cache_usage)
        for counter, total in (
            (self.prefix_queries, stats.prefix_query_tokens), (self.prefix_hits, stats.prefix_hit_tokens),
            (self.preemptions, stats.num_preemptions), (self.media_requests, stats.media_requests_total),
            (self.encoder_cache_queries, stats.encoder_cache_queries_total),
            (self.encoder_cache_hits, stats.encoder_cache_hits_total), (self.encoder_seconds, stats.encoder_seconds_total),
            (self.spec_drafts, stats.spec_num_drafts), (self.spec_draft_tokens, stats.spec_num_draft_tokens),
            (self.spec_accepted_tokens, stats.spec_num_accepted_tokens),
        ):
            self._advance(counter, total)
        for counter, per_modality in ((self.media_items, stats.media_items_total),
                                      (self.encoder_items, stats.encoder_items_total)):
            for modality in dict.fromkeys((*MEDIA_MODALITIES, *per_modality)):
                self._advance(counter, per_modality.get(modality, 0), "modality", modality)
        per_position = stats.spec_accepted_per_position
        for position in range(max(self.speculative_tokens, len(per_position))):
            accepted = per_position[position] if position < len(per_position) else 0
            self._advance(self.spec_accepted_per_pos, accepted, "position", str(position))
        self._update_experts(expert_load)
        self._update_ranks(expert_load, placements)

    def _advance(self, counter: Counter, total: float, label: str | None = None, value: str = "") -> None:
        """Increment `counter` (its series with `label`=`value`, if given) by what the engine's cumulative
        `total` grew since the last update."""
        labels = {**self._labels, **({label: value} if label is not None else {})}
        key = (counter, value)
        counter.labels(**labels).inc(max(0, total - self._seen.get(key, 0)))
        self._seen[key] = total

    def _update_experts(self, expert_load: dict[int, list[int]]) -> None:
        lab = self._labels
        for layer, counts in expert_load.items():
            total = sum(counts)
            self.layer_tokens.labels(**lab, layer=str(layer)).set(total)
            mean = total / len(counts) if counts else 0
            self.expert_imbalance.labels(**lab, layer=str(layer)).set(max(counts) / mean if mean else 1.0)
            self.num_experts.labels(**lab).set(len(counts))
        pairs = [(count, layer, expert) for layer, counts in expert_load.items() for expert, count in enumerate(counts)]
        self.hot_expert_tokens.clear()  # the hottest pairs change: only the current top N are exported
        for count, layer, expert in heapq.nlargest(self.moe_top_experts, pairs):
            self.hot_expert_tokens.labels(**lab, layer=str(layer), expert=str(expert)).set(count)

    def _update_ranks(self, expert_load: dict[int, list[int]], placements: dict[int, ExpertPlacement] | None) -> None:
        """Each interval's new assignments go to the ranks of the placement in force at its end (placements
        change rarely, so the counts stay close to what each rank served)."""
        if not expert_load:
            return
        lab = self._labels
        self.placement_changes.labels(**lab)  # exported as 0 until the first change
        for layer, counts in expert_load.items():
            placement = placements[layer] if placements is not None else balanced_placement(len(counts), 1)
            last = self._expert_counts.get(layer, [0] * len(counts))
            new = [max(0, n - o) for n, o in zip(counts, last)] if len(last) == len(counts) else counts
            for rank, tokens in enumerate(group_loads(placement, new)):
                self.rank_tokens.labels(**lab, rank=str(rank)).inc(tokens)
            self.rank_imbalance.labels(**lab, layer=str(layer)).set(imbalance(group_loads(placement, counts)))
            self.redundant_experts.labels(**lab).set(len(placement.physical()) - placement.num_experts)
            if layer in self._placements and self._placements[layer] != placement:
                self.placement_changes.labels(**lab).inc()
            self._placements[layer] = placement
            self._expert_counts[layer] = list(counts)

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class GatewayMetrics:
    """Requests as clients see them, per protocol and status code, and the chat-format outcomes."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.model_name = model_name
        self.requests = Counter(
            "gemma4_gateway_requests", "Requests by protocol, method and status code.",
            ["model_name", "protocol", "method", "code"], registry=r,
        )
        self.latency = Histogram(
            "gemma4_gateway_request_latency_seconds", "Request latency at the gateway.",
            ["model_name", "protocol", "method"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.pending = Gauge("gemma4_gateway_pending_requests", "Requests in flight at this gateway.", ["model_name"], registry=r)
        self.thinking_tokens = Counter(
            "gemma4_chat_thinking_tokens", "Output tokens inside thinking blocks.", ["model_name"], registry=r
        )
        self.tool_calls = Counter("gemma4_chat_tool_calls", "Tool calls parsed from model output.", ["model_name"], registry=r)
        self.tool_call_failures = Counter(
            "gemma4_chat_tool_call_parse_failures", "Malformed tool calls in model output.", ["model_name"], registry=r
        )
        for metric in (self.pending, self.thinking_tokens, self.tool_calls, self.tool_call_failures):
            metric.labels(model_name)  # export zeros from the start, so rates and ratios are defined

    def record(self, protocol: str, method: str, code: str, seconds: float) -> None:
        self.requests.labels(self.model_name, protocol, method, code).inc()
        self.latency.labels(self.model_name, protocol, method).observe(seconds)

    def render(self) -> str:
        return generate_latest(self.registry).decode()


def merge_expositions(texts: Iterable[str]) -> bytes:
    """One valid exposition from several (each family once, with every source's samples)."""
    families: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            merged.samples.extend(family.samples)
    registry = CollectorRegistry()
    registry.register(_Static(list(families.values())))
    return generate_latest(registry)


class _Static:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


@dataclass(frozen=True)
class ReplicaReport:
    """What a replica publishes every metrics interval."""

    metrics_text: str
    ready: bool
    expert_load: dict[int, list[int]] = field(default_factory=dict)


class MetricsHub:
    """Latest report of each replica (a Ray actor in the graph; plain class for tests).

    The gateway reads metrics texts for /metrics, readiness for its health state and the expert-load
    matrices for /debug/moe/experts from here, so none of those costs a call to a replica.
    """

    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, ReplicaReport]] = {}

    def publish(self, replica: str, report: ReplicaReport) -> None:
        self._latest[replica] = (time.monotonic(), report)

    def forget(self, replica: str) -> None:
        self._latest.pop(replica, None)

    def _live(self) -> list[tuple[str, ReplicaReport]]:
        now = time.monotonic()
        self._latest = {k: v for k, v in self._latest.items() if now - v[0] < STALE_AFTER_S}
        return [(replica, report) for replica, (_, report) in self._latest.items()]

    def texts(self) -> list[str]:
        return [report.metrics_text for _, report in self._live()]

    def ready_replicas(self) -> int:
        return sum(report.ready for _, report in self._live())

    def expert_load(self) -> dict[str, dict[int, list[int]]]:
        return {replica: report.expert_load for replica, report in self._live() if report.expert_load}
