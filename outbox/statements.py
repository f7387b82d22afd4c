"""Every SQL statement the library runs, built by named functions.

Builders only build; they never execute. Each takes the :class:`~outbox.schema.OutboxTables`
it works on, so table and schema names are configurable and quoted by SQLAlchemy.
Statements are written for PostgreSQL 13+.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
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


# Array parameters as PostgreSQL array literals (text the server parses in C), for psycopg.
# psycopg adapts a Python list in Python, element by element: for a 100-message insert, about
# 2 ms, more than the statement's own server time. Other drivers get lists.


def plain_array(values: Sequence[object]) -> str:
    """An array literal of values whose text needs no quoting: integers, UUIDs."""
    return "{" + ",".join(map(str, values)) + "}"


def _quoted(value: str) -> str:
    # Inside double quotes a backslash escapes the next character; nothing else is special.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _text_array(values: Sequence[str]) -> str:
    return "{" + ",".join(map(_quoted, values)) + "}"


def _bytea_array(values: Sequence[bytes | None]) -> str:
    # Each element in bytea's hex input form, \x..., its backslash escaped: "\\x...".
    return "{" + ",".join("NULL" if v is None else '"\\\\x' + v.hex() + '"' for v in values) + "}"


def _array(name: str, element: str) -> str:
    """Parameter ``name`` as an ``element[]``: a list, or a literal that psycopg sends untyped
    for the cast to parse (not through ``text``: that made the insert a third slower)."""
    return f"CAST(:{name} AS {element}[])"


@functools.lru_cache(maxsize=64)
def insert_messages(tables: OutboxTables, headers: bool = True) -> sa.TextClause:
    """Insert a list of messages in one round trip, in list order.

    Before any row gets its id, the statement takes a transaction-scoped advisory lock per
    distinct (topic, key) (ids pre-sorted by the caller, so two writers never deadlock on each
    other's keys). The lock is held until commit, so a later writer of the same key only gets
    its ids after the earlier one committed or rolled back: per key, id order is commit order,
    and a row that the relay sees is never overtaken by a lower id of the same key. It
    notifies the relay (delivered on commit) only when the relay may be asleep: see
    :func:`wake_if_asleep`.

    Headers travel as two flat arrays (every message's names, then values, in order);
    message ``i`` owns the slice ``header_from[i]:header_to[i]`` (empty when from > to): arrays
    of arrays must be rectangular in PostgreSQL, header lists are not. Without ``headers``
    (no message has any) the columns keep their defaults, empty arrays: sending and checking
    empty arrays costs about 3 % of a one-row transaction.
    """
    if headers:
        columns = ", header_names, header_values"
        select = ",\n       h.names[m.hfrom:m.hto], h.vals[m.hfrom:m.hto]"
        ranges = f",\n        {_array('header_from', 'int')}, {_array('header_to', 'int')}"
        names = ", hfrom, hto"
        arrays = f"""
     (SELECT {_array("header_names", "text")} AS names,
             {_array("header_values", "bytea")} AS vals) AS h,"""
    else:
        columns = select = ranges = names = arrays = ""
    sql = f"""
INSERT INTO {_table(tables)} (message_id, topic, key, payload{columns})
SELECT m.message_id, m.topic, m.key, m.payload{select}
FROM unnest(
        {_array("message_ids", "uuid")}, {_array("topics", "text")},
        {_array("keys", "bytea")}, {_array("payloads", "bytea")}{ranges}
     ) WITH ORDINALITY AS m(message_id, topic, key, payload{names}, ord),{arrays}
     (SELECT count(pg_advisory_xact_lock(l)) AS n,
             {wake_if_asleep(tables)} AS wake
        FROM unnest({_array("lock_ids", "bigint")}) AS l) AS locks
ORDER BY m.ord
"""
    return sa.text(sql)


#: Up to this many headers, :func:`insert_message` takes each as a parameter of its own.
SCALAR_HEADERS = 8


@functools.lru_cache(maxsize=64)
def insert_message(tables: OutboxTables, headers: int | None = None) -> sa.TextClause:
    """Insert one message: :func:`insert_messages` for the common case, about half the
    server time (no arrays to unpack). ``lock_id`` NULL (no key) takes no lock: the lock
    function is strict.

    ``headers``: None, the headers come as two array parameters; a count (at most
    :data:`SCALAR_HEADERS`), each name and value is a parameter of its own (``hn0``, ``hv0``,
    ...), which saves about 6 % of a one-row transaction (psycopg dumps a Python list as an
    array in Python); 0, the header columns keep their defaults, empty arrays."""
    if headers is None:
        columns = ", header_names, header_values"
        values = ",\n       CAST(:header_names AS text[]), CAST(:header_values AS bytea[])"
    elif headers:
        columns = ", header_names, header_values"
        names = ", ".join(f"CAST(:hn{i} AS text)" for i in range(headers))
        blobs = ", ".join(f"CAST(:hv{i} AS bytea)" for i in range(headers))
        values = f",\n       ARRAY[{names}], ARRAY[{blobs}]"
    else:
        columns = values = ""
    sql = f"""
INSERT INTO {_table(tables)} (message_id, topic, key, payload{columns})
SELECT :message_id, :topic, :key, :payload{values}
FROM (SELECT pg_advisory_xact_lock(CAST(:lock_id AS bigint)),
             {wake_if_asleep(tables)} AS wake) AS locks
"""
    return sa.text(sql)


def wake_if_asleep(tables: OutboxTables) -> str:
    """The writers' half of the wake-up protocol, an SQL expression: notify the relay (on
    commit) only if it may be asleep.

    A ``pg_notify`` costs every writer a database-wide lock held through its commit, which
    serializes concurrent committers. So the relay takes the *dozing* lock (exclusive,
    session-scoped, :func:`session_lock_within`) before it claims one last time and sleeps,
    and writers take it shared until their commit: a writer that gets it holds the relay
    awake until it has committed, and the relay's last claim sees its rows; a writer that
    cannot get it (the relay dozes, or waits to) notifies. A relay of this version also
    holds the *leading* lock while it leads: a writer that gets that one shared knows of no
    such relay (an older one, during an upgrade, or none yet) and notifies as before.
    """
    notify = f"pg_notify({_literal(tables.channel)}, '')"
    return (
        f"CASE WHEN NOT pg_try_advisory_xact_lock_shared({tables.dozing_lock_id}) "
        f"THEN {notify} "
        f"WHEN pg_try_advisory_xact_lock_shared({tables.leading_lock_id}) THEN {notify} END"
    )


def session_lock_within() -> sa.TextClause:
    """The relay's half (see :func:`wake_if_asleep`): take the dozing (or leading) lock,
    waiting at most ``lock_timeout`` (``:ms``, for this statement only) for the writers that
    hold it shared to commit. Queued, it also keeps new writers from taking it."""
    return sa.text("SELECT set_config('lock_timeout', :ms, true), pg_advisory_lock(:lock_id)")


def session_lock_held() -> sa.TextClause:
    """Whether this session holds advisory lock ``:lock_id`` exclusively. A lock granted just
    as ``lock_timeout`` fires is kept, though the statement fails with the timeout: a
    session-scoped advisory lock outlives the statement's error. (classid holds the id's high
    32 bits, objid the low ones; the shift wraps as the id is signed.)"""
    return sa.text(
        "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' "
        "AND pid = pg_backend_pid() AND mode = 'ExclusiveLock' AND granted AND objsubid = 1 "
        "AND (CAST(classid AS bigint) << 32 | CAST(objid AS bigint)) = :lock_id)"
    )


def session_unlock() -> sa.TextClause:
    """Release a session-scoped advisory lock (the relay waking from a doze)."""
    return sa.text("SELECT pg_advisory_unlock(:lock_id)")


_HN = tuple(f"hn{i}" for i in range(SCALAR_HEADERS))
_HV = tuple(f"hv{i}" for i in range(SCALAR_HEADERS))


def insert(
    tables: OutboxTables, encoded: Sequence[EncodedMessage], *, literals: bool = True
) -> tuple[sa.TextClause, dict[str, Any]]:
    """The one statement that writes ``encoded`` (at least one message), with its parameters:
    :func:`insert_message` for one, :func:`insert_messages` for several. ``literals``: the
    arrays as literals (psycopg sends a str untyped), else as lists (any driver)."""
    if len(encoded) == 1:
        e = encoded[0]
        one: dict[str, Any] = {
            "message_id": e.message_id,
            "topic": e.topic,
            "key": e.key,
            "payload": e.payload,
            "lock_id": None if e.key is None else tables.lock_id(e.topic.encode(), e.key),
        }
        n = len(e.headers)
        if n > SCALAR_HEADERS:
            one["header_names"] = [name for name, _ in e.headers]
            one["header_values"] = [value for _, value in e.headers]
            return insert_message(tables), one
        for i, (name, value) in enumerate(e.headers):
            one[_HN[i]] = name
            one[_HV[i]] = value
        return insert_message(tables, n), one
    lock_ids = sorted(
        {tables.lock_id(e.topic.encode(), e.key) for e in encoded if e.key is not None}
    )
    plain: Callable[[Sequence[Any]], Any] = plain_array if literals else list
    text: Callable[[Sequence[Any]], Any] = _text_array if literals else list
    blobs: Callable[[Sequence[Any]], Any] = _bytea_array if literals else list
    params: dict[str, Any] = {
        "message_ids": plain([e.message_id for e in encoded]),
        "topics": text([e.topic for e in encoded]),
        "keys": blobs([e.key for e in encoded]),
        "payloads": blobs([e.payload for e in encoded]),
        "lock_ids": plain(lock_ids),
    }
    if not any(e.headers for e in encoded):
        return insert_messages(tables, headers=False), params
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
    params.update(
        header_from=plain(starts),
        header_to=plain(ends),
        header_names=text(names),
        header_values=blobs(values),
    )
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
    Records when sending first and last failed (revision ``outbox_0006``; the statements that
    mark messages sent do not touch those columns). Returns the new status of each row.
    """
    sql = f"""
UPDATE {_table(tables)} AS o
SET attempts = o.attempts + 1,
    last_error = f.error,
    first_failed_at = coalesce(o.first_failed_at, now()),
    last_failed_at = now(),
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
    """Give parked messages (all, the listed ``ids``, or those of ``topic``) a fresh set of
    attempts. They keep their ids, so each key's messages are sent in their order again: the
    later ones were held back behind the parked one. The failure times are cleared for the new
    attempts; ``last_error`` stays until the next failure."""
    return sa.text(
        f"UPDATE {_table(tables)} SET status = '{PENDING}', attempts = 0, "
        "next_attempt_at = NULL, first_failed_at = NULL, last_failed_at = NULL "
        f"WHERE status = '{DEAD}' "
        "AND (CAST(:ids AS bigint[]) IS NULL OR id = ANY(CAST(:ids AS bigint[]))) "
        "AND (CAST(:topic AS text) IS NULL OR topic = CAST(:topic AS text)) "
        "RETURNING id"
    )


@functools.lru_cache(maxsize=64)
def wake_relay(tables: OutboxTables) -> sa.TextClause:
    """Notify the relay (delivered on commit), as a writer does: rows made sendable by an
    operator are sent at once instead of at the relay's fallback poll."""
    return sa.text(f"SELECT pg_notify({_literal(tables.channel)}, '')")


