"""Claiming rows for the relay: on the leader's connection, or ahead on a second one.

When a claim came back full, the relay sends the next one at once on a second connection kept
in pipeline mode (:meth:`Claims.send_ahead`) and reads its rows only after it has awaited and
marked the oldest batch (:meth:`Claims.take_ahead`): the server runs the claim while the
relay's thread waits for the broker. Only reads run there -- marks and the leader lock stay on
the leader's connection -- so losing it costs nothing but claiming on the leader's connection
until the next claim ahead opens a new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import struct
from typing import Any

import psycopg
import psycopg.adapt
import psycopg.conninfo
import psycopg.postgres

from outbox.exceptions import OutboxError, translate_db_errors
from outbox.leader import prepare_session

logger = logging.getLogger("outbox.relay")


@dataclasses.dataclass(slots=True)
class Row:
    """A claimed row, in the claim statement's column order."""

    id: int
    message_id: str
    topic: str
    key: bytes | None
    payload: bytes | None
    # The header arrays as PostgreSQL sends them in binary (``text[]``, ``bytea[]``): turned
    # into Kafka headers once per distinct pair, see HeaderCache.
    header_names: bytes
    header_values: bytes
    attempts: int
    #: ``created_at`` as POSIX seconds (for the commit-to-acknowledge latency).
    created: float = 0.0


#: bytea's binary loader (psycopg's C one when installed) returns a value's bytes as they came:
#: registered for the header arrays, it hands the relay their binary wire form, unparsed, as
#: the key of HeaderCache, which parses each distinct one once.
_RAW = psycopg.adapters.get_loader(psycopg.postgres.types["bytea"].oid, psycopg.pq.Format.BINARY)
_ARRAY_OIDS = (psycopg.postgres.types["text"].array_oid, psycopg.postgres.types["bytea"].array_oid)


def raw_arrays(adapters: psycopg.adapt.AdaptersMap) -> None:
    """Make ``text[]`` and ``bytea[]`` columns load as raw bytes in binary results."""
    if _RAW is None:  # pragma: no cover - psycopg always has one
        raise RuntimeError("psycopg has no binary bytea loader")
    for oid in _ARRAY_OIDS:
        adapters.register_loader(oid, _RAW)


_INT = struct.Struct("!i")


def parse_array(data: bytes) -> list[bytes]:
    """The elements of an array in PostgreSQL's binary form: the dimension count, a has-nulls
    flag, the element type, a (size, lower bound) per dimension, then each element as its
    length and bytes. Several dimensions are flattened in storage order. The table's check
    constraint allows no NULL element (length -1); one would be b""."""
    unpack = _INT.unpack_from
    ndims = unpack(data)[0]
    if ndims == 0:
        return []
    count = 1
    pos = 12
    for _ in range(ndims):
        count *= unpack(data, pos)[0]
        pos += 8
    out: list[bytes] = []
    for _ in range(count):
        size = unpack(data, pos)[0]
        pos += 4
        if size < 0:
            out.append(b"")
            continue
        out.append(data[pos : pos + size])
        pos += size
    return out


class HeaderCache:
    """Rows' header arrays as Kafka headers, in stored order. Most rows share a handful of
    distinct header lists (content type, event type): each is parsed once. The keys are the
    arrays' binary form, which the claim reads unparsed (:func:`raw_arrays`). Rows whose values
    differ (a ``traceparent`` per message) still share their names: those are decoded once,
    and only the values are parsed for each row."""

    __slots__ = ("_names", "_pairs")

    def __init__(self) -> None:
        self._pairs: dict[tuple[bytes, bytes], list[tuple[str, bytes]]] = {}
        self._names: dict[bytes, list[str]] = {}

    def __call__(self, names: bytes, values: bytes) -> list[tuple[str, bytes]]:
        key = (names, values)
        pairs = self._pairs.get(key)
        if pairs is None:
            decoded = self._names.get(names)
            if decoded is None:
                if len(self._names) > 1024:
                    self._names.clear()
                # "replace": a name is valid UTF-8 in a UTF-8 database; never fail the relay.
                decoded = [n.decode("utf-8", "replace") for n in parse_array(names)]
                self._names[names] = decoded
            if len(self._pairs) > 1024:
                self._pairs.clear()
            pairs = list(zip(decoded, parse_array(values), strict=False))
            self._pairs[key] = pairs
        return pairs


