"""The batched consumer (``batch_size`` > 1, or a batch handler) on the in-memory source and the
real database: one transaction per batch, and per message exactly what the per-message
consumer does -- duplicates, dead letters, retries, the breaker, deadlines, order, offsets."""

from __future__ import annotations

import collections
import datetime
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import Producer
from sqlalchemy.orm import Session

from outbox import DownstreamUnavailable, PoisonMessage
from outbox import consumer as consumer_module
from outbox.breaker import BreakerPolicy
from outbox.consumer import EXIT_HANDLER_HUNG, Consumer, ConsumerConfig, ConsumerStats, _Watchdog
from outbox.message import HEADER_DEADLINE, format_deadline
from outbox.transport.base import IncomingMessage
from outbox.transport.memory import MemorySource
from tests.support import handlers
from tests.support.broker import Broker
from tests.support.cli import run_cli
from tests.support.handlers import Finished, Handed, create_effects_table, record_effect
from tests.support.incoming import message
from tests.support.waits import wait_until

FAST = BreakerPolicy(failures=3, open_base=0.02, open_max=0.05, min_attempts=1000)
XID = sa.text("SELECT CAST(pg_current_xact_id() AS text)")


@pytest.fixture
def effects(engine: sa.Engine) -> sa.Engine:
    return create_effects_table(engine)


def run(
    db_url: str,
    handler: Callable[[Session, IncomingMessage], Any] | None,
    messages: list[IncomingMessage],
    *,
    batch_handler: Callable[[Session, list[IncomingMessage]], Any] | None = None,
    **config: Any,
) -> tuple[ConsumerStats, Handed, Finished]:
    source = Handed(messages)
    finished = Finished()
    settings: dict[str, Any] = {
        "retry_backoff_base": 0.001,
        "retry_backoff_max": 0.002,
        "breaker": FAST,
        "batch_size": 500,
        **config,
    }
    consumer = Consumer(
        ConsumerConfig(db_url=db_url, name="payments", **settings),
        handler,
        lambda: source,
        observers=[finished],
        rng=random.Random(1),
        batch_handler=batch_handler,
    )
    stats = consumer.run(idle_timeout=0.3)
    return stats, source, finished


