"""The handler's side of the consumer's transaction: the session it is given, and what the
consumer's connections count of it.

* :class:`HandlerSession`: joined to the transaction that holds the inbox claim, so the
  handler's writes commit with the claim or not at all; :func:`in_session` calls a handler
  with one (:mod:`outbox.consumer_async` does the same for ``async def`` handlers);
* statement counting: every connection of the consumer counts the statements it sends (a
  psycopg cursor factory), so that a batch can tell a handler that failed before writing
  anything (see :meth:`outbox.consumer_batch.Batches.cut`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
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


#: A handler bound to how it is called: ``call(connection, message_or_messages, watch)`` runs it
#: in a :class:`HandlerSession` on ``connection`` inside ``watch`` (the watchdog), and flushes
#: its writes; the caller owns the transaction.
Call = Callable[[sa.Connection, Any, AbstractContextManager[None]], None]


def in_session(handler: Callable[[Session, Any], Any]) -> Call:
    """``handler(session, arg)`` as a :data:`Call`, for a plain (not ``async def``) handler."""

    def call(conn: sa.Connection, arg: Any, watch: AbstractContextManager[None]) -> None:
        with HandlerSession(bind=conn, join_transaction_mode="rollback_only") as session, watch:
            result = handler(session, arg)
            if result is not None:
                not_awaitable(result)
            # finished(session), inline: this runs once per message.
            if session.undone is not None:
                raise HandlerUndidItsWork(undone_message(session.undone))
            session.commit()

    return call


def finished(session: HandlerSession) -> None:
    """After the handler returned: refuse an undone session, flush the writes (the claim and
    the writes commit together, by the caller)."""
    if session.undone is not None:
        raise HandlerUndidItsWork(undone_message(session.undone))
    session.commit()


def not_awaitable(result: Any) -> None:
    """A plain handler's result must not be awaitable: the coroutine of an ``async def``
    hidden behind a plain wrapper (a decorator, a lambda) would never run while its message
    counts as processed. Fail the attempt instead."""
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # no "never awaited" warning on top of this error
        raise TypeError(
            "the handler returned an awaitable but is not an async function (a plain wrapper "
            "around one?): only `async def` handlers are awaited, with an AsyncSession"
        )


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


class CountingAsyncCursor(psycopg.AsyncCursor[Any]):
    """:class:`CountingCursor` for the connections of async handlers."""

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        _count(self.connection)
        return await super().execute(*args, **kwargs)

    async def executemany(self, *args: Any, **kwargs: Any) -> None:
        _count(self.connection)
        await super().executemany(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        _count(self.connection)
        return super().stream(*args, **kwargs)

    def copy(self, *args: Any, **kwargs: Any) -> Any:
        _count(self.connection)
        return super().copy(*args, **kwargs)


class CountingAsyncServerCursor(psycopg.AsyncServerCursor[Any]):
    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        _count(self.connection)
        return await super().execute(*args, **kwargs)


def _count(connection: Any) -> None:
    connection.outbox_statements = getattr(connection, "outbox_statements", 0) + 1


def counting(dbapi_connection: Any, _record: Any) -> None:
    """On each new database connection of the consumer: count its statements."""
    if isinstance(dbapi_connection, psycopg.Connection):
        dbapi_connection.outbox_statements = 0  # type: ignore[attr-defined]
        dbapi_connection.cursor_factory = CountingCursor
        dbapi_connection.server_cursor_factory = CountingServerCursor


def counting_async(_dbapi_connection: Any, record: Any) -> None:
    """:func:`counting` for an async engine's connections (SQLAlchemy's adapter around a
    ``psycopg.AsyncConnection``)."""
    driver = record.driver_connection
    if isinstance(driver, psycopg.AsyncConnection):
        driver.outbox_statements = 0  # type: ignore[attr-defined]
        driver.cursor_factory = CountingAsyncCursor
        driver.server_cursor_factory = CountingAsyncServerCursor
