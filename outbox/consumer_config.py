"""The consumer's settings (:class:`ConsumerConfig`) and counters (:class:`ConsumerStats`);
both are imported from :mod:`outbox.consumer`."""

from __future__ import annotations

import dataclasses
import datetime

from outbox.backoff import Backoff
from outbox.breaker import BreakerPolicy
from outbox.config import parse_db_url
from outbox.exceptions import ConfigurationError
from outbox.schema import DEFAULT_INBOX_TABLE, DEFAULT_TABLE, validate_identifier


@dataclasses.dataclass(frozen=True)
class ConsumerConfig:
    db_url: str
    #: The inbox's consumer name: keys are deduplicated per name (usually the group id).
    name: str
    #: Where poison messages go; default ``<topic>.dlq`` of each message.
    dead_letter_topic: str | None = None
    max_attempts: int = 5
    #: Backoff between a handler's attempts at one message.
    retry_backoff_base: float = 0.2
    retry_backoff_max: float = 30.0
    #: Backoff between tries while the database is unreachable (no attempt is counted).
    db_backoff_base: float = 0.5
    db_backoff_max: float = 30.0
    #: How long one attempt of the handler may take, in seconds (None: no limit). Its database
    #: statements are cancelled past it (``statement_timeout``: a failed attempt); a handler
    #: stuck outside the database is dead-lettered and the process exits with status
    #: :data:`EXIT_HANDLER_HUNG` for its supervisor to restart it (a Python thread cannot be
    #: stopped from outside). Keep it below Kafka's ``max.poll.interval.ms``.
    handler_timeout: float | None = 60.0
    table: str = DEFAULT_TABLE
    schema: str | None = None
    inbox_table: str = DEFAULT_INBOX_TABLE
    #: How long processed keys are remembered; must exceed how long a message can come back.
    retention: datetime.timedelta = datetime.timedelta(days=7)
    #: How long a message can come back (e.g. the topics' retention), if known: a shorter
    #: ``retention`` gets a warning at start-up.
    redelivery_horizon: datetime.timedelta | None = None
    #: When transient failures open the circuit breaker, and the retry budget.
    breaker: BreakerPolicy = dataclasses.field(default_factory=BreakerPolicy)
    #: A message counts as expired only this many seconds past its deadline: the tolerance
    #: for the publisher's clock running ahead of the consumer's.
    clock_skew: float = 1.0
    #: Messages handled in one database transaction (one inbox claim statement, one commit);
    #: 1: one transaction per message. See "Batches" in :class:`Consumer`.
    batch_size: int = 500
    #: Seconds a batch may wait for more messages once it has one. 0: a batch is what has
    #: been fetched already, so batches grow with the load (more arrives while one is
    #: handled) and no message waits for others. A wait means fewer, larger transactions at
    #: moderate rates, for up to this much more latency (docs/performance.md).
    batch_max_wait: float = 0.0

    def __post_init__(self) -> None:
        parse_db_url(self.db_url)
        if not self.name:
            raise ConfigurationError("the consumer needs a name (the inbox's consumer)")
        if self.max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        for name in (
            "retry_backoff_base",
            "retry_backoff_max",
            "db_backoff_base",
            "db_backoff_max",
        ):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be positive")
        validate_identifier(self.table, "table name")
        if self.handler_timeout is not None and not self.handler_timeout > 0:
            raise ConfigurationError("handler_timeout must be positive (or None: no limit)")
        if not 0 <= self.clock_skew < 86400:
            raise ConfigurationError("clock_skew must be at least 0 seconds (and under a day)")
        if not 1 <= self.batch_size <= 100_000:
            raise ConfigurationError("batch_size must be between 1 and 100000")
        if not 0 <= self.batch_max_wait <= 60:
            raise ConfigurationError("batch_max_wait must be between 0 and 60 seconds")

    @property
    def retry_backoff(self) -> Backoff:
        return Backoff(self.retry_backoff_base, self.retry_backoff_max)

    @property
    def db_backoff(self) -> Backoff:
        return Backoff(self.db_backoff_base, self.db_backoff_max)


@dataclasses.dataclass
class ConsumerStats:
    processed: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    failed_attempts: int = 0
    #: Failures of the handler's dependencies (no attempt counted).
    transient_failures: int = 0
    #: Messages past their deadline (dead-lettered, or given to ``on_expired``).
    expired: int = 0
    #: Times the circuit breaker opened, and seconds it kept the partitions paused.
    breaker_opened: int = 0
    paused_seconds: float = 0.0
