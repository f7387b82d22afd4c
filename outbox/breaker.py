"""The consumer's circuit breaker and retry budget: an outage of what a handler calls is not
the messages' fault, so it must neither burn their attempts nor dead-letter them.

**Failures come in three kinds.** :class:`~outbox.PoisonMessage`: this message can never
succeed (dead-lettered at once). *Transient* (:class:`~outbox.DownstreamUnavailable`, or a type
passed as ``transient=``): the dependency is down, not this message. *Unclassified* (anything
else): a per-message attempt, retried with backoff and dead-lettered after ``max_attempts``.

**The breaker** counts transient failures. It opens after ``failures`` of them in a row, or
when they are ``failure_rate`` of the attempts in the last ``window`` seconds (once the window
holds ``min_attempts``). Open, the consumer pauses its partitions (it stays in its group)
for a delay drawn with full jitter from ``[open_base/2, open_base * 2**n]`` (capped at
``open_max``; ``n`` counts the reopenings), then goes half-open: one message is tried. Its
success closes the breaker; a transient failure reopens it with the next, longer delay.

**The retry budget** caps the retries of unclassified failures at ``retry_budget`` of the
attempts in the window. Past it (and past ``budget_min_retries`` retries, so that one poison
message alone never trips it) an unclassified failure is taken as transient: many different
messages failing the same way look like an outage, and retrying each of them would storm the
dependency. The budget then stays spent until the breaker closes. An unclassified failure
can never be told apart from a poison message for sure, so a message's own attempts still
count while the breaker is half-open: see ``docs/guarantees.md``.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import Literal

from outbox.exceptions import ConfigurationError

State = Literal["closed", "open", "half_open"]


@dataclasses.dataclass(frozen=True)
class BreakerPolicy:
    """When the breaker opens, how long it stays open, and the retry budget."""

    #: Transient failures in a row that open the breaker.
    failures: int = 5
    #: ...or the fraction of the window's attempts that failed transiently,
    failure_rate: float = 0.5
    #: ...once the window holds at least this many attempts.
    min_attempts: int = 20
    #: The sliding window, in seconds.
    window: float = 30.0
    #: The first open period is drawn from [open_base/2, open_base] s; each reopening doubles
    #: the upper end, up to ``open_max``.
    open_base: float = 1.0
    open_max: float = 60.0
    #: Retries of unclassified failures may be at most this fraction of the window's attempts.
    retry_budget: float = 0.2
    #: The budget applies only past this many retries in the window.
    budget_min_retries: int = 10

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise ConfigurationError("breaker failures must be at least 1")
        if not 0 < self.failure_rate <= 1:
            raise ConfigurationError("breaker failure_rate must be in (0, 1]")
        if self.min_attempts < 1:
            raise ConfigurationError("breaker min_attempts must be at least 1")
        if not self.window >= 1:
            raise ConfigurationError("breaker window must be at least 1 second")
        if not 0 < self.open_base <= self.open_max:
            raise ConfigurationError("breaker open_base must be positive and at most open_max")
        if not 0 <= self.retry_budget <= 1:
            raise ConfigurationError("retry_budget must be in [0, 1]")
        if self.budget_min_retries < 0:
            raise ConfigurationError("budget_min_retries must not be negative")

    def open_delay(self, reopenings: int, rng: random.Random) -> float:
        cap = min(self.open_max, self.open_base * (2 ** min(reopenings, 32)))
        # Full jitter spreads the probes of many consumers; the floor keeps a probe from
        # following a failure at once.
        return rng.uniform(min(cap, self.open_base / 2), cap)


class Window:
    """Counts over the last ``seconds`` seconds, in one-second buckets: O(1) per event at any
    message rate."""

    __slots__ = ("_buckets", "_clock", "_second", "seconds")

    #: Per bucket: attempts, retries (of unclassified failures), transient failures.
    _FIELDS = 3

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = max(1, int(seconds))
        self._clock = clock
        self._buckets = [[0] * self._FIELDS for _ in range(self.seconds)]
        self._second = int(clock())

    def _bucket(self) -> list[int]:
        now = int(self._clock())
        if now != self._second:
            for s in range(max(self._second + 1, now - self.seconds + 1), now + 1):
                bucket = self._buckets[s % self.seconds]
                bucket[0] = bucket[1] = bucket[2] = 0
            self._second = now
        return self._buckets[now % self.seconds]

    def add(self, field: int) -> None:
        self._bucket()[field] += 1

    def totals(self) -> tuple[int, int, int]:
        """(attempts, retries, transient failures) in the window."""
        self._bucket()
        b = self._buckets
        return sum(x[0] for x in b), sum(x[1] for x in b), sum(x[2] for x in b)


ATTEMPT, RETRY, TRANSIENT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Transition:
    """A change of the breaker's state, as reported to observers and the log."""

    state: State
    reason: str
    #: Transient failures in a row, and the window's counts, when it happened.
    failures_in_row: int
    window_attempts: int
    window_failures: int
    #: Open: seconds until half-open. Closed: seconds the partitions were paused.
    seconds: float


