"""An in-process transport for fast tests of relay logic (and of your own code).

Delivery reports are served from :meth:`MemoryTransport.poll`, like a real client. Failures
are injected with ``reject`` (synchronous, at send) and ``fail`` (asynchronous, at delivery),
and a broker outage with ``available = False``.

Like librdkafka with ``enable.gapless.guarantee``, it never writes a message behind a gap:

* once a message of a (topic, key) fails during a poll, the later queued messages of that
  (topic, key) in the same poll fail with :attr:`FailureKind.TRANSPORT` and are not written;
* once a message fails with :attr:`FailureKind.FATAL`, the client is broken: the rest of the
  queue fails with ``FATAL`` and :meth:`send` raises until the client is replaced.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from outbox.exceptions import MessageRejected, TransportUnavailable
from outbox.transport.base import (
    DeliveryFailure,
    FailureKind,
    IncomingMessage,
    OnDelivery,
    OutgoingMessage,
)


class MemoryTransport:
    def __init__(
        self,
        *,
        reject: Callable[[OutgoingMessage], str | None] | None = None,
        fail: Callable[[OutgoingMessage], DeliveryFailure | None] | None = None,
    ) -> None:
        self.reject = reject
        self.fail = fail
        self.available = True
        #: Every message the "broker" accepted, in order.
        self.sent: list[OutgoingMessage] = []
        #: Every failed delivery (asynchronous), in order, with its failure.
        self.failed: list[tuple[OutgoingMessage, DeliveryFailure]] = []
        self._queue: collections.deque[tuple[OutgoingMessage, OnDelivery]] = collections.deque()
        self._broken = False
        self._lock = threading.Lock()

    def by_topic(self, topic: str) -> list[OutgoingMessage]:
        return [m for m in self.sent if m.topic == topic]

    def send(self, message: OutgoingMessage, on_delivery: OnDelivery) -> None:
        if self._broken:
            raise TransportUnavailable("transport is broken")
        if self.reject is not None:
            reason = self.reject(message)
            if reason is not None:
                raise MessageRejected(reason)
        with self._lock:
            self._queue.append((message, on_delivery))

    def poll(self, timeout: float) -> None:
        with self._lock:
            items = list(self._queue)
            self._queue.clear()
        gaps: set[tuple[str, bytes]] = set()
        for message, on_delivery in items:
            failure: DeliveryFailure | None
            ordered = message.key is not None
            if self._broken:
                failure = DeliveryFailure(FailureKind.FATAL, "transport is broken")
            elif not self.available:
                failure = DeliveryFailure(FailureKind.TRANSPORT, "broker unavailable")
            elif ordered and (message.topic, message.key) in gaps:
                failure = DeliveryFailure(
                    FailureKind.TRANSPORT, "an earlier message of this key failed (gapless)"
                )
            else:
                failure = self.fail(message) if self.fail is not None else None
            if failure is None:
                self.sent.append(message)
            else:
                self.failed.append((message, failure))
                if failure.kind is FailureKind.FATAL:
                    self._broken = True
                if message.key is not None:
                    gaps.add((message.topic, message.key))
            on_delivery(failure, message)

    def flush(self, timeout: float) -> None:
        self.poll(timeout)

    def failure(self, error: DeliveryFailure) -> DeliveryFailure:
        return error

    def check(self, timeout: float) -> None:
        if not self.available:
            raise TransportUnavailable("broker unavailable")

    @property
    def broken(self) -> bool:
        return self._broken

    def close(self, timeout: float) -> None:
        self.poll(0)


class MemorySource:
    """An in-process message source for tests of consumers: messages are read in order;
    ``committed`` holds the positions of processed messages, per (topic, partition)."""

    def __init__(self, messages: list[IncomingMessage] | None = None) -> None:
        self.messages: collections.deque[IncomingMessage] = collections.deque(messages or [])
        self.committed: dict[tuple[str, int], int] = {}
        self._stored: dict[tuple[str, int], int] = {}
        self.closed = False
        self.joined = True
        self.reachable = True
        self.paused = False
        #: Rewound messages, handed out first (see :meth:`rewind`).
        self.held: list[IncomingMessage] = []

    def check(self, timeout: float) -> None:
        pass

    def poll(self, timeout: float) -> IncomingMessage | None:
        if self.paused:
            return None
        if self.held:
            return self.held.pop(0)
        return self.messages.popleft() if self.messages else None

    def poll_batch(
        self, max_messages: int, timeout: float, max_wait: float = 0.0
    ) -> list[IncomingMessage]:
        batch: list[IncomingMessage] = []
        while len(batch) < max_messages:
            message = self.poll(0)
            if message is None:
                break
            batch.append(message)
        return batch

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def rewind(self, message: IncomingMessage) -> None:
        """Held in front of everything else, in offset order per partition (as Kafka's)."""
        position = (message.topic, message.partition, message.offset)
        if any((m.topic, m.partition, m.offset) == position for m in self.held):
            return
        self.held.append(message)
        self.held.sort(key=lambda m: (m.topic, m.partition, m.offset))

    def processed(self, message: IncomingMessage) -> None:
        self._stored[(message.topic, message.partition)] = message.offset + 1

    def commit(self) -> None:
        self.committed.update(self._stored)

    def close(self) -> None:
        self.commit()
        self.closed = True
