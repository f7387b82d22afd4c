"""``Outbox(at_commit=True)``: messages written together with the COMMIT.

Publishing validates and encodes at once and keeps the messages with the connection's
transaction. SQLAlchemy's ``commit`` event then sends their INSERT and the COMMIT in one
pipeline: the transaction costs the same number of round trips as without events, however
many it publishes. The per-key locks are taken right before the COMMIT and held only for it.

The messages live in memory until then, so this mode relies on the transaction ending through
SQLAlchemy (``Session.commit()``, ``Connection.commit()``, ``engine.begin()``). A COMMIT sent
as SQL or on the raw DBAPI connection bypasses it: the messages are then dropped, and logged
as an error when the connection goes back to the pool.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import event

from outbox import statements
from outbox.exceptions import ConfigurationError, translate_db_errors
from outbox.message import EncodedMessage
from outbox.schema import OutboxTables

logger = logging.getLogger(__name__)

_INFO = "outbox.at_commit"
_installed: list[bool] = []  # a flag that needs no `global`


@dataclasses.dataclass
class _Buffer:
    messages: list[tuple[OutboxTables, EncodedMessage]] = dataclasses.field(default_factory=list)
    # (savepoint name, number of messages when it was created)
    savepoints: list[tuple[str | None, int]] = dataclasses.field(default_factory=list)
    # Set when a savepoint rollback could not be matched: the commit then fails rather than
    # guess which messages it discarded.
    unsure: bool = False
    untracked: bool = False
    # The server transaction was open when messages were added (see _on_rollback).
    began: bool = False


def add(conn: sa.Connection, tables: OutboxTables, encoded: Sequence[EncodedMessage]) -> None:
    """Keep ``encoded`` to be written when ``conn``'s transaction commits."""
    driver = conn.connection.driver_connection
    if not isinstance(driver, (psycopg.Connection, psycopg.AsyncConnection)):
        raise ConfigurationError(
            "Outbox(at_commit=True) needs the psycopg 3 driver (postgresql+psycopg://); "
            "use Outbox() with other drivers"
        )
    if driver.autocommit:
        raise ConfigurationError(
            "the connection is in autocommit mode: publish inside a transaction, or the event "
            "is not atomic with your writes"
        )
    buf = _buffer(conn)
    if not buf.savepoints and conn.get_nested_transaction() is not None:
        buf.untracked = True  # inside savepoints created before install(): names unknown
    buf.began = buf.began or driver.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    buf.messages.extend((tables, e) for e in encoded)


def _buffer(conn: sa.Connection) -> _Buffer:
    buf: _Buffer | None = conn.info.get(_INFO)
    if buf is None:
        buf = conn.info[_INFO] = _Buffer()
    return buf


def install() -> None:
    """Listen to every engine's transactions (once per process). Called when the first
    ``Outbox(at_commit=True)`` is created, so that savepoints made after it are all seen."""
    if _installed:
        return
    _installed.append(True)
    event.listen(sa.engine.Engine, "commit", _on_commit)
    event.listen(sa.engine.Engine, "rollback", _on_rollback)
    event.listen(sa.engine.Engine, "savepoint", _on_savepoint)
    event.listen(sa.engine.Engine, "rollback_savepoint", _on_rollback_savepoint)
    event.listen(sa.engine.Engine, "release_savepoint", _on_release_savepoint)
    event.listen(sa.engine.Engine, "prepare_twophase", _on_prepare_twophase)
    event.listen(sa.pool.Pool, "checkin", _on_checkin)


def _statements(
    messages: list[tuple[OutboxTables, EncodedMessage]],
) -> list[tuple[str, dict[str, Any]]]:
    groups: dict[OutboxTables, list[EncodedMessage]] = {}
    for tables, e in messages:
        groups.setdefault(tables, []).append(e)
    out = []
    for tables, encoded in groups.items():
        stmt, params = statements.insert(tables, encoded)
        out.append((statements.to_driver_sql(stmt), params))
    return out


