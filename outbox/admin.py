"""Inspection and repair of the outbox table from code (the CLI's ``status`` uses it)."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import sqlalchemy as sa

from outbox import statements
from outbox.config import parse_db_url
from outbox.exceptions import translate_db_errors
from outbox.schema import DEFAULT_TABLE, define_tables


def counts(
    db_url: str, *, table: str = DEFAULT_TABLE, schema: str | None = None
) -> dict[str, tuple[int, datetime.datetime | None]]:
    """``{status: (count, oldest created_at)}`` for the statuses that have rows."""
    tables = define_tables(table=table, schema=schema)
    engine = sa.create_engine(parse_db_url(db_url), poolclass=sa.pool.NullPool)
    try:
        with translate_db_errors("count"), engine.connect() as conn:
            rows = conn.execute(statements.count_by_status(tables)).all()
    finally:
        engine.dispose()
    return {r.status: (r.n, r.oldest) for r in rows}


def replay_dead(
    connection: sa.Connection,
    *,
    ids: Sequence[int] | None = None,
    table: str = DEFAULT_TABLE,
    schema: str | None = None,
) -> list[int]:
    """Give parked messages (all, or ``ids``) a fresh set of attempts, in the caller's
    transaction. Their keys flow again once the relay sends them."""
    tables = define_tables(table=table, schema=schema)
    with translate_db_errors("replay"):
        rows = connection.execute(
            statements.replay_dead(tables), {"ids": list(ids) if ids is not None else None}
        ).all()
        if rows:
            # Wake the relay on commit, as a writer does; otherwise the replayed messages wait
            # for its fallback poll.
            connection.execute(
                sa.text("SELECT pg_notify(:channel, '')"), {"channel": tables.channel}
            )
    return [r.id for r in rows]
