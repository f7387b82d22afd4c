"""The relay's link to the broker: the current client, its health and its backoff.

A transport failure (broker down, slow, moving leaders) is not a message's fault: the whole
relay pauses with backoff and then probes the broker before claiming again. A client in a
state it cannot leave (fenced, fatal) is discarded and a new one made from the factory.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from outbox.backoff import Backoff, Retrying
from outbox.breaker import State, Transition
from outbox.exceptions import TransportError
from outbox.observe import RelayObserver
from outbox.transport.base import Transport

logger = logging.getLogger("outbox.relay")


class BrokerLink:
    __slots__ = (
        "_factory",
        "_observe",
        "_probe_timeout",
        "_since",
        "_transport",
        "failures_in_row",
        "health",
        "state",
    )

    def __init__(
        self,
        factory: Callable[[], Transport],
        backoff: Backoff,
        rng: random.Random,
        observe: RelayObserver,
        probe_timeout: float,
    ) -> None:
        self._factory = factory
        self._transport: Transport | None = None
        self._observe = observe
        self._probe_timeout = probe_timeout
        self.health = Retrying(backoff, rng)
        #: Batches in a row that the broker failed (unlike ``health``, not reset by a probe
        #: that succeeds): ``--once`` gives up after a few.
        self.failures_in_row = 0
        #: As the consumer's circuit breaker: ``open`` while backing off, ``half_open`` while
        #: a probe is out, ``closed`` when the broker answers.
        self.state: State = "closed"
        self._since = 0.0

    def transport(self) -> Transport:
        """The current client, created on first use (and after a discard)."""
        if self._transport is None:
            self._transport = self._factory()
        return self._transport

    def failed(self, reason: str, *, fatal: bool) -> None:
        """A batch (or a probe) failed for a reason that is not the messages': back off, and
        discard the client if it cannot recover."""
        delay = self.health.failed()
        self.failures_in_row += 1
        self._observe.broker_unavailable(reason, delay, self.health.failures)
        if self.state == "closed":
            self._since = time.monotonic()
        self._change("open", reason, delay)
        if fatal or (self._transport is not None and self._transport.broken):
            self.discard()

    def delivered(self) -> None:
        """A batch got acknowledgements: the broker works."""
        self.health.succeeded()
        self.failures_in_row = 0
        self._closed()

    def ready(self, *, busy: bool) -> bool:
        """Whether to send now: always while healthy; after failures, once the backoff has
        passed and a probe reaches the broker. ``busy``: batches are in flight; their
        reports say whether the broker is back before any probe does."""
        if not self.health.failing:
            return True
        if busy or not self.health.due():
            return False
        self._change("half_open", "backoff over, probing the broker", 0.0)
        try:
            self.transport().check(self._probe_timeout)
        except TransportError as exc:
            self.failed(str(exc), fatal=False)
            return False
        self.health.succeeded()
        self._observe.broker_available()
        self._closed()
        return True

    def _closed(self) -> None:
        if self.state != "closed":
            self._change("closed", "the broker answers", time.monotonic() - self._since)

    def _change(self, state: State, reason: str, seconds: float) -> None:
        if state == self.state:
            return  # one report per transition, not per failure
        self.state = state
        failures = self.health.failures
        self._observe.breaker_changed(Transition(state, reason, failures, 0, 0, seconds))

    def discard(self) -> None:
        """Drop the client without waiting for what it still holds (purged, unacknowledged:
        those rows stay pending)."""
        if self._transport is not None:
            self._observe.producer_recreated()
            transport, self._transport = self._transport, None
            try:
                transport.close(0)
            except Exception:  # a broken client may fail to close; it is dropped either way
                logger.debug(
                    "closing the broken client failed",
                    exc_info=True,
                    extra={"event": "relay.client_close_failed"},
                )

    def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for queued messages, then release the client."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close(timeout)
