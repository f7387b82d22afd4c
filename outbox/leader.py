"""The relay's main database session: the leader lock, LISTEN, and the marks.

The leader lock is a session advisory lock on *this* connection, the one that marks rows
sent: if the session ends, PostgreSQL releases the lock and the relay can mark nothing more.
The lock, the work and the fencing are one thing (see ``docs/design.md``). Claims run here
too, or ahead on the claims connection (``outbox.claims``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import sqlalchemy as sa

from outbox import statements
from outbox.exceptions import (
    ConfigurationError,
    DatabaseAccessError,
    DatabaseUnavailableError,
    MissingTablesError,
    first_line,
    translate_db_errors,
)
from outbox.purge import SentPurge
from outbox.schema import DEAD, OutboxTables, qualified

logger = logging.getLogger("outbox.relay")


def prepare_session(conn: psycopg.Connection[Any]) -> None:
    """Settings every relay session needs beyond its connection options."""
    if conn.info.server_version >= 140000:
        conn.execute(_NO_IDLE_SESSION_TIMEOUT)


_NO_IDLE_SESSION_TIMEOUT = statements.to_driver_sql(statements.no_idle_session_timeout())

#: How long a relay may queue for the leading lock, at each try until it has it: longer than
#: the writers' transactions that published (they hold it shared until they commit).
LEADING_WAIT = 0.05

#: The relay refuses a pool that does not give it a server session of its own.
SESSION_NEEDED = (
    "the relay needs a session connection (LISTEN and its leader lock): point --db-url at "
    "PostgreSQL or a session-mode pool, not PgBouncer in transaction mode"
)
# Which server session runs a statement: the backend's pid and its server's start (two servers
# behind one multi-host URL may both have a backend with that pid).
_BACKEND = "SELECT pg_backend_pid(), pg_postmaster_start_time()"


def connect_session(conninfo: str) -> psycopg.Connection[Any]:
    """An autocommit connection; a pool that refuses the relay's server options (PgBouncer
    knows no ``options`` startup parameter) is a :class:`ConfigurationError`, not an outage
    to wait out."""
    try:
        return psycopg.connect(conninfo, autocommit=True)
    except psycopg.OperationalError as exc:
        if "unsupported startup parameter" not in str(exc):
            raise
        refused = first_line(exc).rpartition("FATAL:")[2].strip()
        raise ConfigurationError(
            f"a connection pool refused the relay's session options ({refused}): "
            f"{SESSION_NEEDED}; with PgBouncer in session mode, add options to "
            "ignore_startup_parameters"
        ) from exc


def check_own_session(conn: psycopg.Connection[Any], conninfo: str, rounds: int = 2) -> None:
    """Raise :class:`ConfigurationError` unless ``conn`` keeps one server session to itself.

    A pool in transaction (or statement) mode, PgBouncer's for one, hands the server session
    to other clients between transactions: the LISTEN, the leader lock and the session's
    settings would stay behind with whichever client gets it next. It shows when ``conn``'s
    statements run on another backend, or when a second, short connection (``conninfo``) lands
    on ``conn``'s; a session of its own shows neither, ever. In a quiet pool one of the first
    two tries catches either order of handing out idle server connections: oldest first
    (``server_round_robin``) moves ``conn`` to another at its second statement when two or more
    are idle; most recently used first (PgBouncer's default), or a single idle one, gives the
    second connection ``conn``'s at once. Then ``rounds`` times the second connection holds a
    transaction open while ``conn`` runs a statement (traffic from other clients only
    shuffles the sessions more). Costs a connection and up to eleven statements, once per
    connect."""
    name = psycopg.conninfo.conninfo_to_dict(conninfo).get("application_name")

    def backend(c: psycopg.Connection[Any]) -> tuple[Any, ...]:
        return tuple(c.execute(_BACKEND).fetchone() or ())

    mine = backend(conn)
    shared = backend(conn) != mine
    try:
        if not shared:
            with psycopg.connect(
                conninfo, autocommit=True, application_name=f"{name or 'outbox'} probe"
            ) as other:
                shared = backend(other) == mine
                for _ in range(rounds):
                    if shared:
                        break
                    with other.transaction():
                        shared = backend(other) == mine or backend(conn) != mine
    except psycopg.Error as exc:
        # Statement mode: "transaction blocks not allowed in statement pooling mode".
        if "pooling mode" not in str(exc):
            raise
        shared = True
    if shared:
        raise ConfigurationError(SESSION_NEEDED)


class LeaderSession:
    """One connection (autocommit, no statement in a transaction unless recording failures).
    Not thread-safe."""

    def __init__(
        self,
        conninfo: str,
        tables: OutboxTables,
        *,
        retain_sent: bool,
        purge: SentPurge | None = None,
    ) -> None:
        self._conninfo = conninfo
        self._tables = tables
        self.conn: psycopg.Connection[Any] | None = None
        self._purge = purge

        def sql(build: Callable[[OutboxTables], sa.TextClause]) -> str:
            return statements.to_driver_sql(build(tables))

        self._probe = sql(statements.probe_tables)
        self._privileges = statements.to_driver_sql(statements.missing_privileges())
        self._probe_failures = sql(statements.probe_failure_times)
        # Marking sent deletes (or, retaining sent rows, updates); failures update; purging
        # sent rows (--purge-sent-after) deletes.
        deletes = purge is not None or not retain_sent
        self._needed = "{SELECT,UPDATE,DELETE}" if deletes else "{SELECT,UPDATE}"
        self._table = tables.qualified_name
        self._listen = sql(statements.listen)
        self._next_retry = sql(statements.next_retry_in)
        self._mark = sql(statements.mark_sent if retain_sent else statements.delete_sent)
        self._fail = sql(statements.record_failures)
        self._lock = statements.to_driver_sql(statements.try_leader_lock())
        self._epoch = sql(statements.leader_epoch)
        self._new_epoch = sql(statements.new_leader_epoch)
        self._holder = statements.to_driver_sql(statements.leader_lock_holder())
        self._leader_table = qualified(tables.leader)
        self._wait_lock = statements.to_driver_sql(statements.wait_leader_lock())
        self._lock_timeout = statements.to_driver_sql(statements.local_lock_timeout())
        self._purge_sql = sql(statements.purge_sent)
        self._lock_within_sql = statements.to_driver_sql(statements.session_lock_within())
        self._unlock = statements.to_driver_sql(statements.session_unlock())
        self._lock_held = statements.to_driver_sql(statements.session_lock_held())
        self._dozing_id = tables.dozing_lock_id
        self._leading_id = tables.leading_lock_id
        #: Holding the dozing lock: writers notify (see ``statements.wake_if_asleep``).
        self.dozing = False
        self._leading = False

    def connect(self) -> psycopg.Connection[Any]:
        """A new connection on which the tables were found and the role may do all the relay
        does (the caller owns it). Checked before anything is sent: a missing privilege found
        at the first mark would re-send a batch at every restart."""
        with translate_db_errors("connect"):
            conn = connect_session(self._conninfo)
        try:
            with translate_db_errors("connect"):
                check_own_session(conn, self._conninfo)  # before any session state is set
            # Privileges first: probing the table without SELECT would only say "permission
            # denied" (has_table_privilege needs none).
            self._require(conn, self._table, self._needed)
            with translate_db_errors("check tables"):
                conn.execute(self._probe)  # the columns of this release (outbox_0004)
            self._require(conn, self._leader_table, "{SELECT,UPDATE}", " (the leader epoch)")
            self._check_failure_times(conn)
            with translate_db_errors("connect"):
                prepare_session(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _require(
        self, conn: psycopg.Connection[Any], table: str, needed: str, what: str = ""
    ) -> None:
        """Raise a one-line error naming the privileges of ``needed`` the role lacks on
        ``table``, and the GRANT that gives them."""
        try:
            with translate_db_errors("check tables"):
                row = conn.execute(self._privileges, {"table": table, "needed": needed}).fetchone()
        except MissingTablesError:
            if table != self._leader_table:
                raise
            raise MissingTablesError(
                f"the outbox tables are older than this version (no {table}): run "
                "`outbox db upgrade --db-url URL` (or `alembic upgrade outbox@head`) first"
            ) from None
        if row is not None and row[1]:
            role, missing = row[0], ", ".join(row[1])
            grant = needed.strip("{}").replace(",", ", ")
            raise DatabaseAccessError(
                f"the relay's role {role!r} lacks {missing} on {table}{what}: "
                f"GRANT {grant} ON {table} TO {role}"
            )

    def _check_failure_times(self, conn: psycopg.Connection[Any]) -> None:
        """The columns of revision ``outbox_0006``, which the failure statement sets."""
        with translate_db_errors("check tables"):
            try:
                conn.execute(self._probe_failures)
            except psycopg.errors.UndefinedColumn:
                raise MissingTablesError(
                    f"the outbox tables are older than this version (no first_failed_at on "
                    f"{self._table}): run `outbox db upgrade --db-url URL` (or `alembic "
                    "upgrade outbox@head`) first"
                ) from None

    def try_lead(self, wait: float = 0.0) -> bool:
        """Connect and LISTEN if needed, then take the leader lock of the current epoch: at
        once or not at all, or waiting up to ``wait`` seconds for the leader's session to end.
        Not taken because a role that is not a relay holds it: move to a new epoch (the next
        call takes that lock)."""
        if self.conn is None:
            conn = self.connect()
            with translate_db_errors("listen"):
                conn.execute(self._listen)
            self.conn = conn
        conn = self.conn
        with translate_db_errors("leader lock"):
            row = conn.execute(self._epoch).fetchone()
            epoch = int(row[0]) if row else 0
            lock_id = self._tables.leader_lock_id(epoch)
            if wait <= 0:
                row = conn.execute(self._lock, {"lock_id": lock_id}).fetchone()
                taken = bool(row and row[0])
            else:
                taken = self._wait_for(conn, lock_id, wait)
            if not taken:
                self._evict_squatter(conn, epoch, lock_id)
        return taken

    def _wait_for(self, conn: psycopg.Connection[Any], lock_id: int, wait: float) -> bool:
        try:
            # The timeouts are local to this transaction: marks never inherit them.
            with conn.transaction():
                ms = max(1, int(wait * 1000))
                conn.execute(self._lock_timeout, {"ms": str(ms), "statement_ms": str(ms + 5000)})
                conn.execute(self._wait_lock, {"lock_id": lock_id})
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
            return False  # lock_timeout (or a shorter statement_timeout) passed
        return True

    def _evict_squatter(self, conn: psycopg.Connection[Any], epoch: int, lock_id: int) -> None:
        """If the lock of ``epoch`` is held by a role that may not change the leader table
        (so: not a relay), move every relay to a new epoch, whose lock that role cannot know
        (it cannot read the table). A relay that holds the lock is never moved away from: it
        has the privilege, so its epoch is never replaced."""
        unsigned = lock_id & 0xFFFFFFFFFFFFFFFF
        row = conn.execute(
            self._holder,
            {"leader": self._leader_table, "hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF},
        ).fetchone()
        if row is None or row[2]:
            return  # free now, or held by a relay: a standby waits
        moved = conn.execute(self._new_epoch, {"epoch": epoch}).fetchone()
        logger.error(
            "the relays' leader lock is held by a role that is not a relay; moved to a new epoch",
            extra={
                "event": "relay.leader_lock_squatted",
                "holder_pid": row[0],
                "holder_role": row[1],
                "moved": moved is not None,
            },
        )

    def next_retry_in(self) -> float | None:
        """Seconds until the earliest scheduled retry (by any leader), if there is one."""
        with translate_db_errors("read retry times"):
            due = self.require().execute(self._next_retry).fetchone()
        return None if due is None or due[0] is None else max(0.0, float(due[0]))

    def record(
        self,
        acked: str | Sequence[int],
        failed: Sequence[tuple[int, str]],
        delays: Sequence[float],
        max_attempts: int,
    ) -> list[tuple[Any, ...]]:
        """Mark ``acked`` sent (ids, or a ready bigint[] literal) and count an attempt for
        each of ``failed`` (retry after ``delays``): one statement, one round trip, no
        BEGIN/COMMIT in the common case. Returns the rows (id, status, attempts) parked."""
        conn = self.require()
        parked: list[tuple[Any, ...]] = []
        with (
            translate_db_errors("mark sent"),
            conn.transaction() if failed else contextlib.nullcontext(),
        ):
            if acked:
                ids = acked if isinstance(acked, str) else statements.plain_array(acked)
                conn.execute(self._mark, {"ids": ids})
            if failed:
                cur = conn.execute(
                    self._fail,
                    {
                        "ids": statements.plain_array([f[0] for f in failed]),
                        "errors": [f[1][:2000] for f in failed],
                        "delays": list(delays),
                        "max_attempts": max_attempts,
                    },
                )
                parked = [r for r in cur.fetchall() if r[1] == DEAD]
        return parked

    def purge_when_idle(self, budget: float = 0.1) -> bool:
        """``--purge-sent-after``: when a pass is due, run its batches for up to ``budget``
        seconds (the relay is idle: nothing to claim). Returns whether the pass goes on (the
        relay looks for work, then calls again) rather than waiting for a notification."""
        purge = self._purge
        if purge is None or not purge.due():
            return False
        conn = self.require()
        until = time.monotonic() + budget
        with translate_db_errors("purge sent messages"):
            while True:
                purge.step(lambda params: conn.execute(self._purge_sql, params).fetchone())
                if not purge.running or time.monotonic() >= until:
                    break
        if not purge.running and purge.deleted:
            logger.info(
                "sent messages purged",
                extra={
                    "event": "relay.purged",
                    "deleted": purge.deleted,
                    "older_than_s": purge.older_than,
                },
            )
        return purge.running

    def lead(self, wait: float) -> None:
        """Take the leading lock if this session does not hold it yet (once per session).
        Until then writers notify at every commit, as for an older relay, and hold it shared
        until they commit: queued for it, the relay gets it when those in flight have
        committed (later ones cannot take it)."""
        if not self._leading:
            conn = self.require()
            with translate_db_errors("lead"):
                self._leading = self._lock_within(conn, self._leading_id, max(wait, LEADING_WAIT))

    def doze(self, wait: float) -> bool:
        """Take the dozing lock, waiting up to ``wait`` seconds for the writers in flight
        (between their insert and their commit) to commit. Once it is taken, every writer
        notifies; the caller claims once more, then sleeps. True if taken."""
        self.lead(wait)
        conn = self.require()
        with translate_db_errors("doze"):
            if not self._lock_within(conn, self._dozing_id, wait):
                return False  # a writer is still in flight: claim again, then retry
            # Drop the notifications received so far: their commits came before the lock
            # was taken, so the claim that follows sees their rows. Left, each would cut a
            # sleep short for nothing.
            for _ in conn.notifies(timeout=0):
                pass
        self.dozing = True
        return True

    def _lock_within(self, conn: psycopg.Connection[Any], lock_id: int, wait: float) -> bool:
        """Take session lock ``lock_id``, queued for at most ``wait`` seconds."""
        try:
            ms = f"{max(1, int(wait * 1000))}ms"
            conn.execute(self._lock_within_sql, {"ms": ms, "lock_id": lock_id})
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
            # Granted as the timeout fired, the lock is held all the same. Untracked, a held
            # dozing lock would make every writer notify, and the next doze would take it a
            # second time, which one unlock does not undo.
            row = conn.execute(self._lock_held, {"lock_id": lock_id}).fetchone()
            return bool(row and row[0])
        return True

    def wake(self) -> None:
        """Release the dozing lock: from now on writers do not notify."""
        if self.dozing:
            with translate_db_errors("wake"):
                self.require().execute(self._unlock, {"lock_id": self._dozing_id})
            self.dozing = False

    def wait_for_notify(self, deadline: float, stop: threading.Event) -> bool:
        """Wait until a writer's commit notifies, ``deadline`` (monotonic) passes or
        ``stop`` is set. Issues no statement. True if notified."""
        conn = self.require()
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with translate_db_errors("wait for notifications"):
                for _ in conn.notifies(timeout=min(remaining, 0.25), stop_after=1):
                    return True
        return False

    def require(self) -> psycopg.Connection[Any]:
        if self.conn is None:
            raise DatabaseUnavailableError("not connected")
        return self.conn

    def close(self) -> None:
        """Close the session (which releases the leader lock)."""
        conn, self.conn = self.conn, None
        self.dozing = self._leading = False  # session locks end with the session
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