class Breaker:
    """The circuit breaker of one consumer (one handler). Not thread-safe."""

    def __init__(
        self,
        policy: BreakerPolicy,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.state: State = "closed"
        self.failures_in_row = 0
        #: Reopenings since the breaker last closed (for the growing open period).
        self.reopenings = 0
        #: Seconds the breaker has been open or half-open, all told (closed periods excluded).
        self.paused_seconds = 0.0
        self._rng = rng
        self._clock = clock
        self._window = Window(policy.window, clock)
        self._half_open_at = 0.0
        self._opened_at = 0.0
        # The budget ran out: it stays spent until the breaker closes, however long it is open
        # (the window empties while paused, and a fresh budget would let each probe retry in
        # place and dead-letter a few messages per open period).
        self._budget_spent = False

    def attempt(self) -> None:
        """A handler attempt starts."""
        self._window.add(ATTEMPT)

    def succeeded(self) -> Transition | None:
        """The attempt succeeded; closes a half-open breaker."""
        self.failures_in_row = 0
        if self.state == "closed":
            return None
        paused = self._clock() - self._opened_at
        self.paused_seconds += paused
        self.state = "closed"
        self.reopenings = 0
        self._budget_spent = False
        return self._transition("the dependency answered", paused)

    def transient_failure(self, reason: str) -> Transition | None:
        """A transient failure; the transition to open if the breaker opens."""
        self.failures_in_row += 1
        self._window.add(TRANSIENT)
        if self.state == "half_open":
            self.reopenings += 1
            return self._open(f"half-open probe failed: {reason}")
        if self.state == "open":
            return None
        if self.failures_in_row >= self.policy.failures:
            return self._open(f"{self.failures_in_row} transient failures in a row: {reason}")
        attempts, _, failures = self._window.totals()
        if attempts >= self.policy.min_attempts and failures >= self.policy.failure_rate * attempts:
            return self._open(
                f"{failures} of {attempts} attempts in {self._window.seconds} s failed "
                f"transiently: {reason}"
            )
        return None

    def retry_allowed(self) -> bool:
        """Whether an unclassified failure may be retried as a per-message attempt (the retry
        is then counted); False when the retry budget is spent."""
        if self._budget_spent and self.state != "closed":
            return False
        attempts, retries, _ = self._window.totals()
        policy = self.policy
        if retries >= policy.budget_min_retries and retries + 1 > policy.retry_budget * attempts:
            self._budget_spent = True
            return False
        self._window.add(RETRY)
        return True

    def remaining(self) -> float:
        """Seconds until an open breaker may go half-open."""
        return max(0.0, self._half_open_at - self._clock())

    def open_for(self) -> float:
        """Seconds since the breaker opened (0 while closed)."""
        return 0.0 if self.state == "closed" else self._clock() - self._opened_at

    def half_open(self) -> Transition:
        self.state = "half_open"
        return self._transition("open period over, trying one message", 0.0)

    def budget(self) -> tuple[int, int]:
        """(retries, attempts) in the window: how much of the retry budget is used."""
        attempts, retries, _ = self._window.totals()
        return retries, attempts

    def _open(self, reason: str) -> Transition:
        if self.state == "closed":
            self._opened_at = self._clock()
        self.state = "open"
        delay = self.policy.open_delay(self.reopenings, self._rng)
        self._half_open_at = self._clock() + delay
        return self._transition(reason, delay)

    def _transition(self, reason: str, seconds: float) -> Transition:
        attempts, _, failures = self._window.totals()
        return Transition(self.state, reason, self.failures_in_row, attempts, failures, seconds)