@functools.lru_cache(maxsize=64)
def discard_dead(tables: OutboxTables) -> sa.TextClause:
    """Delete the parked messages ``ids`` (only parked ones). Their keys are released: the
    messages held back behind them become sendable."""
    return sa.text(
        f"DELETE FROM {_table(tables)} WHERE status = '{DEAD}' "
        "AND id = ANY(CAST(:ids AS bigint[])) "
        "RETURNING id, CAST(message_id AS text) AS message_id, topic, key, attempts, last_error"
    )


@functools.lru_cache(maxsize=64)
def held_behind(tables: OutboxTables) -> sa.TextClause:
    """How many unsent messages wait behind the parked messages ``ids`` (a later message of
    the same topic and key). Walks the unsent rows (partial index ``ix_*_unsent``)."""
    t = _table(tables)
    return sa.text(
        f"SELECT count(*) FROM {t} AS o WHERE o.status IN ('{PENDING}', '{RETRY}') "
        f"AND EXISTS (SELECT 1 FROM {t} AS d WHERE d.id = ANY(CAST(:ids AS bigint[])) "
        f"AND d.status = '{DEAD}' AND d.topic = o.topic AND d.key = o.key AND d.id < o.id)"
    )


_DEAD_COLUMNS = (
    "id, CAST(message_id AS text) AS message_id, topic, key, status, attempts, last_error, "
    "created_at, first_failed_at, last_failed_at"
)


