"""Inspection and repair of the outbox table from code; the CLI's ``status``, ``dead``, ``dlq``
and ``purge`` commands are thin layers over these functions.

Every function that changes messages (:func:`replay_dead`, :func:`discard_dead`,
:func:`replay_dead_letters`) runs in the caller's transaction and leaves an audit trace there:
a row in ``<table>_audit`` (revision ``outbox_0006``) and a log line (logger ``outbox.admin``,
event ``admin.replayed`` or ``admin.discarded``) with the rows concerned, the database role,
the OS user and the host. The row commits or rolls back with the caller's transaction; the log
line is written when the statements ran.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import datetime
import getpass
import json
import logging
import socket
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa

from outbox import statements
from outbox.config import parse_db_url
from outbox.deadletter import REPLAY_CONSUMER, Replay
from outbox.exceptions import (
    DatabaseError,
    MissingTablesError,
    OutboxError,
    PayloadError,
    translate_db_errors,
)
from outbox.inbox import Inbox
from outbox.outbox import Outbox
from outbox.purge import BATCH_SIZE, SentPurge
from outbox.schema import (
    DEAD,
    DEFAULT_INBOX_TABLE,
    DEFAULT_TABLE,
    PENDING,
    RETRY,
    SENT,
    STATUSES,
    OutboxTables,
    define_tables,
)

logger = logging.getLogger(__name__)

#: ``status`` counts sent rows and inbox keys exactly while their table is at most this large
#: (a scan of it takes tens of milliseconds), and gives the planner's estimate beyond.
EXACT_BYTES = 64 * 1024 * 1024
#: How much of a payload :func:`message` reads.
PREVIEW_BYTES = 1024
#: At most this many ids in a log line (the audit row has them all).
_LOGGED_IDS = 100


def _tables(table: str, schema: str | None, inbox_table: str = DEFAULT_INBOX_TABLE) -> OutboxTables:
    return define_tables(table=table, schema=schema, inbox_table=inbox_table)


def counts(
    db_url: str, *, table: str = DEFAULT_TABLE, schema: str | None = None
) -> dict[str, tuple[int, datetime.datetime | None]]:
    """``{status: (count, oldest created_at)}`` for the statuses that have rows. Scans the
    whole table: :func:`status` is the cheap one."""
    tables = _tables(table, schema)
    engine = sa.create_engine(parse_db_url(db_url), poolclass=sa.pool.NullPool)
    try:
        with translate_db_errors("count"), engine.connect() as conn:
            rows = conn.execute(statements.count_by_status(tables)).all()
    finally:
        engine.dispose()
    return {r.status: (r.n, r.oldest) for r in rows}


# -- status -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Count:
    """How many rows, and the age in seconds of the oldest (None: no rows, or not known).
    ``estimated``: ``count`` is the planner's estimate (a large table; see :func:`status`);
    None when it has none yet."""

    count: int | None
    oldest_age_s: float | None = None
    estimated: bool = False

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"count": self.count, "oldest_age_s": _round(self.oldest_age_s)}
        if self.estimated:
            data["estimated"] = True
        return data


@dataclasses.dataclass(frozen=True)
class Status:
    """What :func:`status` found."""

    table: str
    #: Every status (``pending``, ``retry``, ``dead``, ``sent``), with zero counts too.
    statuses: dict[str, Count]
    #: Per topic, the statuses it has rows in (sent rows only when counted exactly).
    topics: dict[str, dict[str, Count]]
    inbox_table: str
    #: The inbox's keys (None: no such table, or neither readable nor estimated yet).
    inbox: Count

    @property
    def lag_s(self) -> float | None:
        """The age of the oldest message not sent yet (pending or retry), in seconds."""
        ages = [
            c.oldest_age_s for s, c in self.statuses.items() if s in (PENDING, RETRY) and c.count
        ]
        return max((a for a in ages if a is not None), default=None)

    @property
    def dead(self) -> int:
        return self.statuses[DEAD].count or 0

    @property
    def empty(self) -> bool:
        return not any(c.count for c in self.statuses.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "statuses": {s: c.as_dict() for s, c in self.statuses.items()},
            "topics": {
                t: {s: c.as_dict() for s, c in by.items()} for t, by in sorted(self.topics.items())
            },
            "lag_s": _round(self.lag_s),
            "inbox": {"table": self.inbox_table, "rows": self.inbox.count}
            | ({"estimated": True} if self.inbox.estimated else {}),
        }


def status(connection: sa.Connection, tables: OutboxTables) -> Status:
    """Counts and oldest ages per status and per topic and status, and the inbox's size.

    Cheap on any table: pending, retry and dead rows are read through the partial indexes
    (their cost follows the backlog, not the table); sent rows (``--retain-sent``) and the
    inbox's keys are counted exactly while their table is at most :data:`EXACT_BYTES`, and
    estimated from the catalog beyond (the oldest sent row is then found along the primary
    key). Reading the inbox's size needs no privilege on it when it is estimated.
    """
    with translate_db_errors("status"):
        rows: list[Any] = list(connection.execute(statements.status_unsent(tables)))
        sizes = connection.execute(statements.status_sizes(tables)).one()
        exact = sizes.messages_bytes is not None and sizes.messages_bytes <= EXACT_BYTES
        if exact:
            sent = connection.execute(statements.status_sent(tables)).all()
            rows += [(r.topic, SENT, r.n, r.oldest) for r in sent]
        topics: dict[str, dict[str, Count]] = {}
        totals: dict[str, tuple[int, float | None]] = {s: (0, None) for s in STATUSES}
        for topic, state, n, oldest in rows:
            age = None if oldest is None else float(oldest)
            topics.setdefault(topic, {})[state] = Count(n, age)
            count, old = totals[state]
            totals[state] = (count + n, age if old is None or (age or 0) > old else old)
        statuses = {s: Count(n, age) for s, (n, age) in totals.items()}
        if not exact:
            statuses[SENT] = _estimate_sent(connection, tables, sizes.messages_estimate, statuses)
        if sizes.inbox_bytes is None:
            inbox = Count(None)
        elif sizes.inbox_readable and sizes.inbox_bytes <= EXACT_BYTES:
            inbox = Count(int(connection.execute(statements.inbox_count(tables)).scalar() or 0))
        elif sizes.inbox_estimate is None:
            inbox = Count(None, estimated=True)
        else:
            inbox = Count(round(sizes.inbox_estimate), estimated=True)
    return Status(
        table=tables.qualified_name,
        statuses=statuses,
        topics=topics,
        inbox_table=_qualified(tables.inbox),
        inbox=inbox,
    )


def _estimate_sent(
    connection: sa.Connection,
    tables: OutboxTables,
    estimate: float | None,
    statuses: dict[str, Count],
) -> Count:
    """The sent rows of a large table: the planner's estimate of its rows less the others
    (counted), and the age of the oldest sent row, found along the primary key."""
    if estimate is None:
        return Count(None, estimated=True)
    others = sum(c.count or 0 for s, c in statuses.items() if s != SENT)
    sent = max(0, round(estimate) - others)
    oldest = connection.execute(statements.oldest_sent(tables)).scalar() if sent else None
    return Count(sent, None if oldest is None else float(oldest), estimated=True)


# -- dead messages ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeadMessage:
    """A message as ``outbox dead list`` and ``show`` print it."""

    id: int
    message_id: str
    topic: str
    key: bytes | None
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime.datetime
    first_failed_at: datetime.datetime | None
    last_failed_at: datetime.datetime | None
    #: ``show`` only: the headers after ``message-id``, the first :data:`PREVIEW_BYTES` of the
    #: payload, and its size in bytes (None: no payload).
    headers: tuple[tuple[str, bytes], ...] = ()
    payload_head: bytes | None = None
    payload_size: int | None = None
    next_attempt_at: datetime.datetime | None = None

    def as_dict(self, *, detail: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "message_id": self.message_id,
            "topic": self.topic,
            **text_or_hex("key", self.key),
            "status": self.status,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "created_at": _iso(self.created_at),
            "first_failed_at": _iso(self.first_failed_at),
            "last_failed_at": _iso(self.last_failed_at),
        }
        if detail:
            data["next_attempt_at"] = _iso(self.next_attempt_at)
            data["headers"] = [{"name": n, **text_or_hex("value", v)} for n, v in self.headers]
            data["payload_size"] = self.payload_size
            if self.payload_head is not None:
                encoding, text = preview(self.payload_head, self.payload_size or 0)
                data["payload_preview"] = {"encoding": encoding, "text": text}
        return data


def text_or_hex(name: str, value: bytes | None) -> dict[str, Any]:
    """``{name: text}`` when ``value`` is UTF-8 text, and ``{name + "_hex": hex}`` always (both
    None for None): JSON output that scripts can rely on for any bytes."""
    if value is None:
        return {name: None, f"{name}_hex": None}
    try:
        text: str | None = bytes(value).decode()
    except UnicodeDecodeError:
        text = None
    return {name: text, f"{name}_hex": bytes(value).hex()}


def preview(head: bytes, size: int) -> tuple[str, str]:
    """``("utf-8", text)`` when ``head`` (the first bytes of a payload of ``size`` bytes) is
    UTF-8 text -- a character cut at its end by the preview's limit is left out --, else
    ``("hex", hex digits)``."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        return "utf-8", decoder.decode(bytes(head), final=len(head) >= size)
    except UnicodeDecodeError:
        return "hex", bytes(head).hex()


