"""A replica's engine metrics rendered from `EngineStats`: the multimodal families (media requests and
items, encoder work, the encoder-output cache) as Prometheus sees them."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from gemma4.engine.outputs import CoreStats, EngineStats, FinishedStats
from gemma4_platform.metrics import ReplicaMetrics

LABELS = {"model_name": "tiny", "replica": "r1"}


def engine_stats(**media) -> EngineStats:
    return EngineStats.of(CoreStats(0, 0, [], 0, 0, 0, 0, 0, **media), FinishedStats.empty())


def samples(metrics: ReplicaMetrics) -> dict[tuple[str, str], float]:
    """(sample name, modality label or "") -> value, for this replica's samples."""
    out = {}
    for family in text_string_to_metric_families(metrics.render()):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            assert {k: sample.labels[k] for k in LABELS} == LABELS, sample
            out[(sample.name, sample.labels.get("modality", ""))] = sample.value
    return out


def test_media_and_encoder_counters_follow_the_engine_totals() -> None:
    metrics = ReplicaMetrics("tiny", "r1")
    metrics.update_engine(engine_stats(), {})
    idle = samples(metrics)
    # Exported from the first update on, every modality at zero, so rates and ratios are defined.
    for modality in ("image", "audio", "video"):
        assert idle[("gemma4_media_items_total", modality)] == 0
        assert idle[("gemma4_encoder_items_total", modality)] == 0
    for name in ("gemma4_media_requests_total", "gemma4_encoder_cache_queries_total", "gemma4_encoder_cache_hits_total",
                 "gemma4_encoder_seconds_total", "gemma4_encoder_cache_usage_ratio"):
        assert idle[(name, "")] == 0, name

    metrics.update_engine(engine_stats(
        media_requests_total=3, media_items_total={"image": 4, "video": 32}, encoder_items_total={"image": 3},
        encoder_cache_queries_total=36, encoder_cache_hits_total=1, encoder_seconds_total=0.75,
        encoder_cache_usage=0.25,
    ), {})
    metrics.update_engine(engine_stats(
        media_requests_total=5, media_items_total={"image": 6, "video": 32, "audio": 1},
        encoder_items_total={"image": 4, "audio": 1}, encoder_cache_queries_total=39, encoder_cache_hits_total=2,
        encoder_seconds_total=1.5, encoder_cache_usage=0.5,
    ), {})
    got = samples(metrics)
    assert got[("gemma4_media_requests_total", "")] == 5
    assert [got[("gemma4_media_items_total", m)] for m in ("image", "audio", "video")] == [6, 1, 32]
    assert [got[("gemma4_encoder_items_total", m)] for m in ("image", "audio", "video")] == [4, 1, 0]
    assert got[("gemma4_encoder_cache_queries_total", "")] == 39
    assert got[("gemma4_encoder_cache_hits_total", "")] == 2
    assert got[("gemma4_encoder_seconds_total", "")] == 1.5
    assert got[("gemma4_encoder_cache_usage_ratio", "")] == 0.5  # a gauge: the latest value


def test_a_restarted_engine_does_not_make_counters_go_back() -> None:
    metrics = ReplicaMetrics("tiny", "r1")
    metrics.update_engine(engine_stats(media_requests_total=4, media_items_total={"audio": 4}), {})
    metrics.update_engine(engine_stats(media_requests_total=1, media_items_total={"audio": 2}), {})
    metrics.update_engine(engine_stats(media_requests_total=3, media_items_total={"audio": 5}), {})
    got = samples(metrics)
    # 4, then nothing for the drop, then the 2 the new engine added since its last report.
    assert got[("gemma4_media_requests_total", "")] == 6
    assert got[("gemma4_media_items_total", "audio")] == 7


def spec_samples(metrics: ReplicaMetrics) -> dict[tuple[str, str], float]:
    """(sample name, position label or "") -> value, for the speculative-decoding families."""
    return {
        (s.name, s.labels.get("position", "")): s.value
        for family in text_string_to_metric_families(metrics.render()) for s in family.samples
        if s.name.startswith("vllm:spec_decode") and not s.name.endswith("_created")
    }


def test_speculative_decoding_counters_have_vllms_names_and_follow_the_engine_totals() -> None:
    metrics = ReplicaMetrics("tiny", "r1")
    metrics.update_engine(engine_stats(), {})
    idle = spec_samples(metrics)
    for name in ("drafts", "draft_tokens", "accepted_tokens"):
        assert idle[(f"vllm:spec_decode_num_{name}_total", "")] == 0  # exported from the start, speculation off too
    assert not any(name.endswith("_per_pos_total") for name, _ in idle)  # no positions without speculation
    drafting = ReplicaMetrics("tiny", "r1", speculative_tokens=2)
    drafting.update_engine(engine_stats(), {})
    assert [spec_samples(drafting)[("vllm:spec_decode_num_accepted_tokens_per_pos_total", p)] for p in "01"] == [0, 0]
    metrics.update_engine(engine_stats(spec_num_drafts=4, spec_num_draft_tokens=12, spec_num_accepted_tokens=7,
                                       spec_accepted_per_position=(4, 2, 1)), {})
    metrics.update_engine(engine_stats(spec_num_drafts=10, spec_num_draft_tokens=30, spec_num_accepted_tokens=16,
                                       spec_accepted_per_position=(9, 5, 2)), {})
    got = spec_samples(metrics)
    assert got[("vllm:spec_decode_num_drafts_total", "")] == 10
    assert got[("vllm:spec_decode_num_draft_tokens_total", "")] == 30
    assert got[("vllm:spec_decode_num_accepted_tokens_total", "")] == 16
    per_pos = [got[("vllm:spec_decode_num_accepted_tokens_per_pos_total", str(p))] for p in range(3)]
    assert per_pos == [9, 5, 2] and sum(per_pos) == got[("vllm:spec_decode_num_accepted_tokens_total", "")]
