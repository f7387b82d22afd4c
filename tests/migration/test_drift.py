"""The table the shipped revisions build is the table ``outbox.schema.define_tables`` declares.

Two checks, because Alembic's autogenerate compares columns, types, defaults, nullability,
indexes by name and columns, unique constraints, but neither check constraints nor the
predicates of partial indexes:

* ``alembic.autogenerate.compare_metadata`` against the migrated database;
* the catalog (columns, identity sequence, constraint definitions, full index definitions) of
  the migrated table against the one ``metadata.create_all`` builds (in a rolled-back
  savepoint on the same database).

``test_drift_is_detected`` proves both checks fail when the declaration changes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa

from outbox import migrate
from outbox.schema import DEFAULT_TABLE, OutboxTables, define_tables
from tests.migration.support import autogenerate_diff, catalog, drift, engine


@pytest.mark.parametrize(
    ("table", "schema"),
    [
        pytest.param(DEFAULT_TABLE, None, id="default"),
        pytest.param("events_out", "messaging", id="custom"),
    ],
)
def test_migrations_match_declared_tables(
    empty_db_url: str, table: str, schema: str | None
) -> None:
    migrate.upgrade(empty_db_url, table=table, schema=schema)
    eng = engine(empty_db_url)
    try:
        with eng.connect() as conn:
            assert drift(conn, define_tables(table=table, schema=schema)) == []
            # The comparison saw the real thing: named constraints and partial indexes.
            snap = catalog(conn, table, schema)
    finally:
        eng.dispose()
    constraints = {name: definition for name, _, definition, *_ in snap["constraints"]}
    assert set(constraints) == {
        f"pk_{table}",
        f"uq_{table}_message_id",
        f"ck_{table}_topic",
        f"ck_{table}_status",
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
        "headers",
        "status",
        "attempts",
        "last_error",
        "next_attempt_at",
        "created_at",
        "sent_at",
    ]


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


#: mutation -> (what it changes, the catalog part that must show it)
MUTATIONS: dict[str, tuple[Callable[[sa.Table], None], str]] = {
    "extra column": (_extra_column, "columns"),
    "missing index": (_missing_index, "indexes"),
    "index columns": (_index_columns, "indexes"),
    # Autogenerate does not compare these two: only the catalog comparison catches them.
    "index predicate": (_index_predicate, "indexes"),
    "check constraint": (_check_constraint, "constraints"),
    "nullable": (_nullable, "columns"),
    "column type": (_column_type, "columns"),
    "server default": (_server_default, "columns"),
    "unique constraint dropped": (_unique_dropped, "constraints"),
}


def _mutated(name: str) -> OutboxTables:
    tables = define_tables()
    MUTATIONS[name][0](tables.messages)
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
    part = MUTATIONS[mutation][1]
    assert any(p.startswith(f"catalog {part}:") for p in problems), problems


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