class Claims:
    """The claim statement on the leader's connection, and the claims connection that runs
    the next claim ahead. Not thread-safe (the relay's thread only)."""

    def __init__(self, conninfo: str, sql: str, batch_size: int) -> None:
        self._conninfo = conninfo
        self._sql = sql
        self._batch_size = batch_size
        self._conn: psycopg.Connection[Any] | None = None
        self._pipeline: psycopg.Pipeline | None = None
        # The pipeline's context manager must stay referenced: collecting it would leave
        # pipeline mode.
        self._stack = contextlib.ExitStack()
        self._ahead: tuple[psycopg.Cursor[Any], int] | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def backend_pid(self) -> int | None:
        """The claims connection's server process (for fault tests), if connected."""
        return self._conn.info.backend_pid if self._conn is not None else None

    @property
    def pending(self) -> bool:
        """A claim was sent ahead and not taken yet."""
        return self._ahead is not None

    def claim(self, conn: psycopg.Connection[Any], exclude: str) -> list[Row]:
        """Claim on the leader's connection ``conn`` and wait for the rows."""
        _drain_notifies(conn)
        with translate_db_errors("claim"):
            # Binary: bytea arrives raw instead of hex-encoded, the header arrays unparsed.
            cur = conn.cursor(binary=True)
            raw_arrays(cur.adapters)
            cur.execute(
                self._sql,
                {"exclude": exclude, "limit": self._batch_size},
                # Planned for each call: a prepared statement's generic plan cannot see how
                # many ids are excluded, and at some backlogs picked a plan ten times slower
                # (26 ms instead of 2.3 ms for 1000 rows, 1000 excluded, 10k pending).
                prepare=False,
            )
            return [Row(*r) for r in cur.fetchall()]

    def send_ahead(self, exclude: str, number: int) -> None:
        """Send claim number ``number`` on the claims connection without waiting for it.
        On failure, nothing is pending and the next claim runs on the leader's connection."""
        try:
            conn = self._conn or self.open()
            with translate_db_errors("claim"):
                cur = conn.cursor(binary=True)
                raw_arrays(cur.adapters)
                cur.execute(
                    self._sql,
                    {"exclude": exclude, "limit": self._batch_size},
                    prepare=False,  # see claim()
                )
        except OutboxError as exc:
            self._lost(exc)
            return
        self._ahead = (cur, number)

    def take_ahead(self, leader: psycopg.Connection[Any]) -> tuple[list[Row], int] | None:
        """The rows and number of the claim sent ahead; None if there is none or it failed
        (then claim on the leader's connection)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        cur, number = ahead
        try:
            with translate_db_errors("claim"):
                rows = cur.fetchall()
                # Ends the pipeline's implicit transaction (it would hold back vacuum).
                if self._pipeline is not None:
                    self._pipeline.sync()
        except OutboxError as exc:
            self._lost(exc)
            return None
        _drain_notifies(leader)
        return [Row(*r) for r in rows], number

    def sync(self) -> None:
        """Wait for what was sent on the claims connection (tests)."""
        if self._pipeline is not None:
            self._pipeline.sync()

    def open(self) -> psycopg.Connection[Any]:
        """Open the claims connection (done on becoming the leader: connecting takes longer
        than a batch)."""
        name = psycopg.conninfo.conninfo_to_dict(self._conninfo).get("application_name")
        with translate_db_errors("connect"):
            conn = psycopg.connect(
                self._conninfo, autocommit=True, application_name=f"{name or 'outbox'} claims"
            )
        self._stack = contextlib.ExitStack()
        try:
            with translate_db_errors("connect"):
                prepare_session(conn)
            pipeline = self._stack.enter_context(conn.pipeline())
        except BaseException:
            conn.close()
            raise
        self._conn, self._pipeline = conn, pipeline
        return conn

    def close(self) -> None:
        self._ahead = None
        conn, self._conn, self._pipeline = self._conn, None, None
        stack, self._stack = self._stack, contextlib.ExitStack()
        if conn is not None:
            # Close first: pending results are dropped instead of synced.
            with contextlib.suppress(psycopg.Error):
                conn.close()
            with contextlib.suppress(psycopg.Error):
                stack.close()

    def _lost(self, exc: OutboxError) -> None:
        # Only reads ran there: nothing in flight depends on it.
        logger.warning(
            "claim connection lost", extra={"event": "relay.claims_lost", "error": str(exc)}
        )
        self.close()


def _drain_notifies(conn: psycopg.Connection[Any]) -> None:
    # Notifications already received are for commits this claim will see; drop them (psycopg
    # queues them until read: under constant load they would pile up).
    with translate_db_errors("claim"):
        for _ in conn.notifies(timeout=0):
            pass