@functools.lru_cache(maxsize=64)
def list_dead(tables: OutboxTables) -> sa.TextClause:
    """Parked messages in id order, optionally of one ``topic``, one ``key`` (bytes), parked
    (last failed; created, for rows parked before ``outbox_0006``) at or after ``since``; at
    most ``limit``, with ``total``: how many match. Walks the partial index ``ix_*_held``."""
    return sa.text(
        f"SELECT {_DEAD_COLUMNS}, count(*) OVER () AS total FROM {_table(tables)} "
        f"WHERE status = '{DEAD}' "
        "AND (CAST(:topic AS text) IS NULL OR topic = CAST(:topic AS text)) "
        "AND (CAST(:key AS bytea) IS NULL OR key = CAST(:key AS bytea)) "
        "AND (CAST(:since AS timestamptz) IS NULL "
        "OR coalesce(last_failed_at, created_at) >= CAST(:since AS timestamptz)) "
        "ORDER BY id LIMIT :limit"
    )


@functools.lru_cache(maxsize=64)
def show_message(tables: OutboxTables) -> sa.TextClause:
    """One message by ``id``, with its headers and the first ``preview`` bytes of its payload
    (and the payload's size): a large payload is not read whole."""
    return sa.text(
        f"SELECT {_DEAD_COLUMNS}, next_attempt_at, header_names, header_values, "
        "substring(payload FROM 1 FOR :preview) AS payload_head, "
        f"octet_length(payload) AS payload_size FROM {_table(tables)} WHERE id = :id"
    )


