"""Spans to files, for the demo and its test: the OpenTelemetry SDK with an exporter that
appends every finished span as one JSON line to ``<folder>/<service>-<pid>.jsonl``.

In production, ``opentelemetry-instrument outbox-relay ...`` configures the SDK from the
standard ``OTEL_*`` variables and exports to a collector (see docs/howto.md, "Trace a message
end to end"); this module stands in for it where no collector runs. ``sitecustomize.py``
beside it calls :func:`configure` in every Python process started with this folder on
``PYTHONPATH`` and ``SPAN_FILES`` set to the folder for the files.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult


class JsonLinesExporter(SpanExporter):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(as_dict(s)) + "\n" for s in spans)
        with self._lock, open(self.path, "a") as out:
            out.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def as_dict(span: ReadableSpan) -> dict[str, Any]:
    ctx, parent = span.context, span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name"),
        "trace_id": f"{ctx.trace_id:032x}" if ctx else None,
        "span_id": f"{ctx.span_id:016x}" if ctx else None,
        "parent_id": f"{parent.span_id:016x}" if parent else None,
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
            for link in span.links
        ],
        "start": span.start_time,
        "end": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }


def configure(folder: str, service: str | None = None) -> None:
    """Make the SDK the global tracer provider, writing to ``folder``. Spans are written as
    they end (a simple processor, not a batching one): nothing is lost when the process is
    stopped by a signal."""
    name = service or os.environ.get("OTEL_SERVICE_NAME") or "unknown_service"
    Path(folder).mkdir(parents=True, exist_ok=True)
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    path = Path(folder) / f"{name}-{os.getpid()}.jsonl"
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    trace.set_tracer_provider(provider)


def read(folder: str | Path) -> list[dict[str, Any]]:
    """Every span written to ``folder``, by start time."""
    spans = [json.loads(line) for path in Path(folder).glob("*.jsonl") for line in _lines(path)]
    return sorted(spans, key=lambda s: s["start"])


def _lines(path: Path) -> Iterator[str]:
    with open(path) as f:
        yield from (line for line in f if line.strip())


def chain(spans: list[dict[str, Any]], trace_id: str) -> list[dict[str, Any]]:
    """The spans of one trace, by start time, with the ``send`` spans of other traces that
    link to one of them (a relay batch belongs to the trace of its first message only)."""
    ids = {s["span_id"] for s in spans if s["trace_id"] == trace_id}
    return [
        s
        for s in spans
        if s["trace_id"] == trace_id
        or any(link["trace_id"] == trace_id and link["span_id"] in ids for link in s["links"])
    ]
