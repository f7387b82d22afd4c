"""The inbox against a real PostgreSQL: a message's effects happen once per consumer, whatever
the redeliveries, including concurrent ones; idempotent commands replay their stored outcome;
expired keys are purged in short batches."""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from outbox import (
    Command,
    CommandInProgress,
    ConfigurationError,
    DatabaseError,
    IdempotencyKeyReused,
    Inbox,
    Outbox,
    OutboxError,
    PayloadError,
    TransactionConflict,
    migrate,
)
from tests.support.cli import run_cli
from tests.support.waits import wait_until

SCOPE = "POST /orders"
FP = "sha256:request-1"


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


@pytest.fixture
def effects(engine: sa.Engine) -> sa.Engine:
    """The handler's own table: one row per time the handler's effect happened."""
    with engine.begin() as conn:
        conn.execute(
            sa.text("CREATE TABLE effects (consumer text NOT NULL, key text NOT NULL, note text)")
        )
    return engine


def scalar(engine: sa.Engine, query: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.text(query), params).scalar()


def count(engine: sa.Engine, table: str) -> int:
    return int(scalar(engine, f"SELECT count(*) FROM {table}"))


def effect_keys(engine: sa.Engine) -> list[tuple[str, str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT consumer, key, note FROM effects ORDER BY note"))
        return [(r.consumer, r.key, r.note) for r in rows]


def handle(session: Session, inbox: Inbox, consumer: str, key: str, note: str = "") -> bool:
    """The handler pattern: claim the message and write its effect in the same transaction."""
    if not inbox.claim(session, consumer, key):
        return False
    session.execute(
        sa.text("INSERT INTO effects (consumer, key, note) VALUES (:c, :k, :n)"),
        {"c": consumer, "k": key, "n": note},
    )
    return True


def waiting_on_lock(engine: sa.Engine, pid: int | None) -> bool:
    """True while backend ``pid`` waits for a heavyweight lock (here: another transaction's
    id, which is how an INSERT waits on a concurrent insert of the same unique key)."""
    if pid is None:
        return False
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = :p"),
            {"p": pid},
        ).first()
    return row is not None and tuple(row) == ("Lock", "transactionid")


class Duplicate(threading.Thread):
    """Handles the same message on another thread, in its own transaction, and commits."""

    def __init__(
        self, engine: sa.Engine, inbox: Inbox, consumer: str, key: str, note: str = "b"
    ) -> None:
        super().__init__(daemon=True)
        self.engine, self.inbox, self.consumer, self.key, self.note = (
            engine,
            inbox,
            consumer,
            key,
            note,
        )
        self.pid: int | None = None
        self.result: bool | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Session(self.engine) as session, session.begin():
                self.pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
                session.execute(sa.text("SET LOCAL lock_timeout = '20s'"))
                self.result = handle(session, self.inbox, self.consumer, self.key, self.note)
        except BaseException as exc:
            self.error = exc


# -- claim: once per (consumer, key) ----------------------------------------------------------


def test_a_key_is_claimed_once(engine: sa.Engine, inbox: Inbox) -> None:
    results = []
    for _ in range(5):
        with Session(engine) as session, session.begin():
            results.append(inbox.claim(session, "billing", "m-1"))
    assert results == [True, False, False, False, False]
    assert count(engine, "outbox_inbox") == 1
    # Remembered for the inbox's retention (7 days by default), from the claim's transaction.
    assert scalar(engine, "SELECT expires_at - created_at FROM outbox_inbox") == (
        datetime.timedelta(days=7)
    )
    assert scalar(engine, "SELECT fingerprint IS NULL FROM outbox_inbox") is True

    # On a plain Connection too; another key is new.
    with engine.begin() as conn:
        assert inbox.claim(conn, "billing", "m-2") is True
        assert inbox.claim(conn, "billing", "m-2") is False  # same transaction
    assert count(engine, "outbox_inbox") == 2


def test_consumers_are_independent(engine: sa.Engine) -> None:
    inbox = Inbox(retention=datetime.timedelta(hours=1))
    with Session(engine) as session, session.begin():
        assert inbox.claim(session, "billing", "m-1") is True
        assert inbox.claim(session, "shipping", "m-1") is True
    with Session(engine) as session, session.begin():
        assert inbox.claim(session, "billing", "m-1") is False
        assert inbox.claim(session, "shipping", "m-1") is False
        assert inbox.claim(session, "audit", "m-1") is True
    assert count(engine, "outbox_inbox") == 3
    assert scalar(engine, "SELECT DISTINCT expires_at - created_at FROM outbox_inbox") == (
        datetime.timedelta(hours=1)
    )


def test_redelivered_message_has_one_effect(effects: sa.Engine, inbox: Inbox) -> None:
    ran = []
    for i in range(5):
        with Session(effects) as session, session.begin():
            ran.append(handle(session, inbox, "billing", "m-1", note=str(i)))
    assert ran == [True, False, False, False, False]
    assert effect_keys(effects) == [("billing", "m-1", "0")]


def test_a_rolled_back_claim_is_forgotten(effects: sa.Engine, inbox: Inbox) -> None:
    """A handler that fails leaves no key: the redelivery runs it again."""
    with pytest.raises(RuntimeError), Session(effects) as session, session.begin():
        assert handle(session, inbox, "billing", "m-1", note="failed")
        raise RuntimeError("handler failed")
    assert count(effects, "outbox_inbox") == 0
    with Session(effects) as session, session.begin():
        assert handle(session, inbox, "billing", "m-1", note="retried")
    assert effect_keys(effects) == [("billing", "m-1", "retried")]


# -- claim: concurrent duplicates -------------------------------------------------------------


@pytest.mark.parametrize("first", ["commit", "rollback"])
def test_concurrent_duplicate_waits_for_the_first(
    effects: sa.Engine, inbox: Inbox, session_a: Session, first: str
) -> None:
    """Two deliveries of one message at once: the second blocks on the first's uncommitted key
    until that transaction ends; it is skipped if the first committed and runs if the first
    rolled back. One effect either way."""
    assert handle(session_a, inbox, "billing", "m-1", note="a")
    b = Duplicate(effects, inbox, "billing", "m-1", note="b")
    b.start()
    wait_until(lambda: waiting_on_lock(effects, b.pid), what="B to wait for A's transaction")
    time.sleep(0.3)  # B keeps waiting while A's transaction is open
    assert b.is_alive() and b.result is None
    getattr(session_a, first)()
    b.join(10)
    assert not b.is_alive() and b.error is None
    if first == "commit":
        assert b.result is False
        assert effect_keys(effects) == [("billing", "m-1", "a")]
    else:
        assert b.result is True
        assert effect_keys(effects) == [("billing", "m-1", "b")]
    assert count(effects, "outbox_inbox") == 1


def test_concurrent_claims_of_other_keys_do_not_wait(
    engine: sa.Engine, inbox: Inbox, session_a: Session
) -> None:
    assert inbox.claim(session_a, "billing", "m-1")
    with Session(engine) as other, other.begin():
        other.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
        assert inbox.claim(other, "billing", "m-2") is True
        assert inbox.claim(other, "shipping", "m-1") is True
    session_a.commit()
    assert count(engine, "outbox_inbox") == 3


def test_repeatable_read_duplicate_is_a_serialization_failure(
    effects: sa.Engine, inbox: Inbox, session_a: Session
) -> None:
    """Under REPEATABLE READ, a duplicate whose snapshot predates the first delivery's commit
    cannot skip a row it cannot see: PostgreSQL raises a serialization failure (SQLSTATE
    40001), surfaced as a DatabaseError, and the transaction must be retried (where it then
    sees the key and skips)."""
    rr = effects.execution_options(isolation_level="REPEATABLE READ")
    assert handle(session_a, inbox, "billing", "m-1", note="a")
    b = Duplicate(rr, inbox, "billing", "m-1", note="b")
    b.start()
    wait_until(lambda: waiting_on_lock(effects, b.pid), what="B to wait for A's transaction")
    session_a.commit()
    b.join(10)
    assert isinstance(b.error, DatabaseError) and isinstance(b.error, OutboxError)
    assert "could not serialize" in str(b.error)
    # TransactionConflict (a DatabaseError) says to retry; the driver error is chained.
    assert isinstance(b.error, TransactionConflict)
    cause = b.error.__cause__
    assert getattr(getattr(cause, "orig", cause), "sqlstate", None) == "40001"
    # The retry, in a new transaction, sees the key.
    with Session(rr) as session, session.begin():
        assert handle(session, inbox, "billing", "m-1", note="b retried") is False
    assert effect_keys(effects) == [("billing", "m-1", "a")]

    # The same without any waiting: the snapshot was taken before the other commit.
    with Session(rr) as session, session.begin():
        session.execute(sa.text("SELECT 1"))  # takes the snapshot
        with Session(effects) as other, other.begin():
            assert handle(other, inbox, "billing", "m-2", note="c")
        with pytest.raises(DatabaseError, match="could not serialize"):
            inbox.claim(session, "billing", "m-2")
        session.rollback()

    # A rolled-back first delivery leaves nothing to conflict with: the duplicate runs.
    with Session(effects) as first:
        first.begin()
        assert handle(first, inbox, "billing", "m-3", note="d")
        b = Duplicate(rr, inbox, "billing", "m-3", note="e")
        b.start()
        wait_until(lambda: waiting_on_lock(effects, b.pid), what="B to wait for A's transaction")
        first.rollback()
    b.join(10)
    assert (b.error, b.result) == (None, True)
    assert effect_keys(effects) == [
        ("billing", "m-1", "a"),
        ("billing", "m-2", "c"),
        ("billing", "m-3", "e"),
    ]


# -- claim: with outbox events ----------------------------------------------------------------


def test_handler_publishes_events_in_the_same_transaction(effects: sa.Engine, inbox: Inbox) -> None:
    outbox = Outbox()

    def handler(session: Session, key: str, fail: bool = False) -> bool:
        if not handle(session, inbox, "billing", key, note=key):
            return False
        outbox.publish(session, "invoices", {"for": key}, key=key)
        if fail:
            raise RuntimeError("handler failed after publishing")
        return True

    with pytest.raises(RuntimeError), Session(effects) as session, session.begin():
        handler(session, "m-1", fail=True)
    assert count(effects, "outbox_inbox") == 0
    assert count(effects, "outbox_messages") == 0
    assert effect_keys(effects) == []

    for _ in range(3):
        with Session(effects) as session, session.begin():
            handler(session, "m-1")
    assert count(effects, "outbox_inbox") == 1
    assert scalar(effects, "SELECT convert_from(payload, 'UTF8') FROM outbox_messages") == (
        '{"for":"m-1"}'
    )
    assert count(effects, "outbox_messages") == 1
    assert effect_keys(effects) == [("billing", "m-1", "m-1")]


# -- claim: asyncio ---------------------------------------------------------------------------


def test_async_claim(effects: sa.Engine, db_url: str, inbox: Inbox) -> None:
    async def main() -> list[bool]:
        aengine = create_async_engine(db_url)
        try:
            results = []
            for _ in range(5):
                async with AsyncSession(aengine) as session, session.begin():
                    results.append(await inbox.aclaim(session, "billing", "m-1"))
            # Rolled back: forgotten.
            async with AsyncSession(aengine) as session, session.begin():
                assert await inbox.aclaim(session, "billing", "m-2") is True
                await session.rollback()
            async with aengine.begin() as conn:  # AsyncConnection
                results.append(await inbox.aclaim(conn, "billing", "m-2"))
                results.append(await inbox.aclaim(conn, "billing", "m-2"))
            with pytest.raises(PayloadError):
                async with aengine.begin() as conn:
                    await inbox.aclaim(conn, "billing", "")
            return results
        finally:
            await aengine.dispose()

    assert asyncio.run(main()) == [True, False, False, False, False, True, False]
    assert count(effects, "outbox_inbox") == 2


# -- commands ---------------------------------------------------------------------------------


def begin(session: Session | sa.Connection, inbox: Inbox, key: str = "k-1", **kw: Any) -> Command:
    return inbox.command(session, SCOPE, key, kw.pop("fingerprint", FP), **kw)


def test_completed_command_replays_its_outcome(effects: sa.Engine, inbox: Inbox) -> None:
    with Session(effects) as session, session.begin():
        cmd = begin(session, inbox)
        assert (cmd.replay, cmd.status, cmd.body) == (False, None, None)
        handle(session, inbox, "orders", "k-1", note="created")
        cmd.complete(session, 201, b'{"id": 1}')
        assert (cmd.status, cmd.body) == (201, b'{"id": 1}')

    for _ in range(3):
        with Session(effects) as session, session.begin():
            cmd = begin(session, inbox)
            assert (cmd.replay, cmd.status, cmd.body) == (True, 201, b'{"id": 1}')
            with pytest.raises(OutboxError, match="replayed"):
                cmd.complete(session, 500, b"overwrite")
    assert effect_keys(effects) == [("orders", "k-1", "created")]
    with effects.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT consumer, key, fingerprint, response_status, response_body, "
                "expires_at - created_at AS ttl FROM outbox_inbox WHERE consumer = :s"
            ),
            {"s": SCOPE},
        ).one()
    assert tuple(row) == (SCOPE, "k-1", FP, 201, b'{"id": 1}', datetime.timedelta(hours=24))

    # A command committed without complete() replays "no stored outcome".
    with effects.begin() as conn:
        assert begin(conn, inbox, "k-2").replay is False
    with effects.begin() as conn:
        cmd = begin(conn, inbox, "k-2")
    assert (cmd.scope, cmd.key, cmd.replay, cmd.status, cmd.body) == (
        SCOPE,
        "k-2",
        True,
        None,
        None,
    )