def _on_commit(conn: sa.Connection) -> None:
    buf: _Buffer | None = conn.info.pop(_INFO, None)
    if buf is None or not buf.messages:
        return
    if buf.unsure:
        raise ConfigurationError(
            "a savepoint rollback could not be matched to the messages it discards; the "
            "transaction is not committed"
        )
    stmts = _statements(buf.messages)
    driver = conn.connection.driver_connection
    with translate_db_errors("publish at commit"):
        if isinstance(driver, psycopg.Connection):
            # INSERT and COMMIT in one round trip. If the INSERT fails, the server skips the
            # COMMIT and the transaction is rolled back: no business row without its events.
            # SQLAlchemy's own commit() that follows finds no transaction and does nothing.
            with driver.pipeline():
                for sql, params in stmts:
                    driver.execute(sql, params)
                driver.execute("COMMIT")
        else:
            conn.connection.dbapi_connection.run_async(  # type: ignore[union-attr]
                functools.partial(_acommit, stmts)
            )


async def _acommit(stmts: list[tuple[str, dict[str, Any]]], driver: Any) -> None:
    async with driver.pipeline():
        for sql, params in stmts:
            await driver.execute(sql, params)
        await driver.execute("COMMIT")


def _on_rollback(conn: sa.Connection) -> None:
    if conn.invalidated:
        # The connection is gone (and conn.info with it): so are the buffered rows, with the
        # transaction they belonged to. Raising here would break every rollback in the process.
        return
    buf: _Buffer | None = conn.info.pop(_INFO, None)
    if buf is None or not buf.messages or not buf.began:
        return
    # add() accepted only psycopg connections, sync or async: both have .info.
    driver = conn.connection.driver_connection
    if driver is not None and driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        # The server transaction is already over: it ended outside SQLAlchemy (a COMMIT sent
        # as SQL or on the DBAPI connection). If it committed, these messages are lost.
        _log_dropped(len(buf.messages))


def _on_savepoint(conn: sa.Connection, name: str | None) -> None:
    if name is None:
        # SQLAlchemy names it sa_savepoint_<n> right after this event, from a private counter
        # of the Connection. Without that counter, rolling back a savepoint fails the commit
        # (see _on_rollback_savepoint) rather than guess.
        seq = getattr(conn, "_Connection__savepoint_seq", None)
        name = f"sa_savepoint_{seq + 1}" if isinstance(seq, int) else None
    buf = _buffer(conn)
    buf.savepoints.append((name, len(buf.messages)))


def _on_rollback_savepoint(conn: sa.Connection, name: str, context: object) -> None:
    buf: _Buffer | None = conn.info.get(_INFO)
    if buf is None:
        return
    if not buf.untracked:
        for i, (sp, size) in enumerate(buf.savepoints):
            if sp == name:
                del buf.messages[size:]
                del buf.savepoints[i:]
                return
    buf.unsure = True


def _on_release_savepoint(conn: sa.Connection, name: str, context: object) -> None:
    buf: _Buffer | None = conn.info.get(_INFO)
    if buf is not None:
        # Its messages now belong to the enclosing transaction or savepoint.
        buf.savepoints = [(sp, size) for sp, size in buf.savepoints if sp != name]


def _on_prepare_twophase(conn: sa.Connection, xid: object) -> None:
    buf: _Buffer | None = conn.info.get(_INFO)
    if buf is not None and buf.messages:
        raise ConfigurationError(
            "Outbox(at_commit=True) does not support two-phase commit; use Outbox()"
        )


def _on_checkin(dbapi_connection: object, record: Any) -> None:
    buf: _Buffer | None = record.info.pop(_INFO, None) if record is not None else None
    if buf is not None and buf.messages:
        _log_dropped(len(buf.messages))


def _log_dropped(n: int) -> None:
    logger.error(
        "published messages dropped: their transaction ended without a SQLAlchemy commit or "
        "rollback",
        extra={"event": "deferred.dropped", "dropped": n},
    )
