"""``async def`` handlers: awaited with an ``AsyncSession`` in the transaction that holds the
inbox claim, with every guarantee of a plain handler -- effects once, a poison message in a
batch rolling back only its own work, the session's commit() / rollback() / close(), the
breaker, the time limit, a batch handler's bisection -- and ``outbox consume --handler
module:async_function`` end to end. (The runner on the in-memory source, the database real;
the command on the real broker.)"""

from __future__ import annotations

import asyncio
import collections
import datetime
import functools
import json
import random
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import Producer
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.ext.asyncio import AsyncSession

from outbox import DownstreamUnavailable, Outbox, PoisonMessage
from outbox.breaker import BreakerPolicy
from outbox.consumer import (
    EXIT_HANDLER_HUNG,
    Consumer,
    ConsumerConfig,
    ConsumerStats,
    _Watchdog,
    json_value,
)
from outbox.exceptions import ConfigurationError
from outbox.message import HEADER_DEADLINE, format_deadline
from outbox.transport.base import IncomingMessage
from outbox.transport.memory import MemorySource
from tests.support.broker import Broker
from tests.support.cli import ROOT, run_cli
from tests.support.handlers import Finished, Handed, create_effects_table
from tests.support.incoming import message
from tests.support.otel import install, named
from tests.support.waits import wait_until

NO_GREENLET = (
    "the handler is an async function, which needs greenlet: install sqlalchemy-outbox[asyncio]"
)
FAST = BreakerPolicy(failures=3, open_base=0.02, open_max=0.05, min_attempts=1000)
XID = sa.text("SELECT CAST(pg_current_xact_id() AS text)")
INSERT = sa.text("INSERT INTO effects (message_id, n, pid) VALUES (:m, :n, pg_backend_pid())")


@pytest.fixture
def effects(engine: sa.Engine) -> sa.Engine:
    return create_effects_table(engine)


def n_of(m: IncomingMessage) -> int:
    n: int = json_value(m)["n"]
    return n


async def record(session: AsyncSession, m: IncomingMessage) -> None:
    """The async twin of ``tests.support.handlers.record_effect``."""
    await session.execute(INSERT, {"m": (m.header("message-id") or b"").decode(), "n": n_of(m)})