def test_concurrent_command_is_in_progress(
    engine: sa.Engine, inbox: Inbox, session_a: Session
) -> None:
    """While the first request's transaction is open, a duplicate fails at once (no waiting)
    with CommandInProgress; after the commit it replays; after a rollback it runs."""
    cmd = begin(session_a, inbox)
    assert not cmd.replay
    with Session(engine) as other, other.begin():
        other.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
        start = time.monotonic()
        with pytest.raises(CommandInProgress) as info:
            begin(other, inbox)
        assert time.monotonic() - start < 1.0
        assert isinstance(info.value, OutboxError)
        # Another key or scope is not held up.
        assert not begin(other, inbox, "k-2").replay
        assert not inbox.command(other, "POST /refunds", "k-1", FP).replay
        # The duplicate's transaction is still usable.
        other.execute(sa.text("SELECT 1"))
    cmd.complete(session_a, 200, b"done")
    session_a.commit()
    with Session(engine) as other, other.begin():
        replay = begin(other, inbox)
    assert (replay.replay, replay.status, replay.body) == (True, 200, b"done")

    # The first rolls back: the duplicate that comes next runs.
    with Session(engine) as first:
        first.begin()
        assert not begin(first, inbox, "k-3").replay
        with Session(engine) as other, other.begin(), pytest.raises(CommandInProgress):
            begin(other, inbox, "k-3")
        first.rollback()
    with Session(engine) as other, other.begin():
        assert not begin(other, inbox, "k-3").replay


