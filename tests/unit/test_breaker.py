"""The circuit breaker and retry budget on a fake clock (outbox/breaker.py), and the relay's
broker link reporting its backoff as breaker transitions."""

from __future__ import annotations

import random
import time

import pytest

from outbox.backoff import Backoff
from outbox.breaker import Breaker, BreakerPolicy, Transition, Window
from outbox.brokerlink import BrokerLink
from outbox.exceptions import ConfigurationError
from outbox.observe import RelayObserver
from outbox.transport.memory import MemoryTransport


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **policy: float) -> Breaker:
    return Breaker(BreakerPolicy(**policy), random.Random(7), clock)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        {"failures": 0},
        {"failure_rate": 0},
        {"failure_rate": 1.5},
        {"min_attempts": 0},
        {"window": 0.5},
        {"open_base": 0},
        {"open_base": 10, "open_max": 5},
        {"retry_budget": -0.1},
        {"budget_min_retries": -1},
    ],
)
def test_a_nonsensical_policy_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        BreakerPolicy(**bad)  # type: ignore[arg-type]


def test_the_window_forgets_what_is_older_than_its_length() -> None:
    clock = Clock()
    window = Window(3, clock)
    window.add(0)
    clock.now += 1
    window.add(0)
    window.add(2)
    assert window.totals() == (2, 0, 1)
    clock.now += 2  # the first second is out
    assert window.totals() == (1, 0, 1)
    clock.now += 100  # a long quiet spell clears everything
    assert window.totals() == (0, 0, 0)


def test_consecutive_transient_failures_open_it_and_a_success_resets_the_count() -> None:
    clock = Clock()
    b = breaker(clock, failures=3)
    for _ in range(2):
        b.attempt()
        assert b.transient_failure("down") is None
    b.attempt()
    assert b.succeeded() is None  # closed stays closed, the run is broken
    for _ in range(2):
        b.attempt()
        assert b.transient_failure("down") is None
    b.attempt()
    opened = b.transient_failure("503 from the provider")
    assert opened is not None and opened.state == "open" and b.state == "open"
    assert opened.failures_in_row == 3
    assert opened.reason == "3 transient failures in a row: 503 from the provider"
    assert 0.5 <= opened.seconds <= 1.0  # [open_base/2, open_base]


def test_a_failure_rate_over_the_window_opens_it() -> None:
    clock = Clock()
    b = breaker(clock, failures=100, failure_rate=0.5, min_attempts=10)
    opened: Transition | None = None
    for i in range(20):
        b.attempt()
        if i % 2:
            opened = b.transient_failure("flaky")
            if opened:
                break
        else:
            b.succeeded()
    assert opened is not None and opened.state == "open"
    assert opened.window_failures * 2 >= opened.window_attempts >= 10
    assert "failed transiently" in opened.reason


def test_half_open_probe_closes_it_or_reopens_it_for_longer() -> None:
    clock = Clock()
    b = breaker(clock, failures=1, open_base=1.0, open_max=60.0)
    b.attempt()
    first = b.transient_failure("down")
    assert first is not None
    assert b.remaining() == pytest.approx(first.seconds)
    clock.now += first.seconds
    assert b.remaining() == 0
    assert b.half_open().state == "half_open"
    # A failed probe reopens with the next, longer cap: up to 2 s, then 4 s...
    caps = []
    for _ in range(6):
        b.attempt()
        t = b.transient_failure("still down")
        assert t is not None and t.state == "open"
        assert t.reason.startswith("half-open probe failed")
        caps.append(t.seconds)
        clock.now += t.seconds
        b.half_open()
    assert all(0.5 <= s <= cap for s, cap in zip(caps, [2, 4, 8, 16, 32, 60], strict=True))
    b.attempt()
    closed = b.succeeded()
    assert closed is not None and closed.state == "closed" and b.state == "closed"
    assert closed.seconds == pytest.approx(sum(caps) + first.seconds)
    assert b.paused_seconds == pytest.approx(closed.seconds)
    # Closing forgets the reopenings: the next outage starts short again.
    b.attempt()
    again = b.transient_failure("down")
    assert again is not None and again.seconds <= 1.0


def test_the_retry_budget_allows_a_lone_poison_message_its_retries() -> None:
    clock = Clock()
    b = breaker(clock, retry_budget=0.2, budget_min_retries=10)
    # One message failing 5 times in a quiet period: 4 retries, under the minimum.
    for _ in range(5):
        b.attempt()
        assert b.retry_allowed()
    assert b.budget() == (5, 5)


def test_the_retry_budget_is_spent_when_many_messages_fail() -> None:
    clock = Clock()
    b = breaker(clock, retry_budget=0.2, budget_min_retries=10)
    for _ in range(100):  # healthy traffic: 100 attempts
        b.attempt()
        b.succeeded()
    allowed = 0
    while True:
        b.attempt()
        if not b.retry_allowed():
            break
        allowed += 1
    # 20 % of the attempts (which grow with each retry): about 25 retries.
    retries, attempts = b.budget()
    assert retries == allowed and 20 <= allowed <= 26
    assert retries + 1 > 0.2 * attempts
    clock.now += 31  # the window moves on: the budget is back
    b.attempt()
    assert b.retry_allowed()


def test_a_spent_budget_stays_spent_while_the_breaker_is_open_however_long() -> None:
    clock = Clock()
    b = breaker(
        clock, failures=1, retry_budget=0.2, budget_min_retries=2, open_base=100, open_max=100
    )
    for _ in range(3):
        b.attempt()
        b.retry_allowed()
    b.attempt()
    assert not b.retry_allowed()  # spent: the failure is taken as an outage
    opened = b.transient_failure("retry budget spent: ConnectionError")
    assert opened is not None
    clock.now += opened.seconds  # longer than the window: its counts are gone
    b.half_open()
    b.attempt()
    assert b.budget() == (0, 1)
    assert not b.retry_allowed()  # the probe gets no fresh budget to retry in place
    b.attempt()
    b.succeeded()  # closed: the budget is back
    assert b.retry_allowed()


class Recorder(RelayObserver):
    def __init__(self) -> None:
        self.transitions: list[Transition] = []

    def breaker_changed(self, transition: Transition) -> None:
        self.transitions.append(transition)


def test_the_relays_broker_backoff_reports_each_transition_once() -> None:
    transport = MemoryTransport()
    recorder = Recorder()
    link = BrokerLink(
        lambda: transport, Backoff(0.0001, 0.0001), random.Random(1), recorder, probe_timeout=1
    )
    link.failed("broker down", fatal=False)
    link.failed("broker down", fatal=False)  # still open: no second report
    assert [t.state for t in recorder.transitions] == ["open"]
    assert recorder.transitions[0].reason == "broker down"
    transport.available = False
    time.sleep(0.001)
    assert not link.ready(busy=False)  # the probe fails: half-open, then open again
    transport.available = True
    time.sleep(0.001)
    assert link.ready(busy=False)
    assert [t.state for t in recorder.transitions] == [
        "open",
        "half_open",
        "open",
        "half_open",
        "closed",
    ]
    assert link.state == "closed" and recorder.transitions[-1].seconds > 0
