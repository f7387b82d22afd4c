"""The consumer's circuit breaker, retry budget and deadlines, on the in-memory source and the
real database (the real broker and ``outbox consume``: tests/acceptance/
test_downstream_outage.py)."""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import DownstreamUnavailable, PoisonMessage
from outbox.breaker import BreakerPolicy, Transition
from outbox.consumer import Consumer, ConsumerConfig, ConsumerStats
from outbox.message import HEADER_DEADLINE, format_deadline
from outbox.observe import ConsumerObserver
from outbox.transport.base import IncomingMessage
from outbox.transport.memory import MemorySource
from tests.support.cli import run_cli
from tests.support.handlers import Handed, create_effects_table, record_effect
from tests.support.incoming import message

FAST = BreakerPolicy(failures=3, open_base=0.02, open_max=0.05, min_attempts=1000)


class Watch(ConsumerObserver):
    def __init__(self) -> None:
        self.transitions: list[Transition] = []
        self.retries = 0

    def breaker_changed(self, transition: Transition) -> None:
        self.transitions.append(transition)

    def attempt_failed(self, *args: Any) -> None:
        self.retries += 1

    @property
    def states(self) -> list[str]:
        return [t.state for t in self.transitions]


@pytest.fixture
def effects(engine: sa.Engine) -> sa.Engine:
    return create_effects_table(engine)


def run(
    db_url: str,
    handler: Callable[[Session, IncomingMessage], Any],
    messages: list[IncomingMessage],
    *,
    policy: BreakerPolicy = FAST,
    max_attempts: int = 5,
    **kw: Any,
) -> tuple[ConsumerStats, Handed, Watch]:
    source = Handed(messages)
    watch = Watch()
    config = ConsumerConfig(
        db_url=db_url,
        name="payments",
        retry_backoff_base=0.001,
        retry_backoff_max=0.002,
        max_attempts=max_attempts,
        breaker=policy,
        **{k: v for k, v in kw.items() if k in {"clock_skew"}},
    )
    consumer = Consumer(
        config,
        handler,
        lambda: source,
        observers=[watch],
        **{k: v for k, v in kw.items() if k in {"transient", "on_expired"}},
    )
    stats = consumer.run(idle_timeout=0.3)
    return stats, source, watch


