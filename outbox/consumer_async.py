"""``async def`` handlers: ``await handler(session, message)`` with an ``AsyncSession`` in the
transaction that holds the inbox claim.

The consumer's own code stays synchronous. When a handler is async, the consumer runs each of
its transactions (claim, handlers, commit) inside ``greenlet_spawn`` on an event loop of its
own, on a connection of an async engine (``create_async_engine``, same URL and settings):
there SQLAlchemy's synchronous API works (each driver call is awaited through the greenlet),
so the claim, the batch and its cut, the statement counting and the watchdog are the code the
sync path runs. The handler's ``AsyncSession`` is bound to that same connection and joins its
transaction as the sync handler's session does; the handler is awaited from inside the
greenlet. None of this exists for a consumer whose handlers are plain functions.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar, cast

import sqlalchemy as sa
import sqlalchemy.util

from outbox.exceptions import ConfigurationError
from outbox.handler_session import Call, HandlerSession, counting_async, finished, in_session

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

_T = TypeVar("_T")

#: ``await_`` (SQLAlchemy 2.1), formerly ``await_only``: await from inside the greenlet.
_await: Callable[[Awaitable[Any]], Any] = (
    getattr(sqlalchemy.util, "await_", None) or sqlalchemy.util.await_only
)


def is_async(fn: object) -> bool:
    """Whether calling ``fn`` gives a coroutine to await: an ``async def`` function or method,
    a ``functools.partial`` of one, or an object whose ``__call__`` is ``async def``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if isinstance(fn, type) or inspect.isroutine(fn):
        return False  # a class, or a plain function or method
    # An object: its class's __call__ (what calling it runs), not whether it is callable.
    return inspect.iscoroutinefunction(getattr(type(fn), "__call__", None))  # noqa: B004


class AsyncHandlers:
    """The async engine and the event loop of one consumer with async handlers."""

    def __init__(self, url: sa.URL, connect_args: dict[str, Any], what: str) -> None:
        try:
            importlib.import_module("greenlet")  # SQLAlchemy's asyncio extension needs it
        except ImportError:
            raise ConfigurationError(
                f"the {what} is an async function, which needs greenlet: install "
                "sqlalchemy-outbox[asyncio]"
            ) from None
        from sqlalchemy.ext.asyncio import create_async_engine

        self.engine: AsyncEngine = create_async_engine(
            url, pool_pre_ping=True, connect_args=connect_args
        )
        sa.event.listen(self.engine.sync_engine, "connect", counting_async)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def sync_engine(self) -> sa.Engine:
        """The engine whose connections the transactions use, inside :meth:`run`."""
        return self.engine.sync_engine

    def start(self) -> None:
        """Before the consumer's loop: an event loop of its own, in the consumer's thread."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise ConfigurationError(
                "a consumer with an async handler runs its own event loop: call Consumer.run() "
                "from a thread without one (e.g. through asyncio.to_thread)"
            )
        if self._loop is None:
            self._loop = asyncio.new_event_loop()

    def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` where SQLAlchemy can await: in a greenlet on the consumer's loop."""
        assert self._loop is not None, "start() first"
        return self._loop.run_until_complete(sqlalchemy.util.greenlet_spawn(fn, *args))

    def caller(self, handler: Callable[..., Any]) -> Call:
        """``handler`` as a :data:`~outbox.handler_session.Call`: awaited with an
        ``AsyncSession`` when it is async, else as a plain handler (inside :meth:`run`)."""
        if not is_async(handler):
            return in_session(handler)
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

        engine = self.engine

        def call(conn: sa.Connection, arg: Any, watch: AbstractContextManager[None]) -> None:
            session = AsyncSession(
                AsyncConnection(engine, conn),
                sync_session_class=HandlerSession,
                join_transaction_mode="rollback_only",
                # Its commit() only flushes, and a refresh after it would need the greenlet
                # the handler's own code does not run in (MissingGreenlet).
                expire_on_commit=False,
            )
            with cast(HandlerSession, session.sync_session) as sync_session, watch:
                _await(handler(session, arg))
                finished(sync_session)

        return call

    def close(self) -> None:
        """Close the connections and the loop (a later :meth:`run` opens new ones)."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            loop.run_until_complete(self.engine.dispose())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
