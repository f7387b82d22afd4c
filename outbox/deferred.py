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
import hashlib
import itertools
import logging
import select
import weakref
from collections.abc import Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg

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
) -> list[tuple[sa.TextClause, dict[str, Any]]]:
    groups: dict[OutboxTables, list[EncodedMessage]] = {}
    for tables, e in messages:
        groups.setdefault(tables, []).append(e)
    return [statements.insert(tables, encoded) for tables, encoded in groups.items()]


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
        # INSERT and COMMIT in one round trip. If the INSERT fails, the server skips the
        # COMMIT and the transaction is rolled back: no business row without its events.
        # SQLAlchemy's own commit() that follows finds no transaction and does nothing.
        if isinstance(driver, psycopg.Connection):
            _commit_with(driver, stmts)
        else:
            conn.connection.dbapi_connection.run_async(  # type: ignore[union-attr]
                functools.partial(_acommit, [(statements.to_driver_sql(s), p) for s, p in stmts])
            )


_NUMBERED = pg_psycopg.dialect(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]


@functools.lru_cache(maxsize=64)
def _numbered(stmt: sa.TextClause) -> tuple[bytes, tuple[str, ...]]:
    """``stmt`` with ``$n`` parameters, and the names they stand for, in order."""
    compiled = stmt.compile(dialect=_NUMBERED)
    return str(compiled).encode(), tuple(compiled.positiontup or ())


class _Prepared:
    """The statements prepared on one connection. Names carry a generation: after a failed
    commit, which may have left some prepared and some not, new names are used."""

    __slots__ = ("generation", "names")

    def __init__(self) -> None:
        self.generation = 0
        self.names: set[bytes] = set()


_prepared: weakref.WeakKeyDictionary[psycopg.Connection[Any], _Prepared] = (
    weakref.WeakKeyDictionary()
)
_generations = itertools.count(1)


def _commit_with(
    driver: psycopg.Connection[Any], stmts: list[tuple[sa.TextClause, dict[str, Any]]]
) -> None:
    """Send the inserts and the COMMIT in one libpq pipeline, and wait for them.

    What ``with driver.pipeline()`` does, without its general machinery: that costs about as
    much again as the insert's own server time (see docs/performance.md). The inserts are
    prepared once per connection and statement (as psycopg would, unless the connection's
    ``prepare_threshold`` is None, e.g. behind PgBouncer in transaction mode).
    """
    tx = Transformer.from_context(driver)
    dumped = []
    for stmt, params in stmts:  # all dumped before anything is sent: a bad value sends nothing
        sql, names = _numbered(stmt)
        values = tx.dump_sequence([params[n] for n in names], [PyFormat.AUTO] * len(names))
        dumped.append((sql, values, tx.types, tx.formats))
    prepared = None
    if driver.prepare_threshold is not None:
        prepared = _prepared.get(driver)
        if prepared is None:
            prepared = _prepared[driver] = _Prepared()
    pg = driver.pgconn
    new: list[bytes] = []
    with driver.lock:
        pg.enter_pipeline_mode()
        try:
            for sql, values, types, formats in dumped:
                if prepared is None:
                    pg.send_query_params(sql, values, types, formats)
                    continue
                digest = hashlib.blake2b(sql + repr(types).encode(), digest_size=8).hexdigest()
                name = f"outbox_{prepared.generation}_{digest}".encode()
                if name not in prepared.names:
                    pg.send_prepare(name, sql, types)
                    new.append(name)
                pg.send_query_prepared(name, values, formats)
            pg.send_query_params(b"COMMIT", None)
            pg.pipeline_sync()
            error = _await_sync(pg)
        except BaseException:
            # Interrupted or disconnected with results pending: the connection cannot be
            # used again, and whether the COMMIT happened is unknown (as for any commit
            # whose answer was lost).
            pg.finish()
            raise
        pg.exit_pipeline_mode()
    if error is not None:
        if prepared is not None:
            prepared.generation = next(_generations)
            prepared.names.clear()
        raise psycopg.errors.error_from_result(error, encoding=driver.info.encoding)
    if prepared is not None:
        prepared.names.update(new)


def _await_sync(pg: pq.abc.PGconn) -> pq.abc.PGresult | None:
    """Flush the pipeline and read every result up to its sync point; returns the first
    error, if any (the statements after it are skipped by the server)."""
    fileno = pg.socket
    while pg.flush():
        # Both ways: libpq may need to read before it can write more (docs of PQflush).
        if _wait(fileno, write=True):
            pg.consume_input()
    error = None
    while True:
        while pg.is_busy():
            _wait(fileno, write=False)
            pg.consume_input()
        result = pg.get_result()
        if result is None:
            continue  # the end of one statement's results
        if result.status == pq.ExecStatus.PIPELINE_SYNC:
            return error
        if result.status == pq.ExecStatus.FATAL_ERROR and error is None:
            error = result


def _wait(fileno: int, *, write: bool) -> bool:
    """Block until ``fileno`` is readable (or, with ``write``, writable too); True if
    readable. poll() where there is one: select() fails on descriptors past 1023."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fileno, select.POLLIN | (select.POLLOUT if write else 0))
        events = poller.poll()
        return any(e & (select.POLLIN | select.POLLERR | select.POLLHUP) for _, e in events)
    readable, _, _ = select.select([fileno], [fileno] if write else [], [])
    return bool(readable)


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