def test_key_reused_for_another_request(engine: sa.Engine, inbox: Inbox) -> None:
    with Session(engine) as session, session.begin():
        begin(session, inbox).complete(session, 201, b"created")
    with Session(engine) as session, session.begin():
        with pytest.raises(IdempotencyKeyReused) as info:
            begin(session, inbox, fingerprint="sha256:another-request")
        assert isinstance(info.value, OutboxError)
        # Nothing was overwritten; the same request still replays.
        assert begin(session, inbox).status == 201
    assert scalar(engine, "SELECT fingerprint FROM outbox_inbox") == FP


def test_rolled_back_command_stores_nothing(effects: sa.Engine, inbox: Inbox) -> None:
    with pytest.raises(RuntimeError), Session(effects) as session, session.begin():
        cmd = begin(session, inbox)
        handle(session, inbox, "orders", "k-1", note="failed")
        cmd.complete(session, 500, b"boom")
        raise RuntimeError("rolled back")
    assert count(effects, "outbox_inbox") == 0
    # A retry, even with another fingerprint, runs.
    with Session(effects) as session, session.begin():
        cmd = begin(session, inbox, fingerprint="sha256:fixed-request")
        assert not cmd.replay
        handle(session, inbox, "orders", "k-1", note="retried")
        cmd.complete(session, 201)
    assert effect_keys(effects) == [("orders", "k-1", "retried")]
    with Session(effects) as session, session.begin():
        assert (begin(session, inbox, fingerprint="sha256:fixed-request").status) == 201


