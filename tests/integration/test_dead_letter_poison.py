"""Any message a Kafka producer can send can be dead-lettered, so a poison message never stops
its partition: the dead letter keeps the original bytes (key, value, headers in order), the
consumer goes on with the next message, and its offset moves past it. When even the full dead
letter cannot be stored, a minimal one is; when that fails too, the consumer stops before the
offset moves on. (The runner on the in-memory source; the database is real.)"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox.consumer import Consumer, ConsumerConfig, ConsumerStats
from outbox.deadletter import ENVELOPE, ESCAPED_NAME
from outbox.exceptions import DatabaseError
from outbox.transport.base import IncomingMessage
from outbox.transport.memory import MemorySource
from tests.support.handlers import create_effects_table, record_effect

TOPIC = "orders"
LONG_ID = b"m" * 600


@pytest.fixture
def effects(engine: sa.Engine) -> sa.Engine:
    return create_effects_table(engine)


def good(offset: int, topic: str = TOPIC) -> IncomingMessage:
    return IncomingMessage(
        topic=topic,
        partition=0,
        offset=offset,
        key=f"k{offset}".encode(),
        value=json.dumps({"n": offset}).encode(),
        headers=[("message-id", f"m-{offset}".encode())],
    )


def poison(
    offset: int, headers: list[tuple[str, bytes]], topic: str = TOPIC, value: bytes | None = None
) -> IncomingMessage:
    return IncomingMessage(
        topic=topic,
        partition=0,
        offset=offset,
        key=b"\x00poison\xff",
        value=b"\x00\xff not json \xfe" if value is None else value,
        headers=headers,
    )


def run(
    db_url: str, *messages: IncomingMessage, handler: Any = record_effect, **config: Any
) -> tuple[ConsumerStats, MemorySource]:
    settings: dict[str, Any] = {"max_attempts": 2, "retry_backoff_base": 0.001, **config}
    source = MemorySource(list(messages))
    consumer = Consumer(
        ConsumerConfig(db_url=db_url, name="payments", **settings),
        handler,
        lambda: source,
        rng=random.Random(1),
    )
    return consumer.run(max_messages=len(messages)), source


def effects_of(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT n FROM effects ORDER BY seq"))]


def dead_letters(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT topic, key, payload, header_names, header_values "
                    "FROM outbox_messages ORDER BY id"
                )
            )
        )


def headers_of(row: Any) -> list[tuple[str, bytes]]:
    return list(zip(row.header_names, row.header_values, strict=True))


def dlq_headers(row: Any) -> dict[str, bytes]:
    return {n: v for n, v in headers_of(row) if n.startswith("dlq-")}


#: (the poison message's headers, the headers its dead letter starts with)
POISON: dict[str, tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]] = {
    # An empty name: the table and Kafka hold it, so it is kept as it is.
    "empty-header-name": ([("", b"x")], [("", b"x")]),
    "nul-and-non-utf8-values": (
        [("h", b"a\x00b"), ("bin", b"\xff\xfe"), ("h", b"")],
        [("h", b"a\x00b"), ("bin", b"\xff\xfe"), ("h", b"")],
    ),
    # Only a source other than Kafka can give such names; text cannot hold them: base64.
    "unstorable-header-names": (
        [("a\x00b", b"1"), ("x\udcff", b"2"), ("ok", b"3")],
        [
            (ESCAPED_NAME + base64.b64encode(b"a\x00b").decode(), b"1"),
            (ESCAPED_NAME + base64.b64encode(b"x\xed\xb3\xbf").decode(), b"2"),
            ("ok", b"3"),
        ],
    ),
    "long-header-name": ([("n" * 5000, b"v")], [("n" * 5000, b"v")]),
}


@pytest.mark.parametrize("form", list(POISON))
def test_a_poison_message_without_a_key_is_dead_lettered_with_its_bytes(
    effects: sa.Engine, db_url: str, form: str
) -> None:
    headers, kept = POISON[form]
    bad = poison(1, headers)
    stats, source = run(db_url, good(0), bad, good(2), good(3))
    assert (stats.processed, stats.dead_lettered) == (3, 1)
    assert effects_of(effects) == [0, 2, 3]
    assert source.committed == {(TOPIC, 0): 4}
    [row] = dead_letters(effects)
    assert (row.topic, row.key, row.payload) == (f"{TOPIC}.dlq", bad.key, bad.value)
    stored = headers_of(row)
    assert stored[: len(kept)] == kept
    assert stored[len(kept) :] == [
        ("dlq-original-topic", TOPIC.encode()),
        ("dlq-original-partition", b"0"),
        ("dlq-original-offset", b"1"),
        ("dlq-consumer", b"payments"),
        ("dlq-reason", b"no-key"),
        ("dlq-error", b"no idempotency key (message-id header)"),
        ("dlq-attempts", b"0"),
    ]


@pytest.mark.parametrize(
    "message_id", [LONG_ID, b"m\x00x", b"m" * 512], ids=["600-bytes", "nul", "512-bytes"]
)
def test_a_key_the_inbox_cannot_hold_is_hashed_and_kept_whole_in_a_header(
    effects: sa.Engine, db_url: str, message_id: bytes
) -> None:
    bad = poison(1, [("a", b"1"), ("message-id", message_id), ("b", b"2")], value=b'{"n": 1}')
    stats, source = run(db_url, good(0), bad, good(2))
    assert source.committed == {(TOPIC, 0): 3}
    key = message_id.decode()
    if len(message_id) == 512:
        # The longest key the inbox holds: an ordinary message.
        assert (stats.processed, stats.dead_lettered) == (3, 0)
        return
    if b"\x00" not in message_id:
        # Too long for the inbox: claimed by its digest and handled like any message; a
        # redelivery is a duplicate.
        assert (stats.processed, stats.dead_lettered, stats.failed_attempts) == (3, 0, 0)
        with effects.connect() as conn:
            keys = [r[0] for r in conn.execute(sa.text("SELECT key FROM outbox_inbox"))]
        assert "sha256:" + hashlib.sha256(key.encode()).hexdigest() in keys
        stats, _ = run(db_url, bad)
        assert (stats.processed, stats.duplicates) == (0, 1)
        return
    # A NUL: claimed by its digest too, but this handler stores the message id as text,
    # which cannot hold a NUL: it fails and the message is dead-lettered.
    assert (stats.processed, stats.dead_lettered) == (2, 1)
    assert effects_of(effects) == [0, 2]
    [row] = dead_letters(effects)
    assert (row.key, row.payload) == (bad.key, bad.value)
    assert headers_of(row)[:3] == [
        ("a", b"1"),
        ("dlq-original-message-id", message_id),
        ("b", b"2"),
    ]
    assert dlq_headers(row)["dlq-idempotency-key"] == message_id
    assert dlq_headers(row)["dlq-attempts"] == b"2"
    with effects.connect() as conn:
        keys = [r[0] for r in conn.execute(sa.text("SELECT key FROM outbox_inbox ORDER BY key"))]
    assert "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest() in keys

    # Redelivered: dead-lettered once (the hashed key is in the inbox).
    stats, _ = run(db_url, bad)
    assert (stats.dead_lettered, stats.duplicates) == (0, 1)
    assert len(dead_letters(effects)) == 1


def test_a_handler_error_text_that_utf8_or_text_cannot_hold(
    effects: sa.Engine, db_url: str
) -> None:
    def handler(session: Session, message: IncomingMessage) -> None:
        if message.offset == 1:
            raise ValueError("bad \udcff byte, \x00 too")
        record_effect(session, message)

    stats, source = run(db_url, good(0), good(1), good(2), handler=handler, max_attempts=1)
    assert (stats.processed, stats.dead_lettered) == (2, 1)
    assert source.committed == {(TOPIC, 0): 3}
    [row] = dead_letters(effects)
    assert dlq_headers(row)["dlq-error"] == b"ValueError: bad \\udcff byte, \x00 too"


def test_a_topic_too_long_for_the_suffix(effects: sa.Engine, db_url: str) -> None:
    topic = "t" * 249
    stats, source = run(db_url, good(0, topic), poison(1, [], topic=topic), good(2, topic))
    assert (stats.processed, stats.dead_lettered) == (2, 1)
    assert source.committed == {(topic, 0): 3}
    [row] = dead_letters(effects)
    assert row.topic == "t" * 245 + ".dlq"
    assert dlq_headers(row)["dlq-original-topic"] == topic.encode()


# -- when the full dead letter cannot be stored ---------------------------------------------------

REFUSE = """
CREATE FUNCTION refuse_dead_letters() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(NEW.header_names) > {most} THEN
        RAISE EXCEPTION 'no room for %% headers', cardinality(NEW.header_names);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER refuse_dead_letters BEFORE INSERT ON outbox_messages
