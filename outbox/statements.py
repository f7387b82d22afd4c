"""Every SQL statement the library runs, built by named functions.

Builders only build; they never execute. Each takes the :class:`~outbox.schema.OutboxTables`
it works on, so table and schema names are configurable and quoted by SQLAlchemy.
Statements are written for PostgreSQL 13+.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg

from outbox.message import EncodedMessage
from outbox.schema import DEAD, NEW_EPOCH, PENDING, RETRY, SENT, OutboxTables

_DIALECT = pg_psycopg.dialect()  # type: ignore[no-untyped-call]


def _table(tables: OutboxTables) -> str:
    return _DIALECT.identifier_preparer.format_table(tables.messages)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@functools.lru_cache(maxsize=64)
def insert_messages(tables: OutboxTables) -> sa.TextClause:
    """Insert a list of messages in one round trip, in list order.

    Before any row gets its id, the statement takes a transaction-scoped advisory lock per
    distinct (topic, key) (ids pre-sorted by the caller, so two writers never deadlock on each
    other's keys). The lock is held until commit, so a later writer of the same key only gets
    its ids after the earlier one committed or rolled back: per key, id order is commit order,
    and a row that the relay sees is never overtaken by a lower id of the same key. The
    ``pg_notify`` fires only on commit, waking the relay.

    Headers travel as two flat arrays (every message's names, then values, in order);
    message ``i`` owns the slice ``header_from[i]:header_to[i]`` (empty when from > to): arrays
    of arrays must be rectangular in PostgreSQL, header lists are not.
    """
    sql = f"""
INSERT INTO {_table(tables)} (message_id, topic, key, payload, header_names, header_values)
SELECT m.message_id, m.topic, m.key, m.payload,
       h.names[m.hfrom:m.hto], h.vals[m.hfrom:m.hto]
FROM unnest(
        CAST(:message_ids AS uuid[]), CAST(:topics AS text[]), CAST(:keys AS bytea[]),
        CAST(:payloads AS bytea[]), CAST(:header_from AS int[]), CAST(:header_to AS int[])
     ) WITH ORDINALITY AS m(message_id, topic, key, payload, hfrom, hto, ord),
     (SELECT CAST(:header_names AS text[]) AS names,
             CAST(:header_values AS bytea[]) AS vals) AS h,
     (SELECT count(pg_advisory_xact_lock(l)) AS n
        FROM unnest(CAST(:lock_ids AS bigint[])) AS l) AS locks,
     (SELECT pg_notify({_literal(tables.channel)}, '')) AS wake
ORDER BY m.ord
"""
    return sa.text(sql)


@functools.lru_cache(maxsize=64)
def insert_message(tables: OutboxTables) -> sa.TextClause:
    """Insert one message: :func:`insert_messages` for the common case, about half the
    server time (no arrays to unpack). ``lock_id`` NULL (no key) takes no lock: the lock
    function is strict."""
    sql = f"""
INSERT INTO {_table(tables)} (message_id, topic, key, payload, header_names, header_values)
SELECT :message_id, :topic, :key, :payload,
       CAST(:header_names AS text[]), CAST(:header_values AS bytea[])
FROM (SELECT pg_advisory_xact_lock(CAST(:lock_id AS bigint)),
             pg_notify({_literal(tables.channel)}, '')) AS wake
"""
    return sa.text(sql)


def insert(
    tables: OutboxTables, encoded: Sequence[EncodedMessage]
) -> tuple[sa.TextClause, dict[str, Any]]:
    """The one statement that writes ``encoded`` (at least one message), with its parameters:
    :func:`insert_message` for one, :func:`insert_messages` for several."""
    if len(encoded) == 1:
        e = encoded[0]
        return insert_message(tables), {
            "message_id": e.message_id,
            "topic": e.topic,
            "key": e.key,
            "payload": e.payload,
            "header_names": [n for n, _ in e.headers],
            "header_values": [v for _, v in e.headers],
            "lock_id": None if e.key is None else tables.lock_id(e.topic.encode(), e.key),
        }
    lock_ids = sorted(
        {tables.lock_id(e.topic.encode(), e.key) for e in encoded if e.key is not None}
    )
    names: list[str] = []
    values: list[bytes | None] = []
    starts: list[int] = []
    ends: list[int] = []
    for e in encoded:
        starts.append(len(names) + 1)  # PostgreSQL arrays start at 1; slices are inclusive
        for name, value in e.headers:
            names.append(name)
            values.append(value)
        ends.append(len(names))
    params: dict[str, Any] = {
        "message_ids": [e.message_id for e in encoded],
        "topics": [e.topic for e in encoded],
        "keys": [e.key for e in encoded],
        "payloads": [e.payload for e in encoded],
        "header_from": starts,
        "header_to": ends,
        "header_names": names,
        "header_values": values,
        "lock_ids": lock_ids,
    }
    return insert_messages(tables), params


@functools.lru_cache(maxsize=64)
def claim(tables: OutboxTables) -> sa.TextClause:
    """The next messages to send, in id order.

    Excludes ids already in flight, retries whose time has not come, parked messages, and every
    message of a (topic, key) that has an earlier message in backoff or parked: a failing
    message holds back its own key only. Only the leader relay runs it, so it takes no row
    locks. Cost stays flat with the backlog: it walks the partial index ``ix_*_unsent`` and
    probes ``ix_*_held``, which is empty while nothing fails.
    """
    t = _table(tables)
    sql = f"""
SELECT o.id, CAST(o.message_id AS text), o.topic, o.key, o.payload, o.header_names,
       o.header_values, o.attempts, CAST(extract(epoch FROM o.created_at) AS float8)
FROM {t} AS o
WHERE o.status IN ('{PENDING}', '{RETRY}')
  AND (o.status = '{PENDING}' OR o.next_attempt_at <= now())
  AND o.id <> ALL(CAST(:exclude AS bigint[]))
  AND NOT EXISTS (
      SELECT 1 FROM {t} AS h
      WHERE h.status IN ('{RETRY}', '{DEAD}')
        AND h.topic = o.topic AND h.key = o.key AND h.id < o.id
        AND (h.status = '{DEAD}' OR h.next_attempt_at > now())
  )
ORDER BY o.id
LIMIT :limit
"""
    return sa.text(sql)


@functools.lru_cache(maxsize=64)
def delete_sent(tables: OutboxTables) -> sa.TextClause:
    """Remove acknowledged messages (the default ``delete`` mode)."""
    return sa.text(f"DELETE FROM {_table(tables)} WHERE id = ANY(CAST(:ids AS bigint[]))")


@functools.lru_cache(maxsize=64)
def mark_sent(tables: OutboxTables) -> sa.TextClause:
    """Keep acknowledged messages with their send time (``retain`` mode)."""
    return sa.text(
        f"UPDATE {_table(tables)} SET status = '{SENT}', sent_at = now(), "
        "next_attempt_at = NULL WHERE id = ANY(CAST(:ids AS bigint[]))"
    )


@functools.lru_cache(maxsize=64)
def record_failures(tables: OutboxTables) -> sa.TextClause:
    """Count one failed attempt per message; park those that reached ``max_attempts``.

    ``delays`` are seconds until the next attempt, chosen by the caller (backoff with jitter).
    Returns the new status of each row.
    """
    sql = f"""
UPDATE {_table(tables)} AS o
SET attempts = o.attempts + 1,
    last_error = f.error,
    status = CASE WHEN o.attempts + 1 >= :max_attempts THEN '{DEAD}' ELSE '{RETRY}' END,
    next_attempt_at = CASE WHEN o.attempts + 1 >= :max_attempts THEN NULL
                           ELSE now() + f.delay * interval '1 second' END
FROM unnest(CAST(:ids AS bigint[]), CAST(:errors AS text[]), CAST(:delays AS float8[]))
     AS f(id, error, delay)
WHERE o.id = f.id AND o.status IN ('{PENDING}', '{RETRY}')
RETURNING o.id, o.status, o.attempts
"""
    return sa.text(sql)


@functools.lru_cache(maxsize=64)
def next_retry_in(tables: OutboxTables) -> sa.TextClause:
    """Seconds until the earliest scheduled retry (negative: overdue; NULL: none)."""
    return sa.text(
        f"SELECT EXTRACT(EPOCH FROM min(next_attempt_at) - now()) FROM {_table(tables)} "
        f"WHERE status = '{RETRY}'"
    )


@functools.lru_cache(maxsize=64)
def replay_dead(tables: OutboxTables) -> sa.TextClause:
    """Give parked messages (all, or the listed ids) a fresh set of attempts."""
    return sa.text(
        f"UPDATE {_table(tables)} SET status = '{PENDING}', attempts = 0, "
        f"next_attempt_at = NULL WHERE status = '{DEAD}' "
        "AND (CAST(:ids AS bigint[]) IS NULL OR id = ANY(CAST(:ids AS bigint[]))) "
        "RETURNING id"
    )


@functools.lru_cache(maxsize=64)
def count_by_status(tables: OutboxTables) -> sa.TextClause:
    return sa.text(
        f"SELECT status, count(*) AS n, min(created_at) AS oldest FROM {_table(tables)} "
        "GROUP BY status"
    )


@functools.lru_cache(maxsize=64)
def probe_tables(tables: OutboxTables) -> sa.TextClause:
    """Fails with UndefinedTable when the tables are not installed, and with UndefinedColumn
    when they are older than revision ``outbox_0004`` (run ``outbox db upgrade``)."""
    return sa.text(f"SELECT header_names, header_values FROM {_table(tables)} LIMIT 0")


def missing_privileges() -> sa.TextClause:
    """The current role's name, and which of ``:needed`` (e.g. ``{SELECT,UPDATE,DELETE}``) it
    lacks on table ``:table``: checked at start, before anything is sent. Needs no privilege
    (a missing table fails with UndefinedTable)."""
    return sa.text(
        "SELECT current_user, array(SELECT p FROM unnest(CAST(:needed AS text[])) AS p "
        "WHERE NOT has_table_privilege(CAST(:table AS text), p))"
    )


def terminate_backend() -> sa.TextClause:
    """End the server session ``:pid`` (the consumer's own hung handler: its transaction,
    with the inbox claim, rolls back)."""
    return sa.text("SELECT pg_terminate_backend(:pid)")


def _leader(tables: OutboxTables) -> str:
    return _DIALECT.identifier_preparer.format_table(tables.leader)


def leader_epoch(tables: OutboxTables) -> sa.TextClause:
    """The current leader epoch (no row: 0). Only relay roles can read it."""
    return sa.text(f"SELECT coalesce((SELECT epoch FROM {_leader(tables)}), 0)")


def new_leader_epoch(tables: OutboxTables) -> sa.TextClause:
    """Move the relays to a new epoch, if it is still ``:epoch`` (one of several relays that
    noticed the same squatter wins; the others read the new epoch)."""
    return sa.text(
        f"UPDATE {_leader(tables)} SET epoch = {NEW_EPOCH} WHERE epoch = :epoch RETURNING epoch"
    )


def leader_lock_holder() -> sa.TextClause:
    """Who holds advisory lock ``:lock_id`` in this database, and whether that role may
    change ``:leader`` (the leader table: relays may). Reads pg_locks and pg_stat_activity,
    which every role can."""
    return sa.text(
        "SELECT l.pid, a.usename, "
        "has_table_privilege(a.usesysid, CAST(:leader AS regclass), 'UPDATE') "
        "FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.classid = CAST(CAST(:hi AS bigint) AS oid) "
        "AND l.objid = CAST(CAST(:lo AS bigint) AS oid)"
    )


def try_leader_lock() -> sa.TextClause:
    """Session-scoped: held until released or the session ends (crash included)."""
    return sa.text("SELECT pg_try_advisory_lock(:lock_id)")


def wait_leader_lock() -> sa.TextClause:
    """Wait for the leader lock (session-scoped even when taken inside a transaction), at
    most ``lock_timeout`` (see :func:`local_lock_timeout`): a standby takes over as soon as
    the leader's session ends instead of at its next poll."""
    return sa.text("SELECT pg_advisory_lock(:lock_id)")


def local_lock_timeout() -> sa.TextClause:
    """``lock_timeout`` for the current transaction only (``:ms``), and a longer
    ``statement_timeout`` (``:statement_ms``): a short one set on the role must not cut every
    wait of a standby into a burst of statements."""
    return sa.text(
        "SELECT set_config('lock_timeout', :ms, true), "
        "set_config('statement_timeout', :statement_ms, true)"
    )


def no_idle_session_timeout() -> sa.TextClause:
    """PostgreSQL 14+: the relay's sessions idle while the broker acknowledges a batch; an
    ``idle_session_timeout`` meant for leaked application sessions must not end them (a lost
    leader session re-sends its batch). Keepalives, not this timeout, detect a dead relay."""
    return sa.text("SET idle_session_timeout = 0")


def listen(tables: OutboxTables) -> sa.TextClause:
    return sa.text(f"LISTEN {_DIALECT.identifier_preparer.quote(tables.channel)}")


@functools.lru_cache(maxsize=256)
def to_driver_sql(stmt: sa.TextClause) -> str:
    """Compile for running directly on a psycopg connection (``%(name)s`` parameters)."""
    return str(stmt.compile(dialect=_DIALECT))


# -- inbox --------------------------------------------------------------------------------------


def _inbox(tables: OutboxTables) -> str:
    return _DIALECT.identifier_preparer.format_table(tables.inbox)


@functools.lru_cache(maxsize=64)
def probe_inbox(tables: OutboxTables) -> sa.TextClause:
    """Fails with UndefinedTable when the inbox is not installed."""
    return sa.text(f"SELECT 1 FROM {_inbox(tables)} LIMIT 0")


def probe_outbox_for_writers(tables: OutboxTables) -> sa.TextClause:
    """For a role that writes to the outbox table without reading it (a consumer's dead
    letters and events): fails with UndefinedTable when it is not installed; returns how many
    of the header columns of revision ``outbox_0004`` it has (2 when up to date), whether the
    role may INSERT, and the role's name. Reads only the catalog: no SELECT privilege needed."""
    table = _literal(_table(tables))
    return sa.text(
        "SELECT (SELECT count(*) FROM pg_attribute "
        f"WHERE attrelid = CAST({table} AS regclass) AND NOT attisdropped "
        "AND attname IN ('header_names', 'header_values')), "
        f"has_table_privilege(CAST({table} AS regclass), 'INSERT'), current_user"
    )


@functools.lru_cache(maxsize=64)
def inbox_claim(tables: OutboxTables) -> sa.TextClause:
    """Record (consumer, key) as processed; returns a row only the first time.

    A concurrent transaction inserting the same key makes this one wait on the unique index
    until it ends: then this returns nothing if it committed, a row if it rolled back.
    """
    return sa.text(
        f"INSERT INTO {_inbox(tables)} (consumer, key, expires_at) "
        "VALUES (:consumer, :key, now() + CAST(:retention AS float8) * interval '1 second') "
        "ON CONFLICT (consumer, key) DO NOTHING RETURNING true"
    )


@functools.lru_cache(maxsize=64)
def command_begin(tables: OutboxTables) -> sa.TextClause:
    """Start an idempotent command in one round trip.

    Returns ``(locked, fresh, found, fingerprint, response_status, response_body)``:
    ``locked`` false: another transaction holds the key now (in progress);
    ``fresh`` true: this transaction owns the key (new, or the old one expired), run it;
    otherwise the stored row, as committed before this statement began (``found`` false: it
    committed after the statement's snapshot was taken; run the statement again).
    """
    t = _inbox(tables)
    sql = f"""
WITH lock AS (SELECT pg_try_advisory_xact_lock(:lock_id) AS got),
fresh AS (
    INSERT INTO {t} AS i (consumer, key, fingerprint, expires_at)
    SELECT :consumer, :key, :fingerprint,
           now() + CAST(:ttl AS float8) * interval '1 second'
    FROM lock WHERE lock.got
    ON CONFLICT (consumer, key) DO UPDATE
        SET fingerprint = EXCLUDED.fingerprint, response_status = NULL, response_body = NULL,
            created_at = now(), expires_at = EXCLUDED.expires_at
        WHERE i.expires_at <= now()
    RETURNING true AS fresh
)
SELECT (SELECT got FROM lock), COALESCE((SELECT fresh FROM fresh), false),
       s.key IS NOT NULL, s.fingerprint, s.response_status, s.response_body
FROM (SELECT 1) AS one
LEFT JOIN {t} AS s ON s.consumer = :consumer AND s.key = :key
"""
    return sa.text(sql)


@functools.lru_cache(maxsize=64)
def command_complete(tables: OutboxTables) -> sa.TextClause:
    return sa.text(
        f"UPDATE {_inbox(tables)} SET response_status = :status, response_body = :body "
        "WHERE consumer = :consumer AND key = :key"
    )


@functools.lru_cache(maxsize=64)
def inbox_purge(tables: OutboxTables) -> sa.TextClause:
    """Delete up to ``limit`` expired rows; short, so it never blocks writers for long."""
    t = _inbox(tables)
    return sa.text(
        f"DELETE FROM {t} WHERE ctid IN (SELECT ctid FROM {t} WHERE expires_at < now() "
        "LIMIT :limit FOR UPDATE SKIP LOCKED)"
    )
