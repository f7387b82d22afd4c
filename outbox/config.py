"""Relay configuration: a dataclass validated at construction. No globals, no env reading here
(the CLI maps ``OUTBOX_*`` variables onto it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import sqlalchemy as sa
import sqlalchemy.exc

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
    #: Fallback poll when no notification arrives (notifications wake it at once).
    poll_interval: float = 10.0
    #: How often a standby relay tries to become the leader.
    leader_retry_interval: float = 5.0
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
            "poll_interval",
            "leader_retry_interval",
            "delivery_timeout",
            "db_connect_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be positive")
        if self.shutdown_timeout < 0:
            raise ConfigurationError("shutdown_timeout must not be negative")
