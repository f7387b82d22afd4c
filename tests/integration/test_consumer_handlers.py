"""A handler cannot half-apply a message: its own session.commit() joins the runner's
transaction (a savepoint), and session.rollback() / close() fail the attempt instead of
committing the inbox key without the writes they undid. Handler failures are logged with
their traceback. (The runner on an in-memory source; the database is real.)"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox.consumer import Consumer, ConsumerConfig
from outbox.logs import JsonFormatter
from outbox.transport.base import IncomingMessage
from outbox.transport.memory import MemorySource
from tests.support.incoming import message


@pytest.fixture
def writes(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE writes (what text NOT NULL)"))
    return engine


def run(db_url: str, handler: Any, *messages: IncomingMessage, attempts: int = 3) -> Any:
    config = ConsumerConfig(
        db_url=db_url, name="c", max_attempts=attempts, retry_backoff_base=0.001
    )
    source = MemorySource(list(messages or [message()]))
    return Consumer(config, handler, lambda: source, rng=random.Random(1)).run(
        max_messages=len(messages or [message()])
    )


def rows(engine: sa.Engine, table: str = "writes") -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text(f"SELECT what FROM {table} ORDER BY what"))]


def inbox_keys(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT key FROM outbox_inbox"))]


def write(session: Session, what: str) -> None:
    session.execute(sa.text("INSERT INTO writes (what) VALUES (:w)"), {"w": what})


def test_a_handler_that_commits_midway_and_then_fails_commits_nothing(
    writes: sa.Engine, db_url: str
) -> None:
    calls = 0

    def handler(session: Session, msg: IncomingMessage) -> None:
        nonlocal calls
        calls += 1
        write(session, f"first-{calls}")
        session.commit()  # only ends the handler's savepoint
        if calls == 1:
            raise RuntimeError("the next statement fails")
        write(session, f"second-{calls}")

    stats = run(db_url, handler)
    # Before: first-1 and the inbox key committed, the retry was skipped as a duplicate and
    # the second write never happened.
    assert stats.processed == 1 and stats.duplicates == 0 and stats.failed_attempts == 1
    assert rows(writes) == ["first-2", "second-2"]
    assert inbox_keys(writes) == ["m-0"]


def test_a_handler_that_commits_and_succeeds_commits_once(writes: sa.Engine, db_url: str) -> None:
    def handler(session: Session, msg: IncomingMessage) -> None:
        write(session, "a")
        session.commit()
        write(session, "b")
        session.commit()

    assert run(db_url, handler).processed == 1
    assert rows(writes) == ["a", "b"]


@pytest.mark.parametrize("undo", ["rollback", "close"])
def test_a_handler_that_rolls_back_or_closes_fails_the_attempt(
    writes: sa.Engine, db_url: str, undo: str, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(session: Session, msg: IncomingMessage) -> None:
        write(session, "undone")
        getattr(session, undo)()
        write(session, "after")

    caplog.set_level(logging.WARNING, logger="outbox.consumer")
    stats = run(db_url, handler, attempts=2)
    assert stats.processed == 0 and stats.dead_lettered == 1 and stats.failed_attempts == 2
    assert rows(writes) == []  # neither the undone write nor the one after it
    retry = next(r for r in caplog.records if getattr(r, "event", "") == "consumer.retry")
    assert f"session.{undo}()" in retry.getMessage() + str(getattr(retry, "error", ""))


def test_handler_failures_are_logged_with_their_traceback(
    engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(session: Session, msg: IncomingMessage) -> None:
        json.loads(msg.value or b"")["id"]  # KeyError: 'id'

    caplog.set_level(logging.WARNING, logger="outbox.consumer")
    run(db_url, handler, attempts=2)
    events = {getattr(r, "event", ""): r for r in caplog.records}
    for name in ("consumer.retry", "consumer.dead_lettered"):
        record = events[name]
        assert record.exc_info is not None and record.exc_info[0] is KeyError
        assert (record.topic, record.partition, record.offset) == ("orders", 0, 0)  # type: ignore[attr-defined]
        assert record.key == "m-0"  # type: ignore[attr-defined]
        line = json.loads(JsonFormatter().format(record))
        assert line["event"] == name
        assert "Traceback" in line["exc"] and "KeyError: 'id'" in line["exc"]
