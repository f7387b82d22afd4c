"""outbox.tracing without a database: the create span and the headers it leaves, the caller's
own traceparent, the process span, parsing traceparent; and nothing at all while tracing is
off (the API without an SDK, or no API)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid

import pytest
from opentelemetry import baggage, context, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from outbox import Message, tracing
from outbox.message import EncodedMessage, encode
from outbox.transport.base import IncomingMessage
from tests.support.otel import ids, install, one, traceparent

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    return install(monkeypatch)


def encoded(*messages: Message) -> list[EncodedMessage]:
    return [encode(m) for m in messages]


def test_create_span_is_a_child_of_the_current_span_and_its_context_is_stored(
    spans: InMemorySpanExporter,
) -> None:
    mid = uuid.uuid4()
    with trace.get_tracer("app").start_as_current_span("POST /orders") as request:
        [msg] = tracing.created(encoded(Message("orders", {"a": 1}, "customer-1", message_id=mid)))
    create = one(spans.get_finished_spans(), "create orders")
    assert create.kind is SpanKind.PRODUCER
    assert create.parent is not None and create.parent.span_id == request.get_span_context().span_id
    assert dict(create.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.destination.name": "orders",
        "messaging.operation.type": "create",
        "messaging.operation.name": "create",
        "messaging.message.id": str(mid),
        "messaging.kafka.message.key": "customer-1",
    }
    # The stored context is the create span's, after the message's own headers.
    value = traceparent(msg.headers)
    assert value is not None
    assert ids(value) == (create.context.trace_id, create.context.span_id)
    assert int(value[-2:], 16) & 1  # sampled
    assert [n for n, _ in msg.headers] == ["content-type", "traceparent"]


def test_without_a_current_span_the_create_span_starts_a_trace(
    spans: InMemorySpanExporter,
) -> None:
    [msg] = tracing.created(encoded(Message("orders", None, b"\xff")))
    create = one(spans.get_finished_spans(), "create orders")
    assert create.parent is None
    attributes = dict(create.attributes or {})
    assert "messaging.kafka.message.key" not in attributes  # no text form
    assert attributes["messaging.kafka.message.tombstone"] is True
    value = traceparent(msg.headers)
    assert value is not None and ids(value) == (create.context.trace_id, create.context.span_id)


def test_a_traceparent_of_the_callers_is_kept_and_no_span_made(
    spans: InMemorySpanExporter,
) -> None:
    with trace.get_tracer("app").start_as_current_span("request"):
        [msg] = tracing.created(
            encoded(Message("orders", {}, headers=[("TraceParent", TP), ("x", "1")]))
        )
    assert [s.name for s in spans.get_finished_spans()] == ["request"]
    assert msg.headers == (
        ("content-type", b"application/json"),
        ("TraceParent", TP.encode()),
        ("x", b"1"),
    )


def test_each_message_of_a_batch_has_its_own_create_span(spans: InMemorySpanExporter) -> None:
    messages = tracing.created(encoded(*(Message(f"t{i % 2}", {"i": i}) for i in range(4))))
    created = spans.get_finished_spans()
    assert [s.name for s in created] == ["create t0", "create t1", "create t0", "create t1"]
    stored = [traceparent(m.headers) for m in messages]
    assert [ids(v) for v in stored if v is not None] == [
        (s.context.trace_id, s.context.span_id) for s in created
    ]


def test_tracestate_and_baggage_go_along_but_a_callers_own_header_wins(
    spans: InMemorySpanExporter,
) -> None:
    token = context.attach(baggage.set_baggage("tenant", "t-1"))
    try:
        [msg] = tracing.created(encoded(Message("t", b"", headers={"baggage": "mine=1"})))
        [other] = tracing.created(encoded(Message("t", b"")))
    finally:
        context.detach(token)
    assert [v for n, v in msg.headers if n == "baggage"] == [b"mine=1"]
    assert traceparent(msg.headers) is not None
    assert dict(other.headers)["baggage"] == b"tenant=t-1"


def test_process_span_continues_the_messages_trace(spans: InMemorySpanExporter) -> None:
    message = IncomingMessage(
        "orders",
        2,
        41,
        b"k",
        b"{}",
        [("message-id", b"m-1"), ("traceparent", TP.encode()), ("traceparent", b"00-bad")],
    )
    with tracing.processing(message, "payments"):
        inside = trace.get_current_span().get_span_context()
        [msg] = tracing.created(encoded(Message("payments", {})))
    process = one(spans.get_finished_spans(), "process orders")
    assert process.kind is SpanKind.CONSUMER
    assert inside.span_id == process.context.span_id
    # The parent is the first traceparent (ours; a Kafka instrumentation appends its own).
    assert process.parent is not None and process.parent.is_remote
    assert (process.parent.trace_id, process.parent.span_id) == ids(TP)
    assert [(link.context.trace_id, link.context.span_id) for link in process.links] == [ids(TP)]
    assert dict(process.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.destination.name": "orders",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.partition.id": "2",
        "messaging.kafka.offset": 41,
        "messaging.consumer.group.name": "payments",
        "messaging.message.id": "m-1",
        "messaging.kafka.message.key": "k",
    }
    create = one(spans.get_finished_spans(), "create payments")
    assert create.parent is not None and create.parent.span_id == process.context.span_id
    value = traceparent(msg.headers)
    assert value is not None and ids(value)[0] == ids(TP)[0]
    assert process.status.status_code is StatusCode.UNSET


def test_a_failed_attempt_is_an_error_on_its_process_span(spans: InMemorySpanExporter) -> None:
    message = IncomingMessage("orders", 0, 0, None, None, [])
    with pytest.raises(ValueError, match="declined"), tracing.processing(message, "payments"):
        raise ValueError("declined")
    process = one(spans.get_finished_spans(), "process orders")
    assert process.parent is None and not process.links  # no context came with it
    assert process.status.status_code is StatusCode.ERROR
    assert process.status.description == "ValueError: declined"
    assert dict(process.attributes or {})["error.type"] == "ValueError"
    assert [e.name for e in process.events] == ["exception"]
    assert trace.get_current_span() is trace.INVALID_SPAN  # detached


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (TP, (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, 1)),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", (ids(TP)[0], ids(TP)[1], 0)),
        ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future", (*ids(TP), 1)),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", None),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),
        ("", None),
    ],
)
def test_parse_traceparent(value: str, parsed: tuple[int, int, int] | None) -> None:
    assert tracing.parse_traceparent(value.encode()) == parsed


# -- tracing off --------------------------------------------------------------------------------


def test_api_without_sdk_is_off_and_leaves_no_header(monkeypatch: pytest.MonkeyPatch) -> None:
    # The API's default: a proxy to nothing (monkeypatch restores whatever this process had).
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.delenv("OTEL_PYTHON_TRACER_PROVIDER", raising=False)

    def no_span(*args: object, **kwargs: object) -> None:
        raise AssertionError("a span was started while tracing is off")

    monkeypatch.setattr(trace.ProxyTracer, "start_span", no_span)
    monkeypatch.setattr(trace.NoOpTracer, "start_span", no_span)
    assert not tracing.live()
    messages = encoded(Message("t", {}), Message("t", {}))
    assert tracing.created(messages) is messages  # the very list: nothing copied
    assert tracing.sending([], [1], 0.0) is None
    # A context from elsewhere (say, extracted by a framework) is not propagated either.
    remote = trace.SpanContext(*ids(TP), is_remote=True, trace_flags=trace.TraceFlags(1))
    with trace.use_span(trace.NonRecordingSpan(remote)):
        [msg] = tracing.created(encoded(Message("t", {})))
        assert traceparent(msg.headers) is None
        assert tracing.processing(IncomingMessage("t", 0, 0, None, None, []), "c") is tracing._OFF


def test_a_disabled_sdk_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", TracerProvider())
    assert not tracing.live()
    assert tracing.sending([], [1], 0.0) is None


def test_no_opentelemetry_installed_publishes_without_it() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["opentelemetry"] = None  # "import opentelemetry" raises ImportError
        from outbox import Message, tracing
        from outbox.message import encode
        from outbox.transport.base import IncomingMessage

        [m] = tracing.created([encode(Message("t", {}, headers={"h": "v"}))])
        assert [n for n, _ in m.headers] == ["content-type", "h"], m.headers
        assert not tracing.live()
        assert tracing.sending([], [1], 0.0) is None
        with tracing.processing(IncomingMessage("t", 0, 0, None, None, []), "c"):
            pass
        assert not any(n.startswith("opentelemetry.") for n in sys.modules)
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_the_api_is_not_imported_by_the_library() -> None:
    script = (
        "import sys, outbox.outbox, outbox.relay, outbox.consumer, outbox.events\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and proc.stdout == "[]\n", proc.stdout + proc.stderr
