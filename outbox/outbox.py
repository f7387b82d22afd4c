"""Publishing: write messages into the caller's own transaction."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import deferred, statements, tracing
from outbox.exceptions import DatabaseUnavailableError, translate_db_errors
from outbox.message import Headers, Message, encode
from outbox.schema import DEFAULT_INBOX_TABLE, DEFAULT_TABLE, OutboxTables, define_tables

if TYPE_CHECKING:
    # Imported for typing only: sqlalchemy.ext.asyncio needs greenlet, which sync users
    # need not install.
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

SyncTarget: TypeAlias = "Session | sa.Connection"
AsyncTarget: TypeAlias = "AsyncSession | AsyncConnection"


def run_first(target: SyncTarget, stmt: sa.TextClause, params: dict[str, Any]) -> Any:
    """Run ``stmt`` in ``target``'s transaction and return its first row (or None).

    On psycopg 3 the statement goes straight to the driver connection, inside the same
    transaction: SQLAlchemy's ORM execution path costs about 0.1 ms a statement, a third of a
    publish or an inbox claim on a fast network (see docs/performance.md).
    """
    conn = target.connection() if isinstance(target, Session) else target
    driver = conn.connection.driver_connection
    if isinstance(driver, psycopg.Connection):
        try:
            cur = driver.execute(statements.to_driver_sql(stmt), params)
        except psycopg.Error as exc:
            if driver.broken or driver.closed:
                # SQLAlchemy did not see the disconnect (the statement bypassed it): tell it,
                # so that the caller's rollback ends cleanly and the pool drops the connection.
                conn.invalidate(exc)
            raise
        return cur.fetchone() if cur.description is not None else None
    result = conn.execute(stmt, params)
    return result.first() if result.returns_rows else None


class Outbox:
    """The outbox table of one application, and the way to publish into it.

    ``Outbox()`` uses the default table name ``outbox_messages`` in the connection's default
    schema; pass ``table=`` / ``schema=`` to match what you installed, and ``metadata=`` to
    declare the tables (outbox and inbox) on your own ``MetaData`` (for ``alembic check``).

    Publishing inserts rows in the session's current transaction: they become visible to the
    relay when that transaction commits, and vanish with it when it rolls back.

    ``at_commit=True`` (psycopg 3 only) validates and encodes at the publish call but writes
    the rows when the transaction commits, in the same round trip as the COMMIT: no extra round
    trip per publish call, and same-key writers wait for each other only while committing.
    The transaction must then end through SQLAlchemy (see ``docs/howto.md``), and database
    errors (missing tables, a duplicate message id) surface at commit, rolling it back.
    """

    def __init__(
        self,
        *,
        table: str = DEFAULT_TABLE,
        schema: str | None = None,
        metadata: sa.MetaData | None = None,
        inbox_table: str = DEFAULT_INBOX_TABLE,
        at_commit: bool = False,
    ) -> None:
        self.tables: OutboxTables = define_tables(
            metadata, table=table, schema=schema, inbox_table=inbox_table
        )
        self.at_commit = at_commit
        if at_commit:
            deferred.install()

    def publish(
        self,
        session: SyncTarget,
        topic: str,
        payload: Any,
        *,
        key: str | bytes | None = None,
        headers: Headers | None = None,
        message_id: uuid.UUID | None = None,
        content_type: str | None = None,
        deadline: datetime.datetime | None = None,
        ttl: datetime.timedelta | float | None = None,
    ) -> uuid.UUID:
        """Publish one message in ``session``'s transaction; returns its message id.

        Raises :class:`~outbox.PayloadError` at once, before anything is written, when the
        topic, key, headers or payload are invalid. ``deadline`` (timezone-aware) or ``ttl``
        (a ``timedelta`` or seconds from now): consumers do not handle the message past it.
        """
        msg = Message(topic, payload, key, headers, message_id, content_type, deadline, ttl)
        return self.publish_many(session, [msg])[0]

    def publish_many(self, session: SyncTarget, messages: Iterable[Message]) -> list[uuid.UUID]:
        """Publish several messages in one round trip, in the given order."""
        encoded = tracing.created([encode(m) for m in messages])
        if encoded:
            if self.at_commit:
                with translate_db_errors("publish"):
                    conn = session.connection() if isinstance(session, Session) else session
                    if not conn.in_transaction():
                        conn.begin()  # as a statement would (autobegin): commit() then writes
                deferred.add(conn, self.tables, encoded)
            else:
                with translate_db_errors("publish"):
                    conn = session.connection() if isinstance(session, Session) else session
                    driver = conn.connection.driver_connection
                    stmt, params = statements.insert(
                        self.tables, encoded, literals=isinstance(driver, psycopg.Connection)
                    )
                    run_first(conn, stmt, params)
        return [e.message_id for e in encoded]

    async def apublish(
        self,
        session: AsyncTarget,
        topic: str,
        payload: Any,
        *,
        key: str | bytes | None = None,
        headers: Headers | None = None,
        message_id: uuid.UUID | None = None,
        content_type: str | None = None,
        deadline: datetime.datetime | None = None,
        ttl: datetime.timedelta | float | None = None,
    ) -> uuid.UUID:
        """:meth:`publish` for an ``AsyncSession`` or ``AsyncConnection``."""
        msg = Message(topic, payload, key, headers, message_id, content_type, deadline, ttl)
        return (await self.apublish_many(session, [msg]))[0]

    async def apublish_many(
        self, session: AsyncTarget, messages: Iterable[Message]
    ) -> list[uuid.UUID]:
        """:meth:`publish_many` for an ``AsyncSession`` or ``AsyncConnection``."""
        encoded = tracing.created([encode(m) for m in messages])
        if encoded:
            if self.at_commit:
                with translate_db_errors("publish"):
                    aconn = await _async_connection(session)
                    sync_conn = aconn.sync_connection
                    if sync_conn is None:
                        raise DatabaseUnavailableError("the connection is closed")
                    if not sync_conn.in_transaction():
                        await aconn.begin()  # as a statement would (autobegin)
                deferred.add(sync_conn, self.tables, encoded)
            else:
                with translate_db_errors("publish"):
                    aconn = await _async_connection(session)
                    sync_conn = aconn.sync_connection
                    driver = None if sync_conn is None else sync_conn.connection.driver_connection
                    stmt, params = statements.insert(
                        self.tables, encoded, literals=isinstance(driver, psycopg.AsyncConnection)
                    )
                    await aconn.execute(stmt, params)
        return [e.message_id for e in encoded]


async def _async_connection(session: AsyncTarget) -> AsyncConnection:
    """The connection of an ``AsyncConnection`` or ``AsyncSession`` (the session's, in its
    transaction). The classes are not imported: they need greenlet."""
    if hasattr(session, "sync_connection"):
        return cast("AsyncConnection", session)
    return await cast("AsyncSession", session).connection()  # type: ignore[redundant-cast]