def effect_ns(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT n FROM effects ORDER BY seq"))]


def dead_letters(engine: sa.Engine) -> list[tuple[str, dict[str, bytes]]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT topic, header_names, header_values FROM outbox_messages ORDER BY id")
        ).all()
    return [(r[0], dict(zip(r[1], r[2], strict=True))) for r in rows]


def n_of(m: IncomingMessage) -> int:
    n: int = json.loads(m.value or b"")["n"]
    return n


def test_a_batch_is_one_transaction_and_skips_duplicates(effects: sa.Engine, db_url: str) -> None:
    # 0..4 done before; then 0..9 with 3 and 7 twice in the batch.
    run(db_url, record_effect, [message(n) for n in range(5)])
    xids: list[str] = []

    def handler(session: Session, m: IncomingMessage) -> None:
        xids.append(session.execute(XID).scalar_one())
        record_effect(session, m)

    again = [message(n) for n in range(10)]
    twice = [dataclass_at(message(3), 10), dataclass_at(message(7), 11)]
    stats, source, finished = run(db_url, handler, again + twice)
    assert effect_ns(effects) == list(range(10))
    assert stats.processed == 5 and stats.duplicates == 7
    assert len(set(xids)) == 1 and len(xids) == 5  # one transaction, fresh messages only
    assert source.committed == {("orders", 0): 12}
    assert [o for _, o in finished.outcomes] == ["duplicate"] * 5 + ["processed"] * 5 + [
        "duplicate"
    ] * 2


def dataclass_at(m: IncomingMessage, offset: int) -> IncomingMessage:
    """``m`` (same message-id) again at ``offset``: a redelivery within the batch."""
    return IncomingMessage(m.topic, m.partition, offset, m.key, m.value, m.headers)


@pytest.mark.parametrize("writes_first", [False, True])
def test_a_poison_message_in_the_middle_of_a_batch(
    effects: sa.Engine, db_url: str, writes_first: bool
) -> None:
    calls: collections.Counter[int] = collections.Counter()

    def handler(session: Session, m: IncomingMessage) -> None:
        calls[n_of(m)] += 1
        if writes_first:
            record_effect(session, m)
        if n_of(m) == 5:
            raise PoisonMessage("bad order")
        if not writes_first:
            record_effect(session, m)

    stats, source, finished = run(db_url, handler, [message(n) for n in range(10)])
    assert effect_ns(effects) == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # once each, in order
    assert stats.processed == 9 and stats.dead_lettered == 1 and stats.failed_attempts == 0
    [(topic, headers)] = dead_letters(effects)
    assert topic == "orders.dlq" and headers["dlq-reason"] == b"poison"
    assert headers["dlq-original-offset"] == b"5"
    # A handler that failed before writing leaves the transaction as the prefix made it: the
    # prefix commits as it is. One that wrote first: the prefix runs again in a fresh
    # transaction (documented). The poison message runs once either way.
    assert [calls[n] for n in range(10)] == [2 if writes_first else 1] * 5 + [1] * 5
    assert source.committed == {("orders", 0): 10}
    assert finished.outcomes == [(n, "dead_lettered" if n == 5 else "processed") for n in range(10)]


def test_an_unclassified_failure_is_retried_in_place(effects: sa.Engine, db_url: str) -> None:
    calls: collections.Counter[int] = collections.Counter()

    def handler(session: Session, m: IncomingMessage) -> None:
        calls[n_of(m)] += 1
        record_effect(session, m)
        if n_of(m) == 3 and calls[3] == 1:
            raise TimeoutError("flaky")

    stats, source, _ = run(db_url, handler, [message(n) for n in range(8)])
    assert effect_ns(effects) == list(range(8))
    assert stats.processed == 8 and stats.failed_attempts == 1 and stats.dead_lettered == 0
    assert source.committed == {("orders", 0): 8}


def test_max_attempts_in_a_batch_dead_letters_after_the_same_attempts(
    effects: sa.Engine, db_url: str
) -> None:
    calls: collections.Counter[int] = collections.Counter()

    def handler(session: Session, m: IncomingMessage) -> None:
        calls[n_of(m)] += 1
        if n_of(m) == 2:
            raise ValueError("always")
        record_effect(session, m)

    stats, _, _ = run(db_url, handler, [message(n) for n in range(5)], max_attempts=3)
    assert effect_ns(effects) == [0, 1, 3, 4]
    assert calls[2] == 3  # the batch's attempt is the first of the three
    assert stats.failed_attempts == 3 and stats.dead_lettered == 1
    [(_, headers)] = dead_letters(effects)
    assert headers["dlq-reason"] == b"attempts" and headers["dlq-attempts"] == b"3"


def test_an_outage_mid_batch_opens_the_breaker_and_the_rest_comes_back_in_order(
    effects: sa.Engine, db_url: str
) -> None:
    calls: collections.Counter[int] = collections.Counter()

    def handler(session: Session, m: IncomingMessage) -> None:
        calls[n_of(m)] += 1
        if n_of(m) == 4 and calls[4] <= 3:
            raise DownstreamUnavailable("payment provider answered 503")
        record_effect(session, m)

    stats, source, finished = run(db_url, handler, [message(n) for n in range(10)])
    assert effect_ns(effects) == list(range(10))
    # No attempt burned, nothing dead-lettered; the breaker opened once and paused.
    assert stats.failed_attempts == 0 and stats.dead_lettered == 0
    assert stats.transient_failures == 3 and stats.breaker_opened == 1 and source.pauses == 1
    # 4..9 were rewound and handed out again, in order.
    assert source.handed == list(range(10)) + list(range(4, 10))
    assert [n for n, _ in finished.outcomes] == list(range(10))
    assert source.committed == {("orders", 0): 10}


def deadline_message(n: int, seconds_from_now: float) -> IncomingMessage:
    m = message(n)
    deadline = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
        seconds=seconds_from_now
    )
    headers = [*m.headers, (HEADER_DEADLINE, format_deadline(deadline))]
    return IncomingMessage(m.topic, m.partition, m.offset, m.key, m.value, headers)


def test_an_expired_message_inside_a_batch_is_dead_lettered_in_order(
    effects: sa.Engine, db_url: str
) -> None:
    handled: list[int] = []

    def handler(session: Session, m: IncomingMessage) -> None:
        handled.append(n_of(m))
        if n_of(m) == 1:
            time.sleep(0.5)  # message 2 expires meanwhile
        record_effect(session, m)

    messages = [
        message(0),
        message(1),
        deadline_message(2, 0.2),
        deadline_message(3, -10),
        message(4),
    ]
    stats, source, finished = run(db_url, handler, messages, clock_skew=0.0)
    assert effect_ns(effects) == [0, 1, 4]
    assert 2 not in handled and 3 not in handled  # never started past its deadline
    assert stats.expired == 2 and stats.dead_lettered == 2
    assert [h["dlq-reason"] for _, h in dead_letters(effects)] == [b"expired", b"expired"]
    assert [n for n, _ in finished.outcomes] == [0, 1, 2, 3, 4]
    assert source.committed == {("orders", 0): 5}


