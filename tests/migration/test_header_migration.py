"""Revision ``outbox_0004``: the ``headers jsonb`` object of existing rows becomes the ordered
``header_names`` / ``header_values`` arrays, which the relay then sends; the downgrade turns
them back into an object where it can (order, repeated names and values that are not UTF-8
text are lost). The relay of this release needs the leader table of ``outbox_0005`` and the
failure times of ``outbox_0006`` too: the tests that relay upgrade to head, through all of
them."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from outbox import Outbox, Relay, RelayConfig, migrate, statements, uuid7
from outbox.consumer import Consumer, ConsumerConfig
from outbox.exceptions import DatabaseError, MissingTablesError
from outbox.message import EncodedMessage
from outbox.testing import drain
from outbox.transport.memory import MemorySource, MemoryTransport
from tests.support.migration import engine, qualified

BEFORE = "outbox_0003"
HEADERS = "outbox_0004"
LEADER = "outbox_0005"
HEAD = "outbox_0006"

NAMES = [
    pytest.param("outbox_messages", None, id="default"),
    pytest.param("events_out", "messaging", id="custom"),
]


def _rows(url: str, rel: str, columns: str) -> list[Any]:
    eng = engine(url)
    try:
        with eng.connect() as conn:
            return list(conn.execute(sa.text(f"SELECT {columns} FROM {rel} ORDER BY id")))
    finally:
        eng.dispose()


@pytest.mark.parametrize(("table", "schema"), NAMES)
def test_upgrade_turns_the_object_into_ordered_arrays(
    empty_db_url: str, table: str, schema: str | None
) -> None:
    url = empty_db_url
    rel = qualified(table, schema)
    migrate.upgrade(url, table=table, schema=schema, revision=BEFORE)
    objects = [
        {"content-type": "application/json", "trace": "abc", "zoë": "€ uro"},
        {},
        # Only a hand-written row holds other JSON values: they keep their JSON text.
        {"n": 5, "flag": True, "none": None, "obj": {"a": 1}},
    ]
    eng = engine(url)
    try:
        with eng.begin() as conn:
            for headers in objects:
                conn.execute(
                    sa.text(
                        f"INSERT INTO {rel} (message_id, topic, payload, headers) "
                        "VALUES (:m, 'orders', 'x', CAST(:h AS jsonb))"
                    ),
                    {"m": uuid.uuid4(), "h": json.dumps(headers)},
                )
            # What the relay of outbox_0003 would have sent, in the object's (jsonb's) order.
            stored = [
                list(json.loads(r[0]).items())
                for r in conn.execute(sa.text(f"SELECT headers::text FROM {rel} ORDER BY id"))
            ]
    finally:
        eng.dispose()

    migrate.upgrade(url, table=table, schema=schema)
    assert migrate.current(url, schema=schema) == HEAD
    rows = _rows(url, rel, "header_names, header_values")
    assert [r.header_names for r in rows] == [[k for k, _ in s] for s in stored]
    assert rows[0].header_values == [str(v).encode() for _, v in stored[0]]
    assert dict(zip(rows[0].header_names, rows[0].header_values, strict=True)) == {
        "content-type": b"application/json",
        "trace": b"abc",
        "zoë": "€ uro".encode(),
    }
    assert rows[1].header_names == [] and rows[1].header_values == []
    assert dict(zip(rows[2].header_names, rows[2].header_values, strict=True)) == {
        "n": b"5",
        "flag": b"true",
        "none": b"null",
        "obj": b'{"a": 1}',
    }

    # The relay sends them: message-id first, then in stored order.
    sent = drain(url, table=table, schema=schema)
    assert [[n for n, _ in m.headers] for m in sent] == [
        ["message-id", *(k for k, _ in s)] for s in stored
    ]
    assert sent[0].headers[1:] == list(zip(rows[0].header_names, rows[0].header_values))


@pytest.mark.parametrize(("table", "schema"), NAMES)
def test_downgrade_keeps_what_jsonb_can_hold(
    empty_db_url: str, table: str, schema: str | None
) -> None:
    url = empty_db_url
    rel = qualified(table, schema)
    migrate.upgrade(url, table=table, schema=schema)
    tables = Outbox(table=table, schema=schema).tables
    headers = (
        ("content-type", b"application/octet-stream"),
        ("b", b"first"),
        ("a", "é".encode()),
        ("b", b"last"),  # repeated: the last one wins
        ("bin", b"\xff\xfe"),  # not UTF-8: dropped
        ("nul", b"a\x00b"),  # jsonb holds no NUL: dropped
        ("", b"empty name"),  # publish refuses it, a dead letter keeps it; jsonb holds it
    )
    letters = [
        EncodedMessage(uuid7(), "orders", None, b"x", headers),
        EncodedMessage(uuid7(), "orders", None, None, ()),
    ]
    eng = engine(url)
    try:
        with eng.begin() as conn:
            conn.execute(*statements.insert(tables, letters))
    finally:
        eng.dispose()

    # Down to the revision before the arrays: the audit table and the leader table go first
    # (outbox_0006, outbox_0005), then the arrays (outbox_0004).
    migrate.downgrade(url, table=table, schema=schema, revision=HEADERS)
    assert migrate.current(url, schema=schema) == HEADERS
    assert _rows(url, rel, "header_names")[0].header_names[:2] == ["content-type", "b"]
    migrate.downgrade(url, table=table, schema=schema, revision="-1")
    assert migrate.current(url, schema=schema) == BEFORE
    rows = _rows(url, rel, "headers")
    assert [r.headers for r in rows] == [
        {
            "content-type": "application/octet-stream",
            "b": "last",
            "a": "é",
            "": "empty name",
        },
        {},
    ]

    # And up again: the rows come back with arrays, in jsonb's key order.
    migrate.upgrade(url, table=table, schema=schema)
    rows = _rows(url, rel, "header_names, header_values")
    assert sorted(zip(rows[0].header_names, rows[0].header_values)) == sorted(
        [
            ("content-type", b"application/octet-stream"),
            ("b", b"last"),
            ("a", "é".encode()),
            ("", b"empty name"),
        ]
    )
    assert (rows[1].header_names, rows[1].header_values) == ([], [])


def test_the_table_refuses_mismatched_or_null_headers(db_url: str) -> None:
    """The check constraint: one value per name, no NULL element (the relay relies on it)."""
    eng = engine(db_url)
    bad = [
        ("ARRAY['a', 'b']", "ARRAY['\\x01'::bytea]"),
        ("ARRAY['a']", "ARRAY[NULL::bytea]"),
        ("ARRAY[NULL::text]", "ARRAY['\\x01'::bytea]"),
    ]
    try:
        for names, values in bad:
            with (
                pytest.raises(sa.exc.IntegrityError, match="ck_outbox_messages_headers"),
                eng.begin() as conn,
            ):
                conn.execute(
                    sa.text(
                        "INSERT INTO outbox_messages (message_id, topic, header_names, "
                        f"header_values) VALUES (:m, 't', {names}, {values})"
                    ),
                    {"m": uuid.uuid4()},
                )
    finally:
        eng.dispose()


def test_a_relay_on_tables_before_the_revision_says_so_at_start(empty_db_url: str) -> None:
    """This release's relay needs ``outbox_0006`` (the header arrays of ``outbox_0004``, the
    leader table, the failure times), its consumer ``outbox_0004``: their start-up check fails
    on older tables instead of every claim, failure or dead letter failing later."""
    migrate.upgrade(empty_db_url, revision=BEFORE)
    relay = Relay(RelayConfig(db_url=empty_db_url), MemoryTransport)
    with pytest.raises(DatabaseError, match="header_names"):
        relay.check()
    consumer = Consumer(
        ConsumerConfig(db_url=empty_db_url, name="c"), lambda s, m: None, MemorySource
    )
    with pytest.raises(MissingTablesError, match="older than this version"):
        consumer.check()

    # The header arrays, but no leader table yet: the relay cannot find its epoch; the
    # consumer, which never leads, needs no more.
    migrate.upgrade(empty_db_url, revision=HEADERS)
    with pytest.raises(MissingTablesError, match="outbox db upgrade"):
        relay.check()
    consumer.check()

    # The leader table, but not the failure times the relay records.
    migrate.upgrade(empty_db_url, revision=LEADER)
    with pytest.raises(MissingTablesError, match=r"no first_failed_at.*outbox db upgrade"):
        relay.check()
    consumer.check()

    migrate.upgrade(empty_db_url)
    relay.check()
    consumer.check()
