"""``outbox.migrate``: upgrade, downgrade to base, upgrade again, on an empty database, with the
default names and with a custom table, inbox table and schema; the revisions one at a time
(``outbox_0001`` the outbox table, ``outbox_0002`` the inbox, ``outbox_0003`` their autovacuum
settings, ``outbox_0004`` the ordered header arrays: see also test_header_migration.py,
``outbox_0005`` the relays' leader epoch table, ``outbox_0006`` the audit table and the failure
times)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from outbox import migrate
from outbox.exceptions import ConfigurationError
from outbox.schema import DEFAULT_INBOX_TABLE, DEFAULT_TABLE
from tests.support.migration import engine, qualified, scalars, schemas_in, tables_in

FIRST = "outbox_0001"
INBOX = "outbox_0002"
AUTOVACUUM = "outbox_0003"
HEADERS = "outbox_0004"
LEADER = "outbox_0005"
HEAD = "outbox_0006"

NAMES = [
    pytest.param(DEFAULT_TABLE, None, DEFAULT_INBOX_TABLE, id="default"),
    pytest.param("events_out", "messaging", "events_in", id="custom"),
]


def _oid(db_url: str, table: str, schema: str | None) -> int | None:
    eng = engine(db_url)
    try:
        with eng.connect() as conn:
            return conn.execute(
                sa.text("SELECT to_regclass(:rel)::oid"), {"rel": qualified(table, schema)}
            ).scalar()
    finally:
        eng.dispose()


def _insert(db_url: str, table: str, schema: str | None) -> None:
    eng = engine(db_url)
    try:
        with eng.begin() as conn:
            conn.execute(
                sa.text(
                    f"INSERT INTO {qualified(table, schema)} (message_id, topic) VALUES (:m, 't')"
                ),
                {"m": uuid.uuid4()},
            )
    finally:
        eng.dispose()


def _epochs(db_url: str, table: str, schema: str | None) -> list[Any]:
    """The epochs in the leader table of ``table``: one, seeded by revision outbox_0005."""
    return scalars(db_url, f"SELECT epoch FROM {qualified(f'{table}_leader', schema)}")


def _failure_columns(db_url: str, table: str, schema: str | None) -> list[Any]:
    """The failure-time columns of revision outbox_0006 that the outbox table has."""
    return scalars(
        db_url,
        "SELECT attname::text FROM pg_attribute WHERE attrelid = "
        f"to_regclass('{qualified(table, schema)}') AND NOT attisdropped "
        "AND attname IN ('first_failed_at', 'last_failed_at') ORDER BY attname",
    )


def _insert_inbox(db_url: str, table: str, schema: str | None) -> None:
    eng = engine(db_url)
    try:
        with eng.begin() as conn:
            conn.execute(
                sa.text(
                    f"INSERT INTO {qualified(table, schema)} (consumer, key, expires_at) "
                    "VALUES ('c', :k, now() + interval '1 day')"
                ),
                {"k": str(uuid.uuid4())},
            )
    finally:
        eng.dispose()


@pytest.mark.parametrize(("table", "schema", "inbox"), NAMES)
def test_upgrade_downgrade_upgrade(
    empty_db_url: str, table: str, schema: str | None, inbox: str
) -> None:
    url = empty_db_url
    names: dict[str, Any] = {"table": table, "schema": schema, "inbox_table": inbox}
    where = schema or "public"
    outbox_table = f"{where}.{table}"
    inbox_table = f"{where}.{inbox}"
    leader_table = f"{where}.{table}_leader"
    audit_table = f"{where}.{table}_audit"
    version_table = f"{where}.{migrate.VERSION_TABLE}"
    assert migrate.current(url, schema=schema) is None
    assert tables_in(url) == set()
    if schema:
        assert schema not in schemas_in(url)

    migrate.upgrade(url, **names)
    assert migrate.current(url, schema=schema) == HEAD
    assert tables_in(url) == {outbox_table, inbox_table, leader_table, audit_table, version_table}
    assert scalars(url, f"SELECT version_num FROM {version_table}") == [HEAD]
    oid = _oid(url, table, schema)
    inbox_oid = _oid(url, inbox, schema)
    leader_oid = _oid(url, f"{table}_leader", schema)
    assert oid is not None and inbox_oid is not None and leader_oid is not None
    (epoch,) = _epochs(url, table, schema)
    assert epoch is not None

    # Again: a no-op. The tables are not recreated and keep their rows (the epoch too).
    _insert(url, table, schema)
    _insert_inbox(url, inbox, schema)
    migrate.upgrade(url, **names)
    assert migrate.current(url, schema=schema) == HEAD
    assert _oid(url, table, schema) == oid
    assert _oid(url, inbox, schema) == inbox_oid
    assert _oid(url, f"{table}_leader", schema) == leader_oid
    assert scalars(url, f"SELECT count(*) FROM {outbox_table}") == [1]
    assert scalars(url, f"SELECT count(*) FROM {inbox_table}") == [1]
    assert _epochs(url, table, schema) == [epoch]
    assert scalars(url, f"SELECT version_num FROM {version_table}") == [HEAD]

    migrate.downgrade(url, **names, revision="base")
    assert migrate.current(url, schema=schema) is None
    # Alembic keeps its (now empty) version table; the schema stays too.
    assert tables_in(url) == {version_table}
    assert scalars(url, f"SELECT count(*) FROM {version_table}") == [0]

    migrate.upgrade(url, **names)
    assert migrate.current(url, schema=schema) == HEAD
    assert tables_in(url) == {outbox_table, inbox_table, leader_table, audit_table, version_table}
    assert scalars(url, f"SELECT count(*) FROM {outbox_table}") == [0]
    assert scalars(url, f"SELECT count(*) FROM {inbox_table}") == [0]
    # A new leader table, with a new random epoch.
    (again,) = _epochs(url, table, schema)
    assert again is not None and again != epoch


@pytest.mark.parametrize(("table", "schema", "inbox"), NAMES)
def test_one_revision_at_a_time(
    empty_db_url: str, table: str, schema: str | None, inbox: str
) -> None:
    """An outbox installed before the inbox existed (``outbox_0001``) gets the inbox from the
    second revision, keeping its messages; ``-1`` from head only removes the audit table and
    the failure times, ``-1`` again only the leader table, ``-1`` again only turns the header
    arrays back into jsonb, ``-1`` again only resets the autovacuum settings, ``-1`` again
    removes only the inbox."""
    url = empty_db_url
    names: dict[str, Any] = {"table": table, "schema": schema, "inbox_table": inbox}
    where = schema or "public"
    outbox_table = f"{where}.{table}"
    inbox_table = f"{where}.{inbox}"
    leader_table = f"{where}.{table}_leader"
    audit_table = f"{where}.{table}_audit"
    version_table = f"{where}.{migrate.VERSION_TABLE}"

    migrate.upgrade(url, **names, revision=FIRST)
    assert migrate.current(url, schema=schema) == FIRST
    assert tables_in(url) == {outbox_table, version_table}
    _insert(url, table, schema)
    oid = _oid(url, table, schema)

    migrate.upgrade(url, **names)
    assert migrate.current(url, schema=schema) == HEAD
    assert tables_in(url) == {outbox_table, inbox_table, leader_table, audit_table, version_table}
    assert _oid(url, table, schema) == oid
    assert scalars(url, f"SELECT count(*) FROM {outbox_table}") == [1]
    assert len(_epochs(url, table, schema)) == 1
    _insert_inbox(url, inbox, schema)

    migrate.downgrade(url, **names, revision="-1")
    assert migrate.current(url, schema=schema) == LEADER
    assert tables_in(url) == {outbox_table, inbox_table, leader_table, version_table}
    assert _oid(url, table, schema) == oid
    assert scalars(url, f"SELECT count(*) FROM {outbox_table}") == [1]
    assert _failure_columns(url, table, schema) == []

    migrate.downgrade(url, **names, revision="-1")
    assert migrate.current(url, schema=schema) == HEADERS
    assert tables_in(url) == {outbox_table, inbox_table, version_table}
    assert _oid(url, table, schema) == oid
    assert scalars(url, f"SELECT count(*) FROM {outbox_table}") == [1]
    assert scalars(url, f"SELECT count(*) FROM {inbox_table}") == [1]

    migrate.downgrade(url, **names, revision="-1")
    assert migrate.current(url, schema=schema) == AUTOVACUUM
    assert tables_in(url) == {outbox_table, inbox_table, version_table}
    assert _oid(url, table, schema) == oid
    assert scalars(url, f"SELECT count(*) FROM {outbox_table}") == [1]

    migrate.downgrade(url, **names, revision="-1")
    assert migrate.current(url, schema=schema) == INBOX
    assert tables_in(url) == {outbox_table, inbox_table, version_table}
    assert scalars(url, f"SELECT count(*) FROM {inbox_table}") == [1]

    migrate.downgrade(url, **names, revision="-1")
    assert migrate.current(url, schema=schema) == FIRST
    assert tables_in(url) == {outbox_table, version_table}
    assert _oid(url, table, schema) == oid
    assert scalars(url, f"SELECT count(*) FROM {outbox_table}") == [1]

    # Relative steps up work too, and `head` afterwards is a no-op.
    migrate.upgrade(url, **names, revision="+1")
    assert migrate.current(url, schema=schema) == INBOX
    migrate.upgrade(url, **names, revision="+1")
    assert migrate.current(url, schema=schema) == AUTOVACUUM
    migrate.upgrade(url, **names, revision="+1")
    assert migrate.current(url, schema=schema) == HEADERS
    assert tables_in(url) == {outbox_table, inbox_table, version_table}
    migrate.upgrade(url, **names, revision="+1")
    assert migrate.current(url, schema=schema) == LEADER
    assert tables_in(url) == {outbox_table, inbox_table, leader_table, version_table}
    migrate.upgrade(url, **names, revision="+1")
    assert migrate.current(url, schema=schema) == HEAD
    assert tables_in(url) == {outbox_table, inbox_table, leader_table, audit_table, version_table}
    assert _failure_columns(url, table, schema) == ["first_failed_at", "last_failed_at"]
    assert scalars(url, f"SELECT count(*) FROM {inbox_table}") == [0]
    assert len(_epochs(url, table, schema)) == 1
    migrate.upgrade(url, **names)
    assert migrate.current(url, schema=schema) == HEAD
    assert len(_epochs(url, table, schema)) == 1

    migrate.downgrade(url, **names, revision=FIRST)
    migrate.downgrade(url, **names, revision="-1")
    assert migrate.current(url, schema=schema) is None
    assert tables_in(url) == {version_table}


@pytest.mark.parametrize(("table", "schema", "inbox"), NAMES)
def test_leader_table_holds_one_row(
    empty_db_url: str, table: str, schema: str | None, inbox: str
) -> None:
    """Revision ``outbox_0005`` seeds the leader table with one row, and the table holds no
    other: its key can only be true."""
    url = empty_db_url
    migrate.upgrade(url, table=table, schema=schema, inbox_table=inbox)
    leader = qualified(f"{table}_leader", schema)
    assert scalars(url, f"SELECT one FROM {leader}") == [True]
    eng = engine(url)
    try:
        for one, constraint in (
            ("true", f"pk_{table}_leader"),
            ("false", f"ck_{table}_leader_one"),
        ):
            with pytest.raises(sa.exc.IntegrityError, match=constraint), eng.begin() as conn:
                conn.execute(sa.text(f"INSERT INTO {leader} (one, epoch) VALUES ({one}, 1)"))
        with pytest.raises(sa.exc.IntegrityError, match="epoch"), eng.begin() as conn:
            conn.execute(sa.text(f"UPDATE {leader} SET epoch = NULL"))
    finally:
        eng.dispose()
    assert len(_epochs(url, table, schema)) == 1


def test_custom_schema_is_separate_from_default(empty_db_url: str) -> None:
    """Each schema has its own version table: an outbox in one schema does not hide another."""
    url = empty_db_url
    migrate.upgrade(url, table="events_out", schema="messaging")
    assert migrate.current(url) is None
    assert migrate.current(url, schema="messaging") == HEAD

    migrate.upgrade(url)
    assert migrate.current(url) == HEAD
    assert tables_in(url) == {
        "messaging.events_out",
        f"messaging.{DEFAULT_INBOX_TABLE}",
        "messaging.events_out_leader",
        "messaging.events_out_audit",
        f"messaging.{migrate.VERSION_TABLE}",
        f"public.{DEFAULT_TABLE}",
        f"public.{DEFAULT_INBOX_TABLE}",
        f"public.{DEFAULT_TABLE}_leader",
        f"public.{DEFAULT_TABLE}_audit",
        f"public.{migrate.VERSION_TABLE}",
    }

    migrate.downgrade(url, table="events_out", schema="messaging")
    assert migrate.current(url, schema="messaging") is None
    assert migrate.current(url) == HEAD
    assert tables_in(url) == {
        f"messaging.{migrate.VERSION_TABLE}",
        f"public.{DEFAULT_TABLE}",
        f"public.{DEFAULT_INBOX_TABLE}",
        f"public.{DEFAULT_TABLE}_leader",
        f"public.{DEFAULT_TABLE}_audit",
        f"public.{migrate.VERSION_TABLE}",
    }


def test_custom_table_in_default_schema(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url, table="events_out")
    assert migrate.current(empty_db_url) == HEAD
    assert tables_in(empty_db_url) == {
        "public.events_out",
        f"public.{DEFAULT_INBOX_TABLE}",
        "public.events_out_leader",
        "public.events_out_audit",
        f"public.{migrate.VERSION_TABLE}",
    }


def test_second_table_in_same_schema_is_refused(empty_db_url: str) -> None:
    """The version table is per schema: a second outbox table in a schema that has one would be
    recorded as installed without being created. ``upgrade`` says so instead of succeeding."""
    url = empty_db_url
    migrate.upgrade(url)
    with pytest.raises(ConfigurationError, match="--schema"):
        migrate.upgrade(url, table="events_out")
    assert tables_in(url) == {
        f"public.{DEFAULT_TABLE}",
        f"public.{DEFAULT_INBOX_TABLE}",
        f"public.{DEFAULT_TABLE}_leader",
        f"public.{DEFAULT_TABLE}_audit",
        f"public.{migrate.VERSION_TABLE}",
    }
    assert migrate.current(url) == HEAD


def test_inbox_under_another_name_is_refused(empty_db_url: str) -> None:
    """Same for the inbox: at head with the inbox installed as ``outbox_inbox``, an
    upgrade naming another inbox would report success while that table does not exist."""
    url = empty_db_url
    migrate.upgrade(url)
    with pytest.raises(ConfigurationError, match="--inbox-table") as info:
        migrate.upgrade(url, inbox_table="dedup")
    assert "'dedup'" in str(info.value)
    assert tables_in(url) == {
        f"public.{DEFAULT_TABLE}",
        f"public.{DEFAULT_INBOX_TABLE}",
        f"public.{DEFAULT_TABLE}_leader",
        f"public.{DEFAULT_TABLE}_audit",
        f"public.{migrate.VERSION_TABLE}",
    }
    # At outbox_0001 there is no inbox yet: any name is fine, and the next step creates it.
    migrate.downgrade(url, revision=FIRST)
    migrate.upgrade(url, revision=FIRST, inbox_table="dedup")
    migrate.upgrade(url, inbox_table="dedup")
    assert tables_in(url) == {
        f"public.{DEFAULT_TABLE}",
        "public.dedup",
        f"public.{DEFAULT_TABLE}_leader",
        f"public.{DEFAULT_TABLE}_audit",
        f"public.{migrate.VERSION_TABLE}",
    }


def test_upgrade_step_by_step(empty_db_url: str) -> None:
    """Explicit revisions work (and ``head`` after the last revision is a no-op)."""
    migrate.upgrade(empty_db_url, revision=FIRST)
    assert migrate.current(empty_db_url) == FIRST
    migrate.upgrade(empty_db_url, revision=INBOX)
    assert migrate.current(empty_db_url) == INBOX
    migrate.upgrade(empty_db_url, revision=AUTOVACUUM)
    assert migrate.current(empty_db_url) == AUTOVACUUM
    migrate.upgrade(empty_db_url, revision=HEADERS)
    assert migrate.current(empty_db_url) == HEADERS
    migrate.upgrade(empty_db_url, revision=LEADER)
    assert migrate.current(empty_db_url) == LEADER
    migrate.upgrade(empty_db_url, revision=HEAD)
    assert migrate.current(empty_db_url) == HEAD
    migrate.upgrade(empty_db_url, revision="outbox@head")
    assert migrate.current(empty_db_url) == HEAD


def test_invalid_names_are_refused_before_connecting() -> None:
    url = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # nothing listens there
    with pytest.raises(ConfigurationError, match="table name"):
        migrate.upgrade(url, table="Bad-Name")
    with pytest.raises(ConfigurationError, match="schema name"):
        migrate.downgrade(url, schema="x; DROP TABLE y")
    with pytest.raises(ConfigurationError, match="inbox table"):
        migrate.upgrade(url, inbox_table="Inbox")
    with pytest.raises(ConfigurationError, match="name of its own"):
        migrate.upgrade(url, table="events", inbox_table="events")
