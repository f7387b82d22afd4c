"""An in-process transport for fast tests of relay logic (and of your own code).

Delivery reports are served from :meth:`MemoryTransport.poll`, like a real client. Failures
are injected with ``reject`` (synchronous, at send) and ``fail`` (asynchronous, at delivery).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from outbox.transport.base import (
    DeliveryFailure,
    FailureKind,
    MessageRejected,
    OnDelivery,
    OutgoingMessage,
    TransportUnavailable,
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
        for message, on_delivery in items:
            failure: DeliveryFailure | None
            if not self.available:
                failure = DeliveryFailure(FailureKind.TRANSPORT, "broker unavailable")
            else:
                failure = self.fail(message) if self.fail is not None else None
            if failure is None:
                self.sent.append(message)
            elif failure.kind is FailureKind.FATAL:
                self._broken = True
            on_delivery(failure)

    def check(self, timeout: float) -> None:
        if not self.available:
            raise TransportUnavailable("broker unavailable")

    @property
    def broken(self) -> bool:
        return self._broken

    def close(self, timeout: float) -> None:
        self.poll(0)
