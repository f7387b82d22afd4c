"""Table definitions, built by a factory on the caller's ``MetaData``.

The shipped Alembic revisions (``migrations/``) create exactly these tables; a test fails when
the two drift apart. Every constraint and index is named so that migrations can refer to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from outbox.exceptions import ConfigurationError

DEFAULT_TABLE = "outbox_messages"
DEFAULT_INBOX_TABLE = "outbox_inbox"

#: Values of the ``status`` column.
PENDING = "pending"  # waiting for its first attempt
RETRY = "retry"  # failed; next attempt at ``next_attempt_at``; holds back its key until then
DEAD = "dead"  # parked after too many attempts; holds back its key until replayed or removed
SENT = "sent"  # acknowledged by the broker (retain mode only; delete mode removes the row)
STATUSES = (PENDING, RETRY, DEAD, SENT)

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")

#: Autovacuum settings (PostgreSQL storage parameters) of the outbox table, set by revision
#: ``outbox_0003``. A queue table churns: every row is inserted, then deleted (or updated to
#: ``sent``) within seconds, so its dead rows, not its size, decide when it needs a vacuum. The
#: server's defaults wait until 20 % of the table is dead (10 % changed, for statistics), which
#: for a table that is nearly empty while all is well means far too late, or, after a backlog,
#: hundreds of thousands of dead index entries that every claim walks through. Here: a fixed
#: number of rows, whatever the table's size.
MESSAGES_STORAGE_PARAMETERS: tuple[tuple[str, str], ...] = (
    ("autovacuum_vacuum_scale_factor", "0"),
    ("autovacuum_vacuum_threshold", "1000"),
    ("autovacuum_vacuum_insert_scale_factor", "0"),
    ("autovacuum_vacuum_insert_threshold", "1000"),
    ("autovacuum_analyze_scale_factor", "0"),
    ("autovacuum_analyze_threshold", "1000"),
)

#: Autovacuum settings of the inbox table (revision ``outbox_0003``). The inbox is large (it
#: keeps every key for the retention period) and loses rows in bursts, when the purge deletes
#: expired keys (command outcomes, written after their key, leave dead rows too): vacuum at 1 %
#: of the table instead of 20 %, so that purged space is reused before the table grows, and
#: after 1 % of new rows, which also summarizes the new ranges of the BRIN index the purge uses.
INBOX_STORAGE_PARAMETERS: tuple[tuple[str, str], ...] = (
    ("autovacuum_vacuum_scale_factor", "0.01"),
    ("autovacuum_vacuum_threshold", "1000"),
    ("autovacuum_vacuum_insert_scale_factor", "0.01"),
    ("autovacuum_vacuum_insert_threshold", "1000"),
)

#: The header columns hold one value per name, and no NULL element. Revision ``outbox_0004``
#: spells out the same expression.
HEADERS_CHECK = (
    "cardinality(header_names) = cardinality(header_values) "
    "AND array_position(header_names, NULL) IS NULL "
    "AND array_position(header_values, NULL) IS NULL"
)

#: The key in ``Table.info`` that holds a table's storage parameters (a dict, name -> value).
#: ``metadata.create_all`` applies them right after ``CREATE TABLE`` (SQLAlchemy 2.0 has no
#: ``postgresql_with`` for tables); the revisions set them with ``ALTER TABLE ... SET``.
STORAGE_PARAMETERS = "outbox_storage_parameters"


#: PostgreSQL truncates (or, for NOTIFY, refuses) longer identifiers.
_MAX_IDENTIFIER = 63


def validate_identifier(value: str, what: str) -> str:
    """Table and schema names become SQL identifiers and NOTIFY channels: keep them plain."""
    if not _IDENT.match(value):
        raise ConfigurationError(
            f"invalid {what} {value!r}: use lower-case letters, digits and underscores, "
            "starting with a letter, at most 48 characters"
        )
    return value


def qualified(table: sa.Table) -> str:
    """``schema.name``, or ``name`` in the search path."""
    return f"{table.schema}.{table.name}" if table.schema else table.name


@dataclasses.dataclass(frozen=True)
class OutboxTables:
    """The outbox's tables on one ``MetaData``, plus names derived from them."""

    metadata: sa.MetaData
    messages: sa.Table
    #: Idempotency keys already processed, per consumer (events) or scope (commands).
    inbox: sa.Table
    #: One row: the epoch of the relays' leader lock (revision ``outbox_0005``). Only relay
    #: roles may read or change it, so a role that is not a relay cannot learn the lock to
    #: take it first; a relay that finds the lock held by such a role moves to a new epoch.
    leader: sa.Table
    #: What operators did to messages (replayed, discarded: ``outbox dead``, ``outbox dlq
    #: replay``), one row per action (revision ``outbox_0006``).
    audit: sa.Table

    @property
    def qualified_name(self) -> str:
        return qualified(self.messages)

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel that writers notify on commit: ``schema__table``, or,
        when that is longer than PostgreSQL's 63-byte identifiers (a 30-character schema and
        a 40-character table are both valid names), ``outbox_`` and a digest of it."""
        name = self.qualified_name.replace(".", "__")
        if len(name) <= _MAX_IDENTIFIER:
            return name
        return "outbox_" + hashlib.sha256(name.encode()).hexdigest()[:32]

    def lock_id(self, *parts: bytes) -> int:
        """A stable signed 64-bit advisory-lock id, namespaced by the table's name.

        Stable across processes and Python versions (unlike ``hash()``), so writers and relays
        agree on it.
        """
        h = hashlib.blake2b(digest_size=8)
        h.update(self.qualified_name.encode())
        for part in parts:
            h.update(b"\x00")
            h.update(part)
        return int.from_bytes(h.digest(), "big", signed=True)

    @property
    def dozing_lock_id(self) -> int:
        """Held by the leader relay while it dozes (see ``statements.wake_if_asleep``)."""
        return self.lock_id(b"relay-dozing")

    @property
    def leading_lock_id(self) -> int:
        """Held by a leader relay that dozes under the dozing lock: writers that find it free
        notify at every commit, for older relays."""
        return self.lock_id(b"relay-leading")

    def leader_lock_id(self, epoch: int) -> int:
        """The advisory lock that the active relay holds for as long as its session lives, in
        leader epoch ``epoch`` (see :attr:`leader`)."""
        return self.lock_id(b"relay-leader", str(epoch).encode())


def define_tables(
    metadata: sa.MetaData | None = None,
    *,
    table: str = DEFAULT_TABLE,
    schema: str | None = None,
    inbox_table: str = DEFAULT_INBOX_TABLE,
) -> OutboxTables:
    """Declare the outbox tables on ``metadata`` (a new one if not given).

    Use it to make the tables part of your own models (so ``alembic check`` and
    ``metadata.create_all`` see them); install them with the shipped migrations.
    """
    validate_identifier(table, "table name")
    if schema is not None:
        validate_identifier(schema, "schema name")
    md = metadata if metadata is not None else sa.MetaData()
    status_list = ", ".join(f"'{s}'" for s in STATUSES)
    messages = sa.Table(
        table,
        md,
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=True),
        sa.Column("payload", sa.LargeBinary, nullable=True),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text(f"'{PENDING}'")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        # Kafka headers, sent after message-id in this order (revision outbox_0004): names and
        # values side by side, repeated names kept; values are raw bytes.
        sa.Column(
            "header_names",
            postgresql.ARRAY(sa.Text),
            nullable=False,
            server_default=sa.text("'{}'::text[]"),
        ),
        sa.Column(
            "header_values",
            postgresql.ARRAY(sa.LargeBinary),
            nullable=False,
            server_default=sa.text("'{}'::bytea[]"),
        ),
        # When sending first and last failed (revision outbox_0006): set by the relay's
        # failure statement only, never on the path that marks messages sent.
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=f"pk_{table}"),
        sa.UniqueConstraint("message_id", name=f"uq_{table}_message_id"),
        sa.CheckConstraint("length(topic) > 0", name=f"ck_{table}_topic"),
        sa.CheckConstraint(f"status IN ({status_list})", name=f"ck_{table}_status"),
        sa.CheckConstraint(HEADERS_CHECK, name=f"ck_{table}_headers"),
        # The relay's claim: unsent rows in id order. Partial, so that rows kept in retain mode
        # do not slow it down.
        sa.Index(
            f"ix_{table}_unsent",
            "id",
            postgresql_where=sa.text(f"status IN ('{PENDING}', '{RETRY}')"),
        ),
        # Keys held back by a failing or parked message; empty while all is well.
        sa.Index(
            f"ix_{table}_held",
            "topic",
            "key",
            "id",
            postgresql_where=sa.text(f"status IN ('{RETRY}', '{DEAD}')"),
        ),
        schema=schema,
        info={STORAGE_PARAMETERS: dict(MESSAGES_STORAGE_PARAMETERS)},
    )
    sa.event.listen(messages, "after_create", _set_storage_parameters)
    validate_identifier(inbox_table, "inbox table name")
    if inbox_table in (table, f"{table}_leader", f"{table}_audit"):
        raise ConfigurationError(
            f"the inbox table needs a name of its own (not {table!r}, {table}_leader nor "
            f"{table}_audit)"
        )
    inbox = sa.Table(
        inbox_table,
        md,
        sa.Column("consumer", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        # Commands only: what the request looked like, and the outcome to replay.
        sa.Column("fingerprint", sa.Text, nullable=True),
        sa.Column("response_status", sa.Integer, nullable=True),
        sa.Column("response_body", sa.LargeBinary, nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        # Purged after this; a command whose key expired runs again.
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "key", name=f"pk_{inbox_table}"),
        sa.CheckConstraint(
            "length(consumer) > 0 AND length(key) > 0", name=f"ck_{inbox_table}_names"
        ),
        # BRIN: expiry times grow with insertion order, so a tiny summary index serves the
        # purge and costs the claim (a hot path) almost nothing to maintain.
        sa.Index(f"ix_{inbox_table}_expires_at", "expires_at", postgresql_using="brin"),
        schema=schema,
        info={STORAGE_PARAMETERS: dict(INBOX_STORAGE_PARAMETERS)},
    )
    sa.event.listen(inbox, "after_create", _set_storage_parameters)
    leader = sa.Table(
        f"{table}_leader",
        md,
        sa.Column("one", sa.Boolean, nullable=False, server_default=sa.text("true")),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("one", name=f"pk_{table}_leader"),
        sa.CheckConstraint("one", name=f"ck_{table}_leader_one"),
        schema=schema,
    )
    sa.event.listen(leader, "after_create", _seed_leader)
    # Names derived from a table name of at most 48 characters stay within PostgreSQL's 63.
    audit = sa.Table(
        f"{table}_audit",
        md,
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")
        ),
        # replay, discard, dlq-replay
        sa.Column("action", sa.Text, nullable=False),
        # The outbox rows concerned (ids in the messages table; a discarded one is gone).
        sa.Column(
            "message_ids",
            postgresql.ARRAY(sa.BigInteger),
            nullable=False,
            server_default=sa.text("'{}'::bigint[]"),
        ),
        sa.Column("db_user", sa.Text, nullable=False, server_default=sa.text("CURRENT_USER")),
        sa.Column("os_user", sa.Text, nullable=True),
        sa.Column("host", sa.Text, nullable=True),
        # JSON text: what was asked (--all, --topic), what was discarded, what was skipped.
        sa.Column("detail", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name=f"pk_{table}_audit"),
        schema=schema,
    )
    return OutboxTables(metadata=md, messages=messages, inbox=inbox, leader=leader, audit=audit)


#: A random 63-bit epoch, from the server (no extension needed).
NEW_EPOCH = "(('x' || substr(md5(gen_random_uuid()::text), 1, 16))::bit(64)::bigint >> 1)"


def _seed_leader(target: sa.Table, connection: sa.Connection, **_: Any) -> None:
    """``after_create``: the leader table's one row, as revision ``outbox_0005`` inserts it."""
    if connection.dialect.name != "postgresql":
        return
    name = connection.dialect.identifier_preparer.format_table(target)
    connection.execute(sa.text(f"INSERT INTO {name} (epoch) VALUES ({NEW_EPOCH})"))


def _set_storage_parameters(target: sa.Table, connection: sa.Connection, **_: Any) -> None:
    """``after_create``: give the new table the storage parameters in its ``info``, as the
    revisions do (same statement, same order, so the catalogs compare equal)."""
    params: dict[str, str] = target.info.get(STORAGE_PARAMETERS) or {}
    if not params or connection.dialect.name != "postgresql":
        return
    name = connection.dialect.identifier_preparer.format_table(target)
    settings = ", ".join(f"{key} = {value}" for key, value in params.items())
    connection.execute(sa.text(f"ALTER TABLE {name} SET ({settings})"))
