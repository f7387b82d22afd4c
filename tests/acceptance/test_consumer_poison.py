"""Poison in the middle of a partition, with the real ``outbox consume`` command, database and
broker: messages that cannot be processed *and* whose bytes no text column could hold (an empty
header name, a NUL and non-UTF-8 bytes in header values, a 600-byte ``message-id``) are
dead-lettered with their original bytes; the consumer exits 0 on ``--idle-timeout``, every
later message of the partition is processed, the group's offset is past all of them, a restart
finds nothing left, and the relay delivers the dead letters to Kafka byte for byte.

Before: the first of them made ``outbox consume`` exit 1 before its offset was committed, and
every restart stopped at it again."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, Producer, TopicPartition

from tests.support.broker import Broker
from tests.support.cli import run_cli
from tests.support.consumerproc import ConsumerProcess, Summary
from tests.support.events import event
from tests.support.handlers import create_effects_table

pytestmark = pytest.mark.slow

#: (key, value, headers) of the poison messages, none with a usable message-id.
POISON: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = [
    (b"p-1", b"\x00\xff not json", [("", b"x"), ("trace", b"t-1")]),
    (b"p-2", b'{"n": -1}', [("h", b"a\x00b"), ("bin", b"\xff\xfe"), ("h", b"again")]),
    (b"p-3", b"not json", [("message-id", b"m" * 600), ("after", b"\x01")]),
]
GOOD_BEFORE, GOOD_AFTER = 4, 6


def produce(broker: Broker, topic: str) -> list[str]:
    """Good messages ``{"n": i}`` around the poison ones, in one partition; returns the good
    messages' ids in order."""
    producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})
    ids = []

    def good(n: int) -> None:
        mid = str(uuid.uuid4())
        ids.append(mid)
        producer.produce(
            topic,
            value=json.dumps({"n": n}).encode(),
            key=f"k{n}".encode(),
            headers=[("message-id", mid.encode())],
        )

    for n in range(GOOD_BEFORE):
        good(n)
    for key, value, headers in POISON:
        pairs: list[tuple[str, str | bytes | None]] = list(headers)
        producer.produce(topic, value=value, key=key, headers=pairs)
    for n in range(GOOD_BEFORE, GOOD_BEFORE + GOOD_AFTER):
        good(n)
    assert producer.flush(30) == 0
    return ids


@pytest.fixture
def consumers(tmp_path: Path) -> Iterator[list[ConsumerProcess]]:
    started: list[ConsumerProcess] = []
    yield started
    for proc in started:
        proc.stop(timeout=10)


def consume(
    started: list[ConsumerProcess], db_url: str, broker: Broker, topic: str, group: str
) -> ConsumerProcess:
    proc = ConsumerProcess(
        [
            *("--db-url", db_url),
            *("--bootstrap-servers", broker.bootstrap),
            *("--group", group),
            *("--topic", topic),
            *("--handler", "tests.support.handlers:record_effect"),
            *("--max-attempts", "2"),
            *("--retry-backoff", "0.01"),
            *("--idle-timeout", "2"),
            *("-X", "session.timeout.ms=6000"),
            *("-X", "heartbeat.interval.ms=1000"),
        ],
        env={"CONSUMER_TEST_SLEEP_MS": "0"},
    ).start()
    started.append(proc)
    return proc


def committed(broker: Broker, group: str, topic: str) -> int:
    client = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        [tp] = client.committed([TopicPartition(topic, 0)], timeout=10)
        return int(tp.offset)
    finally:
        client.close()


def test_poison_in_the_middle_of_a_partition(
    engine: sa.Engine, db_url: str, broker: Broker, consumers: list[ConsumerProcess]
) -> None:
    create_effects_table(engine)
    topic = broker.create_topic(partitions=1)
    dlq = broker.create_topic(f"{topic}.dlq", partitions=1)
    ids = produce(broker, topic)
    group = f"g-{uuid.uuid4().hex[:8]}"

    proc = consume(consumers, db_url, broker, topic, group)
    assert proc.wait(90) == 0, proc.tail()
    assert proc.summary() == Summary(GOOD_BEFORE + GOOD_AFTER, 0, len(POISON))
    assert len(proc.matches(event("consumer.dead_lettered"))) == len(POISON)
    # Every good message once, in partition order, the ones after the poison included.
    with engine.connect() as conn:
        effects = conn.execute(sa.text("SELECT message_id, n FROM effects ORDER BY seq")).all()
    assert [tuple(e) for e in effects] == list(zip(ids, range(len(ids)), strict=True))
    total = GOOD_BEFORE + len(POISON) + GOOD_AFTER
    assert committed(broker, group, topic) == total

    # A restart finds nothing left to do.
    again = consume(consumers, db_url, broker, topic, group)
    assert again.wait(90) == 0, again.tail()
    assert again.summary() == Summary(0, 0, 0)

    # Nothing lost: the relay sends the dead letters, with the original bytes.
    relay = run_cli(
        "outbox-relay",
        ["--db-url", db_url, "--bootstrap-servers", broker.bootstrap, "--once"],
        timeout=90,
    )
    assert relay.returncode == 0, relay.stderr
    letters = read(broker, dlq, len(POISON))
    assert [(m.key(), m.value()) for m in letters] == [(k, v) for k, v, _ in POISON]
    for m, (_, _, headers) in zip(letters, POISON, strict=True):
        got = m.headers() or []
        assert got[0][0] == "message-id"  # the dead letter's own
        original = [("dlq-original-message-id" if n == "message-id" else n, v) for n, v in headers]
        assert got[1 : 1 + len(headers)] == original
        added = dict(got[1 + len(headers) :])
        assert added["dlq-original-topic"] == topic.encode()
        assert added["dlq-original-offset"] == str(m.offset() + GOOD_BEFORE).encode()
    # The long message-id is kept whole; the inbox holds its digest.
    assert dict(letters[2].headers() or [])["dlq-idempotency-key"] == b"m" * 600
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM outbox_messages")).scalar_one() == 0


def read(broker: Broker, topic: str, n: int) -> list[Any]:
    client = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": uuid.uuid4().hex})
    try:
        client.assign([TopicPartition(topic, 0, 0)])
        out: list[Any] = []
        for _ in range(60):
            out += [m for m in client.consume(n, 0.5) if m.error() is None]
            if len(out) >= n:
                break
        assert len(out) == n, f"{len(out)} of {n} dead letters in {topic}"
        return out
    finally:
        client.close()
