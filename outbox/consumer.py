"""Consume with the inbox: each message's effects commit once, then its offset is committed.

For every message, in partition order: take its idempotency key (default: the ``message-id``
header the relay writes), then in **one database transaction** claim the key in the inbox and
run the handler (which may write rows and publish outbox events); only after that commit is
the offset stored for committing. A crash between the two redelivers the message, and the
inbox skips it. A handler that raises is retried with backoff and full jitter; after
``max_attempts`` (or at once for :class:`PoisonMessage`) the message goes to the dead-letter
topic — published through the outbox in the same transaction that claims its key, so the
dead-lettering itself happens once — and the partition moves on.

A failure of what the handler calls (:class:`DownstreamUnavailable`, or a ``transient=`` type)
counts no attempt: the circuit breaker (:mod:`outbox.breaker`) retries, then pauses the
partitions until the dependency answers. A message past its deadline (``publish(ttl=...)``)
is not handled: it is dead-lettered with reason ``expired``, or given to ``on_expired``.

Batches (``batch_size`` > 1, or a batch handler): the messages of a batch share that one
transaction, with one claim statement for all their keys; a message that fails takes the
per-message path above on its own, after the messages before it commit (see
:meth:`Consumer._segment` and docs/design.md, "Batches").
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import json
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.orm import Session

from outbox import deadletter, statements, tracing
from outbox.backoff import Backoff, Retrying
from outbox.breaker import Breaker, BreakerPolicy, Transition
from outbox.config import parse_db_url
from outbox.exceptions import (
    ConfigurationError,
    DatabaseAccessError,
    DatabaseUnavailableError,
    DownstreamUnavailable,
    HandlerUndidItsWork,
    MissingTablesError,
    PoisonMessage,
    TransactionConflict,
    TransportError,
    classify_db_error,
    first_line,
    translate_db_errors,
)
from outbox.inbox import Inbox
from outbox.message import HEADER_DEADLINE, HEADER_MESSAGE_ID, parse_deadline
from outbox.observe import ConsumerObserver, LogConsumer, Outcome, fanout, message_fields
from outbox.outbox import Outbox
from outbox.schema import DEFAULT_INBOX_TABLE, DEFAULT_TABLE, validate_identifier
from outbox.transport.base import IncomingMessage, Source

logger = logging.getLogger(__name__)

Handler = Callable[[Session, IncomingMessage], Any]
BatchHandler = Callable[[Session, list[IncomingMessage]], Any]

#: Seconds of handlers after which a batch is cut short (the messages done commit, the rest
#: is rewound and comes again after the next poll): so that the consumer still polls Kafka
#: (``max.poll.interval.ms``) and ticks its health at least every this plus one handler call,
#: as without batches. Batching pays off when messages take milliseconds, not seconds.
BATCH_BUDGET = 5.0

#: Exit status of ``outbox consume`` after a handler hung past its time limit (its message
#: was dead-lettered first): restart the process.
EXIT_HANDLER_HUNG = 3
KeyExtractor = Callable[[IncomingMessage], "str | None"]


def message_id_key(message: IncomingMessage) -> str | None:
    """The default idempotency key: the ``message-id`` header written by the relay."""
    value = message.header(HEADER_MESSAGE_ID)
    return value.decode("utf-8", "replace") if value else None


def json_value(message: IncomingMessage) -> Any:
    """The message's value parsed as JSON; :class:`PoisonMessage` if it is not JSON."""
    try:
        return json.loads(message.value or b"")
    except ValueError as exc:
        raise PoisonMessage(f"value is not JSON: {exc}") from exc


