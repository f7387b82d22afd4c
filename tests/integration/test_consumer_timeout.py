"""A handler's time limit: its statements are cancelled at the limit (a failed attempt, not
a database outage), and a handler stuck outside the database gets its message dead-lettered
before the process exits for its supervisor (the exit is replaced here; the real command's
exit status is tested in tests/acceptance/test_consumer_hang.py)."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from outbox.consumer import EXIT_HANDLER_HUNG, Consumer, ConsumerConfig, _Watchdog
from outbox.transport.memory import MemorySource
from tests.support import handlers
from tests.support.incoming import message
from tests.support.waits import wait_until


def consumer(db_url: str, source: MemorySource, handler: object, **config: object) -> Consumer:
    return Consumer(
        ConsumerConfig(db_url=db_url, name="c", retry_backoff_base=0.001, **config),  # type: ignore[arg-type]
        handler,  # type: ignore[arg-type]
        lambda: source,
        rng=random.Random(1),
    )


def dead_letters(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT topic FROM outbox_messages"))]


def test_a_statement_past_the_limit_is_a_failed_attempt(engine: sa.Engine, db_url: str) -> None:
    source = MemorySource([message(0)])
    c = consumer(db_url, source, handlers.hang_in_database, handler_timeout=0.3, max_attempts=2)
    stats = c.run(max_messages=1)
    # Before: the cancelled statement counted as a database outage, retried forever.
    assert stats.failed_attempts == 2 and stats.dead_lettered == 1
    assert dead_letters(engine) == ["orders.dlq"]
    assert source.committed == {("orders", 0): 1}


@pytest.fixture
def exits() -> Iterator[list[int]]:
    codes: list[int] = []
    original = _Watchdog.exit
    _Watchdog.exit = staticmethod(codes.append)
    handlers.release_hang.clear()
    yield codes
    _Watchdog.exit = original
    handlers.release_hang.set()


def test_a_handler_stuck_outside_the_database_is_dead_lettered_then_the_process_exits(
    effects: sa.Engine, db_url: str, exits: list[int]
) -> None:
    source = MemorySource([message(0), message(1), message(2)])
    # One transaction per message (a batch: tests/integration/test_consumer_batch.py).
    c = consumer(db_url, source, handlers.hang_in_python, handler_timeout=0.3, batch_size=1)
    runner = threading.Thread(target=c.run, kwargs={"max_messages": 3}, daemon=True)
    runner.start()
    wait_until(lambda: exits, 15, "the watchdog to give up on the handler")
    assert exits == [EXIT_HANDLER_HUNG]
    # Before exiting: message 1 dead-lettered, its offset committed (a restart skips it).
    assert dead_letters(effects) == ["orders.dlq"]
    assert source.committed == {("orders", 0): 2}
    c.stop()
    handlers.release_hang.set()
    runner.join(15)
    with effects.connect() as conn:
        done = sorted(r[0] for r in conn.execute(sa.text("SELECT n FROM effects")))
    # Message 0 done; the released hung attempt wrote nothing (its session was ended), and
    # the stopped consumer never reached message 2.
    assert done == [0]


@pytest.fixture
def effects(engine: sa.Engine) -> sa.Engine:
    return handlers.create_effects_table(engine)