def run(
    db_url: str,
    handler: Any,
    messages: list[IncomingMessage],
    *,
    batch_handler: Any = None,
    **config: Any,
) -> tuple[ConsumerStats, Handed, Finished]:
    source = Handed(messages)
    finished = Finished()
    settings: dict[str, Any] = {
        "retry_backoff_base": 0.001,
        "retry_backoff_max": 0.002,
        "breaker": FAST,
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
    return consumer.run(idle_timeout=0.3), source, finished


def effect_ns(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT n FROM effects ORDER BY seq"))]


def dead_letters(engine: sa.Engine) -> list[dict[str, bytes]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT header_names, header_values FROM outbox_messages "
                "WHERE topic LIKE '%.dlq' ORDER BY id"
            )
        ).all()
    return [dict(zip(r[0], r[1], strict=True)) for r in rows]


# -- per message --------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 500])
def test_an_async_handler_writes_its_effects_once_in_the_claims_transaction(
    effects: sa.Engine, db_url: str, batch_size: int
) -> None:
    outbox = Outbox()
    sessions: list[type] = []

    async def capture(session: AsyncSession, m: IncomingMessage) -> None:
        sessions.append(type(session))
        await asyncio.sleep(0)  # a real await: the handler runs on the consumer's event loop
        await record(session, m)
        await outbox.apublish(session, "payments", {"n": n_of(m)}, key="k")

    messages = [message(n) for n in range(5)]
    stats, source, _ = run(db_url, capture, messages, batch_size=batch_size)
    assert stats.processed == 5 and stats.duplicates == 0
    assert effect_ns(effects) == list(range(5)) and set(sessions) == {AsyncSession}
    assert source.committed == {("orders", 0): 5}
    with effects.connect() as conn:
        # The handler's rows, its events and the inbox claims: one transaction per message
        # (per batch when batching), the consumer's.
        xmins = conn.execute(
            sa.text(
                "SELECT DISTINCT CAST(xmin AS text) FROM effects UNION "
                "SELECT DISTINCT CAST(xmin AS text) FROM outbox_messages UNION "
                "SELECT DISTINCT CAST(xmin AS text) FROM outbox_inbox"
            )
        ).all()
        assert conn.execute(sa.text("SELECT count(*) FROM outbox_messages")).scalar() == 5
    assert len(xmins) == (5 if batch_size == 1 else 1)
    # Redelivered: the same messages again are duplicates, and the handler does not run.
    stats, source, _ = run(db_url, capture, messages, batch_size=batch_size)
    assert stats.processed == 0 and stats.duplicates == 5
    assert effect_ns(effects) == list(range(5)) and len(sessions) == 5
    assert source.committed == {("orders", 0): 5}


class Capture:
    """A handler object with an ``async def __call__``."""

    def __init__(self) -> None:
        self.sessions: list[Any] = []

    async def __call__(self, session: AsyncSession, m: IncomingMessage) -> None:
        self.sessions.append(session)
        await record(session, m)


async def record_as(session: AsyncSession, m: IncomingMessage, *, offset: int) -> None:
    await session.execute(INSERT, {"m": "partial", "n": n_of(m) + offset})


def test_a_partial_or_an_object_with_async_call_is_an_async_handler(
    effects: sa.Engine, db_url: str
) -> None:
    obj = Capture()
    run(db_url, obj, [message(0)], batch_size=1)
    assert [type(s) for s in obj.sessions] == [AsyncSession]
    run(db_url, functools.partial(record_as, offset=100), [message(1)], batch_size=1)
    assert effect_ns(effects) == [0, 101]


def test_an_async_on_expired_gets_an_async_session(effects: sa.Engine, db_url: str) -> None:
    m = message(0)
    past = format_deadline(datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc))
    headers = [*m.headers, (HEADER_DEADLINE, past)]
    expired = IncomingMessage(m.topic, m.partition, m.offset, m.key, m.value, headers)
    got: list[Any] = []

    async def on_expired(session: AsyncSession, msg: IncomingMessage) -> None:
        got.append(type(session))
        await record(session, msg)

    source = MemorySource([expired])
    stats = Consumer(
        ConsumerConfig(db_url=db_url, name="c"),
        lambda s, msg: pytest.fail("not the handler"),
        lambda: source,
        on_expired=on_expired,
    ).run(max_messages=1)
    assert got == [AsyncSession] and effect_ns(effects) == [0]
    assert stats.expired == 1 and stats.processed == 1 and stats.dead_lettered == 0


# -- batches ------------------------------------------------------------------------------------


@pytest.mark.parametrize("writes_first", [False, True])
def test_a_poison_message_in_the_middle_of_a_batch_rolls_back_only_its_own_work(
    effects: sa.Engine, db_url: str, writes_first: bool
) -> None:
    calls: collections.Counter[int] = collections.Counter()

    async def handler(session: AsyncSession, m: IncomingMessage) -> None:
        calls[n_of(m)] += 1
        if writes_first:
            await record(session, m)
        if n_of(m) == 5:
            raise PoisonMessage("bad order")
        if not writes_first:
            await record(session, m)

    stats, source, finished = run(db_url, handler, [message(n) for n in range(10)])
    assert effect_ns(effects) == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # once each, in order
    assert stats.processed == 9 and stats.dead_lettered == 1 and stats.failed_attempts == 0
    [headers] = dead_letters(effects)
    assert headers["dlq-reason"] == b"poison" and headers["dlq-original-offset"] == b"5"
    # A handler that failed before sending a statement (counted on the async connection too)
    # leaves the transaction as the prefix made it: the prefix commits as it is. One that
    # wrote first: the prefix runs again in a fresh transaction. The poison message runs once.
    assert [calls[n] for n in range(10)] == [2 if writes_first else 1] * 5 + [1] * 5
    assert source.committed == {("orders", 0): 10}
    assert finished.outcomes == [(n, "dead_lettered" if n == 5 else "processed") for n in range(10)]


def test_a_failing_message_is_retried_then_dead_lettered_after_max_attempts(
    effects: sa.Engine, db_url: str
) -> None:
    calls: collections.Counter[int] = collections.Counter()

    async def handler(session: AsyncSession, m: IncomingMessage) -> None:
        calls[n_of(m)] += 1
        await record(session, m)
        if n_of(m) == 2:
            raise ValueError("always")

    stats, _, _ = run(db_url, handler, [message(n) for n in range(5)], max_attempts=3)
    assert effect_ns(effects) == [0, 1, 3, 4]
    assert calls[2] == 3 and stats.failed_attempts == 3 and stats.dead_lettered == 1
    [headers] = dead_letters(effects)
    assert headers["dlq-reason"] == b"attempts" and headers["dlq-attempts"] == b"3"


