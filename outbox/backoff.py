"""One backoff for every retry in the library: exponential, capped, with full jitter.

:class:`Backoff` is the policy (a value); :class:`Retrying` is one thing being retried (the
broker, the database, a handler's message): how many failures in a row, and when the next try
is due. The relay and the consumer hold a :class:`Retrying` per concern instead of counters.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
import time
from collections.abc import Callable, Iterable


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Delays of ``uniform(0, min(cap, base * 2**failures))`` seconds.

    Full jitter spreads the retries of many messages (or relays, or consumers) evenly instead
    of in waves that hit a recovering dependency together.
    """

    base: float
    cap: float

    def delay(self, failures: int, rng: random.Random) -> float:
        """The delay after ``failures`` failures in a row before this one (0 for the first)."""
        return rng.uniform(0, min(self.cap, self.base * (2 ** min(failures, 32))))


class Retrying:
    """Failures in a row of one thing, and when it may be tried again."""

    __slots__ = ("_clock", "_rng", "failures", "policy", "retry_at")

    def __init__(
        self,
        policy: Backoff,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.failures = 0
        self.retry_at = 0.0
        self._rng = rng
        self._clock = clock

    def failed(self) -> float:
        """Count a failure; returns the delay before the next try."""
        delay = self.policy.delay(self.failures, self._rng)
        self.failures += 1
        self.retry_at = self._clock() + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.retry_at = 0.0

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def due(self) -> bool:
        """Whether the next try may go now (always, while nothing failed)."""
        return self._clock() >= self.retry_at

    def remaining(self) -> float:
        """Seconds until the next try is due (0 if it is)."""
        return max(0.0, self.retry_at - self._clock())


class DueTimes:
    """Monotonic times at which something falls due (per-message retries): the relay wakes
    for the earliest. Bounded: past ``limit`` pending times, new ones are dropped and the
    fallback poll catches up with them."""

    __slots__ = ("_clock", "_heap", "limit")

    def __init__(self, limit: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._heap: list[float] = []
        self._clock = clock
        self.limit = limit

    def add(self, delays: Iterable[float]) -> None:
        """Things fall due after each of ``delays`` seconds from now."""
        now = self._clock()
        for delay in set(delays):
            if len(self._heap) >= self.limit:
                return
            heapq.heappush(self._heap, now + delay)

    def next(self) -> float | None:
        """The earliest time still to come (past ones are forgotten), or None."""
        now = self._clock()
        while self._heap and self._heap[0] <= now:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else None
