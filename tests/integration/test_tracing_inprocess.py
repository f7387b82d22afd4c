"""Tracing in one process, on the real database, with an in-memory SDK exporter: every way to
publish stores the create span's context; the relay sends it and reports a send span per
batch and topic, linked to the messages; the consumer's process span continues the trace, and
what its handler publishes stays in it. With tracing off, the relay looks at no row."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from outbox import Outbox, Relay, RelayConfig, collect_events, tracing
from outbox.consumer import Consumer, ConsumerConfig
from outbox.transport.base import DeliveryFailure, FailureKind, IncomingMessage, OutgoingMessage
from outbox.transport.memory import MemorySource, MemoryTransport
from tests.support.models import Base, Order
from tests.support.otel import ids, install, named, one, traceparent

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    return install(monkeypatch)


def relay(db_url: str, transport: MemoryTransport, **kw: Any) -> Relay:
    config = RelayConfig(db_url=db_url, shutdown_timeout=1.0, **kw)
    return Relay(config, lambda: transport)


def stored_traceparents(engine: sa.Engine) -> list[str | None]:
    sql = sa.text(
        "SELECT convert_from(header_values[array_position(header_names, 'traceparent')], "
        "'UTF8') FROM outbox_messages ORDER BY id"
    )
    with engine.connect() as conn:
        return list(conn.execute(sql).scalars())


def context_of(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


@pytest.mark.parametrize("at_commit", [False, True], ids=["at-publish", "at-commit"])
def test_publish_stores_the_create_spans_context(
    engine: sa.Engine, spans: InMemorySpanExporter, at_commit: bool
) -> None:
    outbox = Outbox(at_commit=at_commit)
    with (
        trace.get_tracer("app").start_as_current_span("request"),
        Session(engine) as session,
        session.begin(),
    ):
        outbox.publish(session, "orders", {"n": 1}, key="k")
        outbox.publish(session, "orders", {"n": 2}, headers={"traceparent": TP})
    create = one(spans.get_finished_spans(), "create orders")
    assert stored_traceparents(engine) == [
        f"00-{create.context.trace_id:032x}-{create.context.span_id:016x}-"
        f"{int(create.context.trace_flags):02x}",
        TP,  # the caller's own
    ]


def test_async_publish_stores_it_too(db_url: str, engine: sa.Engine, spans: Any) -> None:
    async def main() -> None:
        aengine = create_async_engine(db_url)
        try:
            with trace.get_tracer("app").start_as_current_span("request"):
                async with AsyncSession(aengine) as session, session.begin():
                    await Outbox().apublish(session, "orders", {"n": 1})
        finally:
            await aengine.dispose()

    asyncio.run(main())
    create = one(spans.get_finished_spans(), "create orders")
    [value] = stored_traceparents(engine)
    assert value is not None and ids(value) == context_of(create)


def test_domain_events_take_the_context_where_they_are_recorded(
    engine: sa.Engine, spans: InMemorySpanExporter
) -> None:
    Base.metadata.create_all(engine)
    outbox = Outbox()
    factory = sessionmaker(engine)
    collect_events(outbox, factory)
    with factory() as session, session.begin():
        session.add(Order(id=1))
    with factory() as session, session.begin():
        order = session.get(Order, 1)
        assert order is not None
        with trace.get_tracer("app").start_as_current_span("cancel") as cancel:
            order.cancel()
        # Written at commit, outside the span: the context is the one recorded.
    create = one(spans.get_finished_spans(), "create orders")  # one: publish made no other
    assert create.parent is not None
    assert create.parent.span_id == cancel.get_span_context().span_id
    [value] = stored_traceparents(engine)
    assert value is not None and ids(value) == context_of(create)


def test_relay_sends_the_context_and_a_send_span_per_topic_linked_to_the_messages(
    engine: sa.Engine, db_url: str, spans: InMemorySpanExporter
) -> None:
    outbox = Outbox()
    tracer = trace.get_tracer("app")
    with Session(engine) as session, session.begin():
        with tracer.start_as_current_span("first request"):
            outbox.publish(session, "orders", {"n": 1}, key="a")
        with tracer.start_as_current_span("second request"):
            outbox.publish(session, "orders", {"n": 2}, key="b")
            outbox.publish(session, "payments", {"n": 3}, key="c")
        outbox.publish(session, "orders", {"n": 4}, headers={"traceparent": "not one"})
    created = [s for s in spans.get_finished_spans() if s.name.startswith("create ")]
    spans.clear()
    transport = MemoryTransport()
    relay(db_url, transport).run_once()

    sent = {m.headers[0][1].decode(): m for m in transport.sent}
    assert len(sent) == 4
    for span in created:
        message = sent[str(dict(span.attributes or {})["messaging.message.id"])]
        value = traceparent(message.headers)
        assert value is not None and ids(value) == context_of(span)

    finished = spans.get_finished_spans()
    orders, payments = one(finished, "send orders"), one(finished, "send payments")
    for span, topic, count in ((orders, "orders", 3), (payments, "payments", 1)):
        assert span.kind is SpanKind.CLIENT
        assert dict(span.attributes or {}) == {
            "messaging.system": "kafka",
            "messaging.destination.name": topic,
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.batch.message_count": count,
        }
        assert span.status.status_code is StatusCode.UNSET
    # Linked to each message's creation context (not to the unparseable one); the first is
    # the parent, so the first request's trace shows when its message was sent.
    assert [(link.context.trace_id, link.context.span_id) for link in orders.links] == [
        context_of(created[0]),
        context_of(created[1]),
    ]
    assert [dict(link.attributes or {}) for link in orders.links] == [
        {"messaging.message.id": str(dict(s.attributes or {})["messaging.message.id"])}
        for s in created[:2]
    ]
    assert orders.parent is not None and orders.parent.span_id == context_of(created[0])[1]
    assert orders.context.trace_id == created[0].context.trace_id
    assert payments.parent is not None and payments.parent.span_id == context_of(created[2])[1]


def test_a_failed_send_is_an_error_on_its_topics_span(
    engine: sa.Engine, db_url: str, spans: InMemorySpanExporter
) -> None:
    outbox = Outbox()
    with Session(engine) as session, session.begin():
        outbox.publish(session, "good", {})
        outbox.publish(session, "bad", {})

    def fail(message: OutgoingMessage) -> DeliveryFailure | None:
        if message.topic == "bad":
            return DeliveryFailure(FailureKind.MESSAGE, "MSG_SIZE_TOO_LARGE")
        return None

    relay(db_url, MemoryTransport(fail=fail), max_attempts=5).run_once()
    finished = spans.get_finished_spans()
    good, bad = one(finished, "send good"), one(finished, "send bad")
    assert good.status.status_code is StatusCode.UNSET
    assert bad.status.status_code is StatusCode.ERROR
    assert bad.status.description == "MSG_SIZE_TOO_LARGE"
    assert dict(bad.attributes or {})["error.type"] == "message"


def test_consumer_continues_the_trace_and_what_it_publishes_stays_in_it(
    engine: sa.Engine, db_url: str, spans: InMemorySpanExporter
) -> None:
    outbox = Outbox()
    with (
        trace.get_tracer("app").start_as_current_span("POST /orders") as request,
        Session(engine) as session,
        session.begin(),
    ):
        outbox.publish(session, "orders", {"n": 1}, key="c1")
    transport = MemoryTransport()
    relay(db_url, transport).run_once()
    [sent] = transport.sent

    def capture(session: Session, message: IncomingMessage) -> None:
        outbox.publish(session, "payments", {"paid": True}, key=message.key)

    def fail_once(session: Session, message: IncomingMessage) -> None:
        if not named(spans.get_finished_spans(), "process orders"):
            raise RuntimeError("provider timeout")
        capture(session, message)

    incoming = IncomingMessage(sent.topic, 0, 7, sent.key, sent.value, list(sent.headers))
    config = ConsumerConfig(db_url=db_url, name="payments", retry_backoff_base=0.01)
    stats = Consumer(config, fail_once, lambda: MemorySource([incoming])).run(idle_timeout=0.1)
    assert stats.processed == 1 and stats.failed_attempts == 1
    relay(db_url, transport).run_once()
    payment = transport.sent[-1]

    finished = spans.get_finished_spans()
    trace_id = request.get_span_context().trace_id
    create = one(finished, "create orders")
    failed, processed = named(finished, "process orders")
    for attempt in (failed, processed):
        assert attempt.kind is SpanKind.CONSUMER
        assert attempt.parent is not None and attempt.parent.span_id == context_of(create)[1]
        assert dict(attempt.attributes or {})["messaging.kafka.offset"] == 7
    assert failed.status.status_code is StatusCode.ERROR
    assert processed.status.status_code is StatusCode.UNSET
    paid = one(finished, "create payments")
    assert paid.parent is not None and paid.parent.span_id == context_of(processed)[1]
    value = traceparent(payment.headers)
    assert value is not None and ids(value) == context_of(paid)
    chain = [
        "POST /orders",
        "create orders",
        "send orders",
        "process orders",
        "create payments",
        "send payments",
    ]
    assert {s.name for s in finished} == set(chain)
    assert {s.context.trace_id for s in finished} == {trace_id}


def test_tracing_off_the_relay_looks_at_no_row(
    engine: sa.Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)  # the API without an SDK

    def refuse(*args: object) -> None:
        raise AssertionError("a row was looked at while tracing is off")

    monkeypatch.setattr(tracing._Traceparents, "__call__", refuse)
    monkeypatch.setattr(tracing, "parse_traceparent", refuse)
    outbox = Outbox()
    with Session(engine) as session, session.begin():
        outbox.publish(session, "orders", {"n": 1}, headers={"traceparent": TP})
        outbox.publish(session, "orders", {"n": 2})
    assert stored_traceparents(engine) == [TP, None]
    transport = MemoryTransport()
    assert relay(db_url, transport).run_once().sent == 2