def effect_ns(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT n FROM effects ORDER BY seq"))]


def dead_letters(engine: sa.Engine) -> list[dict[str, bytes]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT header_names, header_values FROM outbox_messages ORDER BY id")
        ).all()
    return [dict(zip(r[0], r[1], strict=True)) for r in rows]


def n_of(m: IncomingMessage) -> int:
    n: int = json.loads(m.value or b"")["n"]
    return n


class Dependency:
    """Down for the first ``down`` calls, then up; counts the calls."""

    def __init__(self, down: int, error: type[BaseException] = DownstreamUnavailable) -> None:
        self.down = down
        self.calls = 0
        self.error = error

    def __call__(self, session: Session, m: IncomingMessage) -> None:
        self.calls += 1
        if self.calls <= self.down:
            raise self.error("payment provider answered 503")
        record_effect(session, m)


def test_an_outage_burns_no_attempts_pauses_and_resumes_in_order(
    effects: sa.Engine, db_url: str
) -> None:
    dependency = Dependency(down=12)
    stats, source, watch = run(db_url, dependency, [message(i) for i in range(6)])
    assert effect_ns(effects) == [0, 1, 2, 3, 4, 5]
    assert (stats.processed, stats.dead_lettered, stats.failed_attempts) == (6, 0, 0)
    assert stats.transient_failures == 12 and watch.retries == 0
    assert dead_letters(effects) == []
    # 3 failures open it; each failed half-open probe reopens it: 12 = 3 + 9 probes.
    assert watch.states[:2] == ["open", "half_open"]
    assert watch.states[-2:] == ["half_open", "closed"]
    assert watch.states.count("open") == stats.breaker_opened == 10
    assert source.pauses == 10 and not source.paused
    # The failed message came back first each time: nothing after it ran early.
    assert source.handed.count(0) == 1 + 10 and source.handed[-6:] == [0, 1, 2, 3, 4, 5]
    assert stats.paused_seconds > 0
    assert source.committed == {("orders", 0): 6}


def test_user_types_are_transient_and_others_keep_their_attempts(
    effects: sa.Engine, db_url: str
) -> None:
    class ProviderTimeout(Exception):
        pass

    stats, _, watch = run(
        db_url, Dependency(4, ProviderTimeout), [message(0)], transient=[ProviderTimeout]
    )
    assert (stats.processed, stats.transient_failures, stats.failed_attempts) == (1, 4, 0)
    assert watch.states == ["open", "half_open", "open", "half_open", "closed"]

    # The same failure, unclassified: per-message attempts, as before (and the budget is
    # not spent by one message alone).
    with effects.begin() as conn:
        conn.execute(sa.text("TRUNCATE effects, outbox_inbox"))
    stats, _, watch = run(db_url, Dependency(3, ProviderTimeout), [message(0)])
    assert (stats.processed, stats.transient_failures, stats.failed_attempts) == (1, 0, 3)
    assert watch.retries == 3 and watch.states == []


def test_a_poison_message_during_an_outage_is_still_dead_lettered(
    effects: sa.Engine, db_url: str
) -> None:
    calls = {"n": 0}

    def handler(session: Session, m: IncomingMessage) -> None:
        if n_of(m) == 1:
            raise PoisonMessage("not a valid order")
        calls["n"] += 1
        if calls["n"] <= 4:
            raise DownstreamUnavailable("down")
        record_effect(session, m)

    stats, _, _ = run(db_url, handler, [message(i) for i in range(3)])
    assert effect_ns(effects) == [0, 2]
    assert stats.dead_lettered == 1
    [letter] = dead_letters(effects)
    assert letter["dlq-reason"] == b"poison"


def test_an_unclassified_outage_is_bounded_by_the_retry_budget(
    effects: sa.Engine, db_url: str
) -> None:
    policy = BreakerPolicy(
        failures=3, open_base=0.05, open_max=0.4, retry_budget=0.2, budget_min_retries=10
    )
    up_at = time.monotonic() + 1.5
    calls = {"failed": 0}

    def handler(session: Session, m: IncomingMessage) -> None:
        if time.monotonic() < up_at:
            calls["failed"] += 1
            raise ConnectionError("provider unreachable")  # a type nobody classified
        record_effect(session, m)

    stats, _, watch = run(db_url, handler, [message(i) for i in range(40)], policy=policy)
    letters = dead_letters(effects)
    assert sorted(effect_ns(effects)) == [
        n for n in range(40) if str(n).encode() not in {d["dlq-original-offset"] for d in letters}
    ]
    assert stats.processed + stats.dead_lettered == 40
    # Per-message retries alone: every message that arrives during the outage would be
    # dead-lettered. With the budget: the first two messages use it up (4 retries each,
    # 10 in the window), then it is an outage. Each probe still counts an attempt: one
    # dead letter per 5 probes (the third message carries the attempts it had). The probes
    # are 0.025-0.4 s apart, so their number varies with the machine: bound by it.
    probes = stats.breaker_opened
    assert stats.dead_lettered <= 3 + probes // 5, (stats, calls)
    assert stats.dead_lettered <= 6, (stats, calls)
    assert any("retry budget spent" in t.reason for t in watch.transitions)
    assert {d["dlq-reason"] for d in letters} == {b"attempts"}


def test_an_unclassified_outage_longer_than_the_window_gets_no_fresh_budget_per_probe(
    effects: sa.Engine, db_url: str
) -> None:
    """Open periods longer than the window: the window is empty at each probe, but the
    budget stays spent until the breaker closes, so each probe is one request (an attempt of
    the held message), not a round of in-place retries that dead-letters a few messages."""
    policy = BreakerPolicy(
        failures=2,
        window=1,
        open_base=1.2,
        open_max=1.2,
        retry_budget=0.2,
        budget_min_retries=4,
    )
    up_at = time.monotonic() + 7.0
    calls = {"failed": 0}

    def handler(session: Session, m: IncomingMessage) -> None:
        if time.monotonic() < up_at:
            calls["failed"] += 1
            raise ConnectionError("provider unreachable")
        record_effect(session, m)

    stats, _, _ = run(db_url, handler, [message(i) for i in range(30)], policy=policy)
    assert stats.processed + stats.dead_lettered == 30
    # Before the budget is spent: one message dead-lettered (5 attempts, 4 retries), the
    # next one's retries spend it. Then one request per probe (about 6 in 7 s): its attempts
    # add up to one more dead letter at most. A fresh budget per probe would dead-letter one
    # or two messages per open period (about 8).
    assert stats.dead_lettered <= 3, (stats, calls)
    assert calls["failed"] <= 25, calls


def test_a_half_open_probe_that_keeps_failing_unclassified_is_dead_lettered_in_the_end(
    effects: sa.Engine, db_url: str
) -> None:
    """An unclassified failure cannot be told apart from a poison message: once the budget is
    spent, the probe still counts its attempts, so one bad message cannot hold its
    partition (and the consumer) forever."""
    policy = BreakerPolicy(
        failures=1, open_base=0.01, open_max=0.01, retry_budget=0.0, budget_min_retries=0
    )

    def handler(session: Session, m: IncomingMessage) -> None:
        if n_of(m) == 0:
            raise ValueError("always fails")
        record_effect(session, m)

    _, _, watch = run(db_url, handler, [message(0), message(1)], policy=policy)
    assert effect_ns(effects) == [1]
    [letter] = dead_letters(effects)
    assert letter["dlq-reason"] == b"attempts" and letter["dlq-attempts"] == b"5"
    assert watch.states.count("open") >= 3


def deadline_message(n: int, seconds_from_now: float) -> IncomingMessage:
    when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
        seconds=seconds_from_now
    )
    m = message(n)
    return IncomingMessage(
        m.topic,
        m.partition,
        m.offset,
        m.key,
        m.value,
        [*m.headers, (HEADER_DEADLINE, format_deadline(when))],
    )