FOR EACH ROW EXECUTE FUNCTION refuse_dead_letters();
"""


def refuse_dead_letters(engine: sa.Engine, most: int) -> None:
    """Make every insert with more than ``most`` headers fail: an error retrying cannot fix."""
    with engine.begin() as conn:
        conn.exec_driver_sql(REFUSE.replace("{most}", str(most)))


def test_a_dead_letter_that_cannot_be_stored_falls_back_to_the_minimal_form(
    effects: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    refuse_dead_letters(effects, most=1)
    headers = [("", b"x"), ("message-id", LONG_ID), ("bin", b"\x00\xff"), ("bin", b"")]
    bad = poison(1, headers)

    def handler(session: Session, message: IncomingMessage) -> None:
        if message.offset == 1:
            raise ValueError("this message always fails")
        record_effect(session, message)

    with caplog.at_level(logging.ERROR, logger="outbox.consumer"):
        stats, source = run(db_url, good(0), bad, good(2), handler=handler)
    assert (stats.processed, stats.dead_lettered) == (2, 1)
    assert effects_of(effects) == [0, 2]
    assert source.committed == {(TOPIC, 0): 3}
    [row] = dead_letters(effects)
    assert (row.topic, row.key, row.payload) == (f"{TOPIC}.dlq", bad.key, bad.value)
    [(name, data)] = headers_of(row)
    assert name == ENVELOPE
    envelope = json.loads(data.decode("ascii"))
    assert envelope == {
        "topic": TOPIC,
        "partition": 0,
        "offset": 1,
        "consumer": "payments",
        "attempts": 2,
        "reason": "attempts",
        "error": envelope["error"],
        "dead_letter_error": envelope["dead_letter_error"],
        "idempotency_key": LONG_ID.decode(),
        "headers": [[n, base64.b64encode(v).decode()] for n, v in headers],
    }
    assert envelope["error"] == "ValueError: this message always fails"
    assert envelope["dead_letter_error"].startswith("DatabaseError: dead-letter failed:")
    assert "no room for" in envelope["dead_letter_error"]
    assert [r.event for r in caplog.records if hasattr(r, "event")] == [
        "consumer.dead_letter_minimal",
        "consumer.dead_lettered",
    ]


def test_when_the_minimal_form_fails_too_the_consumer_stops_before_the_offset(
    effects: sa.Engine, db_url: str
) -> None:
    refuse_dead_letters(effects, most=0)
    with pytest.raises(DatabaseError, match="no room for 1 headers"):
        run(db_url, good(0), poison(1, [("h", b"v")]), good(2))
    # Not lost: the poison message is read again at the next start.
    assert effects_of(effects) == [0]
    assert dead_letters(effects) == []


def test_an_over_long_key_is_handled_once_without_failed_attempts(
    engine: sa.Engine, db_url: str
) -> None:
    # Helper-era behaviour: the claim refused a 600-byte message-id, so the handler path burnt
    # max_attempts before the dead-letter path hashed it. Now the claim hashes it too.
    from outbox.consumer import Consumer, ConsumerConfig
    from outbox.transport.base import IncomingMessage
    from outbox.transport.memory import MemorySource

    calls: list[int] = []
    long_id = "x" * 600
    msg = IncomingMessage("orders", 0, 0, b"k", b"{}", [("message-id", long_id.encode())])
    source = MemorySource([msg, msg])  # and a redelivery
    config = ConsumerConfig(db_url=db_url, name="long", retry_backoff_base=0.001)
    stats = Consumer(config, lambda s, m: calls.append(1), lambda: source).run(max_messages=2)
    assert (stats.processed, stats.duplicates, stats.failed_attempts) == (1, 1, 0)
    assert calls == [1]