def test_an_outage_opens_the_breaker_and_the_rest_comes_back_in_order(
    effects: sa.Engine, db_url: str
) -> None:
    calls: collections.Counter[int] = collections.Counter()

    async def handler(session: AsyncSession, m: IncomingMessage) -> None:
        calls[n_of(m)] += 1
        if n_of(m) == 4 and calls[4] <= 3:
            raise DownstreamUnavailable("payment provider answered 503")
        await record(session, m)

    stats, source, finished = run(db_url, handler, [message(n) for n in range(10)])
    assert effect_ns(effects) == list(range(10))
    assert stats.failed_attempts == 0 and stats.dead_lettered == 0
    assert stats.transient_failures == 3 and stats.breaker_opened == 1
    assert source.handed == list(range(10)) + list(range(4, 10))
    assert [n for n, _ in finished.outcomes] == list(range(10))
    assert source.committed == {("orders", 0): 10}


def test_an_async_batch_handler_is_one_transaction_and_bisected_to_the_failing_message(
    effects: sa.Engine, db_url: str
) -> None:
    calls: list[list[int]] = []
    xids: list[str] = []

    async def batch(session: AsyncSession, messages: list[IncomingMessage]) -> None:
        calls.append([n_of(m) for m in messages])
        xids.append((await session.execute(XID)).scalar_one())
        for m in messages:
            await record(session, m)
        if any(n_of(m) == 5 for m in messages):
            raise PoisonMessage("bad order")

    stats, source, finished = run(db_url, None, [message(n) for n in range(8)], batch_handler=batch)
    assert effect_ns(effects) == [0, 1, 2, 3, 4, 6, 7]
    assert calls == [list(range(8)), [0, 1, 2, 3], [4, 5, 6, 7], [4, 5], [4], [5], [6, 7]]
    assert stats.processed == 7 and stats.dead_lettered == 1
    assert [n for n, _ in finished.outcomes] == list(range(8))
    assert source.committed == {("orders", 0): 8}
    # The first call ran in one transaction for all eight, and redelivery skips them all.
    stats, _, _ = run(db_url, None, [message(n) for n in range(8)], batch_handler=batch)
    assert stats.duplicates == 8 and len(calls) == 7


# -- the session's commit, rollback and close ----------------------------------------------------