def _audit(tables: OutboxTables) -> str:
    return _DIALECT.identifier_preparer.format_table(tables.audit)


@functools.lru_cache(maxsize=64)
def insert_audit(tables: OutboxTables) -> sa.TextClause:
    """Record an operator's action (revision ``outbox_0006``); the database role is
    ``current_user``, by the column's default."""
    return sa.text(
        f"INSERT INTO {_audit(tables)} (action, message_ids, os_user, host, detail) "
        "VALUES (:action, CAST(:ids AS bigint[]), :os_user, :host, :detail) "
        "RETURNING id, db_user"
    )


@functools.lru_cache(maxsize=64)
def status_unsent(tables: OutboxTables) -> sa.TextClause:
    """Per topic and status, the pending, retry and dead messages: how many, and the age in
    seconds of the oldest. Cost follows what is unsent or parked, not the table: the two arms
    of the condition are the predicates of the partial indexes ``ix_*_unsent`` and
    ``ix_*_held`` (a BitmapOr of both), so sent rows kept with ``--retain-sent`` are never
    read."""
    return sa.text(
        "SELECT topic, status, count(*) AS n, "
        "EXTRACT(EPOCH FROM now() - min(created_at)) AS oldest "
        f"FROM {_table(tables)} WHERE status IN ('{PENDING}', '{RETRY}') OR status = '{DEAD}' "
        "GROUP BY topic, status"
    )


@functools.lru_cache(maxsize=64)
def status_sizes(tables: OutboxTables) -> sa.TextClause:
    """From the catalog only (no privilege needed, nothing scanned): the size in bytes of the
    outbox table and of the inbox (NULL: no such table), the planner's row estimate of each
    (NULL before the first vacuum or analyze), and whether the role may read the inbox."""

    def estimate(rel: str) -> str:
        return (
            "(SELECT CASE WHEN c.relpages > 0 AND c.reltuples >= 0 THEN "
            "c.reltuples / c.relpages * (pg_relation_size(c.oid) / "
            "current_setting('block_size')::int) END "
            f"FROM pg_class AS c WHERE c.oid = {rel})"
        )

    messages = f"to_regclass({_literal(_table(tables))})"
    inbox = f"to_regclass({_literal(_inbox(tables))})"
    return sa.text(
        f"SELECT pg_relation_size({messages}) AS messages_bytes, "
        f"{estimate(messages)} AS messages_estimate, "
        f"pg_relation_size({inbox}) AS inbox_bytes, {estimate(inbox)} AS inbox_estimate, "
        f"has_table_privilege({inbox}, 'SELECT') AS inbox_readable"
    )