def _dead(row: Any, **extra: Any) -> DeadMessage:
    return DeadMessage(
        id=row.id,
        message_id=row.message_id,
        topic=row.topic,
        key=None if row.key is None else bytes(row.key),
        status=row.status,
        attempts=row.attempts,
        last_error=row.last_error,
        created_at=row.created_at,
        first_failed_at=row.first_failed_at,
        last_failed_at=row.last_failed_at,
        **extra,
    )


def dead_messages(
    connection: sa.Connection,
    tables: OutboxTables,
    *,
    topic: str | None = None,
    key: bytes | None = None,
    since: datetime.datetime | None = None,
    limit: int = 100,
) -> tuple[list[DeadMessage], int]:
    """Parked messages in id order (at most ``limit``), and how many match in all. ``since``:
    parked (failed last) at or after that time."""
    if limit < 1:
        raise PayloadError("limit must be positive")
    with _upgraded("list dead messages"):
        rows = connection.execute(
            statements.list_dead(tables),
            {"topic": topic, "key": key, "since": since, "limit": limit},
        ).all()
    return [_dead(r) for r in rows], (rows[0].total if rows else 0)


def message(connection: sa.Connection, tables: OutboxTables, id: int) -> DeadMessage | None:
    """One message (parked or not) with its headers and a preview of its payload."""
    with _upgraded("show message"):
        row = connection.execute(
            statements.show_message(tables), {"id": id, "preview": PREVIEW_BYTES}
        ).first()
    if row is None:
        return None
    return _dead(
        row,
        headers=tuple(zip(row.header_names, (bytes(v) for v in row.header_values), strict=True)),
        payload_head=None if row.payload_head is None else bytes(row.payload_head),
        payload_size=row.payload_size,
        next_attempt_at=row.next_attempt_at,
    )


