"""The inbox consumer against the real broker and database: one effect per message, whatever
the redeliveries; poison messages dead-lettered through the outbox; the ``outbox consume``
command (a bad handler's parsing is in tests/unit/test_load_handler.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import Producer
from sqlalchemy.orm import Session

from outbox import Outbox, Relay, RelayConfig
from outbox.consumer import Consumer, ConsumerConfig
from outbox.transport.base import IncomingMessage
from outbox.transport.kafka import KafkaSource, KafkaTransport
from tests.support.broker import Broker
from tests.support.cli import run_cli
from tests.support.handlers import create_effects_table, record_effect

FAST_GROUP = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}


@pytest.fixture
def effects(engine: sa.Engine) -> sa.Engine:
    return create_effects_table(engine)


def publish_and_relay(engine: sa.Engine, db_url: str, broker: Broker, topic: str, n: int) -> None:
    outbox = Outbox()
    with Session(engine) as session, session.begin():
        for i in range(n):
            outbox.publish(session, topic, {"n": i}, key=f"k{i % 3}")
    Relay(RelayConfig(db_url=db_url), lambda: KafkaTransport(broker.bootstrap)).run_once()


def consumer(
    db_url: str, broker: Broker, topic: str, handler: Any, name: str = "payments", **kw: Any
) -> Consumer:
    # A fresh group each time (reads from the start); the inbox name is what deduplicates.
    group = f"g-{uuid.uuid4().hex[:8]}"
    config = ConsumerConfig(db_url=db_url, name=name, retry_backoff_base=0.01, **kw)
    return Consumer(
        config, handler, lambda: KafkaSource(broker.bootstrap, group, [topic], FAST_GROUP)
    )


def consume_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``outbox consume`` command (it can import ``tests.support.handlers``)."""
    return run_cli("outbox", ["consume", *args], timeout=120, import_tests=True)


def effect_counts(engine: sa.Engine) -> dict[int, int]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT n, count(*) FROM effects GROUP BY n")).all()
    return {r[0]: r[1] for r in rows}


def test_each_message_has_one_effect_even_when_delivered_five_times(
    effects: sa.Engine, db_url: str, broker: Broker, topic: str
) -> None:
    publish_and_relay(effects, db_url, broker, topic, 10)
    # Redeliver: the same messages (same message-id headers) produced 4 more times.
    first = consumer(db_url, broker, topic, record_effect)
    stats = first.run(max_messages=10)
    assert stats.processed == 10
    copies = broker.read_all(topic, expect=10)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for _ in range(4):
        for m in copies:
            producer.produce(topic, value=m.value, key=m.key, headers=list(m.headers.items()))
    producer.flush(10)
    second = consumer(db_url, broker, topic, record_effect)
    stats = second.run(max_messages=50)
    assert stats.processed == 0 and stats.duplicates == 50
    assert effect_counts(effects) == {i: 1 for i in range(10)}


def test_poison_message_is_dead_lettered_and_the_partition_moves_on(
    effects: sa.Engine, db_url: str, broker: Broker
) -> None:
    topic = broker.create_topic(partitions=1)
    publish_and_relay(effects, db_url, broker, topic, 6)
    calls: dict[int, int] = {}

    def handler(session: Session, message: IncomingMessage) -> None:
        n = json.loads(message.value or b"")["n"]
        calls[n] = calls.get(n, 0) + 1
        if n == 2:
            raise ValueError("cannot process order 2")
        if n == 4 and calls[n] < 3:
            raise TimeoutError("flaky dependency")  # fails twice, then succeeds
        record_effect(session, message)

    stats = consumer(db_url, broker, topic, handler, max_attempts=3).run(max_messages=6)
    assert stats.processed == 5 and stats.dead_lettered == 1
    assert calls[2] == 3 and calls[4] == 3
    assert effect_counts(effects) == {0: 1, 1: 1, 3: 1, 4: 1, 5: 1}
    with effects.connect() as conn:
        row = conn.execute(
            sa.text("SELECT topic, payload, header_names, header_values FROM outbox_messages")
        ).one()
    assert row.topic == f"{topic}.dlq"
    assert json.loads(row.payload) == {"n": 2}
    headers = dict(zip(row.header_names, row.header_values, strict=True))
    assert headers["dlq-original-topic"] == topic.encode()
    assert headers["dlq-attempts"] == b"3"
    assert headers["dlq-error"].startswith(b"ValueError: cannot process order 2")
    assert "dlq-original-message-id" in headers


