"""OpenTelemetry tracing: spans from gateway to replica to engine, continuing the caller's trace.

The trace context travels as a W3C `traceparent` carrier (gRPC metadata, HTTP headers, and the
`EngineRequest` between processes). Spans are not made "current" because they live across the yields
of streaming generators. Exporters: `none`, `console`, or `jsonl:PATH` (each process appends one
JSON object per finished span; used by tests and for local debugging), or `otlp` (OTLP over gRPC,
configured by the standard `OTEL_EXPORTER_OTLP_*` environment variables).
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

TRACING_ENV = "GEMMA4_TRACING"  # how every process of the graph learns the exporter
_configured = False
_lock = threading.Lock()


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans as JSON lines to one file (safe across processes: one write per span)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for s in spans:
            ctx = s.get_span_context()
            lines.append(
                json.dumps(
                    {
                        "name": s.name,
                        "trace_id": format(ctx.trace_id, "032x"),
                        "span_id": format(ctx.span_id, "016x"),
                        "parent_span_id": format(s.parent.span_id, "016x") if s.parent else None,
                        "service": s.resource.attributes.get("service.name"),
                        "attributes": dict(s.attributes or {}),
                        "start": s.start_time,
                        "end": s.end_time,
                    }
                )
                + "\n"
            )
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(lines))
        return SpanExportResult.SUCCESS


def configure(service_name: str, exporter: str | None = None) -> None:
    """Install the tracer provider of this process once (exporter from the argument or GEMMA4_TRACING)."""
    global _configured
    exporter = exporter if exporter is not None else os.environ.get(TRACING_ENV, "none")
    with _lock:
        if _configured or exporter == "none":
            return
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(SimpleSpanProcessor(_exporter(exporter)))
        trace.set_tracer_provider(provider)
        _configured = True


def _exporter(spec: str) -> SpanExporter:
    if spec == "console":
        return ConsoleSpanExporter()
    if spec.startswith("jsonl:"):
        return JsonLinesSpanExporter(spec.removeprefix("jsonl:"))
    if spec == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise ValueError(f"unknown tracing exporter {spec!r} (none, console, otlp, jsonl:PATH)")


@contextmanager
def span(name: str, *, parent: Mapping[str, str] | None = None, **attributes: Any) -> Iterator[dict[str, str]]:
    """A span that is a child of the `parent` carrier; yields the carrier for the next hop."""
    tracer = trace.get_tracer("gemma4_platform")
    context = propagate.extract(dict(parent)) if parent else None
    current = tracer.start_span(name, context=context, attributes=attributes)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(current))
    try:
        yield carrier
    except BaseException as exc:
        current.record_exception(exc)
        current.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
        raise
    finally:
        current.end()


def carrier_from_metadata(metadata: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> dict[str, str]:
    """The W3C trace headers among gRPC metadata or HTTP headers."""
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    return {k.lower(): str(v) for k, v in items if k.lower() in ("traceparent", "tracestate")}