def test_a_message_without_a_key_in_a_batch_is_dead_lettered_in_order(
    effects: sa.Engine, db_url: str
) -> None:
    m = message(2)
    keyless = IncomingMessage(m.topic, m.partition, m.offset, m.key, m.value, [])
    _, source, finished = run(db_url, record_effect, [message(0), message(1), keyless, message(3)])
    assert effect_ns(effects) == [0, 1, 3]
    assert [h["dlq-reason"] for _, h in dead_letters(effects)] == [b"no-key"]
    assert [n for n, _ in finished.outcomes] == [0, 1, 2, 3]
    assert source.committed == {("orders", 0): 4}


def test_a_handler_that_rolls_back_in_a_batch_fails_its_attempt(
    effects: sa.Engine, db_url: str
) -> None:
    calls: collections.Counter[int] = collections.Counter()

    def handler(session: Session, m: IncomingMessage) -> None:
        calls[n_of(m)] += 1
        record_effect(session, m)
        if n_of(m) == 2 and calls[2] == 1:
            session.rollback()

    stats, source, _ = run(db_url, handler, [message(n) for n in range(5)])
    assert effect_ns(effects) == list(range(5))  # nothing half-applied, nothing lost
    assert stats.failed_attempts == 1 and stats.processed == 5
    assert source.committed == {("orders", 0): 5}


def test_a_batch_handler_is_bisected_down_to_the_failing_message(
    effects: sa.Engine, db_url: str
) -> None:
    calls: list[list[int]] = []

    def batch(session: Session, messages: list[IncomingMessage]) -> None:
        calls.append([n_of(m) for m in messages])
        for m in messages:
            record_effect(session, m)
        if any(n_of(m) == 5 for m in messages):
            raise PoisonMessage("bad order")

    stats, source, finished = run(db_url, None, [message(n) for n in range(8)], batch_handler=batch)
    assert effect_ns(effects) == [0, 1, 2, 3, 4, 6, 7]
    assert calls == [list(range(8)), [0, 1, 2, 3], [4, 5, 6, 7], [4, 5], [4], [5], [6, 7]]
    assert stats.processed == 7 and stats.dead_lettered == 1
    assert [n for n, _ in finished.outcomes] == list(range(8))
    assert source.committed == {("orders", 0): 8}


def test_a_batch_handler_gets_fresh_messages_only(effects: sa.Engine, db_url: str) -> None:
    run(db_url, record_effect, [message(0), message(2)])
    calls: list[list[int]] = []

    def batch(session: Session, messages: list[IncomingMessage]) -> None:
        calls.append([n_of(m) for m in messages])
        for m in messages:
            record_effect(session, m)

    stats, _, _ = run(db_url, None, [message(n) for n in range(4)], batch_handler=batch)
    assert calls == [[1, 3]]
    assert stats.processed == 2 and stats.duplicates == 2


@pytest.fixture
def exits() -> Iterator[list[int]]:
    codes: list[int] = []
    original = _Watchdog.exit
    _Watchdog.exit = staticmethod(codes.append)
    handlers.release_hang.clear()
    yield codes
    _Watchdog.exit = original
    handlers.release_hang.set()


def dlq_offsets(engine: sa.Engine) -> list[bytes]:
    return [h["dlq-original-offset"] for _, h in dead_letters(engine)]


