"""The relay: claim committed rows, send them, mark them sent once acknowledged.

Design (see ``docs/guarantees.md``):

* **One active relay.** A relay becomes the leader by taking a session-scoped advisory lock on
  the same connection it claims and marks with. The lock lives exactly as long as that
  session: a crashed leader's lock is released by PostgreSQL, and a relay that lost its
  connection cannot mark anything. Other relays wait as standbys.
* **Order.** Writers take a per-key transaction lock before their rows get ids (see
  :func:`outbox.statements.insert_messages`), so per key, id order is commit order and the
  claim (``ORDER BY id``) never skips a row that commits late. The leader sends in id order
  and the transport keeps per-key order.
* **At least once.** Rows are deleted (or marked) only after the broker acknowledged them.
  Anything unacknowledged at a crash is sent again: duplicates, never loss.
* **Pipelining.** Up to ``max_inflight_batches`` batches are out at once, so the database work
  for one batch overlaps the broker's acknowledgement of another. Under load the next claim
  also runs ahead, on a second connection in pipeline mode: the server runs it while this
  thread waits for acknowledgements and marks the last batch.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import heapq
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg.conninfo

from outbox import statements
from outbox.config import RelayConfig, parse_db_url
from outbox.exceptions import (
    DatabaseUnavailableError,
    OutboxError,
    TransportError,
    translate_db_errors,
)
from outbox.message import HEADER_MESSAGE_ID
from outbox.schema import DEAD, define_tables
from outbox.transport.base import (
    DeliveryFailure,
    FailureKind,
    MessageRejected,
    OutgoingMessage,
    Transport,
    TransportUnavailable,
)

logger = logging.getLogger(__name__)

_ONCE_BROKER_FAILURES = 3

TransportFactory = Callable[[], Transport]


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)].

    Full jitter spreads retries of many messages (or relays) evenly instead of in waves.
    """
    return rng.uniform(0, min(cap, base * (2 ** min(attempt, 32))))


@dataclasses.dataclass
class RelayStats:
    """Counters since the relay started (also logged at shutdown)."""

    sent: int = 0
    failed_attempts: int = 0
    parked: int = 0
    batches: int = 0
    transport_failures: int = 0


@dataclasses.dataclass(slots=True)
class _Row:
    id: int
    message_id: str
    topic: str
    key: bytes | None
    payload: bytes | None
    headers: str  # JSON text: parsed once per distinct value, see Relay._headers
    attempts: int


_nothing = contextlib.nullcontext


def _int_array(ids: list[int]) -> str:
    """A bigint[] literal: much cheaper to build than letting the driver adapt a list."""
    return "{" + ",".join(map(str, ids)) + "}"


def _in_flight(batches: collections.deque[_Batch]) -> str:
    """The ids of ``batches`` that are in flight, as a bigint[] literal."""
    return "{" + ",".join(b.sent_text for b in batches if b.sent) + "}"


@dataclasses.dataclass
class _Batch:
    rows: list[_Row]
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
    # Keys this batch held back (a failed or unsent message); released once it is finished.
    held_keys: set[tuple[str, bytes]] = dataclasses.field(default_factory=set)

    @property
    def done(self) -> bool:
        return self.outstanding == 0

    @functools.cached_property
    def sent_text(self) -> str:
        """``sent`` joined by commas, built once: every claim excludes it while in flight,
        and the delete of a batch acknowledged in full reuses it. Read only after _send."""
        return ",".join(map(str, self.sent))


