"""Relay configuration: a dataclass validated at construction. No globals, no env reading here
(the CLI maps ``OUTBOX_*`` variables onto it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import psycopg.conninfo
import sqlalchemy as sa
import sqlalchemy.exc

from outbox.backoff import Backoff
from outbox.exceptions import ConfigurationError
from outbox.schema import DEFAULT_TABLE, validate_identifier

_DRIVERS = ("postgresql", "postgresql+psycopg")


def parse_db_url(url: str) -> sa.URL:
    """Parse a SQLAlchemy URL for PostgreSQL with psycopg 3; raise a one-line error otherwise."""
    if not url:
        raise ConfigurationError("no database URL: pass --db-url (or OUTBOX_DB_URL)")
    try:
        parsed = sa.make_url(url)
    except sqlalchemy.exc.ArgumentError as exc:
        raise ConfigurationError(
            "invalid database URL: expected postgresql+psycopg://USER@HOST:PORT/DBNAME"
        ) from exc
    if parsed.drivername not in _DRIVERS:
        raise ConfigurationError(
            f"unsupported database URL scheme {parsed.drivername!r}: "
            "use postgresql+psycopg://USER@HOST:PORT/DBNAME"
        )
    if not parsed.database:
        raise ConfigurationError("the database URL names no database: add /DBNAME")
    return parsed.set(drivername="postgresql+psycopg")


@dataclasses.dataclass(frozen=True)
class RelayConfig:
    """Everything the relay needs; every field has a CLI option and an ``OUTBOX_*`` variable."""

    db_url: str
    table: str = DEFAULT_TABLE
    schema: str | None = None
    #: Rows claimed per round trip.
    batch_size: int = 1000
    #: Batches sent but not yet acknowledged. 2 overlaps the database work for one batch with
    #: the broker's acknowledgement of the previous; a crash re-sends at most
    #: ``batch_size * max_inflight_batches`` messages.
    max_inflight_batches: int = 2
    #: Failed sends of one message before it is parked (status ``dead``).
    max_attempts: int = 10
    #: Per-message retry backoff: full jitter over ``min(max, base * 2**attempts)`` seconds.
    retry_backoff_base: float = 1.0
    retry_backoff_max: float = 300.0
    #: Relay-wide backoff while the broker is unreachable (same formula).
    broker_backoff_base: float = 0.5
    broker_backoff_max: float = 30.0
    #: Backoff between reconnects while the database is unreachable (same formula).
    db_backoff_base: float = 0.5
    db_backoff_max: float = 30.0
    #: Fallback poll when no notification arrives (notifications wake it at once).
    poll_interval: float = 10.0
    #: A standby waits for the leader lock in slices of this many seconds (one statement
    #: each); it takes over as soon as the leader's session ends, whatever the slice.
    leader_retry_interval: float = 1.0
    #: How long one message may wait for the broker's acknowledgement.
    delivery_timeout: float = 30.0
    #: On SIGTERM: how long to wait for in-flight acknowledgements before giving up on them.
    shutdown_timeout: float = 10.0
    #: Keep sent rows (status ``sent``, ``sent_at``) instead of deleting them.
    retain_sent: bool = False
    application_name: str = "outbox-relay"
    db_connect_timeout: float = 10.0
    extra_db_options: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_db_url(self.db_url)
        validate_identifier(self.table, "table name")
        if self.schema is not None:
            validate_identifier(self.schema, "schema name")
        for name in ("batch_size", "max_inflight_batches", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1")
        for name in (
            "retry_backoff_base",
            "retry_backoff_max",
            "broker_backoff_base",
            "broker_backoff_max",
            "db_backoff_base",
            "db_backoff_max",
            "poll_interval",
            "leader_retry_interval",
            "delivery_timeout",
            "db_connect_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be positive")
        if self.shutdown_timeout < 0:
            raise ConfigurationError("shutdown_timeout must not be negative")

    @property
    def retry_backoff(self) -> Backoff:
        return Backoff(self.retry_backoff_base, self.retry_backoff_max)

    @property
    def broker_backoff(self) -> Backoff:
        return Backoff(self.broker_backoff_base, self.broker_backoff_max)

    @property
    def db_backoff(self) -> Backoff:
        return Backoff(self.db_backoff_base, self.db_backoff_max)


def relay_conninfo(config: RelayConfig) -> str:
    """The libpq connection string of the relay's sessions: the URL's parameters, plus
    keepalives and session settings that its guarantees rest on."""
    url = parse_db_url(config.db_url)
    params: dict[str, Any] = dict(
        url.translate_connect_args(username="user", database="dbname").items()
    )
    params.update({k: v for k, v in url.query.items() if isinstance(v, str)})
    params.setdefault("application_name", config.application_name)
    params.setdefault("connect_timeout", max(1, int(config.db_connect_timeout)))
    # Client side: notice a dead server or network in about 25 s instead of hanging on TCP,
    # and stop sending (see Relay._lost_database).
    params.setdefault("keepalives", 1)
    params.setdefault("keepalives_idle", 10)
    params.setdefault("keepalives_interval", 5)
    params.setdefault("keepalives_count", 3)
    server_options = [
        # Server side: end the session of a relay that vanished from the network (releasing
        # leadership) after about 60 s -- later than the relay itself gives up (25 s), so a
        # new leader never sends while the old one still could.
        "-c tcp_keepalives_idle=30",
        "-c tcp_keepalives_interval=10",
        "-c tcp_keepalives_count=3",
        # Marking rows sent need not wait for the WAL flush: if the database crashes before
        # it, those rows are sent again (duplicates, which at-least-once allows), never lost.
        "-c synchronous_commit=off",
    ]
    params["options"] = " ".join(filter(None, [str(params.get("options", "")), *server_options]))
    params.update(config.extra_db_options)
    return psycopg.conninfo.make_conninfo(**params)