def rows_of(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT message_id FROM effects ORDER BY seq")).scalars())


async def write(session: AsyncSession, what: str) -> None:
    await session.execute(INSERT, {"m": what, "n": 0})


@pytest.mark.parametrize("batch_size", [1, 500])
def test_an_async_handler_that_commits_midway_and_then_fails_commits_nothing(
    effects: sa.Engine, db_url: str, batch_size: int
) -> None:
    calls = 0

    async def handler(session: AsyncSession, m: IncomingMessage) -> None:
        nonlocal calls
        calls += 1
        await write(session, f"first-{calls}")
        await session.commit()  # only flushes: the transaction is the consumer's
        if calls == 1:
            raise RuntimeError("the next statement fails")
        await write(session, f"second-{calls}")

    stats, _, _ = run(db_url, handler, [message(0)], batch_size=batch_size)
    assert stats.processed == 1 and stats.duplicates == 0 and stats.failed_attempts == 1
    assert rows_of(effects) == ["first-2", "second-2"]


@pytest.mark.parametrize("undo", ["rollback", "close"])
def test_an_async_handler_that_rolls_back_or_closes_fails_the_attempt(
    effects: sa.Engine, db_url: str, undo: str
) -> None:
    async def handler(session: AsyncSession, m: IncomingMessage) -> None:
        await write(session, "undone")
        await getattr(session, undo)()
        await write(session, "after")

    stats, source, _ = run(db_url, handler, [message(0)], batch_size=1, max_attempts=2)
    assert stats.processed == 0 and stats.dead_lettered == 1 and stats.failed_attempts == 2
    assert rows_of(effects) == []  # neither the undone write nor the one after it
    [headers] = dead_letters(effects)
    assert f"session.{undo}()".encode() in headers["dlq-error"]
    assert source.committed == {("orders", 0): 1}


@pytest.mark.parametrize("batch_size", [1, 500])
def test_a_plain_handler_that_returns_a_coroutine_fails_its_attempt(
    effects: sa.Engine, db_url: str, recwarn: pytest.WarningsRecorder, batch_size: int
) -> None:
    # A plain wrapper (a decorator) hides `async def`: the coroutine would never run, so
    # the message must not count as processed (before: processed, its effect lost).
    def hidden(session: Any, m: IncomingMessage) -> Any:
        return record(session, m)

    stats, _, _ = run(db_url, hidden, [message(0)], batch_size=batch_size, max_attempts=2)
    assert stats.processed == 0 and stats.failed_attempts == 2 and stats.dead_lettered == 1
    [headers] = dead_letters(effects)
    assert b"async def" in headers["dlq-error"]
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


# -- time limit ---------------------------------------------------------------------------------


def test_a_statement_past_the_limit_is_a_failed_attempt(effects: sa.Engine, db_url: str) -> None:
    async def sleepy(session: AsyncSession, m: IncomingMessage) -> None:
        await session.execute(sa.text("SELECT pg_sleep(3600)"))

    started = time.monotonic()
    stats, _, _ = run(
        db_url, sleepy, [message(0)], batch_size=1, handler_timeout=0.3, max_attempts=2
    )
    assert stats.failed_attempts == 2 and stats.dead_lettered == 1
    assert time.monotonic() - started < 30


@pytest.fixture
def exits() -> Iterator[list[int]]:
    codes: list[int] = []
    original = _Watchdog.exit
    _Watchdog.exit = staticmethod(codes.append)
    yield codes
    _Watchdog.exit = original


@pytest.mark.parametrize("batch_size", [1, 10])
def test_an_async_handler_stuck_outside_the_database_is_dead_lettered_then_the_process_exits(
    effects: sa.Engine, db_url: str, exits: list[int], batch_size: int
) -> None:
    release = threading.Event()

    async def hang_on_1(session: AsyncSession, m: IncomingMessage) -> None:
        if n_of(m) == 1:
            while not release.is_set():  # awaiting, as a stuck network call would
                await asyncio.sleep(0.02)
        await record(session, m)

    source = MemorySource([message(0), message(1), message(2)])
    c = Consumer(
        ConsumerConfig(db_url=db_url, name="c", handler_timeout=0.3, batch_size=batch_size),
        hang_on_1,
        lambda: source,
    )
    runner = threading.Thread(target=c.run, kwargs={"max_messages": 3}, daemon=True)
    runner.start()
    try:
        wait_until(lambda: exits, 15, "the watchdog to give up on the handler")
    finally:
        c.stop()
        release.set()
        runner.join(15)
    assert exits == [EXIT_HANDLER_HUNG]
    assert [h["dlq-original-offset"] for h in dead_letters(effects)] == [b"1"]
    if batch_size == 1:
        # Message 0 was committed on its own: its offset and message 1's are stored.
        assert source.committed == {("orders", 0): 2} and effect_ns(effects) == [0]
    else:
        # Message 0 waited in the batch's (terminated) transaction: nothing stored.
        assert source.committed == {} and effect_ns(effects) == []


# -- tracing, set-up errors ---------------------------------------------------------------------


def test_the_async_handler_runs_inside_the_process_span(
    effects: sa.Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans: InMemorySpanExporter = install(monkeypatch)
    current: list[int] = []

    async def handler(session: AsyncSession, m: IncomingMessage) -> None:
        current.append(trace.get_current_span().get_span_context().span_id)
        await record(session, m)

    run(db_url, handler, [message(0)], batch_size=1)
    [process] = named(spans.get_finished_spans(), "process orders")
    assert process.context is not None and current == [process.context.span_id]


def test_an_async_handler_without_greenlet_is_a_configuration_error(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "greenlet", None)  # import greenlet -> ImportError
    with pytest.raises(ConfigurationError) as caught:
        Consumer(ConsumerConfig(db_url=db_url, name="c"), record, MemorySource)
    assert str(caught.value) == NO_GREENLET
    Consumer(ConsumerConfig(db_url=db_url, name="c"), lambda s, m: None, MemorySource)  # sync: fine


def test_an_async_key_extractor_is_refused_in_one_line(db_url: str) -> None:
    async def key(message: Any) -> str:
        return "k"

    with pytest.raises(ConfigurationError, match="key extractor must be a plain function"):
        Consumer(ConsumerConfig(db_url=db_url, name="c"), record, MemorySource, key=key)  # type: ignore[arg-type]


def test_an_async_consumer_runs_in_a_thread_without_an_event_loop(db_url: str) -> None:
    consumer = Consumer(ConsumerConfig(db_url=db_url, name="c"), record, lambda: MemorySource([]))

    async def main() -> None:
        consumer.run(max_messages=1)

    with pytest.raises(ConfigurationError, match="runs its own event loop"):
        asyncio.run(main())

    async def in_a_thread() -> ConsumerStats:  # as the how-to says
        return await asyncio.to_thread(consumer.run, idle_timeout=0.1)

    assert asyncio.run(in_a_thread()).processed == 0


# -- the command --------------------------------------------------------------------------------

HOWTO = ROOT / "docs" / "howto.md"


def documented_handlers() -> str:
    """The how-to's async handler module (the ```python block that starts with its name)."""
    blocks = re.findall(r"```python\n(.*?)```", HOWTO.read_text(), flags=re.DOTALL)
    found = [b for b in blocks if b.startswith("# async_payments.py\n")]
    assert len(found) == 1, "docs/howto.md: no single block for async_payments.py"
    return str(found[0])


@pytest.fixture
def payments(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE payments (order_id text NOT NULL, amount numeric)"))
    return engine


@pytest.mark.parametrize("option", ["--handler", "--batch-handler"])
def test_the_command_takes_the_documented_async_handler(
    payments: sa.Engine, db_url: str, broker: Broker, tmp_path: Path, option: str
) -> None:
    (tmp_path / "async_payments.py").write_text(documented_handlers())
    topic = broker.create_topic(partitions=2)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for n in range(20):
        value = json.dumps({"order_id": f"o-{n}", "amount": n}).encode()
        producer.produce(topic, value=value, headers=[("message-id", f"m-{n}".encode())])
    assert producer.flush(10) == 0
    target = "capture_payment" if option == "--handler" else "record_payments"
    args = [
        "consume",
        *("--db-url", db_url, "--bootstrap-servers", broker.bootstrap, "--topic", topic),
        *("--redelivery-horizon-days", "7", "--app-dir", str(tmp_path)),
        *(option, f"async_payments:{target}"),
        *("--consumer-name", "payments"),  # the inbox's name, whatever the group
        *("-X", "session.timeout.ms=6000", "-X", "heartbeat.interval.ms=1000"),
    ]

    def captured() -> list[tuple[str, int]]:
        with payments.connect() as conn:
            rows = conn.execute(sa.text("SELECT order_id, amount FROM payments")).all()
            events = conn.execute(
                sa.text("SELECT convert_from(key, 'UTF8') FROM outbox_messages")
            ).scalars()
            assert sorted(events) == sorted(r[0] for r in rows)  # an event per payment
        return sorted((r[0], int(r[1])) for r in rows)

    done = run_cli("outbox", [*args, "--group", f"g-{topic}", "--idle-timeout", "2"], timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "processed 20, duplicates 0, dead-lettered 0"
    assert captured() == sorted((f"o-{n}", n) for n in range(20))
    # Read again by another group, with the same inbox: every message is a duplicate.
    again = run_cli("outbox", [*args, "--group", f"h-{topic}", "--idle-timeout", "2"], timeout=90)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.strip().splitlines()[-1] == "processed 0, duplicates 20, dead-lettered 0"
    assert captured() == sorted((f"o-{n}", n) for n in range(20))


def test_the_command_without_greenlet_says_so_in_one_line(
    db_url: str, broker: Broker, tmp_path: Path
) -> None:
    (tmp_path / "async_payments.py").write_text(documented_handlers())
    hidden = tmp_path / "no_greenlet" / "greenlet"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('greenlet is not installed')\n")
    done = run_cli(
        "outbox",
        [
            "consume",
            *("--db-url", db_url, "--bootstrap-servers", broker.bootstrap, "--topic", "t"),
            *("--group", "g", "--redelivery-horizon-days", "7", "--app-dir", str(tmp_path)),
            *("--handler", "async_payments:capture_payment"),
        ],
        env={"PYTHONPATH": str(hidden.parent)},
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    # SQLAlchemy 2.1 refuses to import sqlalchemy.ext.asyncio (the module's import fails);
    # 2.0 imports it, and the consumer refuses the async handler.
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith("which needs greenlet: install sqlalchemy-outbox[asyncio]")
    )
