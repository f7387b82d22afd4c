"""The tables the shipped revisions build (the outbox table, the inbox, the leader table of
revision ``outbox_0005`` and the audit table of ``outbox_0006``) are the tables
``outbox.schema.define_tables`` declares.

Two checks, because Alembic's autogenerate compares columns, types, defaults, nullability,
indexes by name and columns, unique constraints, but neither check constraints nor the
predicates of partial indexes:

* ``alembic.autogenerate.compare_metadata`` against the migrated database;
* the catalog (storage parameters, columns, identity sequence, constraint definitions, full
  index definitions) of each migrated table against the one ``metadata.create_all`` builds (in
  a rolled-back savepoint on the same database). Autogenerate ignores storage parameters (the
  autovacuum settings of revision ``outbox_0003``): only this half compares them;
* the leader table's rows: the revision and ``define_tables`` (its ``after_create`` listener)
  both seed exactly one row, with an epoch.

``test_drift_is_detected`` proves both checks fail when the declaration changes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from outbox import migrate
from outbox import schema as outbox_schema
from outbox.schema import (
    DEFAULT_INBOX_TABLE,
    DEFAULT_TABLE,
    STORAGE_PARAMETERS,
    OutboxTables,
    define_tables,
)
from tests.support.migration import (
    SEEDED,
    autogenerate_diff,
    catalog,
    drift,
    engine,
    leader_rows,
)


@pytest.mark.parametrize(
    ("table", "schema", "inbox_table"),
    [
        pytest.param(DEFAULT_TABLE, None, DEFAULT_INBOX_TABLE, id="default"),
        pytest.param("events_out", "messaging", "events_in", id="custom"),
        pytest.param(DEFAULT_TABLE, None, "dedup", id="custom-inbox"),
    ],
)
def test_migrations_match_declared_tables(
    empty_db_url: str, table: str, schema: str | None, inbox_table: str
) -> None:
    migrate.upgrade(empty_db_url, table=table, schema=schema, inbox_table=inbox_table)
    eng = engine(empty_db_url)
    try:
        with eng.connect() as conn:
            declared = define_tables(table=table, schema=schema, inbox_table=inbox_table)
            assert drift(conn, declared) == []
            # The comparison saw the real thing: named constraints and partial indexes.
            snap = catalog(conn, table, schema)
            inbox = catalog(conn, inbox_table, schema)
            leader = catalog(conn, f"{table}_leader", schema)
            audit = catalog(conn, f"{table}_audit", schema)
            rows = leader_rows(conn, declared.leader)
    finally:
        eng.dispose()
    constraints = {name: definition for name, _, definition, *_ in snap["constraints"]}
    assert set(constraints) == {
        f"pk_{table}",
        f"uq_{table}_message_id",
        f"ck_{table}_topic",
        f"ck_{table}_status",
        f"ck_{table}_headers",
    }
    indexes = dict(snap["indexes"])
    assert "WHERE" in indexes[f"ix_{table}_unsent"]
    assert "WHERE" in indexes[f"ix_{table}_held"]
    assert [c[1] for c in snap["columns"]] == [
        "id",
        "message_id",
        "topic",
        "key",
        "payload",
        "status",
        "attempts",
        "last_error",
        "next_attempt_at",
        "created_at",
        "sent_at",
        "header_names",
        "header_values",
        "first_failed_at",
        "last_failed_at",
    ]
    types = {c[1]: c[2] for c in snap["columns"]}
    assert (types["header_names"], types["header_values"]) == ("text[]", "bytea[]")
    assert types["first_failed_at"] == types["last_failed_at"] == "timestamp with time zone"
    assert [row[0] for row in snap["identity"]] == ["id"]
    # The autovacuum settings are part of what was compared.
    assert snap["table"] == [
        (
            "r",
            "p",
            "{autovacuum_vacuum_scale_factor=0,autovacuum_vacuum_threshold=1000,"
            "autovacuum_vacuum_insert_scale_factor=0,autovacuum_vacuum_insert_threshold=1000,"
            "autovacuum_analyze_scale_factor=0,autovacuum_analyze_threshold=1000}",
        )
    ]
    assert inbox["table"] == [
        (
            "r",
            "p",
            "{autovacuum_vacuum_scale_factor=0.01,autovacuum_vacuum_threshold=1000,"
            "autovacuum_vacuum_insert_scale_factor=0.01,autovacuum_vacuum_insert_threshold=1000}",
        )
    ]

    inbox_constraints = {name: definition for name, _, definition, *_ in inbox["constraints"]}
    assert inbox_constraints == {
        f"pk_{inbox_table}": "PRIMARY KEY (consumer, key)",
        f"ck_{inbox_table}_names": "CHECK (length(consumer) > 0 AND length(key) > 0)",
    }
    assert [name for name, _ in inbox["indexes"]] == [
        f"ix_{inbox_table}_expires_at",
        f"pk_{inbox_table}",
    ]
    assert [c[1] for c in inbox["columns"]] == [
        "consumer",
        "key",
        "fingerprint",
        "response_status",
        "response_body",
        "created_at",
        "expires_at",
    ]
    assert inbox["identity"] == []

    # The leader table (revision outbox_0005): one boolean key that can only be true (so one
    # row at most), the epoch, no storage parameters; seeded with one row.
    assert declared.leader.name == f"{table}_leader"
    assert declared.leader.schema == schema
    leader_constraints = {name: definition for name, _, definition, *_ in leader["constraints"]}
    assert leader_constraints == {
        f"pk_{table}_leader": "PRIMARY KEY (one)",
        f"ck_{table}_leader_one": "CHECK (one)",
    }
    assert [name for name, _ in leader["indexes"]] == [f"pk_{table}_leader"]
    assert [c[1:5] for c in leader["columns"]] == [
        ("one", "boolean", True, "true"),
        ("epoch", "bigint", True, ""),
    ]
    assert leader["identity"] == []
    assert leader["table"] == [("r", "p", "")]
    assert rows == SEEDED

    # The audit table (revision outbox_0006): an identity key, no storage parameters.
    assert declared.audit.name == f"{table}_audit"
    assert declared.audit.schema == schema
    audit_constraints = {name: definition for name, _, definition, *_ in audit["constraints"]}
    assert audit_constraints == {f"pk_{table}_audit": "PRIMARY KEY (id)"}
    assert [c[1:5] for c in audit["columns"]] == [
        ("id", "bigint", True, ""),
        ("at", "timestamp with time zone", True, "now()"),
        ("action", "text", True, ""),
        ("message_ids", "bigint[]", True, "'{}'::bigint[]"),
        ("db_user", "text", True, "CURRENT_USER"),
        ("os_user", "text", False, ""),
        ("host", "text", False, ""),
        ("detail", "text", False, ""),
    ]
    assert [row[0] for row in audit["identity"]] == ["id"]
    assert audit["table"] == [("r", "p", "")]


def test_inbox_is_compared_under_its_configured_name(empty_db_url: str) -> None:
    """Installed as ``dedup``, declared with the default name: the check reports it."""
    migrate.upgrade(empty_db_url, inbox_table="dedup")
    eng = engine(empty_db_url)
    try:
        with eng.connect() as conn:
            problems = drift(conn, define_tables())
            assert drift(conn, define_tables(inbox_table="dedup")) == []
    finally:
        eng.dispose()
    assert f"missing table {DEFAULT_INBOX_TABLE}" in problems
    assert any(p.startswith("autogenerate: ('remove_table'") and "dedup" in p for p in problems)
    assert any(p.startswith("autogenerate: ('add_table'") for p in problems), problems


# --- the check fails when the two drift apart -------------------------------------------------


def _index(t: sa.Table, suffix: str) -> sa.Index:
    return next(i for i in t.indexes if i.name == f"ix_{t.name}_{suffix}")


def _check(t: sa.Table, suffix: str) -> sa.CheckConstraint:
    return next(
        c
        for c in t.constraints
        if isinstance(c, sa.CheckConstraint) and c.name == f"ck_{t.name}_{suffix}"
    )


def _extra_column(t: sa.Table) -> None:
    t.append_column(sa.Column("tenant", sa.Text, nullable=True))


def _missing_index(t: sa.Table) -> None:
    t.indexes.discard(_index(t, "held"))


def _index_columns(t: sa.Table) -> None:
    t.indexes.discard(_index(t, "held"))
    sa.Index(
        f"ix_{t.name}_held",
        t.c.topic,
        t.c.id,
        postgresql_where=sa.text("status IN ('retry', 'dead')"),
    )


def _index_predicate(t: sa.Table) -> None:
    _index(t, "unsent").dialect_options["postgresql"]["where"] = sa.text("status = 'pending'")


def _check_constraint(t: sa.Table) -> None:
    _check(t, "status").sqltext = sa.text("status IN ('pending', 'retry', 'dead')")


def _nullable(t: sa.Table) -> None:
    t.c.topic.nullable = True


def _column_type(t: sa.Table) -> None:
    t.c.attempts.type = sa.SmallInteger()


def _server_default(t: sa.Table) -> None:
    default = t.c.attempts.server_default
    assert isinstance(default, sa.DefaultClause)
    default.arg = sa.text("1")


def _unique_dropped(t: sa.Table) -> None:
    t.constraints.discard(next(c for c in t.constraints if isinstance(c, sa.UniqueConstraint)))


def _inbox_missing_index(t: sa.Table) -> None:
    t.indexes.discard(_index(t, "expires_at"))


def _inbox_check_constraint(t: sa.Table) -> None:
    _check(t, "names").sqltext = sa.text("length(key) > 0")


def _inbox_nullable(t: sa.Table) -> None:
    t.c.expires_at.nullable = True


def _inbox_column_type(t: sa.Table) -> None:
    t.c.response_status.type = sa.SmallInteger()


def _inbox_server_default(t: sa.Table) -> None:
    default = t.c.created_at.server_default
    assert isinstance(default, sa.DefaultClause)
    default.arg = sa.text("clock_timestamp()")


def _leader_check_constraint(t: sa.Table) -> None:
    _check(t, "one").sqltext = sa.text("one IS NOT NULL")


def _leader_server_default(t: sa.Table) -> None:
    t.c.epoch.server_default = sa.DefaultClause(sa.text("0"))


def _leader_nullable(t: sa.Table) -> None:
    t.c.epoch.nullable = True


def _leader_column_type(t: sa.Table) -> None:
    t.c.epoch.type = sa.Numeric()


def _audit_server_default(t: sa.Table) -> None:
    t.c.db_user.server_default = sa.DefaultClause(sa.text("SESSION_USER"))


def _audit_column_type(t: sa.Table) -> None:
    t.c.message_ids.type = postgresql.ARRAY(sa.Integer)


def _audit_nullable(t: sa.Table) -> None:
    t.c.action.nullable = True


def _failure_time_type(t: sa.Table) -> None:
    t.c.first_failed_at.type = sa.DateTime(timezone=False)


def _leader_not_seeded(t: sa.Table) -> None:
    sa.event.remove(t, "after_create", outbox_schema._seed_leader)


def _storage_parameter(t: sa.Table) -> None:
    t.info[STORAGE_PARAMETERS]["autovacuum_vacuum_threshold"] = "5000"


def _no_storage_parameters(t: sa.Table) -> None:
    t.info[STORAGE_PARAMETERS] = {}


#: mutation -> (the table it changes, what it changes, the catalog part that must show it)
MUTATIONS: dict[str, tuple[str, Callable[[sa.Table], None], str]] = {
    "extra column": ("messages", _extra_column, "columns"),
    "missing index": ("messages", _missing_index, "indexes"),
    "index columns": ("messages", _index_columns, "indexes"),
    # Autogenerate does not compare these two: only the catalog comparison catches them.
    "index predicate": ("messages", _index_predicate, "indexes"),
    "check constraint": ("messages", _check_constraint, "constraints"),
    "nullable": ("messages", _nullable, "columns"),
    "column type": ("messages", _column_type, "columns"),
    "server default": ("messages", _server_default, "columns"),
    "unique constraint dropped": ("messages", _unique_dropped, "constraints"),
    # Storage parameters (autovacuum settings): the catalog comparison only.
    "storage parameter": ("messages", _storage_parameter, "table"),
    "no storage parameters": ("messages", _no_storage_parameters, "table"),
    "inbox extra column": ("inbox", _extra_column, "columns"),
    "inbox missing index": ("inbox", _inbox_missing_index, "indexes"),
    "inbox check constraint": ("inbox", _inbox_check_constraint, "constraints"),
    "inbox nullable": ("inbox", _inbox_nullable, "columns"),
    "inbox column type": ("inbox", _inbox_column_type, "columns"),
    "inbox server default": ("inbox", _inbox_server_default, "columns"),
    "inbox storage parameter": ("inbox", _storage_parameter, "table"),
    "inbox no storage parameters": ("inbox", _no_storage_parameters, "table"),
    "leader extra column": ("leader", _extra_column, "columns"),
    "leader check constraint": ("leader", _leader_check_constraint, "constraints"),
    "leader server default": ("leader", _leader_server_default, "columns"),
    "leader nullable": ("leader", _leader_nullable, "columns"),
    "leader column type": ("leader", _leader_column_type, "columns"),
    # The seeded row: only the comparison of the rows sees a declaration without it.
    "leader not seeded": ("leader", _leader_not_seeded, "rows"),
    "failure time type": ("messages", _failure_time_type, "columns"),
    "audit extra column": ("audit", _extra_column, "columns"),
    "audit server default": ("audit", _audit_server_default, "columns"),
    "audit column type": ("audit", _audit_column_type, "columns"),
    "audit nullable": ("audit", _audit_nullable, "columns"),
}


def _mutated(name: str) -> OutboxTables:
    tables = define_tables()
    which, mutate, _ = MUTATIONS[name]
    mutate(getattr(tables, which))
    return tables


def test_unmodified_declaration_has_no_drift(db_url: str) -> None:
    eng = engine(db_url)
    try:
        with eng.connect() as conn:
            assert drift(conn, define_tables()) == []
    finally:
        eng.dispose()


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_drift_is_detected(db_url: str, mutation: str) -> None:
    eng = engine(db_url)
    try:
        with eng.connect() as conn:
            problems = drift(conn, _mutated(mutation))
            # drift() left the migrated table as it was.
            assert drift(conn, define_tables()) == []
    finally:
        eng.dispose()
    assert problems, f"a changed declaration ({mutation}) went unnoticed"
    which, _, part = MUTATIONS[mutation]
    table = getattr(define_tables(), which).name
    where = f"rows of {table} " if part == "rows" else f"catalog {part} of {table}:"
    assert any(p.startswith(where) for p in problems), problems


def test_autogenerate_alone_sees_column_changes(db_url: str) -> None:
    """The autogenerate half on its own: a changed column is reported as an operation."""
    eng = engine(db_url)
    try:
        with eng.connect() as conn:
            ops = autogenerate_diff(conn, _mutated("extra column"))
    finally:
        eng.dispose()
    assert [op[0] for op in ops] == ["add_column"]
    assert ops[0][3].name == "tenant"
