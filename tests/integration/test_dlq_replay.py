"""``outbox dlq replay`` on the real broker and database: dead letters written by a real
consumer run (and a minimal one, and a message that is no dead letter) are published again to
their original topic through the outbox, once each however often the command runs; the relay
sends them and the consumer processes them afresh (they have new message ids)."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import sqlalchemy as sa
from confluent_kafka import Producer
from sqlalchemy.orm import Session

from outbox import Outbox, PoisonMessage, Relay, RelayConfig
from outbox.consumer import Consumer, ConsumerConfig
from outbox.deadletter import REPLAY_CONSUMER, REPLAY_NAMESPACE
from outbox.transport.base import IncomingMessage
from outbox.transport.kafka import KafkaSource, KafkaTransport
from tests.support.broker import Broker
from tests.support.cli import run_cli
from tests.support.handlers import create_effects_table, record_effect

FAST_GROUP = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}


def relay_once(db_url: str, broker: Broker) -> None:
    Relay(RelayConfig(db_url=db_url), lambda: KafkaTransport(broker.bootstrap)).run_once()


def consume(db_url: str, broker: Broker, topic: str, handler: Any, n: int) -> Any:
    group = f"g-{uuid.uuid4().hex[:8]}"  # from the start each time; the inbox deduplicates
    config = ConsumerConfig(db_url=db_url, name="payments", retry_backoff_base=0.01)
    source = lambda: KafkaSource(broker.bootstrap, group, [topic], FAST_GROUP)  # noqa: E731
    return Consumer(config, handler, source).run(max_messages=n)


def effects(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return sorted(r[0] for r in conn.execute(sa.text("SELECT n FROM effects")))


def outbox_rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT id, CAST(message_id AS text) AS message_id, topic, key, payload, "
                    "header_names, header_values FROM outbox_messages ORDER BY id"
                )
            )
        )


def dlq_replay(db_url: str, broker: Broker, topic: str, *extra: str) -> tuple[int, str, str]:
    args = ["dlq", "replay", "--db-url", db_url, "--bootstrap-servers", broker.bootstrap]
    result = run_cli("outbox", [*args, "--topic", topic, *extra], in_process=True)
    return result.returncode, result.stdout, result.stderr


def test_dead_letters_are_replayed_once_through_the_outbox(
    engine: sa.Engine, db_url: str, broker: Broker
) -> None:
    create_effects_table(engine)
    topic = broker.create_topic(partitions=2)
    dlq = broker.create_topic(f"{topic}.dlq", partitions=2)
    outbox = Outbox()
    with Session(engine) as session, session.begin():
        for n in range(6):
            outbox.publish(session, topic, {"n": n}, key=f"k{n % 3}", headers={"trace": f"t{n}"})
    relay_once(db_url, broker)

    def refuse_1_and_4(session: Session, message: IncomingMessage) -> None:
        if json.loads(message.value or b"")["n"] in (1, 4):
            raise PoisonMessage("order cannot be paid")
        record_effect(session, message)

    stats = consume(db_url, broker, topic, refuse_1_and_4, 6)
    assert (stats.processed, stats.dead_lettered) == (4, 2)
    relay_once(db_url, broker)  # the dead letters go out to <topic>.dlq
    letters = broker.read_all(dlq, expect=2)
    assert len(letters) == 2
    originals = {json.loads(m.value or b"")["n"]: m for m in broker.read_all(topic, expect=6)}

    # A minimal dead letter (one dlq-envelope header), and a message that is no dead letter.
    envelope = {
        "topic": topic,
        "partition": 0,
        "offset": 99,
        "consumer": "payments",
        "attempts": 1,
        "reason": "poison",
        "error": "x",
        "dead_letter_error": "y",
        "idempotency_key": "orig-7",
        "headers": [
            ["message-id", base64.b64encode(b"orig-7").decode()],
            ["content-type", base64.b64encode(b"application/json").decode()],
        ],
    }
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    producer.produce(
        dlq,
        key=b"k7",
        value=b'{"n": 7}',
        headers=[("message-id", b"letter-7"), ("dlq-envelope", json.dumps(envelope).encode())],
    )
    producer.produce(dlq, key=b"x", value=b"not a dead letter", headers=[("message-id", b"z")])
    producer.flush(10)
    with engine.connect() as conn:
        conn.execute(sa.text("DELETE FROM outbox_messages"))
        conn.commit()

    # A dry run counts and writes nothing.
    code, out, err = dlq_replay(db_url, broker, dlq, "--dry-run")
    assert code == 0, err
    assert out == f"would replay 3, would skip 0 already replayed, 1 unreadable (to {topic} 3)\n"
    assert "no dlq-original-topic or dlq-envelope header" in err
    assert outbox_rows(engine) == []

    code, out, err = dlq_replay(db_url, broker, dlq, "--log-format", "json")
    assert code == 0, err
    assert out == f"replayed 3, skipped 0 already replayed, 1 unreadable (to {topic} 3)\n"
    rows = outbox_rows(engine)
    assert len(rows) == 3
    letter_ids = {m.headers["dlq-original-message-id"]: m.message_id for m in letters}
    by_value = {json.loads(r.payload)["n"]: r for r in rows}
    assert sorted(by_value) == [1, 4, 7]
    for n in (1, 4):
        row, original = by_value[n], originals[n]
        assert (row.topic, row.key) == (topic, original.key)
        # The original headers after message-id, without any dlq-* header.
        assert list(zip(row.header_names, row.header_values, strict=True)) == [
            ("content-type", b"application/json"),
            ("trace", f"t{n}".encode()),
        ]
        letter_id = letter_ids[original.message_id.encode()]
        assert row.message_id == str(uuid.uuid5(REPLAY_NAMESPACE, letter_id))
    minimal = by_value[7]
    assert (minimal.topic, minimal.key) == (topic, b"k7")
    assert minimal.header_names == ["content-type"]
    assert minimal.message_id == str(uuid.uuid5(REPLAY_NAMESPACE, "letter-7"))
    with engine.connect() as conn:
        claims = conn.execute(
            sa.text("SELECT key FROM outbox_inbox WHERE consumer = :c ORDER BY key"),
            {"c": REPLAY_CONSUMER},
        ).scalars()
        assert sorted(claims) == sorted(
            f"dlq-replay:{i}" for i in [*letter_ids.values(), "letter-7"]
        )
        audit = conn.execute(sa.text("SELECT * FROM outbox_messages_audit")).all()
    assert [(a.action, sorted(a.message_ids)) for a in audit] == [
        ("dlq-replay", sorted(r.id for r in rows))
    ]
    assert json.loads(audit[0].detail)["dlq_topic"] == dlq
    logged = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [r["event"] for r in logged] == ["admin.replayed"]
    assert logged[0]["action"] == "dlq-replay" and logged[0]["count"] == 3

    # Again: nothing new, whether the rows are still in the outbox or already sent.
    code, out, _ = dlq_replay(db_url, broker, dlq)
    assert out == "replayed 0, skipped 3 already replayed, 1 unreadable\n"
    assert len(outbox_rows(engine)) == 3
    relay_once(db_url, broker)
    assert outbox_rows(engine) == []
    code, out, _ = dlq_replay(db_url, broker, dlq, "--limit", "1")
    assert out == "replayed 0, skipped 3 already replayed, 1 unreadable\n"

    # The consumer processes the replayed messages: new message ids, so its inbox, which
    # holds the dead-lettered ones, does not skip them.
    stats = consume(db_url, broker, topic, record_effect, 9)
    assert (stats.processed, stats.duplicates, stats.dead_lettered) == (3, 6, 0)
    assert effects(engine) == [0, 1, 2, 3, 4, 5, 7]


def test_limit_and_a_missing_topic(engine: sa.Engine, db_url: str, broker: Broker) -> None:
    topic = broker.create_topic(partitions=1)
    dlq = broker.create_topic(f"{topic}.dlq", partitions=1)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(3):
        headers: list[tuple[str, str | bytes | None]] = [
            ("message-id", f"letter-{i}".encode()),
            ("dlq-original-message-id", f"orig-{i}".encode()),
            ("dlq-original-topic", topic.encode()),
            ("dlq-original-partition", b"0"),
            ("dlq-original-offset", str(i).encode()),
            ("dlq-consumer", b"payments"),
            ("dlq-reason", b"attempts"),
            ("dlq-error", b"boom"),
            ("dlq-attempts", b"5"),
        ]
        producer.produce(dlq, key=b"k", value=f"v{i}".encode(), headers=headers)
    producer.flush(10)
    code, out, err = dlq_replay(db_url, broker, dlq, "--limit", "2")
    assert code == 0, err
    assert out == f"replayed 2, skipped 0 already replayed, 0 unreadable (to {topic} 2)\n"
    # In the dead letters' order: the key's order is kept.
    assert [bytes(r.payload) for r in outbox_rows(engine)] == [b"v0", b"v1"]
    code, out, _ = dlq_replay(db_url, broker, dlq)
    assert out == f"replayed 1, skipped 2 already replayed, 0 unreadable (to {topic} 1)\n"
    assert [bytes(r.payload) for r in outbox_rows(engine)] == [b"v0", b"v1", b"v2"]

    code, _, err = dlq_replay(db_url, broker, f"missing-{uuid.uuid4().hex[:8]}")
    assert code == 2
    [line] = [x for x in err.splitlines() if x.startswith("error")]
    assert "does not exist" in line