def test_expired_command_runs_again(engine: sa.Engine, inbox: Inbox) -> None:
    ttl = datetime.timedelta(milliseconds=300)
    with Session(engine) as session, session.begin():
        begin(session, inbox, ttl=ttl).complete(session, 201, b"first")
    assert scalar(engine, "SELECT expires_at - created_at FROM outbox_inbox") == ttl
    with Session(engine) as session, session.begin():
        assert begin(session, inbox, ttl=ttl).replay
    time.sleep(0.4)
    with Session(engine) as session, session.begin():
        # Expired: runs again, and may now be another request.
        cmd = begin(session, inbox, fingerprint="sha256:new", ttl=ttl)
        assert (cmd.replay, cmd.status, cmd.body) == (False, None, None)
        cmd.complete(session, 202, b"second")
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT fingerprint, response_status, response_body FROM outbox_inbox")
        ).one()
    assert tuple(row) == ("sha256:new", 202, b"second")

    # The same, by moving the expiry into the past: the old outcome is cleared.
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE outbox_inbox SET expires_at = now() - interval '1 second'"))
    with Session(engine) as session, session.begin():
        cmd = begin(session, inbox)
        assert not cmd.replay
    assert scalar(engine, "SELECT response_status FROM outbox_inbox") is None
    assert scalar(engine, "SELECT expires_at > now() + interval '23 hours' FROM outbox_inbox")


