"""The wake-up protocol: writers notify the relay only when it may be asleep (a NOTIFY
serializes committing writers). A relay dozes under an exclusive lock that writers take
shared; one of this version leads under a second lock, so that writers keep notifying older
relays (see ``statements.wake_if_asleep``)."""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, define_tables, statements
from outbox import relay as relay_module
from outbox.transport.memory import MemoryTransport
from tests.support.relay import Running, by_key, count_rows, make_relay, publish
from tests.support.waits import wait_until

TABLES = define_tables()


def libpq(db_url: str) -> str:
    """The test database's URL for psycopg itself."""
    return db_url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture
def listener(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A session that listens on the relay's channel, as an older relay does."""
    with psycopg.connect(libpq(db_url), autocommit=True) as conn:
        conn.execute(f"LISTEN {TABLES.channel}")
        yield conn


@pytest.fixture
def relay_locks(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A session that takes the relay's locks the way a relay of this version does."""
    with psycopg.connect(libpq(db_url), autocommit=True) as conn:
        yield conn


def notified(conn: psycopg.Connection[Any], wait: float = 0.5) -> int:
    return sum(1 for _ in conn.notifies(timeout=wait))


def lock(conn: psycopg.Connection[Any], lock_id: int) -> None:
    assert conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_id,)).fetchone() == (True,)


def publish_one(engine: sa.Engine, outbox: Outbox, key: str = "k") -> None:
    with Session(engine) as s, s.begin():
        outbox.publish(s, "t", {"n": 1}, key=key)


@pytest.mark.parametrize("at_commit", [False, True], ids=["default", "at_commit"])
def test_writers_notify_when_no_relay_of_this_version_leads(
    engine: sa.Engine, listener: psycopg.Connection[Any], at_commit: bool
) -> None:
    """No relay, or an older one (it takes neither lock): every commit notifies, as before."""
    outbox = Outbox(at_commit=at_commit)
    publish_one(engine, outbox)
    publish_one(engine, outbox, key="other")
    with Session(engine) as s, s.begin():
        outbox.publish_many(s, [])  # nothing written: no notification either
    assert notified(listener) == 2


@pytest.mark.parametrize("at_commit", [False, True], ids=["default", "at_commit"])
def test_writers_do_not_notify_an_awake_relay_and_do_notify_a_dozing_one(
    engine: sa.Engine,
    listener: psycopg.Connection[Any],
    relay_locks: psycopg.Connection[Any],
    at_commit: bool,
) -> None:
    outbox = Outbox(at_commit=at_commit)
    lock(relay_locks, TABLES.leading_lock_id)
    publish_one(engine, outbox)
    assert notified(listener) == 0  # leading and awake: it claims again by itself
    lock(relay_locks, TABLES.dozing_lock_id)
    publish_one(engine, outbox)
    assert notified(listener) == 1
    relay_locks.execute("SELECT pg_advisory_unlock(%s)", (TABLES.dozing_lock_id,))
    publish_one(engine, outbox)
    assert notified(listener) == 0


def test_a_relay_cannot_doze_while_a_writer_that_did_not_notify_is_in_flight(
    engine: sa.Engine, relay_locks: psycopg.Connection[Any]
) -> None:
    """The writer holds the dozing lock shared from its insert to its commit: the relay's
    last claim, after it took the lock, sees that writer's rows."""
    lock(relay_locks, TABLES.leading_lock_id)
    with Session(engine) as s, s.begin():
        Outbox().publish(s, "t", {"n": 1}, key="k")
        got = relay_locks.execute(
            "SELECT pg_try_advisory_lock(%s)", (TABLES.dozing_lock_id,)
        ).fetchone()
        assert got == (False,)
    got = relay_locks.execute("SELECT pg_try_advisory_lock(%s)", (TABLES.dozing_lock_id,))
    assert got.fetchone() == (True,)


