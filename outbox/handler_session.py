"""The handler's side of the consumer's transaction: the session it is given, and what the
consumer's connections count of it.

* :class:`HandlerSession`: joined to the transaction that holds the inbox claim, so the
  handler's writes commit with the claim or not at all;
* statement counting: every connection of the consumer counts the statements it sends (a
  psycopg cursor factory), so that a batch can tell a handler that failed before writing
  anything (see :meth:`outbox.consumer_batch.Batches.cut`).
"""

from __future__ import annotations

from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox.exceptions import HandlerUndidItsWork


class HandlerSession(Session):
    """The handler's session, joined to the runner's transaction (``rollback_only``): its
    ``commit()`` flushes but leaves the transaction to the runner, so the writes commit with
    the inbox key or not at all. ``rollback()`` rolls the whole transaction back, the key's
    claim included, and fails the attempt at once; ``close()`` would drop unflushed writes
    while the flushed ones commit (a half-applied message): it fails the attempt too."""

    undone: str | None = None

    def rollback(self) -> None:
        self.undone = "rollback"
        super().rollback()
        raise HandlerUndidItsWork(undone_message("rollback"))

    def close(self) -> None:
        if self.undone is None and self.in_transaction():
            self.undone = "close"
        super().close()


def undone_message(call: str) -> str:
    return (
        f"the handler called session.{call}(), which would undo its writes; raise an exception "
        "to fail the message (the consumer rolls back and retries), or use "
        "session.begin_nested() for a partial undo"
    )


def backend_pid(conn: sa.Connection) -> int | None:
    driver = conn.connection.driver_connection
    info = getattr(driver, "info", None)
    return getattr(info, "backend_pid", None)


def sent(driver: Any) -> int | None:
    """Statements sent on a driver connection so far (None: not counted)."""
    count: int | None = getattr(driver, "outbox_statements", None)
    return count


class CountingCursor(psycopg.Cursor[Any]):
    """Counts the statements sent on its connection, so that a batch can tell a handler that
    failed before writing anything (see :meth:`outbox.consumer_batch.Batches.cut`).
    Everything psycopg sends goes through a cursor: SQLAlchemy's statements,
    ``Connection.execute`` (the outbox's fast path), COPY, pipelines."""

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        _count(self.connection)
        return super().execute(*args, **kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> None:
        _count(self.connection)
        super().executemany(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        _count(self.connection)
        return super().stream(*args, **kwargs)

    def copy(self, *args: Any, **kwargs: Any) -> Any:
        _count(self.connection)
        return super().copy(*args, **kwargs)


class CountingServerCursor(psycopg.ServerCursor[Any]):
    def execute(self, *args: Any, **kwargs: Any) -> Any:
        _count(self.connection)
        return super().execute(*args, **kwargs)


def _count(connection: Any) -> None:
    connection.outbox_statements = getattr(connection, "outbox_statements", 0) + 1


def counting(dbapi_connection: Any, _record: Any) -> None:
    """On each new database connection of the consumer: count its statements."""
    if isinstance(dbapi_connection, psycopg.Connection):
        dbapi_connection.outbox_statements = 0  # type: ignore[attr-defined]
        dbapi_connection.cursor_factory = CountingCursor
        dbapi_connection.server_cursor_factory = CountingServerCursor