def test_async_commands(engine: sa.Engine, db_url: str, inbox: Inbox) -> None:
    async def main() -> None:
        aengine = create_async_engine(db_url)
        try:
            async with AsyncSession(aengine) as session, session.begin():
                cmd = await inbox.acommand(session, SCOPE, "k-1", FP)
                assert not cmd.replay
                # Concurrent duplicate, on another connection.
                async with aengine.connect() as other:
                    with pytest.raises(CommandInProgress):
                        await inbox.acommand(other, SCOPE, "k-1", FP)
                await cmd.acomplete(session, 201, b"async")
            async with aengine.begin() as conn:  # AsyncConnection
                replay = await inbox.acommand(conn, SCOPE, "k-1", FP)
                assert (replay.replay, replay.status, replay.body) == (True, 201, b"async")
                with pytest.raises(OutboxError, match="replayed"):
                    await replay.acomplete(conn, 200)
                with pytest.raises(IdempotencyKeyReused):
                    await inbox.acommand(conn, SCOPE, "k-1", "other")
        finally:
            await aengine.dispose()

    asyncio.run(main())
    assert scalar(engine, "SELECT response_body FROM outbox_inbox") == b"async"


def test_bad_input_is_refused_before_anything_is_written(engine: sa.Engine, inbox: Inbox) -> None:
    with Session(engine) as session, session.begin():
        bad: list[dict[str, Any]] = [
            {"key": ""},
            {"key": "k" * 513},
            {"scope": ""},
            {"fingerprint": b"bytes"},
            {"fingerprint": None},
            {"ttl": datetime.timedelta(0)},
            {"ttl": datetime.timedelta(seconds=-1)},
        ]
        for case in bad:
            args = {"scope": SCOPE, "key": "k", "fingerprint": FP, **case}
            ttl = args.pop("ttl", datetime.timedelta(hours=1))
            with pytest.raises(PayloadError):
                inbox.command(session, args["scope"], args["key"], args["fingerprint"], ttl=ttl)
        for consumer, key in [("", "k"), ("c", ""), ("c", "k" * 513), ("c", 5)]:
            with pytest.raises(PayloadError):
                inbox.claim(session, consumer, key)  # type: ignore[arg-type]
        # The longest key is fine; the transaction is still usable.
        assert not begin(session, inbox, "k" * 512).replay
        assert inbox.claim(session, "c", "k" * 512)
    assert count(engine, "outbox_inbox") == 2
    # A bad retention is the application's configuration, not a message's input.
    for retention in (datetime.timedelta(0), datetime.timedelta(days=-1)):
        with pytest.raises(ConfigurationError, match="retention must be positive"):
            Inbox(retention=retention)


# -- purge ------------------------------------------------------------------------------------


def add_keys(engine: sa.Engine, n: int, *, expired: bool, table: str = "outbox_inbox") -> None:
    expires = "now() - interval '1 second'" if expired else "now() + interval '1 hour'"
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO {table} (consumer, key, expires_at) "
                f"SELECT 'c', :prefix || i, {expires} FROM generate_series(1, :n) AS i"
            ),
            {"prefix": "expired-" if expired else "live-", "n": n},
        )