def load_handler(path: str, app_dir: str | None = None, what: str = "handler") -> Handler:
    """Import ``package.module:function``; :class:`ConfigurationError` with what is wrong.

    Modules are looked up in ``app_dir`` (default: the working directory) first, as
    ``python -m``, uvicorn and celery do: ``outbox consume --handler payments:capture`` run
    from the folder of ``payments.py`` finds it.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"invalid {what} {path!r}: expected package.module:function")
    folder = os.path.abspath(app_dir if app_dir is not None else os.getcwd())
    if app_dir is not None and not os.path.isdir(folder):
        raise ConfigurationError(f"--app-dir {app_dir!r} is not a directory")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {what} module {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigurationError(f"{what} {path!r}: {module_name} has no {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigurationError(f"{what} {path!r} is not callable")
    handler: Handler = target
    return handler


def load_exception(path: str, app_dir: str | None = None) -> type[BaseException]:
    """Import an exception type named ``package.module.Class`` (or ``package.module:Class``)."""
    module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not module or not name:
        raise ConfigurationError(
            f"invalid --transient {path!r}: expected package.module.ExceptionClass"
        )
    found: Any = load_handler(f"{module}:{name}", app_dir, what="--transient")
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise ConfigurationError(f"--transient {path!r} is not an exception type")
    kind: type[BaseException] = found
    return kind


class _HandlerSession(Session):
    """The handler's session, joined to the runner's transaction (``rollback_only``): its
    ``commit()`` flushes but leaves the transaction to the runner, so the writes commit with
    the inbox key or not at all. ``rollback()`` rolls the whole transaction back, the key's
    claim included, and fails the attempt at once; ``close()`` would drop unflushed writes
    while the flushed ones commit (a half-applied message): it fails the attempt too."""

    undone: str | None = None

    def rollback(self) -> None:
        self.undone = "rollback"
        super().rollback()
        raise HandlerUndidItsWork(_undone_message("rollback"))

    def close(self) -> None:
        if self.undone is None and self.in_transaction():
            self.undone = "close"
        super().close()


def _undone_message(call: str) -> str:
    return (
        f"the handler called session.{call}(), which would undo its writes; raise an exception "
        "to fail the message (the consumer rolls back and retries), or use "
        "session.begin_nested() for a partial undo"
    )


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
    #: Seconds a batch may wait for more messages once it has one (what is fetched already
    #: comes at once): adds up to this much to a message's latency when traffic is light.
    batch_max_wait: float = 0.01

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


class Consumer:
    """Runs ``handler(session, message)`` once per message, with the inbox. Not thread-safe;
    :meth:`stop` may be called from any thread or a signal handler.

    ``transient``: exception types that mean "the dependency is down, not this message", as
    :class:`DownstreamUnavailable` does (e.g. ``httpx.TransportError``). ``on_expired``: called
    as ``on_expired(session, message)`` instead of the handler for a message past its deadline
    (in the transaction that records it in the inbox); without it, such a message is
    dead-lettered with reason ``expired``. ``batch_handler``: instead of ``handler``, called
    as ``batch_handler(session, messages)`` once per batch with the messages not seen before
    (a failing batch is halved down to the failing message, which is then retried and
    dead-lettered on its own as ``batch_handler(session, [message])``).
    """

    def __init__(
        self,
        config: ConsumerConfig,
        handler: Handler | None,
        source_factory: Callable[[], Source],
        *,
        key: KeyExtractor = message_id_key,
        rng: random.Random | None = None,
        observers: Sequence[ConsumerObserver] = (),
        transient: Sequence[type[BaseException]] = (),
        on_expired: Handler | None = None,
        batch_handler: BatchHandler | None = None,
    ) -> None:
        for kind in transient:
            if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                raise ConfigurationError(f"transient={kind!r}: expected exception types")
        if (handler is None) == (batch_handler is None):
            raise ConfigurationError("pass exactly one of handler and batch_handler")
        self.config = config
        self.batch_handler = batch_handler
        if batch_handler is not None:
            # A message on its own (the per-message path: retries, dead letters) is a batch of one.
            def handler(session: Session, message: IncomingMessage) -> Any:
                return batch_handler(session, [message])

        assert handler is not None
        self.handler: Handler = handler
        self._batching = batch_handler is not None or config.batch_size > 1
        #: Set when a batch was cut short: its unfinished messages are rewound.
        self._put_back = False
        self.on_expired = on_expired
        self.stats = ConsumerStats()
        self._transient: tuple[type[BaseException], ...] = (DownstreamUnavailable, *transient)
        self._source_factory = source_factory
        self._key = key
        self._rng = rng or random.Random()
        self._breaker = Breaker(config.breaker, self._rng)
        #: A message the breaker sent back (its position) and its attempts so far: they
        #: count on when it comes again.
        self._carried: tuple[str, int, int, int] | None = None
        self._observe = fanout(LogConsumer(), observers)
        self._stop = threading.Event()
        self._outbox = Outbox(
            table=config.table, schema=config.schema, inbox_table=config.inbox_table
        )
        self._inbox = Inbox(self._outbox, retention=config.retention)
        url = parse_db_url(config.db_url)
        # No prepared statements, and the time limit set per transaction (with the inbox
        # claim) rather than at connect: so the consumer works through a transaction-mode
        # pool (PgBouncer before 1.21 loses prepared statements between transactions, and
        # refuses or drops the options startup parameter).
        connect_args: dict[str, Any] = {"prepare_threshold": None}
        self._engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        sa.event.listen(self._engine, "connect", _counting)
        self._watchdog = _Watchdog(self, config.handler_timeout)

    def stop(self) -> None:
        """Finish the current message (or batch), commit offsets, leave the group."""
        self._stop.set()

    def check(self) -> None:
        """Fail fast on bad setup: the database reachable, the tables installed."""
        tables = self._outbox.tables
        with translate_db_errors("check tables"), self._engine.connect() as conn:
            conn.execute(statements.probe_inbox(tables))
            columns, may_insert, role = conn.execute(
                statements.probe_outbox_for_writers(tables)
            ).one()
        if columns != 2:
            raise MissingTablesError(
                "the outbox tables are older than this version: run `outbox db upgrade "
                "--db-url URL` (or `alembic upgrade outbox@head`) first"
            )
        if not may_insert:
            raise DatabaseAccessError(
                f"the consumer's role {role!r} lacks INSERT on {tables.qualified_name} (its dead "
                f"letters and its handler's events): GRANT INSERT ON {tables.qualified_name} "
                f"TO {role}"
            )
        horizon = self.config.redelivery_horizon
        if horizon is not None and self.config.retention < horizon:
            # A message redelivered after its key was purged would run again.
            logger.warning(
                "inbox retention is shorter than the redelivery horizon",
                extra={
                    "event": "consumer.retention_short",
                    "retention_s": self.config.retention.total_seconds(),
                    "redelivery_horizon_s": horizon.total_seconds(),
                },
            )

    def run(
        self, *, max_messages: int | None = None, idle_timeout: float | None = None
    ) -> ConsumerStats:
        """Consume until :meth:`stop`, or ``max_messages`` handled, or no message for
        ``idle_timeout`` seconds once the source has joined its group (for scripts and tests)."""
        self.check()
        source = self._source = self._source_factory()
        handled = 0
        last = time.monotonic()
        joined = False
        logger.info(
            "consumer starting", extra={"event": "consumer.starting", "consumer": self.config.name}
        )
        try:
            try:
                source.check(5.0)
            except TransportError as exc:
                logger.warning(
                    "broker unreachable at start, will keep trying",
                    extra={"event": "consumer.broker_unreachable", "error": str(exc)},
                )
            while not self._stop.is_set():
                self._observe.tick()
                if max_messages is not None and handled >= max_messages:
                    break
                if self._breaker.state == "open":
                    self._wait_open(source)
                    last = time.monotonic()  # waiting for the dependency is not idle
                    continue
                if self._batching:
                    size = self.config.batch_size
                    if max_messages is not None:
                        size = min(size, max_messages - handled)
                    batch = source.poll_batch(size, 0.5, self.config.batch_max_wait)
                    message = batch[0] if batch else None
                else:
                    message = source.poll(0.5)
                if not joined and source.joined:
                    joined = True
                    self._observe.joined()
                if message is None:
                    if not joined and source.reachable:
                        # Joining a consumer group can take longer than idle_timeout (after a
                        # crash, up to the dead member's session timeout): not idle yet. An
                        # unreachable broker is no join in progress: the idle clock runs.
                        last = time.monotonic()
                    elif idle_timeout is not None and time.monotonic() - last >= idle_timeout:
                        break
                    continue
                last = time.monotonic()
                if self._batching:
                    handled += self._consume_batch(batch, last)
                    continue
                outcome = self._handle(message)
                if outcome is None:
                    # Stopping in the middle of retries (not processed: redelivered), or the
                    # breaker opened (the message is rewound, the partitions paused).
                    continue
                source.processed(message)
                self._observe.message_finished(message, outcome, time.monotonic() - last)
                handled += 1
        finally:
            if self._breaker.state != "closed":
                self.stats.paused_seconds = self._breaker.paused_seconds + self._breaker.open_for()
            source.close()
            self._engine.dispose()
            self._observe.stopped(self.stats)
        return self.stats

    @property
    def source(self) -> Source | None:
        """The broker source while :meth:`run` runs (for metrics: lag, commits)."""
        return getattr(self, "_source", None)

    @property
    def breaker(self) -> Breaker:
        """The circuit breaker: ``.state`` is ``closed``, ``open`` or ``half_open`` (the
        readiness endpoint's "degraded")."""
        return self._breaker

    def _wait_open(self, source: Source) -> None:
        """While the breaker is open: keep the group membership (the source is paused), and
        go half-open when the open period is over."""
        remaining = self._breaker.remaining()
        if remaining > 0:
            source.poll(min(remaining, 0.5))
            return
        self._report(self._breaker.half_open())
        source.resume()

    def _report(self, transition: Transition) -> None:
        if transition.state == "open":
            self.stats.breaker_opened += 1
        elif transition.state == "closed":
            self.stats.paused_seconds = self._breaker.paused_seconds
        self._observe.breaker_changed(transition)

    # -- one message ----------------------------------------------------------------------------

    def _handle(
        self, message: IncomingMessage, failed: BaseException | None = None
    ) -> Outcome | None:
        """Process ``message`` to the end: its outcome. None when it could not be done: asked
        to stop, or the breaker opened (the message is rewound and comes again). ``failed``:
        how its first attempt failed already (in a batch); it counts as this path's own."""
        key = self._key(message)
        if key is None:
            logger.error(
                "message has no idempotency key, dead-lettering",
                extra={"event": "consumer.no_key", **message_fields(message)},
            )
            return self._dead_letter(
                message, None, "no idempotency key (message-id header)", 0, kind="no-key"
            )
        attempts = Retrying(self.config.retry_backoff, self._rng)
        carried = self._carried
        position = (message.topic, message.partition, message.offset)
        if carried is not None and carried[:3] == position:
            attempts.failures = carried[3]
        self._carried = None
        waits = Retrying(self.config.retry_backoff, self._rng)  # between transient failures
        outage = Retrying(self.config.db_backoff, self._rng)
        while True:
            try:
                if failed is not None:
                    first, failed = failed, None
                    self._breaker.attempt()
                    raise first
                handler = self.handler
                expired = self._expired(message)
                if expired is not None:
                    if self.on_expired is None:
                        self.stats.expired += 1
                        return self._dead_letter(
                            message, key, expired, attempts.failures, kind="expired"
                        )
                    handler = self.on_expired
                self._breaker.attempt()
                if not self._run_handler(message, key, attempts.failures + 1, handler):
                    self.stats.duplicates += 1
                    logger.debug(
                        "duplicate skipped",
                        extra={
                            "event": "consumer.duplicate",
                            "key": key,
                            **message_fields(message),
                        },
                    )
                    return "duplicate"
                if expired is not None:
                    self.stats.expired += 1
                self.stats.processed += 1
                transition = self._breaker.succeeded()
                if transition is not None:
                    self._report(transition)
                return "processed"
            except PoisonMessage as exc:
                return self._dead_letter(
                    message, key, f"PoisonMessage: {exc}", attempts.failures + 1, exc, kind="poison"
                )
            except Exception as exc:
                if isinstance(
                    classify_db_error(exc), DatabaseUnavailableError | TransactionConflict
                ):
                    # The database (down, or a conflict with a concurrent transaction), not
                    # the message: try again, counting no attempt.
                    if not self._wait_for_database(exc, outage):
                        return None
                    continue
                reason = f"{type(exc).__name__}: {first_line(exc)}"
                if isinstance(exc, self._transient):
                    self.stats.transient_failures += 1
                    if not self._transient_failure(message, key, reason, waits, attempts, exc):
                        return None
                    continue
                # The handler's own failure (a statement it ran past the time limit too).
                self.stats.failed_attempts += 1
                if attempts.failures + 1 >= self.config.max_attempts:
                    return self._dead_letter(
                        message, key, reason, attempts.failures + 1, exc, kind="attempts"
                    )
                if self._breaker.retry_allowed():
                    delay = attempts.failed()
                    self._observe.attempt_failed(
                        message, key, attempts.failures, reason, delay, exc
                    )
                    if self._stop.wait(delay):
                        return None
                    continue
                # The retry budget is spent: many messages fail, so this is an outage. A
                # half-open probe still counts its attempt: an unclassified failure may be
                # this message's own, which must not block its partition forever.
                if self._breaker.state == "half_open":
                    attempts.failed()
                reason = f"retry budget spent: {reason}"
                if not self._transient_failure(message, key, reason, waits, attempts, exc):
                    return None

    def _transient_failure(
        self,
        message: IncomingMessage,
        key: str,
        reason: str,
        waits: Retrying,
        attempts: Retrying,
        exc: BaseException,
    ) -> bool:
        """A failure of the dependency: tell the breaker. True to try the message again now;
        False when the breaker opened (the message is rewound, the partitions paused) or the
        consumer is stopping."""
        transition = self._breaker.transient_failure(reason)
        if transition is not None:
            self._source.pause()
            self._source.rewind(message)
            self._carried = (message.topic, message.partition, message.offset, attempts.failures)
            self._report(transition)
            return False
        delay = waits.failed()
        self._observe.transient_failure(message, key, reason, delay, exc)
        return not self._stop.wait(delay)

    def _expired(self, message: IncomingMessage) -> str | None:
        """Why ``message`` is past its deadline, or None; :class:`PoisonMessage` if its
        deadline header cannot be read."""
        raw = message.header(HEADER_DEADLINE)
        if raw is None:
            return None
        try:
            deadline = parse_deadline(raw)
        except (ValueError, UnicodeDecodeError):
            raise PoisonMessage(
                f"unreadable {HEADER_DEADLINE} header {raw[:64]!r}: expected RFC 3339 with a zone"
            ) from None
        late = time.time() - deadline
        if late <= self.config.clock_skew:
            return None
        return f"expired: {raw.decode()} passed {late:.3f} s ago"

    def _run_handler(
        self, message: IncomingMessage, key: str, attempts: int, handler: Handler
    ) -> bool:
        """Claim ``key`` and run the handler in one transaction that this runner owns; False
        if the key was claimed before (a duplicate). The handler's session joins that
        transaction (see :class:`_HandlerSession`): its own ``commit()`` only flushes, and
        nothing commits before the whole handler has run. (Not a savepoint per message: two
        round trips that cost the consumer a quarter of its throughput.) The whole attempt is
        the ``process`` span when tracing is on (see :mod:`outbox.tracing`)."""
        with (
            tracing.processing(message, self.config.name),
            self._engine.connect() as conn,
            conn.begin(),
        ):
            # A key the inbox cannot hold (too long, a NUL) is claimed by its digest, as its
            # dead letter would be: a 600-byte message-id is handled, not retried to death.
            if not self._inbox.claim(
                conn,
                self.config.name,
                deadletter.inbox_key(key) or key,
                statement_timeout=self.config.handler_timeout,
            ):
                return False
            with (
                _HandlerSession(bind=conn, join_transaction_mode="rollback_only") as session,
                self._watchdog.watching(message, key, attempts, _backend_pid(conn)),
            ):
                handler(session, message)
                if session.undone is not None:
                    raise HandlerUndidItsWork(_undone_message(session.undone))
                session.commit()  # flushes; the claim and the writes commit together below
        return True

    # -- batches --------------------------------------------------------------------------------

    def _consume_batch(self, batch: list[IncomingMessage], started: float) -> int:
        """Handle a polled batch in order: how many of its messages are finished (their
        offsets stored). Runs of messages that need nothing special go in one transaction each
        (:meth:`_segment`); a message without a key, expired, sent back by the breaker, or
        polled while the breaker is not closed goes through :meth:`_handle` on its own. When
        the breaker opens, the rest of the batch is rewound, in order, with the failed message."""
        i, n = 0, len(batch)
        while i < n and not self._stop.is_set():
            segment: list[tuple[IncomingMessage, str]] = []
            while i + len(segment) < n:
                key = self._batch_key(batch[i + len(segment)])
                if key is None:
                    break
                segment.append((batch[i + len(segment)], key))
            if segment:
                done = self._segment(segment, started)
                i += done
                if done < len(segment):
                    break
            elif self._one(batch[i], started, None):
                i += 1
            else:
                break
        if i < n and (self._breaker.state == "open" or self._put_back):
            for message in batch[i:]:
                self._source.rewind(message)
        self._put_back = False
        return i

    def _batch_key(self, message: IncomingMessage) -> str | None:
        """The key of a message that may share a transaction with others; None if it takes
        the per-message path."""
        if self._breaker.state != "closed":
            return None  # a half-open probe is one message
        carried = self._carried
        if carried is not None and carried[:3] == (
            message.topic,
            message.partition,
            message.offset,
        ):
            return None  # its attempts so far count on
        key = self._key(message)
        if key is None:
            return None
        try:
            if self._expired(message) is not None:
                return None
        except PoisonMessage:
            return None
        return key

    def _one(self, message: IncomingMessage, started: float, failed: BaseException | None) -> bool:
        """One message through the per-message path; False if it was not finished."""
        outcome = self._handle(message, failed)
        if outcome is None:
            return False
        self._source.processed(message)
        self._observe.message_finished(message, outcome, time.monotonic() - started)
        return True

    def _segment(self, segment: list[tuple[IncomingMessage, str]], started: float) -> int:
        """Handle ``segment`` in order, optimistically in one transaction: how many of its
        messages are finished. If the transaction fails at message k, the messages before k
        are handled again in a fresh transaction, k takes the per-message path with its
        failure (retries, breaker, dead letter), and the rest go on as a new segment. A batch
        handler's failure names no message: the segment is split in halves instead, down to
        the one that fails."""
        if not segment or self._stop.is_set():
            return 0
        failure = self._attempt(segment, started)
        if failure is None:
            return len(segment)
        at, exc, committed = failure
        if at is None:
            if len(segment) > 1:
                half = len(segment) // 2
                done = self._segment(segment[:half], started)
                if done < half:
                    return done
                return half + self._segment(segment[half:], started)
            at = 0
        if committed < at:
            done = self._segment(segment[:at], started)
            if done < at:
                return done
        if isinstance(exc, _Cut):
            self._put_back = True  # the rest comes again after the next poll
            return at
        if not self._one(segment[at][0], started, exc):
            return at
        return at + 1 + self._segment(segment[at + 1 :], started)

    def _attempt(
        self, segment: list[tuple[IncomingMessage, str]], started: float
    ) -> tuple[int | None, Exception | None, int] | None:
        """One transaction for ``segment``: claim all its keys in one statement, run the
        handler on each fresh message in order (or the batch handler once), commit. None when
        it committed (offsets stored, observers told); else where it failed (None: at the
        commit, or in the batch handler), why (None: a message expired meanwhile), and how
        many messages before it are committed already (see :meth:`_cut`)."""
        name = self.config.name
        claims = [deadletter.inbox_key(key) or key for _, key in segment]
        outcomes: list[Outcome] = []
        at = 0
        try:
            with self._engine.connect() as conn, conn.begin() as transaction:
                fresh = self._inbox.claim_batch(
                    conn, name, claims, statement_timeout=self.config.handler_timeout
                )
                seen: set[str] = set()
                for claim in claims:
                    if claim in fresh and claim not in seen:
                        seen.add(claim)
                        outcomes.append("processed")
                    else:
                        outcomes.append("duplicate")
                pid = _backend_pid(conn) if self._watchdog.on else None
                if self.batch_handler is not None:
                    at = -1  # a failure from here on names no message
                    self._run_batch_handler(conn, segment, outcomes, pid)
                else:
                    driver = conn.connection.driver_connection
                    first: set[tuple[str, int]] = set()
                    begun = time.monotonic()
                    for at, (message, key) in enumerate(segment):
                        tp = (message.topic, message.partition)
                        alone = tp not in first  # nothing pending before it in its partition
                        first.add(tp)
                        if outcomes[at] == "duplicate":
                            continue
                        mark = _sent(driver)
                        try:
                            if at and time.monotonic() - begun > BATCH_BUDGET:
                                raise _Cut  # poll again soon: see BATCH_BUDGET
                            if self._expired(message) is not None:
                                raise _Expired  # the per-message path dead-letters it
                            with (
                                tracing.processing(message, name),
                                _HandlerSession(
                                    bind=conn, join_transaction_mode="rollback_only"
                                ) as s,
                                self._watchdog.watching(message, key, 1, pid, alone),
                            ):
                                self.handler(s, message)
                                if s.undone is not None:
                                    raise HandlerUndidItsWork(_undone_message(s.undone))
                                s.commit()  # flushes: a failing write is this message's
                        except Exception as exc:
                            if self._cut(conn, transaction, mark, claims, outcomes, at):
                                self._finished(segment[:at], outcomes[:at], started)
                                return at, (None if isinstance(exc, _Expired) else exc), at
                            if isinstance(exc, _Cut):
                                raise _CutFailed from None
                            raise
                at = -1  # the commit names no message
        except _Expired:
            return at, None, 0
        except _CutFailed:
            return at, _Cut(), 0
        except Exception as exc:
            return (None if at < 0 else at), exc, 0
        self._finished(segment, outcomes, started)
        return None

    def _cut(
        self,
        conn: sa.Connection,
        transaction: sa.RootTransaction,
        mark: int | None,
        claims: list[str],
        outcomes: list[Outcome],
        at: int,
    ) -> bool:
        """The handler failed at message ``at`` without sending a statement (it failed before
        writing, as when the dependency it calls first is down): the transaction holds just
        the work of the messages before it. Commit that, less the claims of ``at`` and after,
        so those messages' handlers do not run twice. False (the caller rolls back and the
        messages before ``at`` run again) if the handler did send something, or the
        transaction is no longer usable."""
        driver = conn.connection.driver_connection
        if at == 0 or mark is None or _sent(driver) != mark or not transaction.is_active:
            return False
        info = getattr(driver, "info", None)
        if getattr(info, "transaction_status", None) != psycopg.pq.TransactionStatus.INTRANS:
            return False  # rolled back, or failed
        unclaim = [c for c, o in zip(claims[at:], outcomes[at:], strict=True) if o == "processed"]
        try:
            if unclaim:
                self._inbox.unclaim(conn, self.config.name, unclaim)
            transaction.commit()
        except Exception:
            logger.debug("batch cut failed", exc_info=True, extra={"event": "consumer.cut_failed"})
            return False
        return True

    def _run_batch_handler(
        self,
        conn: sa.Connection,
        segment: list[tuple[IncomingMessage, str]],
        outcomes: list[Outcome],
        pid: int | None,
    ) -> None:
        assert self.batch_handler is not None
        letters = [pair for pair, o in zip(segment, outcomes, strict=True) if o == "processed"]
        if not letters:
            return
        fresh = [m for m, _ in letters]
        with (
            _HandlerSession(bind=conn, join_transaction_mode="rollback_only") as session,
            self._watchdog.watching_all(letters, [m for m, _ in segment], pid),
        ):
            self.batch_handler(session, fresh)
            if session.undone is not None:
                raise HandlerUndidItsWork(_undone_message(session.undone))
            session.commit()

    def _finished(
        self,
        segment: list[tuple[IncomingMessage, str]],
        outcomes: list[Outcome],
        started: float,
    ) -> None:
        """After a segment's commit: the stats, the breaker, the offsets, the observers."""
        processed = 0
        for (message, key), outcome in zip(segment, outcomes, strict=True):
            self._breaker.attempt()
            if outcome == "processed":
                processed += 1
            elif logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "duplicate skipped",
                    extra={"event": "consumer.duplicate", "key": key, **message_fields(message)},
                )
        self.stats.processed += processed
        self.stats.duplicates += len(segment) - processed
        if processed:
            self._breaker.succeeded()  # closed: resets the failures in a row
        last: dict[tuple[str, int], IncomingMessage] = {}
        for message, _ in segment:
            last[(message.topic, message.partition)] = message
        for message in last.values():
            self._source.processed(message)  # the last of each partition stores them all
        now = time.monotonic()
        for (message, _), outcome in zip(segment, outcomes, strict=True):
            self._observe.message_finished(message, outcome, now - started)

    def _wait_for_database(self, exc: BaseException, outage: Retrying) -> bool:
        """Back off after a database failure; False when asked to stop meanwhile."""
        delay = outage.failed()
        self._observe.database_unavailable(first_line(exc), delay)
        return not self._stop.wait(delay)

    def _dead_letter(
        self,
        message: IncomingMessage,
        key: str | None,
        reason: str,
        attempts: int,
        exc: BaseException | None = None,
        *,
        kind: str,
    ) -> Outcome | None:
        """Publish ``message`` to the dead-letter topic through the outbox, claiming its key in
        the same transaction, so that dead-lettering happens once. Any message can be stored
        (see :mod:`outbox.deadletter`); should the full dead letter fail for a reason that
        retrying cannot fix, the minimal one is written instead. Only a database that cannot
        be reached (or a transient failure) makes it wait; None when asked to stop meanwhile."""
        topic = deadletter.topic_for(self.config.dead_letter_topic, message.topic)
        claim = deadletter.inbox_key(key)
        failure: str | None = None  # why the full form could not be stored
        outage = Retrying(self.config.db_backoff, self._rng)
        while True:
            try:
                letter = deadletter.letter(
                    message,
                    topic=topic,
                    consumer=self.config.name,
                    reason=reason,
                    kind=kind,
                    attempts=attempts,
                    key=key,
                    failure=failure,
                )
                with (
                    translate_db_errors("dead-letter"),
                    Session(self._engine) as session,
                    session.begin(),
                ):
                    # Claiming the key makes the dead-lettering itself happen once.
                    if claim and not self._inbox.claim(session, self.config.name, claim):
                        self.stats.duplicates += 1
                        return "duplicate"
                    deadletter.write(session, self._outbox.tables, letter)
                break
            except ConfigurationError:
                raise  # missing tables, a refused role: nothing to do with this message
            except Exception as db_exc:
                if deadletter.transient(db_exc):
                    if not self._wait_for_database(db_exc, outage):
                        return None
                    continue
                if failure is not None:
                    raise  # the minimal form failed too: stop before the offset moves on
                failure = f"{type(db_exc).__name__}: {first_line(db_exc)}"
                logger.error(
                    "dead letter could not be stored, storing a minimal one",
                    exc_info=db_exc,
                    extra={
                        "event": "consumer.dead_letter_minimal",
                        "error": failure,
                        **message_fields(message),
                    },
                )
        self.stats.dead_lettered += 1
        logger.error(
            "message dead-lettered",
            exc_info=exc,
            extra={
                "event": "consumer.dead_lettered",
                "key": key,
                "dead_letter_topic": topic,
                "attempts": attempts,
                "reason": kind,
                "error": reason,
                **message_fields(message),
            },
        )
        return "dead_lettered"


