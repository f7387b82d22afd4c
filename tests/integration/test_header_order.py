"""Kafka headers are an ordered list of (name, bytes): what publish is given is what the relay
sends, after ``message-id``: in order, repeated names kept, binary values untouched (real
PostgreSQL; the in-memory transport, and the real broker once)."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox import (
    EventSource,
    Message,
    Outbox,
    Relay,
    RelayConfig,
    RelayObserver,
    collect_events,
)
from outbox.claims import HeaderCache, parse_array, raw_arrays
from outbox.testing import drain
from outbox.transport.kafka import KafkaTransport
from outbox.transport.memory import MemoryTransport
from tests.support.broker import Broker

#: Not what a jsonb object would give back: "b" before "a", "b" twice, bytes that are no text.
HEADERS: list[tuple[str, str | bytes]] = [
    ("b", "1"),
    ("a", b"\x00\xff\xfe"),
    ("b", "2"),
    ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ("zoë", "€"),
]
SENT = [(n, v.encode() if isinstance(v, str) else v) for n, v in HEADERS]


def names(headers: Any) -> list[str]:
    return [n for n, _ in headers]


@pytest.mark.parametrize("at_commit", [False, True], ids=["at-publish", "at-commit"])
def test_headers_are_sent_in_order_with_repeats_and_bytes(
    engine: sa.Engine, db_url: str, at_commit: bool
) -> None:
    outbox = Outbox(at_commit=at_commit)
    with Session(engine) as session, session.begin():
        first = outbox.publish(session, "orders", b"x", key="k", headers=HEADERS)
        # Several in one statement: each message gets its own slice of the header arrays.
        outbox.publish_many(
            session,
            [
                Message("orders", None, key="k"),
                Message("orders", {"n": 1}, key="k", headers=[("only", "one")]),
                Message("orders", "t", key="k", headers=list(reversed(HEADERS))),
                Message("orders", None, key="k", headers=[]),
                Message("orders", b"y", key="k", headers={"m": "1", "a": "2"}),
            ],
        )
    sent = drain(db_url)
    assert [m.headers for m in sent] == [
        [("message-id", str(first).encode()), ("content-type", b"application/octet-stream"), *SENT],
        [("message-id", sent[1].headers[0][1])],
        [
            ("message-id", sent[2].headers[0][1]),
            ("content-type", b"application/json"),
            ("only", b"one"),
        ],
        [
            ("message-id", sent[3].headers[0][1]),
            ("content-type", b"text/plain; charset=utf-8"),
            *reversed(SENT),
        ],
        [("message-id", sent[4].headers[0][1])],
        [
            ("message-id", sent[5].headers[0][1]),
            ("content-type", b"application/octet-stream"),
            ("m", b"1"),
            ("a", b"2"),
        ],
    ]


def test_async_publish_keeps_the_order(engine: sa.Engine, db_url: str) -> None:
    async def main() -> None:
        aengine = create_async_engine(db_url)
        try:
            async with AsyncSession(aengine) as session, session.begin():
                await Outbox().apublish(session, "orders", None, headers=HEADERS)
                await Outbox().apublish_many(session, [Message("orders", None, headers=HEADERS)])
        finally:
            await aengine.dispose()

    asyncio.run(main())
    assert [m.headers[1:] for m in drain(db_url)] == [SENT, SENT]


class Base(DeclarativeBase):
    pass


class Order(EventSource, Base):
    __tablename__ = "header_orders"
    id: Mapped[int] = mapped_column(primary_key=True)


def test_domain_events_keep_the_order(engine: sa.Engine, db_url: str) -> None:
    Base.metadata.create_all(engine)
    maker = sa.orm.sessionmaker(engine)
    collect_events(Outbox(), maker)
    with maker() as session, session.begin():
        order = Order(id=1)
        session.add(order)
        order.record_event("orders", None, headers=HEADERS)
        order.record_event("orders", b"", headers=dict(HEADERS[:2]))
    sent = drain(db_url)
    assert [m.headers[1:] for m in sent] == [
        SENT,
        [("content-type", b"application/octet-stream"), *SENT[:2]],
    ]


def test_headers_are_kept_through_claims_that_run_ahead(engine: sa.Engine, db_url: str) -> None:
    """Small batches: most claims run ahead on the claims connection (pipeline mode), whose
    cursor reads the header arrays unparsed too."""
    outbox = Outbox()
    expected = []
    with Session(engine) as session, session.begin():
        for i in range(40):
            headers = [(f"h{j}", bytes([i, j])) for j in range(i % 5)] + [("n", str(i))]
            outbox.publish(session, "orders", None, key=f"k{i % 3}", headers=headers)
            expected.append([(n, v.encode() if isinstance(v, str) else v) for n, v in headers])
    transport = MemoryTransport()
    ahead = []

    class Watch(RelayObserver):
        def claimed(self, rows: int, ahead_: bool) -> None:
            ahead.append(ahead_)

    config = RelayConfig(db_url=db_url, batch_size=4, shutdown_timeout=1.0)
    relay = Relay(config, lambda: transport, rng=random.Random(1), observers=[Watch()])
    relay.run_once()
    assert any(ahead)
    got = {int(dict(m.headers)["n"]): m.headers[1:] for m in transport.sent}
    assert [got[i] for i in range(40)] == expected


def test_the_relay_reads_the_arrays_as_postgresql_sends_them(db_url: str) -> None:
    """The claim's raw binary arrays, parsed by the relay, equal what psycopg itself makes of
    them, for awkward values: empty names and values, every byte, long values, many items."""
    rng = random.Random(7)
    cases: list[tuple[list[str], list[bytes]]] = [
        ([], []),
        ([""], [b""]),
        (["a", "a", "ü €", "\U0001f600"], [b"", b"\x00", bytes(range(256)), b"x" * 70_000]),
        ([f"n{i}" for i in range(300)], [rng.randbytes(rng.randrange(0, 40)) for _ in range(300)]),
    ]
    conninfo = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo) as conn:
        for want_names, want_values in cases:
            query = "SELECT CAST(%s AS text[]), CAST(%s AS bytea[])"
            params = (want_names, want_values)
            plain = conn.execute(query, params, binary=True).fetchone()
            assert plain is not None and plain == (want_names, want_values)
            cur = conn.cursor(binary=True)
            raw_arrays(cur.adapters)
            raw = cur.execute(query, params).fetchone()
            assert raw is not None and all(isinstance(x, bytes) for x in raw)
            assert [n.decode() for n in parse_array(raw[0])] == want_names
            assert parse_array(raw[1]) == want_values
            cache = HeaderCache()
            assert cache(*raw) == list(zip(want_names, want_values))
            assert cache(*raw) is cache(*raw)  # parsed once


def test_the_real_broker_gets_them_in_order(engine: sa.Engine, db_url: str, broker: Broker) -> None:
    topic = broker.create_topic(partitions=1)
    with Session(engine) as session, session.begin():
        mid = Outbox().publish(session, topic, b"v", key="k", headers=HEADERS)
    relay = Relay(
        RelayConfig(db_url=db_url),
        lambda: KafkaTransport(broker.bootstrap, {"message.timeout.ms": "20000"}),
    )
    assert relay.run_once().sent == 1
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": uuid.uuid4().hex})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        message = consumer.poll(20)
        assert message is not None and message.error() is None
        assert message.headers() == [
            ("message-id", str(mid).encode()),
            ("content-type", b"application/octet-stream"),
            *SENT,
        ]
    finally:
        consumer.close()
