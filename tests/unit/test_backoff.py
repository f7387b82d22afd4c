"""Backoff with full jitter: always within [0, min(cap, base * 2**attempt)]; the retry state
of one thing (failures in a row, when it is due)."""

from __future__ import annotations

import random

import pytest

from outbox.backoff import Backoff, DueTimes, Retrying


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    return Backoff(base, cap).delay(attempt, rng)


@pytest.mark.parametrize(("base", "cap"), [(1.0, 300.0), (0.5, 30.0), (0.01, 0.05), (2.0, 1.0)])
def test_full_jitter_stays_within_bounds(base: float, cap: float) -> None:
    rng = random.Random(1234)
    for attempt in range(0, 80):
        bound = min(cap, base * 2**attempt)
        delays = [backoff_delay(attempt, base, cap, rng) for _ in range(200)]
        assert all(0.0 <= d <= bound for d in delays), (attempt, max(delays), bound)


def test_jitter_spreads_over_the_whole_range() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(3, 1.0, 300.0, rng) for _ in range(2000)]
    # Uniform over [0, 8]: both ends of the range get used, the mean is near the middle.
    assert min(delays) < 0.5
    assert max(delays) > 7.5
    assert 3.5 < sum(delays) / len(delays) < 4.5


def test_grows_exponentially_until_the_cap() -> None:
    rng = random.Random(99)
    maxima = [max(backoff_delay(n, 0.5, 30.0, rng) for _ in range(500)) for n in range(10)]
    # 0.5, 1, 2, 4, 8, 16, then capped at 30.
    for n, top in enumerate(maxima):
        bound = min(30.0, 0.5 * 2**n)
        assert 0.8 * bound <= top <= bound


def test_huge_attempt_counts_do_not_overflow() -> None:
    rng = random.Random(0)
    for attempt in (1_000, 10**6, 2**40):
        assert 0.0 <= backoff_delay(attempt, 1.0, 300.0, rng) <= 300.0


def test_deterministic_for_a_seeded_rng() -> None:
    a = [backoff_delay(n, 1.0, 60.0, random.Random(5)) for n in range(10)]
    b = [backoff_delay(n, 1.0, 60.0, random.Random(5)) for n in range(10)]
    assert a == b


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Top(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def test_retrying_counts_failures_and_knows_when_it_is_due() -> None:
    clock = Clock()
    retry = Retrying(Backoff(1.0, 5.0), Top(), clock)
    assert not retry.failing and retry.due() and retry.remaining() == 0
    assert [retry.failed() for _ in range(4)] == [1.0, 2.0, 4.0, 5.0]
    assert retry.failures == 4 and retry.failing
    assert not retry.due() and retry.remaining() == 5.0
    clock.now += 5.0
    assert retry.due()
    retry.succeeded()
    assert not retry.failing and retry.failed() == 1.0  # starts over


def test_due_times_wake_for_the_earliest_to_come_and_forget_past_ones() -> None:
    clock = Clock()
    due = DueTimes(limit=3, clock=clock)
    assert due.next() is None
    due.add([5.0, 1.0, 1.0, 3.0])  # the same delay twice is one wake-up
    assert due.next() == clock.now + 1.0
    clock.now += 2.0
    assert due.next() == clock.now + 1.0  # the 3 s one; the 1 s one is past
    due.add([10.0, 20.0])  # 10 s fits (3 pending); 20 s is dropped: the fallback poll covers it
    clock.now += 10.0
    assert due.next() is None