def test_an_expired_message_is_dead_lettered_and_never_handled(
    effects: sa.Engine, db_url: str
) -> None:
    messages = [
        message(0),
        deadline_message(1, -60),  # an hour late would be the same
        deadline_message(2, +60),
        deadline_message(3, -0.2),  # within the clock-skew tolerance: handled
    ]
    handled: list[int] = []

    def handler(session: Session, m: IncomingMessage) -> None:
        handled.append(n_of(m))
        record_effect(session, m)

    stats, source, _ = run(db_url, handler, messages)
    assert handled == [0, 2, 3] and effect_ns(effects) == [0, 2, 3]
    assert (stats.expired, stats.dead_lettered) == (1, 1)
    [letter] = dead_letters(effects)
    assert letter["dlq-reason"] == b"expired"
    assert letter["dlq-error"].startswith(b"expired: ")
    assert letter["dlq-original-offset"] == b"1"
    assert source.committed == {("orders", 0): 4}
    # Recorded in the inbox: a redelivery is a duplicate, not a second dead letter.
    stats, _, _ = run(db_url, handler, [deadline_message(1, -60)])
    assert (stats.duplicates, stats.dead_lettered) == (1, 0)


def test_a_message_that_expires_between_retries_is_not_run_late(
    effects: sa.Engine, db_url: str
) -> None:
    calls: list[int] = []

    def handler(session: Session, m: IncomingMessage) -> None:
        calls.append(n_of(m))
        raise DownstreamUnavailable("down")

    # Open periods longer than the message's remaining life.
    policy = BreakerPolicy(failures=1, open_base=0.5, open_max=0.5)
    stats, _, _ = run(db_url, handler, [deadline_message(0, 0.1)], policy=policy, clock_skew=0)
    assert calls == [0]  # tried once in time; then it expired while the breaker was open
    assert (stats.expired, stats.dead_lettered) == (1, 1)
    assert [d["dlq-reason"] for d in dead_letters(effects)] == [b"expired"]


def test_on_expired_runs_instead_of_the_handler(effects: sa.Engine, db_url: str) -> None:
    expired: list[int] = []

    def on_expired(session: Session, m: IncomingMessage) -> None:
        expired.append(n_of(m))
        record_effect(session, m)  # e.g. publish a compensating event

    def handler(session: Session, m: IncomingMessage) -> None:
        raise AssertionError("the handler must not run for an expired message")

    stats, _, _ = run(db_url, handler, [deadline_message(5, -10)], on_expired=on_expired)
    assert expired == [5] and effect_ns(effects) == [5]
    assert (stats.processed, stats.expired, stats.dead_lettered) == (1, 1, 0)
    assert dead_letters(effects) == []


def test_an_unreadable_deadline_is_poison(effects: sa.Engine, db_url: str) -> None:
    m = message(0)
    bad = IncomingMessage(
        m.topic, m.partition, m.offset, m.key, m.value, [*m.headers, (HEADER_DEADLINE, b"soon")]
    )
    stats, _, _ = run(db_url, record_effect, [bad])
    assert stats.dead_lettered == 1 and effect_ns(effects) == []
    [letter] = dead_letters(effects)
    assert letter["dlq-reason"] == b"poison"
    assert b"unreadable outbox-deadline header" in letter["dlq-error"]


def test_transient_must_be_exception_types(db_url: str) -> None:
    from outbox.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="expected exception types"):
        Consumer(
            ConsumerConfig(db_url=db_url, name="x"),
            record_effect,
            MemorySource,
            transient=["httpx.TransportError"],  # type: ignore[list-item]
        )


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--transient", "nosuch.Error"], "error: cannot import --transient module 'nosuch'"),
        (["--transient", "builtins.len"], "error: --transient 'builtins.len' is not an exception"),
        (["--on-expired", "tests.support.handlers:nope"], "error: --on-expired 'tests.support"),
        (["--breaker-failure-rate", "0"], "Invalid value for '--breaker-failure-rate'"),
        (["--retry-budget", "2"], "Invalid value for '--retry-budget'"),
        (["--clock-skew", "-1"], "Invalid value for '--clock-skew'"),
    ],
)
def test_consume_refuses_careless_breaker_options_with_one_line(
    db_url: str, option: list[str], expected: str
) -> None:
    result = run_cli(
        "outbox",
        [
            "consume",
            *("--db-url", db_url, "--bootstrap-servers", "127.0.0.1:1"),
            *("--group", "g", "--topic", "t", "--handler", "tests.support.handlers:record_effect"),
            *option,
        ],
        import_tests=True,
    )
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