@functools.lru_cache(maxsize=64)
def status_sent(tables: OutboxTables) -> sa.TextClause:
    """Per topic, the sent messages (``--retain-sent``): how many, and the age of the oldest.
    Scans the table: run only when it is small (see ``outbox.admin``)."""
    return sa.text(
        "SELECT topic, count(*) AS n, EXTRACT(EPOCH FROM now() - min(created_at)) AS oldest "
        f"FROM {_table(tables)} WHERE status = '{SENT}' GROUP BY topic"
    )


@functools.lru_cache(maxsize=64)
def oldest_sent(tables: OutboxTables) -> sa.TextClause:
    """The age of the oldest sent message, found along the primary key from the lowest id:
    with ``--retain-sent`` the oldest rows are sent ones, so this stops after a few."""
    return sa.text(
        "SELECT EXTRACT(EPOCH FROM now() - created_at) "
        f"FROM {_table(tables)} WHERE status = '{SENT}' ORDER BY id LIMIT 1"
    )


@functools.lru_cache(maxsize=64)
def purge_sent(tables: OutboxTables) -> sa.TextClause:
    """One batch of the purge of sent messages older than ``age`` seconds (``--retain-sent``).

    Looks at the next ``limit`` rows after id ``after`` along the primary key and deletes the
    sent ones among them that were sent before the cutoff, locking only those (``SKIP
    LOCKED``): one short statement, whatever the table's size. Returns how many it deleted,
    the last id it looked at, how many rows it looked at (fewer than ``limit``: the end of the
    table) and whether all of them were created after the cutoff (then so are, nearly always,
    the rows after them: the pass ends). Rows are looked at in id order, which is creation
    order but for a few created by long transactions; one missed is purged by a later pass.
    """
    t = _table(tables)
    cutoff = "now() - CAST(:age AS float8) * interval '1 second'"
    sql = f"""
WITH scanned AS (
    SELECT id, created_at FROM {t} WHERE id > :after ORDER BY id LIMIT :limit
), bounds AS (
    SELECT max(id) AS last, count(*) AS seen,
           coalesce(bool_and(created_at >= {cutoff}), true) AS newer
    FROM scanned
), doomed AS (
    SELECT o.id FROM {t} AS o
    WHERE o.id > :after AND o.id <= (SELECT last FROM bounds)
      AND o.status = '{SENT}' AND o.sent_at < {cutoff}
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM {t} WHERE id IN (SELECT id FROM doomed) RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deleted, last, seen, newer FROM bounds
"""
    return sa.text(sql)


@functools.lru_cache(maxsize=64)
def existing_message_ids(tables: OutboxTables) -> sa.TextClause:
    """Which of the message ids ``message_ids`` are in the table, with their row ids."""
    return sa.text(
        f"SELECT id, CAST(message_id AS text) AS message_id FROM {_table(tables)} "
        "WHERE message_id = ANY(CAST(:message_ids AS uuid[]))"
    )


@functools.lru_cache(maxsize=64)
def count_by_status(tables: OutboxTables) -> sa.TextClause:
    return sa.text(
        f"SELECT status, count(*) AS n, min(created_at) AS oldest FROM {_table(tables)} "
        "GROUP BY status"
    )


@functools.lru_cache(maxsize=64)
def table_gauges(tables: OutboxTables) -> sa.TextClause:
    """The metrics' table gauges in one round trip: pending and retrying rows, the age in
    seconds of the oldest of them (by id, through the partial index of unsent rows), and
    parked rows (through the partial index of held keys)."""
    t = _table(tables)
    return sa.text(
        f"SELECT (SELECT count(*) FROM {t} WHERE status IN ('{PENDING}', '{RETRY}')), "
        f"(SELECT extract(epoch FROM now() - created_at) FROM {t} "
        f"WHERE status IN ('{PENDING}', '{RETRY}') ORDER BY id LIMIT 1), "
        f"(SELECT count(*) FROM {t} WHERE status = '{DEAD}')"
    )