def test_a_hung_handler_in_a_batch_dead_letters_the_message_running(
    effects: sa.Engine, db_url: str, exits: list[int]
) -> None:
    # Messages 0, 1 (hangs), 2 of one partition, in one batch.
    source = MemorySource([message(0), message(1), message(2)])
    c = Consumer(
        ConsumerConfig(db_url=db_url, name="c", handler_timeout=0.3, batch_size=10),
        handlers.hang_in_python,
        lambda: source,
    )
    runner = threading.Thread(target=c.run, kwargs={"max_messages": 3}, daemon=True)
    runner.start()
    wait_until(lambda: exits, 15, "the watchdog to give up on the handler")
    assert exits == [EXIT_HANDLER_HUNG]
    assert dlq_offsets(effects) == [b"1"]
    # Message 0 waited uncommitted in the batch's transaction (rolled back with it): the
    # offset stays, message 0 comes again after the restart and message 1 is then skipped.
    assert source.committed == {}
    c.stop()
    handlers.release_hang.set()
    runner.join(15)
    assert effect_ns(effects) == []
    restarted = MemorySource([message(0), message(1), message(2)])
    stats = Consumer(
        ConsumerConfig(db_url=db_url, name="c", batch_size=10),
        record_effect,
        lambda: restarted,
    ).run(idle_timeout=0.3)
    assert effect_ns(effects) == [0, 2] and stats.duplicates == 1
    assert restarted.committed == {("orders", 0): 3}


def test_options_are_checked(db_url: str) -> None:
    from outbox.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="batch_size"):
        ConsumerConfig(db_url=db_url, name="c", batch_size=0)
    with pytest.raises(ConfigurationError, match="batch_max_wait"):
        ConsumerConfig(db_url=db_url, name="c", batch_max_wait=-1)
    config = ConsumerConfig(db_url=db_url, name="c")
    with pytest.raises(ConfigurationError, match="exactly one"):
        Consumer(config, None, MemorySource)
    with pytest.raises(ConfigurationError, match="exactly one"):
        Consumer(config, record_effect, MemorySource, batch_handler=lambda s, ms: None)


def test_a_long_batch_is_cut_and_the_rest_comes_again_after_a_poll(
    effects: sa.Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumer_module, "BATCH_BUDGET", 0.05)
    calls: collections.Counter[int] = collections.Counter()

    def handler(session: Session, m: IncomingMessage) -> None:
        calls[n_of(m)] += 1
        record_effect(session, m)
        time.sleep(0.03)

    stats, source, finished = run(db_url, handler, [message(n) for n in range(10)])
    assert effect_ns(effects) == list(range(10)) and set(calls.values()) == {1}
    assert stats.processed == 10
    assert len(source.handed) > 10  # cut short: the rest was rewound and handed out again
    assert [n for n, _ in finished.outcomes] == list(range(10))
    assert source.committed == {("orders", 0): 10}


def test_the_command_takes_a_batch_handler(effects: sa.Engine, db_url: str, broker: Broker) -> None:
    topic = broker.create_topic(partitions=3)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for n in range(50):
        producer.produce(
            topic, value=json.dumps({"n": n}).encode(), headers=[("message-id", f"m-{n}".encode())]
        )
    assert producer.flush(10) == 0
    common = [
        "consume",
        *("--db-url", db_url, "--bootstrap-servers", broker.bootstrap, "--topic", topic),
        *("--group", f"g-{topic}", "--redelivery-horizon-days", "7"),
        *("-X", "session.timeout.ms=6000", "-X", "heartbeat.interval.ms=1000"),
    ]
    both = run_cli(
        "outbox",
        [
            *common,
            "--handler",
            "tests.support.handlers:record_effect",
            "--batch-handler",
            "tests.support.handlers:record_batch",
        ],
        import_tests=True,
    )
    assert both.returncode == 2 and "exactly one of --handler and --batch-handler" in both.stderr
    done = run_cli(
        "outbox",
        [*common, "--batch-handler", "tests.support.handlers:record_batch", "--idle-timeout", "2"],
        import_tests=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "processed 50, duplicates 0, dead-lettered 0"
    assert sorted(effect_ns(effects)) == list(range(50))


def test_by_default_a_batch_is_what_is_fetched_already(db_url: str, effects: sa.Engine) -> None:
    """No wait to fill a batch by default: at 500 messages/s a 10 ms wait cost the
    per-message handler 14 ms at p50 and 24 ms at p99 end to end, and batches still grow
    with the load (docs/performance.md)."""
    waits: list[float] = []

    class Recording(MemorySource):
        def poll_batch(
            self, max_messages: int, timeout: float, max_wait: float = 0.0
        ) -> list[IncomingMessage]:
            waits.append(max_wait)
            return super().poll_batch(max_messages, timeout, max_wait)

    source = Recording([message(0), message(1)])
    Consumer(ConsumerConfig(db_url=db_url, name="c"), record_effect, lambda: source).run(
        idle_timeout=0.2
    )
    assert effect_ns(effects) == [0, 1]
    assert waits and set(waits) == {0.0}
