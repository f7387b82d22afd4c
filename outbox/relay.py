"""The relay: claim committed rows, send them, mark them sent once acknowledged.

Design (see ``docs/guarantees.md`` and ``docs/design.md``):

* **One active relay.** A relay becomes the leader by taking a session-scoped advisory lock on
  the same connection it claims and marks with. The lock lives exactly as long as that
  session: a crashed leader's lock is released by PostgreSQL, and a relay that lost its
  connection cannot mark anything. Other relays wait as standbys.
* **Order.** Writers take a per-key transaction lock before their rows get ids (see
  :func:`outbox.statements.insert_messages`), so per key, id order is commit order and the
  claim (``ORDER BY id``) never skips a row that commits late. The leader sends in id order,
  the transport keeps per-key order, and the key gate (``outbox.keygate``) holds a key back
  behind a message of it that failed or was not sent.
* **At least once.** Rows are deleted (or marked) only after the broker acknowledged them.
  Anything unacknowledged at a crash is sent again: duplicates, never loss.
* **Pipelining.** Up to ``max_inflight_batches`` batches are out at once, so the database work
  for one batch overlaps the broker's acknowledgement of another; under load the next claim
  runs ahead on a second connection (``outbox.claims``).

Around the loop: :class:`~outbox.backoff.Retrying` for the broker and the database, the
:class:`~outbox.observe.RelayObserver` hooks for whatever watches it (logs included).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import operator
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from outbox import purge, statements, tracing
from outbox.backoff import DueTimes, Retrying
from outbox.brokerlink import BrokerLink
from outbox.claims import Claims, HeaderCache, Row
from outbox.config import RelayConfig, relay_conninfo
from outbox.exceptions import (
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailableError,
    MessageRejected,
    OutboxError,
    TransportError,
    TransportUnavailable,
    first_line,
)
from outbox.keygate import Key, KeyGate
from outbox.leader import LeaderSession
from outbox.message import HEADER_MESSAGE_ID
from outbox.observe import BatchOutcome, LogRelay, MessageRef, RelayObserver, fanout
from outbox.schema import define_tables
from outbox.transport.base import FailureKind, OutgoingMessage, Transport

logger = logging.getLogger(__name__)

_ONCE_BROKER_FAILURES = 3
# How long the relay waits for writers in flight before it may sleep (doubling while one
# keeps it awake): a commit that does not notify meanwhile is found up to this much later.
_DOZE_WAIT = 0.005
_DOZE_WAIT_MAX = 0.05
# After its last work the relay polls for this long before it dozes: while it dozes, or
# queues to, every writer notifies, and notifying commits queue behind one lock (a cap of
# about one commit's time each). Under steady traffic it never dozes; at a trickle, with
# gaps longer than this, writers notify and commit rarely. Polls start at the minimum and
# grow with the time idle (a quarter of it).
LINGER = 0.02
_LINGER_POLL_MIN = 0.001
_LINGER_POLL_MAX = 0.005
_TOPIC = operator.attrgetter("topic")
_CREATED = operator.attrgetter("created")

TransportFactory = Callable[[], Transport]


@dataclasses.dataclass
class RelayStats:
    """Counters since the relay started (also logged at shutdown)."""

    sent: int = 0
    failed_attempts: int = 0
    parked: int = 0
    batches: int = 0
    transport_failures: int = 0


@dataclasses.dataclass(slots=True)
class _Batch:
    rows: list[Row]
    transport: Transport
    gate: KeyGate
    started: float
    outstanding: int = 0
    acked: list[int] = dataclasses.field(default_factory=list)
    # (id, reason): counted as a failed attempt.
    failed: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    transport_failures: list[str] = dataclasses.field(default_factory=list)
    fatal: bool = False
    # Ids handed to the transport (or refused by it): excluded from claims while in flight.
    sent: list[int] = dataclasses.field(default_factory=list)
    # Set when finished or abandoned: later delivery reports are ignored.
    closed: bool = False
    # Keys this batch holds back (a failed or unsent message); released once it is recorded.
    held_keys: set[Key] = dataclasses.field(default_factory=set)
    sent_text: str = ""
    # Its "send" spans, when tracing is on (outbox.tracing).
    trace: tracing.Sending | None = None

    @property
    def done(self) -> bool:
        return self.outstanding == 0

    def hold(self, row: Row) -> None:
        if row.key is not None:
            self.gate.hold((row.topic, row.key), self.held_keys)

    def pick(self, claim: int) -> tuple[list[Row], str]:
        """The rows of claim number ``claim`` to send, in id order, and their ids joined: all
        but those whose key the gate holds back for that claim. (The next claim, sent before
        these rows, excludes those ids.)"""
        gate = self.gate
        rows = self.rows
        if gate.held:
            rows = [
                row
                for row in rows
                # An earlier message of this key failed or was not sent, and this claim ran
                # before the table said so: send it later (skipped rows are not in flight:
                # the next claims may return them).
                if row.key is None or not gate.blocks((row.topic, row.key), claim)
            ]
        return rows, ",".join([str(row.id) for row in rows])

    def send(self, rows: list[Row], ids: str, claim: int, headers: HeaderCache) -> None:
        """Hand ``rows`` (from :meth:`pick`, ``ids`` joined) to the transport, in id order.
        A row whose key is held back meanwhile (behind a retry or a refused message of its key
        in this batch, or a failure reported meanwhile) is not sent. The claim sent ahead
        excluded it although it is not in flight: that claim was numbered before the hold, so
        the gate lets it send nothing of the key, and the next claims return the row."""
        transport, gate = self.transport, self.gate
        unavailable = False
        for row in rows:
            if row.key is not None and gate.held and gate.blocks((row.topic, row.key), claim):
                continue  # held back since pick(): see above
            if unavailable:
                self.hold(row)
                continue
            message = OutgoingMessage(
                row.topic,
                row.key,
                row.payload,
                [
                    (HEADER_MESSAGE_ID, row.message_id.encode()),
                    *headers(row.header_names, row.header_values),  # in stored order
                ],
            )
            try:
                transport.send(message, _Report(self, row))
                if row.attempts:
                    # A retry goes alone: if it fails again, the rest of its key must not be
                    # in flight behind it (they would fail too, or overtake it).
                    self.hold(row)
            except MessageRejected as exc:
                self.sent.append(row.id)
                self.failed.append((row.id, str(exc)))
                self.hold(row)
                continue
            except TransportUnavailable as exc:
                # The rest of the batch stays pending; its keys wait so they keep their order.
                self.transport_failures.append(str(exc))
                self.fatal = self.fatal or transport.broken
                unavailable = True
                self.hold(row)
                continue
            self.sent.append(row.id)
            self.outstanding += 1
        # Every later claim excludes these ids while in flight, and the delete of a batch
        # acknowledged in full reuses them: join them once.
        self.sent_text = ids if len(self.sent) == len(rows) else ",".join(map(str, self.sent))

    def await_reports(self, deadline: float, *, stop: threading.Event, newest: bool) -> None:
        """Serve delivery reports until every message is reported, ``stop`` is set, or
        ``deadline`` passes (then the unreported ones count as a transport failure and hold
        their keys). ``newest``: no batch is queued behind this one."""
        while not self.done:
            if stop.is_set():
                return  # bounded by shutdown_timeout from here on, not by delivery_timeout
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.transport_failures.append("no delivery report before the deadline")
                self.fatal = True
                self.outstanding = 0
                # Their keys wait like failed ones: a later claim must not send behind them.
                unreported = set(self.sent) - {*self.acked, *(f[0] for f in self.failed)}
                for row in self.rows:
                    if row.id in unreported:
                        self.hold(row)
                return
            if newest:
                # Nothing queued behind it: send now rather than after linger.ms.
                self.transport.flush(min(remaining, 0.1))
            else:
                # A newer batch is queued; flushing would wait for it too, and leave the
                # broker idle while the next claim runs. Let librdkafka batch it.
                self.transport.poll(min(remaining, 0.1))


def _ref(row: Row) -> MessageRef:
    return MessageRef(row.id, row.topic, row.key, row.message_id)


class _Report:
    """The delivery callback of one message. A slotted object rather than a closure: one
    allocation instead of a function and its cells, for every message sent."""

    __slots__ = ("batch", "row")

    def __init__(self, batch: _Batch, row: Row) -> None:
        self.batch = batch
        self.row = row

    def __call__(self, error: object, _message: object = None) -> None:
        batch = self.batch
        if batch.closed:
            # A report after the batch was finished or abandoned (e.g. purged when a client
            # is discarded): the row's fate is settled (it stays unsent and is claimed again);
            # it must not hold its key back any more.
            return
        batch.outstanding -= 1
        if error is None:
            batch.acked.append(self.row.id)
            return
        batch.hold(self.row)
        failure = batch.transport.failure(error)
        if failure.kind is FailureKind.MESSAGE:
            batch.failed.append((self.row.id, failure.reason))
        else:
            batch.transport_failures.append(failure.reason)
            batch.fatal = batch.fatal or failure.kind is FailureKind.FATAL


class Relay:
    """Moves committed outbox rows to a broker. Not thread-safe; call :meth:`stop` from any
    thread or a signal handler."""

    def __init__(
        self,
        config: RelayConfig,
        transport_factory: TransportFactory,
        *,
        rng: random.Random | None = None,
        observers: Sequence[RelayObserver] = (),
    ) -> None:
        self.config = config
        self.tables = define_tables(table=config.table, schema=config.schema)
        self.stats = RelayStats()
        self._observe = fanout(LogRelay(), observers)
        # messages_acked costs a pass over each batch: only for observers that want it.
        self._acks_wanted = any(
            type(o).messages_acked is not RelayObserver.messages_acked for o in observers
        )
        conninfo = relay_conninfo(config)
        self._session = LeaderSession(
            conninfo, self.tables, retain_sent=config.retain_sent, purge=purge.for_relay(config)
        )
        self._claims = Claims(
            conninfo, statements.to_driver_sql(statements.claim(self.tables)), config.batch_size
        )
        self._rng = rng or random.Random()
        self._broker = BrokerLink(
            transport_factory,
            config.broker_backoff,
            self._rng,
            self._observe,
            probe_timeout=min(config.delivery_timeout, 5.0),
        )
        self._db = Retrying(config.db_backoff, self._rng)
        self._leader = False
        self._inflight: collections.deque[_Batch] = collections.deque()
        self._gate = KeyGate()
        self._stop = threading.Event()
        self._woken = False
        self._doze_wait = _DOZE_WAIT
        self._last_work = 0.0  # monotonic; 0: none yet, so an idle start dozes at once
        # When retries fall due: the relay wakes for each.
        self._retry_due = DueTimes()
        self._headers = HeaderCache()

    # -- public -------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._leader

    def stop(self) -> None:
        """Ask :meth:`run` to finish the in-flight batches and return."""
        self._stop.set()

    def check(self) -> None:
        """Fail fast on bad setup: the database must be reachable and the tables installed."""
        self._session.connect().close()

    def run(self) -> RelayStats:
        """Relay until :meth:`stop` is called. Survives database and broker outages."""
        logger.info("relay starting", extra={"event": "relay.starting", **self._describe()})
        try:
            # Connect the producer now (metadata, producer id): the first messages after a
            # start would otherwise wait for it. A broker that is down is handled later.
            if not self._stop.is_set():
                try:
                    self._broker.transport().check(min(self.config.delivery_timeout, 5.0))
                except TransportError as exc:
                    logger.warning(
                        "broker unreachable at start, will keep trying",
                        extra={"event": "relay.broker_unreachable_at_start", "error": str(exc)},
                    )
            while not self._stop.is_set():
                self._observe.tick()
                try:
                    if not self._ensure_leader(wait=self.config.leader_retry_interval):
                        continue  # it waited on the lock; stop is checked between waits
                    if self._step():
                        self._last_work = time.monotonic()
                        if self._session.dozing:
                            self._session.wake()  # the last claim found work
                    else:
                        self._wait_for_work()
                except ConfigurationError:
                    raise  # missing tables, privileges, a refused role: retrying cannot help
                except (DatabaseUnavailableError, psycopg.OperationalError) as exc:
                    self._sleep(self._lost_database(exc))
                except DatabaseError as exc:
                    # A statement failed but the session lives on (a timeout, a lock wait, a
                    # conflict): keep the leader lock and what is in flight, and try again.
                    self._sleep(self._statement_failed(exc))
        finally:
            self._shutdown()
        return self.stats

    def run_once(self) -> RelayStats:
        """Send everything that is due now, then return (``outbox-relay --once``).

        Raises :class:`~outbox.TransportError` when the broker cannot be reached and
        :class:`~outbox.OutboxError` when another relay is the leader.
        """
        try:
            if not self._ensure_leader():
                raise OutboxError(
                    "another relay is active (it holds the leader lock); it will send the "
                    "pending messages"
                )
            self._broker.transport().check(self.config.delivery_timeout)
            while not self._stop.is_set():
                self._observe.tick()
                progressed = self._step()
                # One transport failure may be a re-created client or a moved leader; a few
                # in a row (with backoff between them) mean the broker is not there.
                if self._broker.failures_in_row >= _ONCE_BROKER_FAILURES:
                    raise TransportError(
                        "the broker did not acknowledge messages; check that it is reachable"
                    )
                if not progressed and not self._inflight:
                    if not self._broker.health.failing:
                        break
                    self._sleep(self._broker.health.remaining())
        finally:
            self._shutdown()
        return self.stats

    # -- one round ----------------------------------------------------------------------------

    def _step(self) -> bool:
        """Claim and send one batch if there is room, then finish the oldest batch if the
        pipeline is full or nothing more was claimed. Returns whether anything happened."""
        progressed = False
        claimed_full = False
        if len(self._inflight) < self.config.max_inflight_batches and self._broker.ready(
            busy=bool(self._inflight)
        ):
            started = time.monotonic()
            rows, claim, ahead = self._take_claim()
            self._observe.claimed(len(rows), ahead)
            self._observe.claim_finished(len(rows), ahead, time.monotonic() - started)
            if rows:
                claimed_full = len(rows) == self.config.batch_size
                batch = _Batch(
                    rows=rows,
                    transport=self._broker.transport(),
                    gate=self._gate,
                    started=time.monotonic(),
                )
                sending, ids = batch.pick(claim)
                if claimed_full and not self._stop.is_set():
                    # Run the next claim while this thread sends this batch and awaits
                    # acknowledgements. It excludes what is in flight and what is about to
                    # be, and takes its number now, so the key gate treats it as what it is:
                    # a claim that may not see later records.
                    self._claims.send_ahead(self._in_flight_ids(ids), self._gate.next_claim())
                batch.send(sending, ids, claim, self._headers)
                batch.trace = tracing.sending(batch.rows, batch.sent, batch.started)
                self._inflight.append(batch)
                progressed = True
        if self._inflight and (
            len(self._inflight) >= self.config.max_inflight_batches or not claimed_full
        ):
            batch = self._inflight[0]
            self._await(batch)
            if not batch.done:
                return True  # stopping: _shutdown waits for it, up to shutdown_timeout
            self._inflight.popleft()
            self._finish(batch)
            progressed = True
        return progressed

    def _take_claim(self) -> tuple[list[Row], int, bool]:
        """The claim that ran ahead if there is one, else a claim now: rows, number, ahead."""
        conn = self._session.require()
        ahead = self._claims.take_ahead(conn)
        if ahead is not None:
            return (*ahead, True)
        claim = self._gate.next_claim()
        return self._claims.claim(conn, self._in_flight_ids()), claim, False

    def _in_flight_ids(self, sending: str = "") -> str:
        """The ids of the batches in flight, and ``sending`` (ids joined), as a bigint[]
        literal."""
        parts = [b.sent_text for b in self._inflight if b.sent]
        if sending:
            parts.append(sending)
        return "{" + ",".join(parts) + "}"

    def _await(self, batch: _Batch) -> None:
        # librdkafka reports every message within message.timeout.ms; the margin covers the
        # rest. Past it, give up on the stragglers (they stay unsent) and re-create the client.
        batch.await_reports(
            batch.started + self.config.delivery_timeout + 5.0,
            stop=self._stop,
            newest=batch is self._inflight[-1],
        )

    def _finish(self, batch: _Batch) -> None:
        batch.closed = True
        if batch.trace is not None:
            batch.trace.finished(batch.failed, batch.transport_failures, batch.fatal)
        failures = batch.failed
        parked: list[tuple[Any, ...]] = []
        if batch.acked or failures:
            attempts = {row.id: row.attempts for row in batch.rows} if failures else {}
            policy = self.config.retry_backoff
            delays = [policy.delay(attempts.get(i, 0), self._rng) for i, _ in failures]
            full = len(batch.acked) == len(batch.sent)
            acked = "{" + batch.sent_text + "}" if full else batch.acked
            while True:
                try:
                    parked = self._session.record(acked, failures, delays, self.config.max_attempts)
                    break
                except (ConfigurationError, DatabaseUnavailableError):
                    raise
                except DatabaseError as exc:
                    # The statement failed whole, so marking again is safe; giving up would
                    # send acknowledged messages again. Wait -- unless stopping (then they
                    # are sent again later: duplicates, not loss).
                    delay = self._statement_failed(exc)
                    if self._stop.is_set() or self._stop.wait(delay):
                        raise
            self._db.succeeded()
            self._retry_due.add(delays)
        self._gate.release(batch.held_keys, (b.held_keys for b in self._inflight))
        self.stats.batches += 1
        self.stats.sent += len(batch.acked)
        self.stats.failed_attempts += len(failures)
        self.stats.parked += len(parked)
        if failures:
            rows = {r.id: r for r in batch.rows}
            for row_id, reason in failures:
                self._observe.send_failed(_ref(rows[row_id]), reason)
            for p in parked:
                self._observe.parked(_ref(rows[p[0]]), p[2])
        if self._acks_wanted and batch.acked:
            done = batch.rows
            if len(batch.acked) != len(done):
                acked_ids = set(batch.acked)
                done = [r for r in done if r.id in acked_ids]
            self._observe.messages_acked(
                list(map(_TOPIC, done)), list(map(_CREATED, done)), time.time()
            )
        if batch.transport_failures:
            self.stats.transport_failures += 1
            self._broker.failed(batch.transport_failures[0], fatal=batch.fatal)
        elif batch.acked:
            self._broker.delivered()
        self._observe.batch_finished(
            BatchOutcome(
                claimed=len(batch.rows),
                acked=len(batch.acked),
                failed=len(failures),
                parked=len(parked),
                unsent=len(batch.rows) - len(batch.acked) - len(failures),
                seconds=time.monotonic() - batch.started,
            )
        )

    # -- database and leadership --------------------------------------------------------------

    def _ensure_leader(self, wait: float = 0.0) -> bool:
        if self._leader:
            return True
        if not self._session.try_lead(wait):
            self._observe.standby()
            return False
        self._leader = True
        self._db.succeeded()
        self._woken = True  # look for work at once
        if not self._claims.connected:
            # Now rather than at the first claim that runs ahead: connecting takes longer
            # than a batch. Failing here is not fatal: the claim ahead tries again.
            with contextlib.suppress(OutboxError):
                self._claims.open()
        # Retries scheduled by an earlier leader: wake when the first falls due.
        due = self._session.next_retry_in()
        if due is not None:
            self._retry_due.add([due])
        self._observe.leadership(True)
        return True

    def _statement_failed(self, exc: DatabaseError) -> float:
        """Report a failed statement on a live session; returns how long to wait."""
        delay = self._db.failed()
        self._observe.database_error(first_line(exc), delay)
        return delay

    def _lost_database(self, exc: BaseException) -> float:
        """Forget everything tied to the lost session; returns how long to wait before
        reconnecting."""
        abandoned = sum(len(b.rows) for b in self._inflight)
        # Whatever is in flight can no longer be marked; it stays unsent and is sent again
        # (a bounded number of duplicates) once a relay is the leader. Purge what the producer
        # still holds: another relay may take over once the server drops our session, and
        # messages from us arriving after its own would break per-key order.
        for batch in self._inflight:
            batch.closed = True
            if batch.trace is not None:
                batch.trace.abandoned()
        self._inflight.clear()
        self._gate.clear()
        self._claims.close()
        self._broker.discard()
        self._session.close()
        if self._leader:
            self._leader = False
            self._observe.leadership(False)
        delay = self._db.failed()
        self._observe.database_lost(first_line(exc), abandoned, delay)
        return delay

    # -- waiting ------------------------------------------------------------------------------

    def _wait_for_work(self) -> None:
        """Sleep until a writer's commit notifies us, a retry falls due, or the fallback poll
        interval passes. Issues no statements while it waits."""
        if self._session.purge_when_idle():
            return  # a purge of sent rows goes on: look for work first, then purge more
        if self._woken:
            self._woken = False
            return
        if not self._session.dozing:
            idle = time.monotonic() - self._last_work
            if idle < LINGER:
                # Traffic just now: poll rather than doze. The leading lock is taken all the
                # same, or writers would notify (as for an older relay) for as long as
                # traffic never lets the relay doze.
                self._session.lead(self._doze_wait)
                self._sleep(min(max(_LINGER_POLL_MIN, idle / 4), _LINGER_POLL_MAX))
                return
            # Announce the sleep (writers notify from now on), then claim once more: rows
            # committed before the announcement are found by that claim, later ones notify.
            if self._session.doze(self._doze_wait):
                self._doze_wait = _DOZE_WAIT
            else:
                # A writer held the relay awake past the wait (an open transaction that
                # published): claim again, and wait longer next time. Others' commits are
                # found by those claims meanwhile (they may not notify).
                self._doze_wait = min(self._doze_wait * 2, _DOZE_WAIT_MAX)
            return
        deadline = time.monotonic() + self.config.poll_interval
        due = self._retry_due.next()
        if due is not None:
            deadline = min(deadline, due)
        if self._broker.health.failing:
            deadline = min(deadline, self._broker.health.retry_at)
        self._session.wait_for_notify(deadline, self._stop)
        self._session.wake()

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    # -- shutdown -----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        deadline = time.monotonic() + self.config.shutdown_timeout
        try:
            while self._inflight and self._session.conn is not None:
                batch = self._inflight[0]
                while not batch.done and time.monotonic() < deadline:
                    batch.transport.flush(0.1)
                # Acknowledged rows are marked even if the batch is incomplete; the rest stays.
                self._inflight.popleft()
                batch.outstanding = 0
                self._finish(batch)
        except (OutboxError, psycopg.Error) as exc:
            logger.warning(
                "could not mark the last batch; it will be sent again",
                extra={"event": "relay.final_mark_failed", "error": str(exc)},
            )
        finally:
            self._inflight.clear()
            self._claims.close()
            self._broker.close(max(0.0, deadline - time.monotonic()))
            self._session.close()  # releases the leader lock
            if self._leader:
                self._leader = False
                self._observe.leadership(False)
            self._observe.stopped(self.stats)

    def _describe(self) -> dict[str, Any]:
        return {
            "table": self.tables.qualified_name,
            "batch_size": self.config.batch_size,
            "retain_sent": self.config.retain_sent,
        }
