"""The relay keeps running through database errors that are not a lost connection (lock and
statement timeouts), keeping its session and leadership, and never sends an acknowledged
message again while it waits. It used to exit 1 on the first one."""

from __future__ import annotations

import threading
from urllib.parse import quote

import psycopg
import sqlalchemy as sa

from outbox import RelayObserver
from outbox.transport.memory import MemoryTransport
from tests.support.relay import Running, count_rows, make_relay, publish
from tests.support.waits import wait_until


class Errors(RelayObserver):
    def __init__(self) -> None:
        self.statement_errors: list[str] = []
        self.lost = 0
        self.leaderships: list[bool] = []

    def database_error(self, reason: str, retry_in: float) -> None:
        self.statement_errors.append(reason)

    def database_lost(self, reason: str, abandoned: int, retry_in: float) -> None:
        self.lost += 1

    def leadership(self, leader: bool) -> None:
        self.leaderships.append(leader)


def with_lock_timeout(db_url: str, ms: int) -> str:
    return f"{db_url}?options={quote(f'-c lock_timeout={ms}')}"


def dsn(db_url: str) -> str:
    return db_url.replace("postgresql+psycopg", "postgresql")


def test_a_mark_that_times_out_is_retried_and_nothing_is_sent_twice(
    engine: sa.Engine, db_url: str
) -> None:
    specs = [(f"k{i % 3}", f"v{i}") for i in range(10)]
    publish(engine, specs)
    errors = Errors()
    transport = MemoryTransport()
    relay = make_relay(
        with_lock_timeout(db_url, 100), transport, observers=[errors], db_backoff_max=0.2
    )
    with psycopg.connect(dsn(db_url)) as blocker:
        # A row lock on the first message: the relay sends and the broker acknowledges all
        # ten, but deleting them waits for this transaction and hits lock_timeout.
        blocker.execute("SELECT id FROM outbox_messages ORDER BY id LIMIT 1 FOR UPDATE")
        with Running(relay) as running:
            wait_until(lambda: len(errors.statement_errors) >= 2, 15, "marks timing out")
            assert running.check_alive()
            blocker.rollback()
            wait_until(lambda: count_rows(engine) == 0 and running.check_alive(), 15, "marked")
            stats = running.stop()
    assert stats.sent == 10
    assert sorted(m.value or b"" for m in transport.sent) == sorted(v.encode() for _, v in specs)
    assert errors.lost == 0 and errors.leaderships == [True, False]
    assert all("lock timeout" in e for e in errors.statement_errors), errors.statement_errors


def test_a_locked_table_at_start_and_while_claiming_is_waited_out(
    engine: sa.Engine, db_url: str
) -> None:
    publish(engine, [("k", f"v{i}") for i in range(5)])
    errors = Errors()
    transport = MemoryTransport()
    relay = make_relay(
        with_lock_timeout(db_url, 50), transport, observers=[errors], db_backoff_max=0.2
    )
    release = threading.Event()

    def hold_table() -> None:
        with psycopg.connect(dsn(db_url)) as blocker:
            blocker.execute("LOCK TABLE outbox_messages IN ACCESS EXCLUSIVE MODE")
            release.wait(10)

    holder = threading.Thread(target=hold_table)
    holder.start()
    try:
        wait_until(lambda: _locked(db_url), 10, "the table locked")
        with Running(relay) as running:
            wait_until(lambda: len(errors.statement_errors) >= 2, 15, "statements timing out")
            assert running.check_alive()
            release.set()
            holder.join(10)
            wait_until(lambda: count_rows(engine) == 0 and running.check_alive(), 15, "sent")
            stats = running.stop()
    finally:
        release.set()
        holder.join(10)
    assert stats.sent == 5 and [m.value for m in transport.sent] == [
        f"v{i}".encode() for i in range(5)
    ]


def _locked(db_url: str) -> bool:
    with psycopg.connect(dsn(db_url)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE relation = 'outbox_messages'::regclass "
            "AND mode = 'AccessExclusiveLock' AND granted"
        ).fetchone()
    return bool(row and row[0])
