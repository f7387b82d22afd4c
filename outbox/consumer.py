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
:mod:`outbox.consumer_batch` and docs/design.md, "Batches").

An ``async def`` handler is awaited with an ``AsyncSession`` in that same transaction (see
:mod:`outbox.consumer_async`); everything above holds for it alike.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.orm import Session

from outbox import deadletter, statements, tracing
from outbox.backoff import Retrying
from outbox.breaker import Breaker, Transition
from outbox.config import parse_db_url
from outbox.consumer_async import AsyncHandlers, is_async
from outbox.consumer_batch import Batches
from outbox.consumer_config import ConsumerConfig, ConsumerStats
from outbox.exceptions import (
    ConfigurationError,
    DatabaseAccessError,
    DatabaseUnavailableError,
    DownstreamUnavailable,
    MissingTablesError,
    PoisonMessage,
    TransactionConflict,
    TransportError,
    classify_db_error,
    first_line,
    translate_db_errors,
)
from outbox.handler_session import Call, backend_pid, counting, in_session
from outbox.inbox import Inbox
from outbox.message import HEADER_DEADLINE, HEADER_MESSAGE_ID, parse_deadline
from outbox.observe import ConsumerObserver, LogConsumer, Outcome, fanout, message_fields
from outbox.outbox import Outbox
from outbox.transport.base import IncomingMessage, Source
from outbox.watchdog import EXIT_HANDLER_HUNG, Watchdog

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = [
    "BATCH_BUDGET",
    "EXIT_HANDLER_HUNG",
    "AsyncBatchHandler",
    "AsyncHandler",
    "BatchHandler",
    "Consumer",
    "ConsumerConfig",
    "ConsumerStats",
    "DownstreamUnavailable",
    "Handler",
    "KeyExtractor",
    "PoisonMessage",
    "json_value",
    "load_exception",
    "load_handler",
    "message_id_key",
]

# The watchdog's old name here (tests replace its ``exit``).
_Watchdog = Watchdog

logger = logging.getLogger(__name__)

Handler = Callable[[Session, IncomingMessage], Any]
BatchHandler = Callable[[Session, list[IncomingMessage]], Any]
#: ``async def`` handlers: awaited with an ``AsyncSession`` in the same transaction.
AsyncHandler = Callable[["AsyncSession", IncomingMessage], Awaitable[Any]]
AsyncBatchHandler = Callable[["AsyncSession", list[IncomingMessage]], Awaitable[Any]]

#: Seconds of handlers after which a batch is cut short (the messages done commit, the rest
#: is rewound and comes again after the next poll): so that the consumer still polls Kafka
#: (``max.poll.interval.ms``) and ticks its health at least every this plus one handler call,
#: as without batches. Batching pays off when messages take milliseconds, not seconds.
BATCH_BUDGET = 5.0

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
        if exc.name == "greenlet" or "greenlet" in str(exc):
            # sqlalchemy.ext.asyncio (an async handler's AsyncSession) without greenlet.
            raise ConfigurationError(
                f"cannot import {what} module {module_name!r}, which needs greenlet: "
                "install sqlalchemy-outbox[asyncio]"
            ) from exc
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

    Any of the three may be an ``async def`` function (or a ``functools.partial`` of one, or
    an object with an ``async def __call__``): it is then awaited with an ``AsyncSession``
    (``expire_on_commit=False``) bound to the same connection and transaction, which needs
    greenlet (``sqlalchemy-outbox[asyncio]``). :meth:`run` then runs an event loop of its own
    and must be called from a thread without one.
    """

    def __init__(
        self,
        config: ConsumerConfig,
        handler: Handler | AsyncHandler | None,
        source_factory: Callable[[], Source],
        *,
        key: KeyExtractor = message_id_key,
        rng: random.Random | None = None,
        observers: Sequence[ConsumerObserver] = (),
        transient: Sequence[type[BaseException]] = (),
        on_expired: Handler | AsyncHandler | None = None,
        batch_handler: BatchHandler | AsyncBatchHandler | None = None,
    ) -> None:
        for kind in transient:
            if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                raise ConfigurationError(f"transient={kind!r}: expected exception types")
        if (handler is None) == (batch_handler is None):
            raise ConfigurationError("pass exactly one of handler and batch_handler")
        if is_async(key):
            # It runs outside the handler's transaction, on the consumer's own thread.
            raise ConfigurationError(
                "the key extractor must be a plain function (not async def): it only reads "
                "the message"
            )
        self.config = config
        self.handler = handler
        self.batch_handler = batch_handler
        self._batching = batch_handler is not None or config.batch_size > 1
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
        sa.event.listen(self._engine, "connect", counting)
        #: With an async handler, the transactions that run handlers take their connections
        #: from an async engine (inside AsyncHandlers.run); without, nothing async is made.
        self._async: AsyncHandlers | None = None
        self._handler_engine = self._engine
        caller: Callable[[Callable[..., Any]], Call] = in_session
        handlers = {"handler": handler, "batch handler": batch_handler, "on_expired": on_expired}
        for what, fn in handlers.items():
            if fn is not None and is_async(fn):
                self._async = AsyncHandlers(url, connect_args, what)
                self._handler_engine = self._async.sync_engine
                caller = self._async.caller
                break
        self._call: Call
        self._call_batch: Call | None = None
        if batch_handler is not None:
            call_batch = self._call_batch = caller(batch_handler)

            # A message on its own (the per-message path: retries, dead letters) is a batch of one.
            def call(conn: sa.Connection, message: Any, watch: Any) -> None:
                call_batch(conn, [message], watch)

            self._call = call
        else:
            assert handler is not None
            self._call = caller(handler)
        self._call_expired = caller(on_expired) if on_expired is not None else None
        self._watchdog = Watchdog(self, config.handler_timeout)
        self._batches = Batches(self)

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
        if self._async is not None:
            self._async.start()
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
            if self._async is not None:
                self._async.close()
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
                call = self._call
                expired = self._expired(message)
                if expired is not None:
                    if self._call_expired is None:
                        self.stats.expired += 1
                        return self._dead_letter(
                            message, key, expired, attempts.failures, kind="expired"
                        )
                    call = self._call_expired
                self._breaker.attempt()
                n = attempts.failures + 1
                if self._async is None:
                    fresh = self._run_handler(message, key, n, call)
                else:
                    fresh = self._async.run(self._run_handler, message, key, n, call)
                if not fresh:
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

    def _run_handler(self, message: IncomingMessage, key: str, attempts: int, call: Call) -> bool:
        """Claim ``key`` and run the handler in one transaction that this runner owns; False
        if the key was claimed before (a duplicate). The handler's session joins that
        transaction (see :class:`~outbox.handler_session.HandlerSession`): its own ``commit()``
        only flushes, and nothing commits before the whole handler has run. (Not a savepoint per
        message: two round trips that cost the consumer a quarter of its throughput.) The whole
        attempt is the ``process`` span when tracing is on (see :mod:`outbox.tracing`)."""
        with (
            tracing.processing(message, self.config.name),
            self._handler_engine.connect() as conn,
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
            # The handler in its session; its writes are flushed, and the claim and the
            # writes commit together below.
            call(conn, message, self._watchdog.watching(message, key, attempts, backend_pid(conn)))
        return True

    # -- batches --------------------------------------------------------------------------------

    def _consume_batch(self, batch: list[IncomingMessage], started: float) -> int:
        """Handle a polled batch (see :class:`outbox.consumer_batch.Batches`): how many of its
        messages are finished."""
        # The budget is read here, at each batch, so that tests can shorten it.
        return self._batches.consume(batch, started, BATCH_BUDGET)

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