def test_a_relay_claims_once_more_after_it_dozed(engine: sa.Engine, db_url: str) -> None:
    """The race the protocol closes: a writer inserts while the relay is awake (so it will
    not notify), the relay finds nothing and waits to doze, the writer commits, the relay
    takes the lock. Only its last claim can find that row: the fallback poll is a minute."""
    transport = MemoryTransport()
    relay = make_relay(db_url, transport, poll_interval=60.0)
    dsn = libpq(db_url)
    with Running(relay), psycopg.connect(dsn) as awake:
        wait_until(lambda: relay.is_leader, 10, "the relay to lead")
        for i in range(5):
            # Keep the relay awake the way a writer in flight does: wait for the lock
            # shared while a commit wakes the relay from its doze.
            grabbed = threading.Thread(
                target=awake.execute,
                args=("SELECT pg_advisory_xact_lock_shared(%s)", (TABLES.dozing_lock_id,)),
            )
            grabbed.start()
            publish(engine, [("wake", f"w{i}")])
            grabbed.join(10)
            # Not woken, the relay would keep the lock: fail here rather than hang in commit()
            # below, which waits for the connection the thread still uses.
            assert not grabbed.is_alive(), "the relay kept the dozing lock though notified"
            with Session(engine) as s, s.begin():
                Outbox().publish(s, "t", f"m{i}", key="k")
                awake.commit()  # now only this writer keeps the relay awake
                time.sleep(0.2)  # the relay claims, finds nothing, waits for the lock
            expected = i + 1
            wait_until(lambda: len(by_key(transport.sent).get("k", [])) == expected, 10, f"m{i}")
    assert by_key(transport.sent)["k"] == [f"m{i}" for i in range(5)]


def test_a_long_open_writer_does_not_stall_other_writers_messages(
    engine: sa.Engine, db_url: str
) -> None:
    """A transaction that published and stays open keeps the relay from dozing; the relay
    claims again in short, growing intervals meanwhile, so other writers' commits (which do
    not notify) still go out at once."""
    transport = MemoryTransport()
    relay = make_relay(db_url, transport, poll_interval=60.0)
    release = threading.Event()
    opened = threading.Event()

    def long_writer() -> None:
        with Session(engine) as s, s.begin():
            Outbox().publish(s, "t", "long", key="slow")
            opened.set()
            release.wait(30)

    with Running(relay):
        wait_until(lambda: relay.is_leader, 10, "the relay to lead")
        t = threading.Thread(target=long_writer)
        t.start()
        try:
            assert opened.wait(10)
            for i in range(3):
                time.sleep(0.3)
                started = time.monotonic()
                publish(engine, [("fast", f"f{i}")])
                expected = i + 1
                wait_until(lambda: len(transport.sent) == expected, 10, f"f{i} sent")
                # Well within the fallback poll; the growing interval is capped at 50 ms.
                assert time.monotonic() - started < 2.0
        finally:
            release.set()
            t.join(10)
        wait_until(lambda: count_rows(engine) == 0, 10, "the long writer's message sent")
    assert by_key(transport.sent) == {"fast": ["f0", "f1", "f2"], "slow": ["long"]}


def test_a_leading_relay_holds_the_leading_lock_and_dozes_when_idle(
    engine: sa.Engine, db_url: str, relay_locks: psycopg.Connection[Any]
) -> None:
    transport = MemoryTransport()
    relay = make_relay(db_url, transport, poll_interval=60.0)
    with Running(relay):
        wait_until(lambda: relay.is_leader, 10, "the relay to lead")

        def held(lock_id: int) -> bool:
            row = relay_locks.execute(
                "SELECT pg_try_advisory_lock_shared(%s)", (lock_id,)
            ).fetchone()
            if row == (True,):
                relay_locks.execute("SELECT pg_advisory_unlock_shared(%s)", (lock_id,))
            return row == (False,)

        wait_until(
            lambda: held(TABLES.leading_lock_id) and held(TABLES.dozing_lock_id),
            10,
            "the idle relay to doze",
        )
    # Its session ended: both released, writers notify again (for whichever relay is next).
    # (The server ends the backend a moment after the client closed it.)
    wait_until(
        lambda: not held(TABLES.leading_lock_id) and not held(TABLES.dozing_lock_id),
        10,
        "the relay's locks released",
    )


def test_a_relay_takes_the_leading_lock_under_a_steady_stream_of_writers(
    engine: sa.Engine, db_url: str, relay_locks: psycopg.Connection[Any]
) -> None:
    """Writers that find no relay of this version hold the leading lock shared until they
    commit; with writers always in flight, a relay that only tried the lock would never get
    it (and writers would notify forever). Queued for it, the relay gets it as soon as those
    in flight commit: queued requests keep new writers from taking it."""
    dsn = libpq(db_url)
    stop = threading.Event()

    def writer(offset: float) -> None:
        with psycopg.connect(dsn) as conn:
            time.sleep(offset)
            while not stop.is_set():
                conn.execute(
                    "SELECT pg_try_advisory_xact_lock_shared(%s)", (TABLES.leading_lock_id,)
                )
                time.sleep(0.04)  # two writers, 40 ms each, 20 ms apart: always one in flight
                conn.commit()

    writers = [threading.Thread(target=writer, args=(i * 0.02,)) for i in range(2)]
    for w in writers:
        w.start()
    transport = MemoryTransport()
    relay = make_relay(db_url, transport, poll_interval=60.0)
    try:
        with Running(relay):

            def leading() -> bool:
                with psycopg.connect(dsn, autocommit=True) as c:
                    row = c.execute(
                        "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                        "WHERE a.application_name = 'outbox-relay' AND l.locktype = 'advisory' "
                        "AND l.mode = 'ExclusiveLock' AND l.granted "
                        "AND (l.classid::bigint << 32 | l.objid::bigint) = %s",
                        (TABLES.leading_lock_id,),  # the shift wraps as the id is signed
                    ).fetchone()
                return row is not None

            wait_until(leading, 10, "the relay to take the leading lock")
    finally:
        stop.set()
        for w in writers:
            w.join(10)