@pytest.fixture
def deletes(db_url: str) -> Iterator[tuple[sa.Engine, list[str]]]:
    """An engine that records the DELETE statements it sends."""
    eng = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    seen: list[str] = []

    @sa.event.listens_for(eng, "before_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            seen.append(statement)

    yield eng, seen
    eng.dispose()


def test_purge_deletes_expired_keys_in_batches(
    engine: sa.Engine, inbox: Inbox, deletes: tuple[sa.Engine, list[str]]
) -> None:
    eng, seen = deletes
    add_keys(engine, 25, expired=True)
    add_keys(engine, 7, expired=False)
    with eng.connect() as conn:
        assert inbox.purge(conn, batch_size=10) == 25
        assert not conn.in_transaction()  # each batch committed
    assert len(seen) == 3  # 10, 10, 5
    assert count(engine, "outbox_inbox") == 7
    assert scalar(engine, "SELECT bool_and(key LIKE 'live-%') FROM outbox_inbox") is True

    seen.clear()
    add_keys(engine, 20, expired=True)
    with eng.connect() as conn:
        assert inbox.purge(conn, batch_size=10) == 20
        assert inbox.purge(conn) == 0
    assert len(seen) == 3 + 1  # 10, 10, 0; then 0
    assert count(engine, "outbox_inbox") == 7

    with eng.connect() as conn:
        for batch_size in (0, -1):
            with pytest.raises(PayloadError):
                inbox.purge(conn, batch_size=batch_size)


def test_purge_skips_a_key_that_is_being_reused(
    engine: sa.Engine, inbox: Inbox, session_a: Session
) -> None:
    """An expired command key being run again (its row locked by the open transaction) is
    neither waited for nor deleted."""
    with Session(engine) as session, session.begin():
        begin(session, inbox).complete(session, 201)
    add_keys(engine, 3, expired=True)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE outbox_inbox SET expires_at = now() - interval '1 second'"))
    assert not begin(session_a, inbox).replay  # the expired key runs again, row locked
    with engine.connect() as conn:
        conn.execute(sa.text("SET lock_timeout = '2s'"))
        conn.commit()
        assert inbox.purge(conn) == 3
    session_a.commit()
    assert count(engine, "outbox_inbox") == 1
    with Session(engine) as session, session.begin():
        assert begin(session, inbox).replay


def _cli(*args: str) -> tuple[int, str, str]:
    result = run_cli("outbox", args, in_process=True)
    return result.returncode, result.stdout, result.stderr


def test_cli_purge(engine: sa.Engine, db_url: str) -> None:
    add_keys(engine, 12, expired=True)
    add_keys(engine, 2, expired=False)
    code, out, _ = _cli("inbox", "purge", "--db-url", db_url, "--batch-size", "5")
    assert (code, out) == (0, "purged 12 expired inbox keys\n")
    assert count(engine, "outbox_inbox") == 2
    code, out, _ = _cli("inbox", "purge", "--db-url", db_url)
    assert (code, out) == (0, "purged 0 expired inbox keys\n")


def test_cli_purge_custom_names(empty_db_url: str) -> None:
    names: dict[str, Any] = {"table": "events_out", "schema": "msg", "inbox_table": "dedup"}
    migrate.upgrade(empty_db_url, **names)
    eng = sa.create_engine(empty_db_url, poolclass=sa.pool.NullPool)
    try:
        add_keys(eng, 4, expired=True, table="msg.dedup")
        add_keys(eng, 1, expired=False, table="msg.dedup")
        code, out, _ = _cli(
            "inbox",
            "purge",
            "--db-url",
            empty_db_url,
            "--table",
            "events_out",
            "--schema",
            "msg",
            "--inbox-table",
            "dedup",
        )
        assert (code, out) == (0, "purged 4 expired inbox keys\n")
        assert count(eng, "msg.dedup") == 1
        # The same Inbox through the API.
        with Session(eng) as session, session.begin():
            assert Inbox(Outbox(**names)).claim(session, "c", "m-1") is True
        assert count(eng, "msg.dedup") == 2
    finally:
        eng.dispose()
    # Wrong names: the tables are missing, a usage error.
    code, out, err = _cli("inbox", "purge", "--db-url", empty_db_url)
    assert (code, out) == (2, "")
    assert "outbox db upgrade" in err
