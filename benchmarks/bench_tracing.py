"""bench.py with tracing in one of three states, to measure what outbox.tracing costs:

    .venv/bin/python benchmarks/bench_tracing.py off write throughput
    .venv/bin/python benchmarks/bench_tracing.py api write throughput
    .venv/bin/python benchmarks/bench_tracing.py sdk write throughput
    .venv/bin/python benchmarks/bench_tracing.py calls      # the checks alone, per call

``off``: outbox.tracing's entry points replaced by no-ops, as if the module did not exist.
``api``: the OpenTelemetry API imported (as another instrumented library would) and no SDK:
the library asks whether tracing is live and does nothing more. ``sdk``: the SDK configured
with a batch span processor whose exporter drops the spans (the cost of making the spans and
the headers, not of shipping them). Arguments after the state go to bench.py.
"""

from __future__ import annotations

import contextlib
import runpy
import sys
import timeit
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from outbox import Message, tracing
from outbox.message import encode
from outbox.transport.base import IncomingMessage


def disable() -> None:
    tracing.created = lambda messages: messages  # type: ignore[assignment]
    tracing.sending = lambda *args: None  # type: ignore[assignment]
    tracing.processing = lambda *args: contextlib.nullcontext()  # type: ignore[assignment]


def api_only() -> None:
    import opentelemetry.trace  # noqa: F401


def sdk() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)


def calls() -> None:
    """Nanoseconds per call of each entry point, tracing off (no API imported), with the API
    imported and no SDK, then with the SDK (making a span)."""
    messages = [encode(Message("orders", {"n": 1}, key="k"))]
    incoming = IncomingMessage("orders", 0, 0, None, None, [])

    def each(label: str) -> None:
        n = 200_000
        timings: dict[str, Any] = {
            "created([1 message])": lambda: tracing.created(messages),
            "sending(batch)": lambda: tracing.sending((), (1,), 0.0),
            "processing(message)": lambda: tracing.processing(incoming, "c"),
        }
        for name, fn in timings.items():
            best = min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e9
            print(f"  {label:28} {name:24} {best:6.0f} ns")

    each("no API imported")
    api_only()
    each("API imported, no SDK")
    sdk()
    n = 20_000
    best = min(timeit.repeat(lambda: tracing.created(messages), number=n, repeat=5)) / n * 1e9
    print(f"  {'SDK (spans dropped)':28} {'created([1 message])':24} {best:6.0f} ns")

    def process() -> None:
        with tracing.processing(incoming, "c"):
            pass

    best = min(timeit.repeat(process, number=n, repeat=5)) / n * 1e9
    print(f"  {'SDK (spans dropped)':28} {'with processing(message)':24} {best:6.0f} ns")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "calls":
        calls()
        sys.exit(0)
    setups = {"off": disable, "api": api_only, "sdk": sdk}
    if mode not in setups:
        sys.exit(__doc__)
    setups[mode]()
    print(f"tracing: {mode} (live: {tracing.live()})")
    sys.argv = [str(Path(__file__).with_name("bench.py")), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