@functools.lru_cache(maxsize=64)
def probe_tables(tables: OutboxTables) -> sa.TextClause:
    """Fails with UndefinedTable when the tables are not installed, and with UndefinedColumn
    when they are older than revision ``outbox_0004`` (run ``outbox db upgrade``)."""
    return sa.text(f"SELECT header_names, header_values FROM {_table(tables)} LIMIT 0")


@functools.lru_cache(maxsize=64)
def probe_failure_times(tables: OutboxTables) -> sa.TextClause:
    """Fails with UndefinedColumn when the table is older than revision ``outbox_0006``,
    whose columns the relay's failure statement sets."""
    return sa.text(f"SELECT first_failed_at, last_failed_at FROM {_table(tables)} LIMIT 0")


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
def inbox_claim_limited(tables: OutboxTables) -> sa.TextClause:
    """:func:`inbox_claim` that also sets the transaction's ``statement_timeout`` (``:timeout``,
    milliseconds as text), in the same round trip: a ``SET LOCAL`` survives a transaction-mode
    pool, where a session setting (or the ``options`` startup parameter) does not."""
    return sa.text(
        f"INSERT INTO {_inbox(tables)} (consumer, key, expires_at) "
        "SELECT :consumer, :key, now() + CAST(:retention AS float8) * interval '1 second' "
        "FROM (SELECT set_config('statement_timeout', :timeout, true)) AS limited "
        "ON CONFLICT (consumer, key) DO NOTHING RETURNING true"
    )


@functools.lru_cache(maxsize=64)
def inbox_claim_batch(tables: OutboxTables, limited: bool) -> sa.TextClause:
    """Claim every key of ``:keys`` (a text array) for ``:consumer`` in one statement; returns
    the keys claimed now (a key given twice is claimed once). ``limited``: also set the
    transaction's ``statement_timeout`` (``:timeout``, as :func:`inbox_claim_limited`).

    The keys are inserted in sorted order, so two batches with common keys lock them in the
    same order and wait for each other instead of deadlocking."""
    limit = (
        "(SELECT set_config('statement_timeout', :timeout, true)) AS limited, " if limited else ""
    )
    return sa.text(
        f"INSERT INTO {_inbox(tables)} (consumer, key, expires_at) "
        "SELECT :consumer, k.key, now() + CAST(:retention AS float8) * interval '1 second' "
        f"FROM {limit}unnest(CAST(:keys AS text[])) AS k(key) ORDER BY k.key "
        "ON CONFLICT (consumer, key) DO NOTHING RETURNING key"
    )


@functools.lru_cache(maxsize=64)
def inbox_unclaim(tables: OutboxTables) -> sa.TextClause:
    """Take back claims of ``:keys`` made in the current transaction (a batch cut short)."""
    return sa.text(
        f"DELETE FROM {_inbox(tables)} WHERE consumer = :consumer "
        "AND key = ANY(CAST(:keys AS text[]))"
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
def inbox_claimed(tables: OutboxTables) -> sa.TextClause:
    """Which of ``keys`` ``consumer`` has claimed (read only: a dry run's answer)."""
    return sa.text(
        f"SELECT key FROM {_inbox(tables)} WHERE consumer = :consumer "
        "AND key = ANY(CAST(:keys AS text[]))"
    )


@functools.lru_cache(maxsize=64)
def inbox_count(tables: OutboxTables) -> sa.TextClause:
    """How many keys the inbox holds. Scans it: run only when it is small."""
    return sa.text(f"SELECT count(*) FROM {_inbox(tables)}")


@functools.lru_cache(maxsize=64)
def inbox_purge(tables: OutboxTables) -> sa.TextClause:
    """Delete up to ``limit`` expired rows; short, so it never blocks writers for long."""
    t = _inbox(tables)
    return sa.text(
        f"DELETE FROM {t} WHERE ctid IN (SELECT ctid FROM {t} WHERE expires_at < now() "
        "LIMIT :limit FOR UPDATE SKIP LOCKED)"
    )
