"""OpenTelemetry in tests: an SDK tracer provider with an in-memory exporter, installed as the
global provider for one test only, and helpers to read the spans it got."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def install(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Make the global tracer provider an SDK one until ``monkeypatch`` is undone (the end of
    the test: the API lets a process set it only once); its finished spans are in the
    exporter returned."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    return exporter


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = named(spans, name)
    assert len(found) == 1, f"{name!r}: {[s.name for s in spans]}"
    return found[0]


def traceparent(headers: Sequence[tuple[str, bytes]]) -> str | None:
    values = [v.decode() for n, v in headers if n == "traceparent"]
    assert len(values) <= 1, values
    return values[0] if values else None


def ids(value: str) -> tuple[int, int]:
    """(trace id, span id) of a traceparent value."""
    _, trace_id, span_id, _ = value.split("-")
    return int(trace_id, 16), int(span_id, 16)