class _Report:
    """The delivery report callback of one message. A slotted object rather than a closure:
    one allocation instead of a function and its cells, for every message sent."""

    __slots__ = ("batch", "relay", "row")

    def __init__(self, relay: Relay, batch: _Batch, row: _Row) -> None:
        self.relay = relay
        self.batch = batch
        self.row = row

    def __call__(self, failure: DeliveryFailure | None) -> None:
        batch = self.batch
        if batch.closed:
            # A report after the batch was finished or abandoned (e.g. purged when a
            # client is discarded): the row's fate is already settled (it stays unsent
            # and is claimed again); it must not hold its key back any more.
            return
        batch.outstanding -= 1
        if failure is None:
            batch.acked.append(self.row.id)
            return
        self.relay._hold(batch, self.row)
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
    ) -> None:
        self.config = config
        self.tables = define_tables(table=config.table, schema=config.schema)
        self.stats = RelayStats()
        self._transport_factory = transport_factory
        self._transport: Transport | None = None
        self._conn: psycopg.Connection[Any] | None = None
        # Claims that run ahead (see _prefetch): their own connection, kept in pipeline mode.
        self._claim_conn: psycopg.Connection[Any] | None = None
        self._claim_pipeline: psycopg.Pipeline | None = None
        self._prefetched: tuple[psycopg.Cursor[Any], int] | None = None
        self._claim_stack = contextlib.ExitStack()
        self._leader = False
        self._inflight: collections.deque[_Batch] = collections.deque()
        self._stop = threading.Event()
        self._woken = False
        self._rng = rng or random.Random()
        self._broker_failures = 0
        self._broker_retry_at = 0.0
        # When retries fall due (a heap of monotonic times): the relay wakes for each.
        self._retry_due: list[float] = []
        self._db_failures = 0
        # Batches in a row that the broker failed (unlike _broker_failures, not reset by a
        # successful probe): --once gives up after a few.
        self._failures_in_row = 0
        self._standby_logged = False
        self._header_cache: dict[str, list[tuple[str, bytes]]] = {}
        # Keys with a failed or unsent message that the table may not show yet, mapped to the
        # number of the first claim that is sure to see it (inf: not recorded yet). See _send.
        self._held: dict[tuple[str, bytes], float] = {}
        self._claims = 0  # claims issued so far, numbered from 1
        self._conninfo = _conninfo(config)
        self._sql = {
            name: statements.to_driver_sql(build(self.tables))
            for name, build in (
                ("claim", statements.claim),
                ("delete", statements.delete_sent),
                ("mark", statements.mark_sent),
                ("fail", statements.record_failures),
                ("probe", statements.probe_tables),
                ("listen", statements.listen),
                ("next_retry", statements.next_retry_in),
            )
        }
        self._sql["lock"] = statements.to_driver_sql(statements.try_leader_lock())

    # -- public -------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._leader

    def stop(self) -> None:
        """Ask :meth:`run` to finish the in-flight batches and return."""
        self._stop.set()

    def check(self) -> None:
        """Fail fast on bad setup: the database must be reachable and the tables installed."""
        conn = self._connect()
        conn.close()

    def run(self) -> RelayStats:
        """Relay until :meth:`stop` is called. Survives database and broker outages."""
        logger.info("relay starting", extra=self._describe())
        try:
            # Connect the producer now (metadata, producer id): the first messages after a
            # start would otherwise wait for it. A broker that is down is handled later.
            with contextlib.suppress(TransportError):
                self._transport_or_create().check(min(self.config.delivery_timeout, 5.0))
            while not self._stop.is_set():
                try:
                    if not self._ensure_leader():
                        self._sleep(self.config.leader_retry_interval)
                        continue
                    if not self._step():
                        self._wait_for_work()
                except (DatabaseUnavailableError, psycopg.OperationalError) as exc:
                    self._lost_database(exc)
                    self._sleep(
                        backoff_delay(
                            self._db_failures,
                            self.config.broker_backoff_base,
                            self.config.broker_backoff_max,
                            self._rng,
                        )
                    )
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
            self._transport_or_create().check(self.config.delivery_timeout)
            while not self._stop.is_set():
                progressed = self._step()
                # One transport failure may be a re-created client or a moved leader; a few
                # in a row (with backoff between them) mean the broker is not there.
                if self._failures_in_row >= _ONCE_BROKER_FAILURES:
                    raise TransportError(
                        "the broker did not acknowledge messages; check that it is reachable"
                    )
                if not progressed and not self._inflight:
                    if not self._broker_failures:
                        break
                    self._sleep(max(0.0, self._broker_retry_at - time.monotonic()))
        finally:
            self._shutdown()
        return self.stats

    # -- one round ----------------------------------------------------------------------------

    def _step(self) -> bool:
        """Claim and send one batch if there is room, then finish the oldest batch if the
        pipeline is full or nothing more was claimed. Returns whether anything happened."""
        progressed = False
        claimed_full = False
        if len(self._inflight) < self.config.max_inflight_batches and self._broker_ready():
            rows, claim_no = self._take_claim()
            if rows:
                claimed_full = len(rows) == self.config.batch_size
                self._inflight.append(self._send(rows, claim_no))
                progressed = True
                if claimed_full and not self._stop.is_set():
                    self._prefetch()
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

    def _take_claim(self) -> tuple[list[_Row], int]:
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None:
            cur, claim_no = prefetched
            try:
                with translate_db_errors("claim"):
                    rows = cur.fetchall()
                    # Ends the pipeline's implicit transaction (it would hold back vacuum).
                    self._require_pipeline().sync()
            except OutboxError as exc:
                self._lost_claim_conn(exc)  # claim on the leader's connection instead
            else:
                self._drain_notifies()
                return [_Row(*r) for r in rows], claim_no
        self._claims += 1
        return self._claim(_in_flight(self._inflight)), self._claims

    def _prefetch(self) -> None:
        """Send the next claim now, without waiting: the server runs it while this thread
        awaits acknowledgements. It excludes exactly what is in flight, like any claim, and
        takes its number now, so hold-back (see _send) treats it as the claim it is: one that
        may not see failures recorded after this point."""
        try:
            conn = self._claim_conn or self._open_claim_conn()
            self._claims += 1
            with translate_db_errors("claim"):
                cur = conn.cursor(binary=True)
                cur.execute(
                    self._sql["claim"],
                    {"exclude": _in_flight(self._inflight), "limit": self.config.batch_size},
                    prepare=False,  # see _claim
                )
        except OutboxError as exc:
            self._lost_claim_conn(exc)
            return
        self._prefetched = (cur, self._claims)

    def _lost_claim_conn(self, exc: OutboxError) -> None:
        # Only reads ran there: nothing in flight depends on it. Claims go through the
        # leader's connection until the next prefetch opens a new one.
        logger.warning("claim connection lost", extra={"error": str(exc)})
        self._close_claim_conn()

    def _open_claim_conn(self) -> psycopg.Connection[Any]:
        name = psycopg.conninfo.conninfo_to_dict(self._conninfo).get("application_name")
        with translate_db_errors("connect"):
            conn = psycopg.connect(
                self._conninfo, autocommit=True, application_name=f"{name or 'outbox'} claims"
            )
        # The context manager must stay referenced: collecting it would leave pipeline mode.
        self._claim_stack = contextlib.ExitStack()
        try:
            pipeline = self._claim_stack.enter_context(conn.pipeline())
        except BaseException:
            conn.close()
            raise
        self._claim_conn, self._claim_pipeline = conn, pipeline
        return conn

    def _close_claim_conn(self) -> None:
        self._prefetched = None
        conn, self._claim_conn, self._claim_pipeline = self._claim_conn, None, None
        stack, self._claim_stack = self._claim_stack, contextlib.ExitStack()
        if conn is not None:
            # Close first: pending results are dropped instead of synced.
            with contextlib.suppress(psycopg.Error):
                conn.close()
            with contextlib.suppress(psycopg.Error):
                stack.close()

    def _require_pipeline(self) -> psycopg.Pipeline:
        if self._claim_pipeline is None:
            raise DatabaseUnavailableError("not connected")
        return self._claim_pipeline

    def _drain_notifies(self) -> None:
        # Notifications already received are for commits this claim will see; drop them
        # (psycopg queues them until read: under constant load they would pile up).
        conn = self._require_conn()
        with translate_db_errors("claim"):
            for _ in conn.notifies(timeout=0):
                pass

    def _claim(self, exclude: str) -> list[_Row]:
        conn = self._require_conn()
        self._drain_notifies()
        with translate_db_errors("claim"):
            cur = conn.execute(
                self._sql["claim"],
                {"exclude": exclude, "limit": self.config.batch_size},
                binary=True,  # bytea arrives raw instead of hex-encoded
                # Planned for each call: a prepared statement's generic plan cannot see how
                # many ids are excluded, and at some backlogs picked a plan ten times slower
                # (26 ms instead of 2.3 ms for 1000 rows, 1000 excluded, 10k pending).
                prepare=False,
            )
            return [_Row(*r) for r in cur.fetchall()]

    def _send(self, rows: list[_Row], claim_no: int) -> _Batch:
        transport = self._transport_or_create()
        batch = _Batch(rows=rows, started=time.monotonic())
        held = self._held
        unavailable = False
        for row in rows:
            if row.key is not None and held:
                key = (row.topic, row.key)
                until = held.get(key)
                if until is not None:
                    if claim_no < until:
                        # An earlier message of this key failed or was not sent, and this
                        # claim ran before the table said so: keep the order, send it later
                        # (skipped rows are not in flight: the next claims may return them).
                        continue
                    del held[key]
            if unavailable:
                self._hold(batch, row)
                continue
            message = OutgoingMessage(
                row.topic,
                row.key,
                row.payload,
                [(HEADER_MESSAGE_ID, row.message_id.encode()), *self._headers(row.headers)],
            )
            try:
                transport.send(message, _Report(self, batch, row))
                if row.attempts and row.key is not None:
                    # A retry goes alone: if it fails again, the rest of its key must not
                    # be in flight behind it (they would fail too, or overtake it).
                    self._hold(batch, row)
            except MessageRejected as exc:
                batch.sent.append(row.id)
                batch.failed.append((row.id, str(exc)))
                self._hold(batch, row)
                continue
            except TransportUnavailable as exc:
                # The rest of the batch stays pending; its keys wait so they keep their order.
                batch.transport_failures.append(str(exc))
                batch.fatal = batch.fatal or transport.broken
                unavailable = True
                self._hold(batch, row)
                continue
            batch.sent.append(row.id)
            batch.outstanding += 1
        return batch

    def _hold(self, batch: _Batch, row: _Row) -> None:
        if row.key is not None:
            key = (row.topic, row.key)
            self._held[key] = math.inf
            batch.held_keys.add(key)

    def _release(self, batch: _Batch) -> None:
        """After ``batch`` is recorded: the next claim sees its failures in the table."""
        for key in batch.held_keys:
            if not any(key in other.held_keys for other in self._inflight):
                self._held[key] = self._claims + 1

    def _headers(self, text: str) -> list[tuple[str, bytes]]:
        # Most rows share a handful of distinct header sets (content type, event type).
        cached = self._header_cache.get(text)
        if cached is None:
            if len(self._header_cache) > 1024:
                self._header_cache.clear()
            cached = [(k, str(v).encode()) for k, v in json.loads(text).items()]
            self._header_cache[text] = cached
        return cached

    def _await(self, batch: _Batch) -> None:
        transport = self._transport_or_create()
        # librdkafka reports every message within message.timeout.ms; the margin covers the
        # rest. Past it, give up on the stragglers (they stay unsent) and re-create the client.
        deadline = batch.started + self.config.delivery_timeout + 5.0
        while not batch.done:
            if self._stop.is_set():
                return  # bounded by shutdown_timeout from here on, not by delivery_timeout
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                batch.transport_failures.append("no delivery report before the deadline")
                batch.fatal = True
                batch.outstanding = 0
                # Their keys wait like failed ones: a later claim must not send behind them.
                unreported = set(batch.sent) - {*batch.acked, *(f[0] for f in batch.failed)}
                for row in batch.rows:
                    if row.id in unreported:
                        self._hold(batch, row)
                break
            if batch is self._inflight[-1]:
                # Nothing queued behind it: send now rather than after linger.ms.
                transport.flush(min(remaining, 0.1))
            else:
                # A newer batch is queued; flushing would wait for it too, and leave the
                # broker idle while the next claim runs. Let librdkafka batch it.
                transport.poll(min(remaining, 0.1))

    def _finish(self, batch: _Batch) -> None:
        batch.closed = True
        conn = self._require_conn()
        failures = batch.failed
        attempts = {row.id: row.attempts for row in batch.rows} if failures else {}
        delays = [
            backoff_delay(
                attempts.get(row_id, 0),
                self.config.retry_backoff_base,
                self.config.retry_backoff_max,
                self._rng,
            )
            for row_id, _ in failures
        ]
        parked: list[tuple[Any, ...]] = []
        # One statement (one round trip, no BEGIN/COMMIT) in the common case.
        with translate_db_errors("mark sent"), conn.transaction() if failures else _nothing():
            if batch.acked:
                conn.execute(
                    self._sql["mark" if self.config.retain_sent else "delete"],
                    {
                        "ids": "{" + batch.sent_text + "}"
                        if len(batch.acked) == len(batch.sent)
                        else _int_array(batch.acked)
                    },
                )
            if failures:
                cur = conn.execute(
                    self._sql["fail"],
                    {
                        "ids": _int_array([f[0] for f in failures]),
                        "errors": [f[1][:2000] for f in failures],
                        "delays": delays,
                        "max_attempts": self.config.max_attempts,
                    },
                )
                parked = [r for r in cur.fetchall() if r[1] == DEAD]
        self._release(batch)
        self.stats.batches += 1
        self.stats.sent += len(batch.acked)
        self.stats.failed_attempts += len(failures)
        self.stats.parked += len(parked)
        if failures:
            now = time.monotonic()
            if len(self._retry_due) < 10_000:  # beyond that, the fallback poll catches up
                for delay in set(delays):
                    heapq.heappush(self._retry_due, now + delay)
            for row_id, reason in failures:
                logger.warning("send failed", extra={"outbox_id": row_id, "error": reason})
        for row in parked:
            logger.error(
                "message parked",
                extra={"outbox_id": row[0], "attempts": row[2], "status": DEAD},
            )
        if batch.transport_failures:
            self.stats.transport_failures += 1
            self._broker_failed(batch.transport_failures[0], fatal=batch.fatal)
        elif batch.acked:
            self._broker_failures = 0
            self._failures_in_row = 0
        logger.debug(
            "batch done",
            extra={
                "claimed": len(batch.rows),
                "acked": len(batch.acked),
                "failed": len(failures),
                "unsent": len(batch.rows) - len(batch.acked) - len(failures),
                "ms": round((time.monotonic() - batch.started) * 1000, 1),
            },
        )

    # -- broker health ------------------------------------------------------------------------

    def _broker_failed(self, reason: str, *, fatal: bool) -> None:
        delay = backoff_delay(
            self._broker_failures,
            self.config.broker_backoff_base,
            self.config.broker_backoff_max,
            self._rng,
        )
        self._broker_failures += 1
        self._failures_in_row += 1
        self._broker_retry_at = time.monotonic() + delay
        logger.warning(
            "broker unavailable, backing off",
            extra={
                "error": reason,
                "retry_in_s": round(delay, 2),
                "failures": self._broker_failures,
            },
        )
        if fatal or (self._transport is not None and self._transport.broken):
            self._discard_transport()

    def _broker_ready(self) -> bool:
        if not self._broker_failures:
            return True
        if time.monotonic() < self._broker_retry_at:
            return False
        if self._inflight:
            return False  # let the outstanding batch tell us first
        try:
            self._transport_or_create().check(min(self.config.delivery_timeout, 5.0))
        except TransportError as exc:
            self._broker_failed(str(exc), fatal=False)
            return False
        logger.info("broker reachable again")
        self._broker_failures = 0
        return True

    def _transport_or_create(self) -> Transport:
        if self._transport is None:
            self._transport = self._transport_factory()
        return self._transport

    def _discard_transport(self) -> None:
        if self._transport is not None:
            logger.warning("re-creating the broker client")
            transport, self._transport = self._transport, None
            try:
                transport.close(0)
            except Exception:  # a broken client may fail to close; it is dropped either way
                logger.debug("closing the broken client failed", exc_info=True)

    # -- database and leadership --------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        with translate_db_errors("connect"):
            conn = psycopg.connect(self._conninfo, autocommit=True)
        try:
            with translate_db_errors("check tables"):
                conn.execute(self._sql["probe"])
        except BaseException:
            conn.close()
            raise
        return conn

    def _ensure_leader(self) -> bool:
        if self._conn is not None and self._leader:
            return True
        if self._conn is None:
            conn = self._connect()
            with translate_db_errors("listen"):
                conn.execute(self._sql["listen"])
            self._conn = conn
        with translate_db_errors("leader lock"):
            row = self._conn.execute(
                self._sql["lock"], {"lock_id": self.tables.leader_lock_id}
            ).fetchone()
        became = bool(row and row[0])
        if became:
            logger.info("relay is the leader", extra={"table": self.tables.qualified_name})
            self._leader = True
            self._db_failures = 0
            self._standby_logged = False
            self._woken = True  # look for work at once
            if self._claim_conn is None:
                # Now rather than at the first claim that runs ahead: connecting takes longer
                # than a batch. Failing here is not fatal: _prefetch tries again.
                with contextlib.suppress(OutboxError):
                    self._open_claim_conn()
            # Retries scheduled by an earlier leader: wake when the first falls due.
            with translate_db_errors("read retry times"):
                due = self._conn.execute(self._sql["next_retry"]).fetchone()
            if due is not None and due[0] is not None:
                heapq.heappush(self._retry_due, time.monotonic() + max(0.0, float(due[0])))
        elif not self._standby_logged:
            logger.info("relay is a standby: another relay is the leader")
            self._standby_logged = True
        return became

    def _require_conn(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise DatabaseUnavailableError("not connected")
        return self._conn

    def _lost_database(self, exc: BaseException) -> None:
        logger.warning(
            "database connection lost, reconnecting",
            extra={
                "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                "abandoned": sum(len(b.rows) for b in self._inflight),
            },
        )
        # Whatever is in flight can no longer be marked; it stays unsent and is sent again
        # (a bounded number of duplicates) once a relay is the leader. Purge what the producer
        # still holds: another relay may take over once the server drops our session, and
        # messages from us arriving after its own would break per-key order.
        for batch in self._inflight:
            batch.closed = True
        self._inflight.clear()
        self._held.clear()
        self._close_claim_conn()
        self._discard_transport()
        self._leader = False
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
        self._db_failures += 1

    # -- waiting ------------------------------------------------------------------------------

    def _wait_for_work(self) -> None:
        """Sleep until a writer's commit notifies us, a retry falls due, or the fallback poll
        interval passes. Issues no statements while it waits."""
        now = time.monotonic()
        deadline = now + self.config.poll_interval
        while self._retry_due and self._retry_due[0] <= now:
            heapq.heappop(self._retry_due)
        if self._retry_due:
            deadline = min(deadline, self._retry_due[0])
        if self._broker_failures:
            deadline = min(deadline, self._broker_retry_at)
        conn = self._require_conn()
        while not self._stop.is_set() and not self._woken:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with translate_db_errors("wait for notifications"):
                for _ in conn.notifies(timeout=min(remaining, 0.25), stop_after=1):
                    self._woken = True
        self._woken = False

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    # -- shutdown -----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        deadline = time.monotonic() + self.config.shutdown_timeout
        try:
            while self._inflight and self._conn is not None:
                batch = self._inflight[0]
                transport = self._transport_or_create()
                while not batch.done and time.monotonic() < deadline:
                    transport.flush(0.1)
                # Acknowledged rows are marked even if the batch is incomplete; the rest stays.
                self._inflight.popleft()
                batch.outstanding = 0
                self._finish(batch)
        except (OutboxError, psycopg.Error) as exc:
            logger.warning(
                "could not mark the last batch; it will be sent again", extra={"error": str(exc)}
            )
        finally:
            self._inflight.clear()
            self._close_claim_conn()
            if self._transport is not None:
                self._transport.close(max(0.0, deadline - time.monotonic()))
                self._transport = None
            if self._conn is not None:
                self._conn.close()  # releases the leader lock
                self._conn = None
            self._leader = False
            logger.info("relay stopped", extra=dataclasses.asdict(self.stats))

    def _describe(self) -> dict[str, Any]:
        return {
            "table": self.tables.qualified_name,
            "batch_size": self.config.batch_size,
            "retain_sent": self.config.retain_sent,
        }


def _conninfo(config: RelayConfig) -> str:
    url = parse_db_url(config.db_url)
    params: dict[str, Any] = {
        k: v for k, v in url.translate_connect_args(username="user", database="dbname").items()
    }
    params.update({k: v for k, v in url.query.items() if isinstance(v, str)})
    params.setdefault("application_name", config.application_name)
    params.setdefault("connect_timeout", max(1, int(config.db_connect_timeout)))
    # Client side: notice a dead server or network in about 25 s instead of hanging on TCP,
    # and stop sending (see _lost_database).
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