def test_undecodable_message_is_poison_at_once(
    effects: sa.Engine, db_url: str, broker: Broker
) -> None:
    topic = broker.create_topic(partitions=1)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    producer.produce(topic, value=b"{not json", headers=[("message-id", b"m-1")])
    producer.produce(topic, value=b'{"n": 7}')  # no message-id header
    producer.flush(10)
    stats = consumer(db_url, broker, topic, record_effect).run(max_messages=2)
    assert stats.dead_lettered == 2 and stats.failed_attempts == 0
    with effects.connect() as conn:
        errors = sorted(
            r[0]
            for r in conn.execute(
                sa.text(
                    "SELECT convert_from(header_values[array_position(header_names, 'dlq-error')],"
                    " 'UTF8') FROM outbox_messages"
                )
            )
        )
    assert errors[0].startswith("PoisonMessage: value is not JSON")
    assert errors[1] == "no idempotency key (message-id header)"


def test_bad_handler_is_a_usage_error_in_one_line(db_url: str, broker: Broker) -> None:
    proc = consume_cli(
        *("--db-url", db_url, "--bootstrap-servers", broker.bootstrap),
        *("--group", "g", "--topic", "t"),
        *("--handler", "tests.support.handlers:missing"),
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "has no 'missing'" in lines[0], lines[0]


def test_missing_tables_stop_the_consumer_cli_with_a_clear_line(
    empty_db_url: str, broker: Broker
) -> None:
    proc = consume_cli(
        "--db-url",
        empty_db_url,
        "--bootstrap-servers",
        broker.bootstrap,
        "--group",
        "g",
        "--topic",
        "t",
        "--handler",
        "tests.support.handlers:record_effect",
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "outbox db upgrade" in lines[0]


def test_retention_shorter_than_the_redelivery_horizon_is_warned(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import datetime

    from outbox.transport.memory import MemorySource

    config = ConsumerConfig(
        db_url=db_url,
        name="payments",
        retention=datetime.timedelta(days=1),
        redelivery_horizon=datetime.timedelta(days=7),
    )
    with caplog.at_level("WARNING", logger="outbox.consumer"):
        Consumer(config, record_effect, MemorySource).run(idle_timeout=0.1)
    assert "inbox retention is shorter than the redelivery horizon" in caplog.text
    caplog.clear()
    ok = dataclasses.replace(config, retention=datetime.timedelta(days=8))
    with caplog.at_level("WARNING", logger="outbox.consumer"):
        Consumer(ok, record_effect, MemorySource).run(idle_timeout=0.1)
    assert "redelivery horizon" not in caplog.text


def test_cli_key_extractor_for_messages_from_foreign_producers(
    effects: sa.Engine, db_url: str, broker: Broker
) -> None:
    # Another producer (no message-id header) sends order 1 twice and order 2 once.
    topic = broker.create_topic(partitions=1)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for order_id, n in ((1, 10), (1, 11), (2, 20)):
        producer.produce(topic, value=json.dumps({"order_id": order_id, "n": n}).encode())
    producer.flush(10)
    proc = consume_cli(
        "--db-url",
        db_url,
        "--bootstrap-servers",
        broker.bootstrap,
        "--group",
        f"g-{uuid.uuid4().hex[:8]}",
        "--topic",
        topic,
        "--handler",
        "tests.support.handlers:record_order",
        "--key-extractor",
        "tests.support.handlers:order_id_key",
        "--max-messages",
        "3",
        "-X",
        "session.timeout.ms=6000",
        "-X",
        "heartbeat.interval.ms=1000",
    )
    assert proc.returncode == 0, proc.stderr
    assert "processed 2, duplicates 1, dead-lettered 0" in proc.stderr
    assert effect_counts(effects) == {10: 1, 20: 1}