def _backend_pid(conn: sa.Connection) -> int | None:
    driver = conn.connection.driver_connection
    info = getattr(driver, "info", None)
    return getattr(info, "backend_pid", None)


def _sent(driver: Any) -> int | None:
    """Statements sent on a driver connection so far (None: not counted)."""
    sent: int | None = getattr(driver, "outbox_statements", None)
    return sent


class _CountingCursor(psycopg.Cursor[Any]):
    """Counts the statements sent on its connection, so that a batch can tell a handler that
    failed before writing anything (see :meth:`Consumer._cut`). Everything psycopg sends
    goes through a cursor: SQLAlchemy's statements, ``Connection.execute`` (the outbox's fast
    path), COPY, pipelines."""

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        _count(self.connection)
        return super().execute(*args, **kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> None:
        _count(self.connection)
        super().executemany(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        _count(self.connection)
        return super().stream(*args, **kwargs)

    def copy(self, *args: Any, **kwargs: Any) -> Any:
        _count(self.connection)
        return super().copy(*args, **kwargs)


class _CountingServerCursor(psycopg.ServerCursor[Any]):
    def execute(self, *args: Any, **kwargs: Any) -> Any:
        _count(self.connection)
        return super().execute(*args, **kwargs)


def _count(connection: Any) -> None:
    connection.outbox_statements = getattr(connection, "outbox_statements", 0) + 1


def _counting(dbapi_connection: Any, _record: Any) -> None:
    """On each new database connection of the consumer: count its statements."""
    if isinstance(dbapi_connection, psycopg.Connection):
        dbapi_connection.outbox_statements = 0  # type: ignore[attr-defined]
        dbapi_connection.cursor_factory = _CountingCursor
        dbapi_connection.server_cursor_factory = _CountingServerCursor


class _Cut(Exception):
    """A batch ran :data:`BATCH_BUDGET` seconds: the rest of it goes back to the source."""


class _CutFailed(Exception):
    pass


class _Expired(Exception):
    """A message of a batch expired before its handler started (the batch is cut there)."""


class _Watchdog:
    """Notices a handler attempt that outlives its time limit. Its database statements are
    cancelled by ``statement_timeout`` at the limit; past the limit and a grace period the
    handler is stuck outside the database, where Python cannot stop it. Then the watchdog
    ends the handler's session (rolling back its claim), dead-letters the message, commits
    its offset and exits the process (:data:`EXIT_HANDLER_HUNG`) for the supervisor to start a
    fresh one -- which skips the message, so a message that always hangs does not crash-loop.

    In a batch each handler call has its own limit, so the hung message is the one running.
    Its offset is stored only if no message before it in its partition waits uncommitted in
    the batch's transaction (rolled back with it); otherwise the redelivery finds its dead
    letter's key and skips it. A batch handler's limit is per call: a batch handler that
    hangs gets every fresh message of its call dead-lettered (the watchdog cannot tell which).
    """

    #: Replaced in tests.
    exit: Callable[[int], None] = staticmethod(os._exit)

    def __init__(self, consumer: Consumer, limit: float | None) -> None:
        self._consumer = consumer
        self._limit = limit
        self._cond = threading.Condition()
        #: What to dead-letter, which offsets to store then, attempts, backend pid, deadline.
        self._current: _Watched | None = None
        self._idle = False
        self._thread: threading.Thread | None = None

    @property
    def on(self) -> bool:
        return self._limit is not None

    @contextlib.contextmanager
    def watching(
        self,
        message: IncomingMessage,
        key: str,
        attempts: int,
        pid: int | None,
        store: bool = True,
    ) -> Iterator[None]:
        """Around one handler call. ``store``: the message's offset may be stored if it hangs."""
        with self._watching(([(message, key)], [message] if store else [], attempts, pid)):
            yield

    @contextlib.contextmanager
    def watching_all(
        self,
        letters: list[tuple[IncomingMessage, str]],
        offsets: list[IncomingMessage],
        pid: int | None,
    ) -> Iterator[None]:
        """Around one batch handler call: ``letters`` are dead-lettered if it hangs, then the
        ``offsets`` stored."""
        with self._watching((letters, offsets, 1, pid)):
            yield

    @contextlib.contextmanager
    def _watching(
        self, what: tuple[list[tuple[IncomingMessage, str]], list[IncomingMessage], int, int | None]
    ) -> Iterator[None]:
        if self._limit is None:
            yield
            return
        grace = min(5.0, 0.5 + self._limit / 4)
        with self._cond:
            self._current = (*what, time.monotonic() + self._limit + grace)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="outbox-handler-watchdog", daemon=True
                )
                self._thread.start()
            # A watchdog waiting for an earlier deadline wakes by itself and reads the new one:
            # waking it only when it waits for nothing saves two thread switches per message.
            if self._idle:
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._current = None

    def _watch(self) -> None:
        while True:
            with self._cond:
                while self._current is None:
                    self._idle = True
                    self._cond.wait()
                self._idle = False
                letters, offsets, attempts, pid, deadline = self._current
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self._current = None
            self._hung(letters, offsets, attempts, pid)

    def _hung(
        self,
        letters: list[tuple[IncomingMessage, str]],
        offsets: list[IncomingMessage],
        attempts: int,
        pid: int | None,
    ) -> None:
        consumer = self._consumer
        reason = f"the handler ran longer than its time limit ({self._limit} s)"
        if consumer.batch_handler is not None and len(letters) > 1:
            reason = (
                f"the batch handler ran longer than its time limit ({self._limit} s) on a "
                f"batch of {len(letters)} messages, this one among them"
            )
        message, key = letters[0]
        logger.error(
            "handler hung, dead-lettering and exiting",
            extra={
                "event": "consumer.handler_hung",
                "key": key,
                "limit_s": self._limit,
                "messages": len(letters),
                **message_fields(message),
            },
        )
        try:
            if pid is not None:
                with consumer._engine.connect() as conn:
                    conn.execute(statements.terminate_backend(), {"pid": pid})
                    conn.commit()
            if all(
                consumer._dead_letter(m, k, reason, attempts, kind="hung") is not None
                for m, k in letters
            ):
                for done in offsets:
                    consumer._source.processed(done)
                consumer._source.commit()
        except Exception:
            # Exiting anyway: the message is redelivered and the watchdog tries again.
            logger.exception(
                "could not dead-letter the hung message",
                extra={"event": "consumer.hang_unrecorded"},
            )
        sys.stderr.flush()
        self.exit(EXIT_HANDLER_HUNG)


_Watched = tuple[list[tuple[IncomingMessage, str]], list[IncomingMessage], int, "int | None", float]
