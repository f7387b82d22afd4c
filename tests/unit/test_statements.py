"""Every statement builds and compiles for psycopg, with configurable, quoted names."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from outbox import ConfigurationError, define_tables
from outbox import statements as st
from outbox.message import EncodedMessage
from outbox.schema import OutboxTables

BUILDERS: dict[str, Callable[[OutboxTables], sa.TextClause]] = {
    "insert_messages": st.insert_messages,
    "claim": st.claim,
    "delete_sent": st.delete_sent,
    "mark_sent": st.mark_sent,
    "record_failures": st.record_failures,
    "replay_dead": st.replay_dead,
    "count_by_status": st.count_by_status,
    "probe_tables": st.probe_tables,
    "probe_failure_times": st.probe_failure_times,
    "listen": st.listen,
    "wake_relay": st.wake_relay,
    "discard_dead": st.discard_dead,
    "held_behind": st.held_behind,
    "list_dead": st.list_dead,
    "show_message": st.show_message,
    "insert_audit": st.insert_audit,
    "status_unsent": st.status_unsent,
    "status_sizes": st.status_sizes,
    "status_sent": st.status_sent,
    "oldest_sent": st.oldest_sent,
    "purge_sent": st.purge_sent,
    "existing_message_ids": st.existing_message_ids,
}

PARAMS = {
    "insert_messages": {
        "message_ids",
        "topics",
        "keys",
        "payloads",
        "header_from",
        "header_to",
        "header_names",
        "header_values",
        "lock_ids",
    },
    "claim": {"exclude", "limit"},
    "delete_sent": {"ids"},
    "mark_sent": {"ids"},
    "record_failures": {"ids", "errors", "delays", "max_attempts"},
    "replay_dead": {"ids", "topic"},
    "count_by_status": set(),
    "probe_tables": set(),
    "probe_failure_times": set(),
    "listen": set(),
    "wake_relay": set(),
    "discard_dead": {"ids"},
    "held_behind": {"ids"},
    "list_dead": {"topic", "key", "since", "limit"},
    "show_message": {"id", "preview"},
    "insert_audit": {"action", "ids", "os_user", "host", "detail"},
    "status_unsent": set(),
    "status_sizes": set(),
    "status_sent": set(),
    "oldest_sent": set(),
    "purge_sent": {"after", "limit", "age"},
    "existing_message_ids": {"message_ids"},
}


def bound_names(sql: str) -> set[str]:
    return set(re.findall(r"%\((\w+)\)s", sql))


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize(
    ("table", "schema", "qualified"),
    [
        ("outbox_messages", None, "outbox_messages"),
        ("events", "app", "app.events"),
        ("user", "select", '"select"."user"'),  # reserved words are quoted
    ],
)
def test_statements_compile_for_the_driver(
    name: str, table: str, schema: str | None, qualified: str
) -> None:
    tables = define_tables(table=table, schema=schema)
    sql = st.to_driver_sql(BUILDERS[name](tables))
    assert bound_names(sql) == PARAMS[name]
    assert ":" + "ids" not in sql  # no SQLAlchemy-style parameter left behind
    if name in ("listen", "wake_relay"):
        channel = tables.channel
        assert channel in sql
    elif name == "insert_audit":
        # "user" is reserved, "user_audit" is not.
        assert qualified.replace('"user"', "user") + "_audit" in sql
    else:
        assert qualified in sql


def test_builders_are_cached_per_tables() -> None:
    tables = define_tables()
    assert st.claim(tables) is st.claim(tables)
    assert st.to_driver_sql(st.claim(tables)) is st.to_driver_sql(st.claim(tables))


def test_leader_lock_statements() -> None:
    assert bound_names(st.to_driver_sql(st.try_leader_lock())) == {"lock_id"}


def test_notify_channel_is_quoted_as_a_literal() -> None:
    sql = st.to_driver_sql(st.insert_messages(define_tables(table="events", schema="app")))
    assert "pg_notify('app__events', '')" in sql


def test_lock_ids_are_stable_and_namespaced() -> None:
    a = define_tables()
    b = define_tables(table="events", schema="app")
    assert a.lock_id(b"t", b"k") == define_tables().lock_id(b"t", b"k")
    assert a.lock_id(b"t", b"k") != b.lock_id(b"t", b"k")
    # The separator keeps (topic, key) pairs apart.
    assert a.lock_id(b"ab", b"c") != a.lock_id(b"a", b"bc")
    assert a.leader_lock_id(7) != b.leader_lock_id(7)
    # A new epoch is a new lock; the same epoch, the same lock in every process.
    assert a.leader_lock_id(7) != a.leader_lock_id(8)
    assert a.leader_lock_id(7) == define_tables().leader_lock_id(7)
    assert -(2**63) <= a.lock_id(b"x") < 2**63


@pytest.mark.parametrize("bad", ["Events", "1abc", "a-b", "a.b", "", "x" * 49, "a b", 'a"b'])
def test_identifiers_are_validated(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        define_tables(table=bad)
    with pytest.raises(ConfigurationError):
        define_tables(schema=bad)


def test_the_inbox_cannot_share_a_name_with_the_other_tables() -> None:
    for name in ("events", "events_leader"):
        with pytest.raises(ConfigurationError, match="needs a name of its own"):
            define_tables(table="events", inbox_table=name)


def encoded(headers: int, key: bytes | None = b"k") -> EncodedMessage:
    return EncodedMessage(
        uuid.uuid4(), "t", key, b"{}", tuple((f"h{i}", bytes([i])) for i in range(headers))
    )


@pytest.mark.parametrize("headers", [0, 1, 2, st.SCALAR_HEADERS, st.SCALAR_HEADERS + 1])
def test_one_message_binds_exactly_its_headers(headers: int) -> None:
    """Up to SCALAR_HEADERS, each header is a parameter of its own (psycopg dumps lists in
    Python: a cost per publish); none, and the columns keep their defaults."""
    stmt, params = st.insert(DEFAULT, [encoded(headers)])
    sql = st.to_driver_sql(stmt)
    assert bound_names(sql) == set(params)
    base = {"message_id", "topic", "key", "payload", "lock_id"}
    if headers == 0:
        assert set(params) == base and "header_names" not in sql
    elif headers <= st.SCALAR_HEADERS:
        assert set(params) == base | {f"h{x}{i}" for x in "nv" for i in range(headers)}
        assert [params[f"hn{i}"] for i in range(headers)] == [f"h{i}" for i in range(headers)]
    else:
        assert set(params) == base | {"header_names", "header_values"}


@pytest.mark.parametrize("headers", [0, 1])
def test_several_messages_bind_header_arrays_only_when_some_has_headers(headers: int) -> None:
    stmt, params = st.insert(DEFAULT, [encoded(0), encoded(headers, key=None)])
    sql = st.to_driver_sql(stmt)
    assert bound_names(sql) == set(params)
    assert ("header_names" in params) is bool(headers)


DEFAULT = define_tables()