def test_under_steady_traffic_the_relay_never_dozes_and_writers_do_not_notify(
    engine: sa.Engine,
    db_url: str,
    listener: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A relay that dozed at every pause between commits would make most writers notify
    (a dozing relay must be woken), and notifying commits queue behind one lock: under
    traffic it polls for LINGER after its last work instead."""
    # The gaps between commits must stay under LINGER however loaded the machine: a commit
    # (or the relay's own turn) late by 15 ms on a busy CI runner made 30 of 100 notify.
    # Lengthened here, LINGER is still far longer than the gap, and a relay without the
    # linger would still doze at every pause.
    monkeypatch.setattr(relay_module, "LINGER", 0.5)
    transport = MemoryTransport()
    relay = make_relay(db_url, transport, poll_interval=60.0)
    outbox = Outbox()
    gap = 0.005
    with Running(relay):
        wait_until(lambda: relay.is_leader, 10, "the relay to lead")
        publish_one(engine, outbox, key="first")  # the relay leads and works
        wait_until(lambda: len(transport.sent) == 1, 10, "the first message")
        notified(listener, 0.05)  # what came before the traffic
        for i in range(100):
            publish_one(engine, outbox, key=f"k{i}")
            time.sleep(gap)
        wait_until(lambda: len(transport.sent) == 101, 10, "every message")
        during = notified(listener, 0)
    assert during <= 3, f"{during} of 100 commits notified"


@pytest.mark.parametrize("lock_id", [-(2**63), 2**63 - 1, 0])
def test_the_wake_expression_takes_any_lock_id(engine: sa.Engine, lock_id: int) -> None:
    """The ids are derived from the table's name and written into the statement as literals:
    any signed 64-bit value must work, the extremes included."""
    fake = types.SimpleNamespace(channel="x", dozing_lock_id=lock_id, leading_lock_id=lock_id)
    with engine.begin() as conn:
        conn.execute(sa.text(f"SELECT {statements.wake_if_asleep(fake)}"))  # type: ignore[arg-type]


def test_a_lock_granted_as_its_timeout_fires_is_known_held_and_released_on_waking(
    engine: sa.Engine, db_url: str
) -> None:
    """PostgreSQL can grant the dozing lock just as lock_timeout fires: the statement fails,
    the session-scoped lock stays. Taken for a failure, it was held untracked (every writer
    notified from then on), and the next doze took it twice, which one unlock did not undo:
    a writer waiting for it shared waited forever. The race, staged: a statement that takes
    the lock, then fails as the timeout does."""
    from outbox.config import RelayConfig, relay_conninfo
    from outbox.leader import LeaderSession

    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE FUNCTION lock_then_time_out(ms text, lock_id bigint) RETURNS void "
                "LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_advisory_lock(lock_id); "
                "RAISE EXCEPTION 'canceling statement due to lock timeout' "
                "USING ERRCODE = '55P03'; END $$"
            )
        )
    session = LeaderSession(relay_conninfo(RelayConfig(db_url=db_url)), TABLES, retain_sent=False)
    try:
        assert session.try_lead()
        session.lead(0.1)
        session._lock_within_sql = "SELECT lock_then_time_out(%(ms)s, %(lock_id)s)"
        assert session.doze(0.01)  # held: dozing, as writers will see it
        assert session.dozing
        session.wake()
        with psycopg.connect(libpq(db_url), autocommit=True) as writer:
            row = writer.execute(
                "SELECT pg_try_advisory_lock_shared(%s)", (TABLES.dozing_lock_id,)
            ).fetchone()
        assert row == (True,), "the relay still holds the dozing lock after waking"
    finally:
        session.close()
