"""The consumer's batch path: a polled batch handled optimistically in one transaction per
run of ordinary messages, with one inbox claim statement and one commit; a message that fails
takes the per-message path on its own, after the messages before it commit (docs/design.md,
"Batches").
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import psycopg
import sqlalchemy as sa

from outbox import deadletter, tracing
from outbox.exceptions import PoisonMessage
from outbox.handler_session import backend_pid, sent
from outbox.observe import Outcome, message_fields
from outbox.transport.base import IncomingMessage

if TYPE_CHECKING:
    from outbox.consumer import Consumer

logger = logging.getLogger("outbox.consumer")


class Batches:
    """The batch path of one :class:`~outbox.consumer.Consumer`: it shares the consumer's
    state (breaker, source, stats, watchdog) and hands a message that needs more than one
    try to the consumer's per-message path."""

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer
        #: Set when a batch was cut short: its unfinished messages are rewound.
        self._put_back = False
        #: Seconds of handlers after which a batch is cut (set by :meth:`consume`).
        self._budget = 0.0

    def consume(self, batch: list[IncomingMessage], started: float, budget: float) -> int:
        """Handle a polled batch in order: how many of its messages are finished (their
        offsets stored). Runs of messages that need nothing special go in one transaction each
        (:meth:`segment`); a message without a key, expired, sent back by the breaker, or
        polled while the breaker is not closed goes through the per-message path on its own.
        When the breaker opens, the rest of the batch is rewound, in order, with the failed
        message. ``budget``: seconds of handlers after which a batch is cut short."""
        c = self._consumer
        self._budget = budget
        i, n = 0, len(batch)
        while i < n and not c._stop.is_set():
            segment: list[tuple[IncomingMessage, str]] = []
            while i + len(segment) < n:
                key = self.key(batch[i + len(segment)])
                if key is None:
                    break
                segment.append((batch[i + len(segment)], key))
            if segment:
                done = self.segment(segment, started)
                i += done
                if done < len(segment):
                    break
            elif self.one(batch[i], started, None):
                i += 1
            else:
                break
        if i < n and (c._breaker.state == "open" or self._put_back):
            for message in batch[i:]:
                c._source.rewind(message)
        self._put_back = False
        return i

    def key(self, message: IncomingMessage) -> str | None:
        """The key of a message that may share a transaction with others; None if it takes
        the per-message path."""
        c = self._consumer
        if c._breaker.state != "closed":
            return None  # a half-open probe is one message
        carried = c._carried
        if carried is not None and carried[:3] == (
            message.topic,
            message.partition,
            message.offset,
        ):
            return None  # its attempts so far count on
        key = c._key(message)
        if key is None:
            return None
        try:
            if c._expired(message) is not None:
                return None
        except PoisonMessage:
            return None
        return key

    def one(self, message: IncomingMessage, started: float, failed: BaseException | None) -> bool:
        """One message through the per-message path; False if it was not finished."""
        c = self._consumer
        outcome = c._handle(message, failed)
        if outcome is None:
            return False
        c._source.processed(message)
        c._observe.message_finished(message, outcome, time.monotonic() - started)
        return True

    def segment(self, segment: list[tuple[IncomingMessage, str]], started: float) -> int:
        """Handle ``segment`` in order, optimistically in one transaction: how many of its
        messages are finished. If the transaction fails at message k, the messages before k
        are handled again in a fresh transaction, k takes the per-message path with its
        failure (retries, breaker, dead letter), and the rest go on as a new segment. A batch
        handler's failure names no message: the segment is split in halves instead, down to
        the one that fails."""
        if not segment or self._consumer._stop.is_set():
            return 0
        c = self._consumer
        if c._async is None:
            failure = self.attempt(segment, started)
        else:
            failure = c._async.run(self.attempt, segment, started)
        if failure is None:
            return len(segment)
        at, exc, committed = failure
        if at is None:
            if len(segment) > 1:
                half = len(segment) // 2
                done = self.segment(segment[:half], started)
                if done < half:
                    return done
                return half + self.segment(segment[half:], started)
            at = 0
        if committed < at:
            done = self.segment(segment[:at], started)
            if done < at:
                return done
        if isinstance(exc, _Cut):
            self._put_back = True  # the rest comes again after the next poll
            return at
        if not self.one(segment[at][0], started, exc):
            return at
        return at + 1 + self.segment(segment[at + 1 :], started)

    def attempt(
        self, segment: list[tuple[IncomingMessage, str]], started: float
    ) -> tuple[int | None, Exception | None, int] | None:
        """One transaction for ``segment``: claim all its keys in one statement, run the
        handler on each fresh message in order (or the batch handler once), commit. None when
        it committed (offsets stored, observers told); else where it failed (None: at the
        commit, or in the batch handler), why (None: a message expired meanwhile), and how
        many messages before it are committed already (see :meth:`cut`)."""
        c = self._consumer
        name = c.config.name
        claims = [deadletter.inbox_key(key) or key for _, key in segment]
        outcomes: list[Outcome] = []
        at = 0
        try:
            with c._handler_engine.connect() as conn, conn.begin() as transaction:
                fresh = c._inbox.claim_batch(
                    conn, name, claims, statement_timeout=c.config.handler_timeout
                )
                seen: set[str] = set()
                for claim in claims:
                    if claim in fresh and claim not in seen:
                        seen.add(claim)
                        outcomes.append("processed")
                    else:
                        outcomes.append("duplicate")
                pid = backend_pid(conn) if c._watchdog.on else None
                if c.batch_handler is not None:
                    at = -1  # a failure from here on names no message
                    self.run_batch_handler(conn, segment, outcomes, pid)
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
                        mark = sent(driver)
                        try:
                            if at and time.monotonic() - begun > self._budget:
                                raise _Cut  # poll again soon: see BATCH_BUDGET
                            if c._expired(message) is not None:
                                raise _Expired  # the per-message path dead-letters it
                            with tracing.processing(message, name):
                                # Flushes after the handler: a failing write is this message's.
                                c._call(
                                    conn, message, c._watchdog.watching(message, key, 1, pid, alone)
                                )
                        except Exception as exc:
                            if self.cut(conn, transaction, mark, claims, outcomes, at):
                                self.finished(segment[:at], outcomes[:at], started)
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
        self.finished(segment, outcomes, started)
        return None

    def cut(
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
        if at == 0 or mark is None or sent(driver) != mark or not transaction.is_active:
            return False
        info = getattr(driver, "info", None)
        if getattr(info, "transaction_status", None) != psycopg.pq.TransactionStatus.INTRANS:
            return False  # rolled back, or failed
        unclaim = [c for c, o in zip(claims[at:], outcomes[at:], strict=True) if o == "processed"]
        try:
            if unclaim:
                self._consumer._inbox.unclaim(conn, self._consumer.config.name, unclaim)
            transaction.commit()
        except Exception:
            logger.debug("batch cut failed", exc_info=True, extra={"event": "consumer.cut_failed"})
            return False
        return True

    def run_batch_handler(
        self,
        conn: sa.Connection,
        segment: list[tuple[IncomingMessage, str]],
        outcomes: list[Outcome],
        pid: int | None,
    ) -> None:
        c = self._consumer
        assert c._call_batch is not None
        letters = [pair for pair, o in zip(segment, outcomes, strict=True) if o == "processed"]
        if not letters:
            return
        fresh = [m for m, _ in letters]
        c._call_batch(conn, fresh, c._watchdog.watching_all(letters, [m for m, _ in segment], pid))

    def finished(
        self,
        segment: list[tuple[IncomingMessage, str]],
        outcomes: list[Outcome],
        started: float,
    ) -> None:
        """After a segment's commit: the stats, the breaker, the offsets, the observers."""
        c = self._consumer
        processed = 0
        for (message, key), outcome in zip(segment, outcomes, strict=True):
            c._breaker.attempt()
            if outcome == "processed":
                processed += 1
            elif logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "duplicate skipped",
                    extra={"event": "consumer.duplicate", "key": key, **message_fields(message)},
                )
        c.stats.processed += processed
        c.stats.duplicates += len(segment) - processed
        if processed:
            c._breaker.succeeded()  # closed: resets the failures in a row
        last: dict[tuple[str, int], IncomingMessage] = {}
        for message, _ in segment:
            last[(message.topic, message.partition)] = message
        for message in last.values():
            c._source.processed(message)  # the last of each partition stores them all
        now = time.monotonic()
        for (message, _), outcome in zip(segment, outcomes, strict=True):
            c._observe.message_finished(message, outcome, now - started)


class _Cut(Exception):
    """A batch ran ``BATCH_BUDGET`` seconds: the rest of it goes back to the source."""


class _CutFailed(Exception):
    pass


class _Expired(Exception):
    """A message of a batch expired before its handler started (the batch is cut there)."""