def held_behind(connection: sa.Connection, tables: OutboxTables, ids: Sequence[int]) -> int:
    """How many unsent messages wait behind the parked messages ``ids`` (later messages of
    their keys): discarding those lets them be sent, without the discarded ones before them."""
    with translate_db_errors("count held messages"):
        return int(
            connection.execute(statements.held_behind(tables), {"ids": list(ids)}).scalar() or 0
        )


class NotDead(OutboxError):
    """Some of the ids given are not parked messages (none was changed: roll back)."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = list(ids)
        shown = ", ".join(map(str, self.ids[:10])) + (", ..." if len(self.ids) > 10 else "")
        plural = "s" if len(self.ids) > 1 else ""
        super().__init__(f"no dead message with id{plural} {shown}")


def replay_dead(
    connection: sa.Connection,
    *,
    ids: Sequence[int] | None = None,
    topic: str | None = None,
    table: str = DEFAULT_TABLE,
    schema: str | None = None,
    detail: dict[str, Any] | None = None,
) -> list[int]:
    """Give parked messages (all, ``ids``, or those of ``topic``) a fresh set of attempts, in
    the caller's transaction, and record it (see the module's docstring). They keep their ids:
    each key's messages go out in their order, the held-back ones after the replayed one.

    With ``ids``, every one must be a parked message: otherwise :class:`NotDead` is raised
    (and the caller rolls back). The relay is woken at commit."""
    tables = _tables(table, schema)
    wanted = sorted(set(ids)) if ids is not None else None
    with _upgraded("replay"):
        rows = connection.execute(
            statements.replay_dead(tables), {"ids": wanted, "topic": topic}
        ).all()
        replayed = sorted(r.id for r in rows)
        if wanted is not None and len(replayed) != len(wanted):
            raise NotDead(sorted(set(wanted) - set(replayed)))
        if replayed:
            # Wake the relay on commit, as a writer does; otherwise the replayed messages wait
            # for its fallback poll.
            connection.execute(statements.wake_relay(tables))
            asked = {"ids": "listed"} if wanted is not None else {"topic": topic}
            record(connection, tables, "replay", replayed, {**asked, **(detail or {})})
    return replayed


@dataclasses.dataclass(frozen=True)
class Discarded:
    id: int
    message_id: str
    topic: str
    key: bytes | None


def discard_dead(
    connection: sa.Connection,
    ids: Sequence[int],
    *,
    table: str = DEFAULT_TABLE,
    schema: str | None = None,
) -> list[Discarded]:
    """Delete the parked messages ``ids`` in the caller's transaction, and record it (the audit
    row keeps their message ids, topics and keys). Every one must be a parked message, or
    :class:`NotDead` is raised.

    A parked message holds back the later messages of its key: once it is gone, they are sent
    (the relay is woken at commit), and their consumers never see the discarded one."""
    tables = _tables(table, schema)
    wanted = sorted(set(ids))
    if not wanted:
        raise PayloadError("no message ids given")
    with translate_db_errors("discard"):
        rows = connection.execute(statements.discard_dead(tables), {"ids": wanted}).all()
        gone = sorted(
            (
                Discarded(r.id, r.message_id, r.topic, None if r.key is None else bytes(r.key))
                for r in rows
            ),
            key=lambda d: d.id,
        )
        if len(gone) != len(wanted):
            raise NotDead(sorted(set(wanted) - {d.id for d in gone}))
        connection.execute(statements.wake_relay(tables))
        messages = [
            {"id": d.id, "message_id": d.message_id, "topic": d.topic, **text_or_hex("key", d.key)}
            for d in gone
        ]
        record(connection, tables, "discard", [d.id for d in gone], {"messages": messages})
    return gone


# -- the audit trace ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    id: int
    db_user: str
    os_user: str | None
    host: str | None


def record(
    connection: sa.Connection,
    tables: OutboxTables,
    action: str,
    ids: Sequence[int],
    detail: dict[str, Any],
) -> AuditRecord:
    """Insert the audit row of ``action`` on the rows ``ids`` and write its log line."""
    os_user, host = _os_user(), _host()
    row = connection.execute(
        statements.insert_audit(tables),
        {
            "action": action,
            "ids": list(ids),
            "os_user": os_user,
            "host": host,
            "detail": json.dumps(detail, default=str, separators=(",", ":")),
        },
    ).one()
    fields = {
        "action": action,
        "count": len(ids),
        "ids": list(ids[:_LOGGED_IDS]),
        "db_user": row.db_user,
        "os_user": os_user,
        "host": host,
        "audit_id": row.id,
    }
    if action == "discard":
        logger.info("dead messages discarded", extra={"event": "admin.discarded", **fields})
    else:
        logger.info("messages replayed", extra={"event": "admin.replayed", **fields})
    return AuditRecord(row.id, row.db_user, os_user, host)


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for the uid (a container), no variables
        return None


def _host() -> str | None:
    try:
        return socket.gethostname() or None
    except OSError:
        return None


# -- purge --------------------------------------------------------------------------------------


def purge_sent(
    connection: sa.Connection,
    tables: OutboxTables,
    older_than: datetime.timedelta,
    *,
    batch_size: int = BATCH_SIZE,
) -> int:
    """Delete the sent messages (``--retain-sent``) sent more than ``older_than`` ago, in
    short statements of ``batch_size`` rows, committing each (see ``outbox.purge``). Returns
    how many were deleted."""
    seconds = older_than.total_seconds()
    if seconds <= 0 or batch_size < 1:
        raise PayloadError("older_than and batch_size must be positive")
    stmt = statements.purge_sent(tables)

    def run(params: Any) -> Any:
        row = connection.execute(stmt, dict(params)).one()
        connection.commit()
        return row

    with translate_db_errors("purge sent messages"):
        return SentPurge(seconds, batch_size=batch_size).run_pass(run)


# -- dead letters from Kafka --------------------------------------------------------------------


@dataclasses.dataclass
class ReplaySummary:
    """What :func:`replay_dead_letters` did (or, in a dry run, would do)."""

    replayed: int = 0
    #: Replayed before: their inbox key was claimed, or their message id is in the outbox.
    skipped: int = 0
    #: The outbox rows written (none in a dry run).
    ids: list[int] = dataclasses.field(default_factory=list)
    #: Per original topic, how many were (or would be) replayed.
    topics: dict[str, int] = dataclasses.field(default_factory=dict)


def replay_dead_letters(
    connection: sa.Connection,
    tables: OutboxTables,
    letters: Iterable[Replay],
    *,
    retention: datetime.timedelta,
    dry_run: bool = False,
    limit: int | None = None,
    batch_size: int = 100,
    detail: dict[str, Any] | None = None,
) -> ReplaySummary:
    """Publish the original messages of dead letters (see :func:`outbox.deadletter.replay`)
    through the outbox, once each: in the transaction of each batch (committed here), every
    letter's inbox key is claimed under :data:`~outbox.deadletter.REPLAY_CONSUMER` (kept for
    ``retention``) and its message published with an id derived from the letter's; a letter
    whose key was claimed before, or whose message id is still in the outbox, is skipped.
    ``limit``: stop after replaying that many. ``dry_run``: count without writing."""
    outbox = Outbox(
        table=tables.messages.name, schema=tables.messages.schema, inbox_table=tables.inbox.name
    )
    inbox = Inbox(outbox, retention=retention)
    summary = ReplaySummary()
    batch: list[Replay] = []

    def flush() -> None:
        if batch:
            _replay_batch(connection, tables, inbox, batch, summary, dry_run, detail or {})
            batch.clear()

    for letter in letters:
        if limit is not None and summary.replayed + len(batch) >= limit:
            flush()
            if summary.replayed >= limit:
                break
        batch.append(letter)
        if len(batch) >= batch_size:
            flush()
    flush()
    return summary


def _replay_batch(
    connection: sa.Connection,
    tables: OutboxTables,
    inbox: Inbox,
    batch: list[Replay],
    summary: ReplaySummary,
    dry_run: bool,
    detail: dict[str, Any],
) -> None:
    ids = [str(r.message.message_id) for r in batch]
    with translate_db_errors("replay dead letters"):
        present = {
            r.message_id
            for r in connection.execute(
                statements.existing_message_ids(tables), {"message_ids": ids}
            )
        }
        fresh: list[Replay] = []
        if dry_run:
            claimed = set(
                connection.execute(
                    statements.inbox_claimed(tables),
                    {"consumer": REPLAY_CONSUMER, "keys": [r.claim for r in batch]},
                ).scalars()
            )
            for r in batch:
                if r.claim in claimed or str(r.message.message_id) in present:
                    summary.skipped += 1
                else:
                    claimed.add(r.claim)
                    fresh.append(r)
            connection.rollback()
        else:
            for r in batch:
                # The claim first: a concurrent run of the same letter waits here for this
                # transaction, then skips it.
                if inbox.claim(connection, REPLAY_CONSUMER, r.claim) and (
                    str(r.message.message_id) not in present
                ):
                    fresh.append(r)
                else:
                    summary.skipped += 1
            written: list[int] = []
            if fresh:
                stmt, params = statements.insert(tables, [r.message for r in fresh])
                connection.execute(stmt, params)
                written = sorted(
                    r.id
                    for r in connection.execute(
                        statements.existing_message_ids(tables),
                        {"message_ids": [str(r.message.message_id) for r in fresh]},
                    )
                )
                record(
                    connection,
                    tables,
                    "dlq-replay",
                    written,
                    {**detail, "replayed": len(fresh), "skipped_in_batch": len(batch) - len(fresh)},
                )
            connection.commit()
            summary.ids += written
    summary.replayed += len(fresh)
    for r in fresh:
        summary.topics[r.message.topic] = summary.topics.get(r.message.topic, 0) + 1


# -- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _upgraded(what: str) -> Iterator[None]:
    """:func:`translate_db_errors`, and the failure-time columns missing (tables older than
    revision outbox_0006) said as what to do rather than as a missing column."""
    try:
        with translate_db_errors(what):
            yield
    except DatabaseError as exc:
        if "first_failed_at" in str(exc) or "last_failed_at" in str(exc):
            raise MissingTablesError(
                "the outbox tables are older than this version (no first_failed_at column): "
                "run `outbox db upgrade --db-url URL` (or `alembic upgrade outbox@head`) first"
            ) from exc
        raise


def _qualified(table: sa.Table) -> str:
    return f"{table.schema}.{table.name}" if table.schema else table.name


def _iso(value: datetime.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
