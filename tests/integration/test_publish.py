"""Publishing against a real PostgreSQL: rows live and die with the caller's transaction, and
per key, id order is commit order (the writers' advisory lock)."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from outbox import (
    DatabaseError,
    Message,
    MissingTablesError,
    Outbox,
    OutboxError,
    PayloadError,
    define_tables,
    migrate,
)
from outbox import statements as st
from outbox.message import EncodedMessage
from outbox.schema import OutboxTables
from tests.support.db import rows
from tests.support.waits import wait_until

DEFAULT = define_tables()


def split_lock_id(lock_id: int) -> tuple[int, int]:
    """pg_locks shows a bigint advisory lock as (classid, objid) = (high, low) 32 bits."""
    unsigned = lock_id & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


def advisory_waiters(engine: sa.Engine, lock_id: int) -> list[int]:
    """Pids waiting (not granted) for the transaction-scoped advisory lock ``lock_id``."""
    classid, objid = split_lock_id(lock_id)
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND NOT l.granted "
                    "AND a.datname = current_database() "
                    "AND l.classid = :c AND l.objid = :o AND l.objsubid = 1 "
                    "AND a.wait_event_type = 'Lock' AND a.wait_event = 'advisory'"
                ),
                {"c": classid, "o": objid},
            ).scalars()
        )


def advisory_locks_held(engine: sa.Engine) -> int:
    """Per-key locks held by other sessions (not the relay wake-up's two locks, which a
    writer takes shared too)."""
    tables = define_tables()
    wake = [split_lock_id(i) for i in (tables.dozing_lock_id, tables.leading_lock_id)]
    with engine.connect() as conn:
        n = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND pid <> pg_backend_pid() AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND (classid, objid) NOT IN ((:c1, :o1), (:c2, :o2))"
            ),
            {"c1": wake[0][0], "o1": wake[0][1], "c2": wake[1][0], "o2": wake[1][1]},
        ).scalar_one()
    return int(n)


@pytest.fixture
def outbox() -> Outbox:
    return Outbox()


# -- commit / rollback ------------------------------------------------------------------------


def test_committed_publish_becomes_rows(engine: sa.Engine, outbox: Outbox) -> None:
    with Session(engine) as session, session.begin():
        mid = outbox.publish(session, "orders", {"id": 1}, key="o-1", headers={"trace": "t1"})
        tomb = outbox.publish(session, "orders", None, key=b"o-2")
    [r1, r2] = rows(engine)
    assert r1.message_id == mid and r1.topic == "orders" and r1.key == b"o-1"
    assert json.loads(r1.payload) == {"id": 1}
    assert r1.headers == [("content-type", b"application/json"), ("trace", b"t1")]
    assert (r1.status, r1.attempts) == ("pending", 0)
    assert r2.message_id == tomb and r2.payload is None and r2.headers == []
    assert mid.version == 7


@pytest.mark.parametrize("at_commit", [False, True])
def test_every_header_count_round_trips(engine: sa.Engine, at_commit: bool) -> None:
    """One message binds its headers one by one up to SCALAR_HEADERS, as arrays beyond, and
    none at all without any: each form stores them in order, repeated names kept."""
    outbox = Outbox(at_commit=at_commit)
    counts = [0, 1, 2, st.SCALAR_HEADERS, st.SCALAR_HEADERS + 1]
    sent: list[list[tuple[str, bytes]]] = []
    for n in counts:
        headers = [("dup" if i % 3 == 0 else f"h{i}", f"v{i}".encode()) for i in range(n)]
        with Session(engine) as session, session.begin():
            # A tombstone: no content-type header, so the counts are exactly these.
            outbox.publish(session, "t", None, key="k", headers=headers)
        sent.append(headers)
    with Session(engine) as session, session.begin():  # several at once, none with headers
        outbox.publish_many(session, [Message("t", None, key="k"), Message("t", None)])
    stored = [r.headers for r in rows(engine)]
    assert stored == [*sent, [], []]


@pytest.mark.parametrize("at_commit", [False, True])
def test_several_messages_keep_every_character(engine: sa.Engine, at_commit: bool) -> None:
    """Several messages travel as array literals the publisher writes itself: whatever a
    key, payload or header holds comes back as it was."""
    names = ['a"b', "c\\d", "{x,y}", "NULL", " sp ace ", "é€😀", "new\nline", "\\\\"]
    blobs = [b"", b"\\", b'"', b"NULL", b"\x00\xff", b"{,}", b" ", b"\\x41"]
    headers = list(zip(names, blobs, strict=True))
    msgs = [
        Message("t.x_y-z", b'\\x00\x00"{}', key=b"\x00\xff", headers=headers),
        Message("t", None),
        Message("t", b"", key="é", headers=headers[:1]),
    ]
    with Session(engine) as session, session.begin():
        Outbox(at_commit=at_commit).publish_many(session, msgs)
    got = rows(engine)
    assert [r.topic for r in got] == ["t.x_y-z", "t", "t"]
    assert [r.key for r in got] == [b"\x00\xff", None, "é".encode()]
    assert [r.payload for r in got] == [b'\\x00\x00"{}', None, b""]
    content_type = ("content-type", b"application/octet-stream")
    assert [r.headers for r in got] == [[content_type, *headers], [], [content_type, headers[0]]]


def test_several_messages_as_lists_for_other_drivers(engine: sa.Engine) -> None:
    """Drivers other than psycopg get the arrays as lists (they type parameters from the
    statement, so a str would not do): the same statement stores the same rows."""
    msgs = [
        EncodedMessage(uuid.uuid4(), "t", b'k"\\', b"\x00{,}", (("a", b""), ("b\\", b'"'))),
        EncodedMessage(uuid.uuid4(), "t", None, None, ()),
    ]
    stmt, params = st.insert(DEFAULT, msgs, literals=False)
    assert isinstance(params["message_ids"], list)
    with engine.begin() as conn:
        conn.execute(stmt, params)  # through SQLAlchemy: psycopg adapts the lists
    got = rows(engine)
    assert [(r.key, r.payload, r.headers) for r in got] == [
        (b'k"\\', b"\x00{,}", [("a", b""), ("b\\", b'"')]),
        (None, None, []),
    ]


def test_rolled_back_publish_leaves_nothing(engine: sa.Engine, outbox: Outbox) -> None:
    with Session(engine) as session:
        with session.begin():
            outbox.publish(session, "orders", {"id": 1}, key="k")
            session.rollback()
        session.begin()
        outbox.publish(session, "orders", {"id": 2}, key="k")
        session.rollback()
    with pytest.raises(RuntimeError), Session(engine) as session, session.begin():
        outbox.publish(session, "orders", {"id": 3})
        raise RuntimeError("business logic failed")
    assert rows(engine) == []


def test_publish_on_a_connection(engine: sa.Engine, outbox: Outbox) -> None:
    with engine.begin() as conn:
        outbox.publish(conn, "t", "text", key="k")
    with engine.connect() as conn:
        outbox.publish(conn, "t", "rolled back")
        conn.rollback()
    [r] = rows(engine)
    assert r.payload == b"text"
    assert r.headers == [("content-type", b"text/plain; charset=utf-8")]


def test_publish_many_keeps_list_order(engine: sa.Engine, outbox: Outbox) -> None:
    msgs = [Message("t", {"n": i}, key=f"k{i % 4}") for i in range(50)]
    msgs[10] = Message("other", b"raw")
    with Session(engine) as session, session.begin():
        ids = outbox.publish_many(session, msgs)
        assert outbox.publish_many(session, []) == []
    stored = rows(engine)
    assert [r.message_id for r in stored] == ids
    assert [r.id for r in stored] == sorted(r.id for r in stored)
    assert stored[10].topic == "other" and stored[10].payload == b"raw"
    assert [json.loads(r.payload)["n"] for r in stored if r.topic == "t"] == [
        i for i in range(50) if i != 10
    ]


def test_successive_publishes_in_one_transaction_get_increasing_ids(
    engine: sa.Engine, outbox: Outbox
) -> None:
    with Session(engine) as session, session.begin():
        ids = [outbox.publish(session, "t", {"n": i}, key="same") for i in range(20)]
    assert [r.message_id for r in rows(engine)] == ids


def test_invalid_payload_fails_before_anything_is_written(
    engine: sa.Engine, outbox: Outbox
) -> None:
    with Session(engine) as session, session.begin():
        outbox.publish(session, "t", {"n": 1})
        with pytest.raises(PayloadError):
            outbox.publish(session, "t", {"n": float("nan")})
        with pytest.raises(PayloadError):
            outbox.publish(session, "bad topic", {"n": 2})
        with pytest.raises(PayloadError):
            outbox.publish(session, "t", {"n": 2}, headers={"message-id": "x"})
        # One invalid message: none of the list is written.
        with pytest.raises(PayloadError):
            outbox.publish_many(session, [Message("t", {"n": 3}), Message("t", object())])
        # The transaction is still usable.
        outbox.publish(session, "t", {"n": 4})
        session.execute(sa.text("SELECT 1"))
    assert [json.loads(r.payload)["n"] for r in rows(engine)] == [1, 4]


def test_duplicate_message_id_is_an_outbox_error(engine: sa.Engine, outbox: Outbox) -> None:
    mid = uuid.uuid4()
    with Session(engine) as session, session.begin():
        assert outbox.publish(session, "t", {}, message_id=mid) == mid
    with Session(engine) as session:
        session.begin()
        with pytest.raises(DatabaseError, match="duplicate") as info:
            outbox.publish(session, "t", {}, message_id=mid)
        assert isinstance(info.value, OutboxError)
        session.rollback()
    with Session(engine) as session:
        session.begin()
        with pytest.raises(DatabaseError):
            # Twice in one call.
            twice = uuid.uuid4()
            outbox.publish_many(session, [Message("t", 1, message_id=twice)] * 2)
        session.rollback()
    assert len(rows(engine)) == 1


def test_missing_tables_is_reported(empty_db_url: str, outbox: Outbox) -> None:
    engine = sa.create_engine(empty_db_url)
    try:
        with pytest.raises(MissingTablesError), Session(engine) as session, session.begin():
            outbox.publish(session, "t", {})
    finally:
        engine.dispose()


def test_notification_fires_on_commit_only(engine: sa.Engine, db_url: str, outbox: Outbox) -> None:
    dsn = db_url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {DEFAULT.channel}")
        with Session(engine) as session:
            session.begin()
            outbox.publish(session, "t", {"n": "rolled back"})
            session.rollback()
            session.begin()
            outbox.publish(session, "t", {"n": 1})
            outbox.publish(session, "t", {"n": 2})
            assert list(listener.notifies(timeout=0.05)) == []  # not before the commit
            session.commit()
        got = list(listener.notifies(timeout=10, stop_after=1))
        assert [n.channel for n in got] == [DEFAULT.channel]
        # PostgreSQL folds identical notifications of one transaction; the rolled back one
        # never arrives.
        assert list(listener.notifies(timeout=0.1)) == []


# -- asyncio ----------------------------------------------------------------------------------


def test_async_session_commits_and_rolls_back(engine: sa.Engine, db_url: str) -> None:
    outbox = Outbox()

    async def main() -> list[uuid.UUID]:
        aengine = create_async_engine(db_url)
        try:
            async with AsyncSession(aengine) as session:
                async with session.begin():
                    a = await outbox.apublish(session, "t", {"n": 1}, key="k")
                    b = await outbox.apublish_many(
                        session, [Message("t", {"n": 2}, key="k"), Message("t", b"3")]
                    )
                async with session.begin():
                    await outbox.apublish(session, "t", {"n": "rolled back"}, key="k")
                    await session.rollback()
                with pytest.raises(PayloadError):
                    async with session.begin():
                        await outbox.apublish(session, "t", {"n": 4})
                        await outbox.apublish(session, "", {"n": 5})
            async with aengine.begin() as conn:  # AsyncConnection
                c = await outbox.apublish(conn, "t", "via connection")
            return [a, *b, c]
        finally:
            await aengine.dispose()

    ids = asyncio.run(main())
    stored = rows(engine)
    assert [r.message_id for r in stored] == ids
    assert [r.payload for r in stored] == [b'{"n":1}', b'{"n":2}', b"3", b"via connection"]


def test_async_duplicate_message_id_is_an_outbox_error(db_url: str) -> None:
    outbox = Outbox()
    mid = uuid.uuid4()

    async def main() -> None:
        aengine = create_async_engine(db_url)
        try:
            async with AsyncSession(aengine) as session, session.begin():
                await outbox.apublish(session, "t", {}, message_id=mid)
            with pytest.raises(DatabaseError):
                async with AsyncSession(aengine) as session, session.begin():
                    await outbox.apublish(session, "t", {}, message_id=mid)
        finally:
            await aengine.dispose()

    asyncio.run(main())


# -- custom table and schema ------------------------------------------------------------------


def test_custom_table_and_schema(engine: sa.Engine, db_url: str) -> None:
    migrate.upgrade(db_url, table="events", schema="app")
    outbox = Outbox(table="events", schema="app")
    with Session(engine) as session, session.begin():
        mid = outbox.publish(session, "t", {"n": 1}, key="k")
    with Session(engine) as session:
        session.begin()
        outbox.publish(session, "t", {"n": 2}, key="k")
        session.rollback()
    [r] = rows(engine, "app.events")
    assert r.message_id == mid
    assert rows(engine) == []  # nothing in the default table


def test_declared_on_the_callers_metadata() -> None:
    md = sa.MetaData()
    outbox = Outbox(metadata=md, table="events", schema="app")
    assert "app.events" in md.tables
    assert outbox.tables.messages is md.tables["app.events"]


# -- per-key commit order ---------------------------------------------------------------------


class Writer(threading.Thread):
    """Publishes in its own transaction on another thread; records the ids it got."""

    def __init__(self, engine: sa.Engine, outbox: Outbox, msgs: list[Message]) -> None:
        super().__init__(daemon=True)
        self.engine, self.outbox, self.msgs = engine, outbox, msgs
        self.ids: list[uuid.UUID] = []
        self.pid: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Session(self.engine) as session, session.begin():
                self.pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
                session.execute(sa.text("SET LOCAL lock_timeout = '30s'"))
                self.ids = self.outbox.publish_many(session, self.msgs)
        except BaseException as exc:
            self.error = exc


def lock_of(tables: OutboxTables, topic: str, key: str) -> int:
    return tables.lock_id(topic.encode(), key.encode())


def test_same_key_writer_waits_for_the_earlier_commit(
    engine: sa.Engine, outbox: Outbox, session_a: Session
) -> None:
    a1 = outbox.publish(session_a, "orders", {"n": "a1"}, key="K")
    b = Writer(engine, outbox, [Message("orders", {"n": "b1"}, key="K")])
    b.start()
    # B blocks on A's advisory lock for (orders, K) before its row gets an id.
    wait_until(
        lambda: (
            b.pid is not None and b.pid in advisory_waiters(engine, lock_of(DEFAULT, "orders", "K"))
        ),
        what="B to wait for the advisory lock",
    )
    assert b.is_alive() and b.ids == []
    # A keeps writing while B waits; then commits.
    a2 = outbox.publish(session_a, "orders", {"n": "a2"}, key="K")
    session_a.commit()
    b.join(10)
    assert not b.is_alive() and b.error is None
    stored = rows(engine)
    assert [r.message_id for r in stored] == [a1, a2, *b.ids]
    assert [json.loads(r.payload)["n"] for r in stored] == ["a1", "a2", "b1"]


def test_other_keys_and_keyless_messages_do_not_wait(
    engine: sa.Engine, outbox: Outbox, session_a: Session
) -> None:
    outbox.publish(session_a, "orders", {"n": "a"}, key="K")
    with Session(engine) as other, other.begin():
        other.execute(sa.text("SET LOCAL lock_timeout = '5s'"))
        outbox.publish(other, "orders", {"n": "other key"}, key="L")
        outbox.publish(other, "invoices", {"n": "same key, other topic"}, key="K")
        outbox.publish(other, "orders", {"n": "no key"})
    session_a.commit()
    assert [json.loads(r.payload)["n"] for r in rows(engine)] == [
        "a",
        "other key",
        "same key, other topic",
        "no key",
    ]


def test_rollback_releases_the_key_lock(
    engine: sa.Engine, outbox: Outbox, session_a: Session
) -> None:
    outbox.publish(session_a, "orders", {"n": "rolled back"}, key="K")
    assert advisory_locks_held(engine) == 1
    b = Writer(engine, outbox, [Message("orders", {"n": "b"}, key="K")])
    b.start()
    wait_until(
        lambda: (
            b.pid is not None and b.pid in advisory_waiters(engine, lock_of(DEFAULT, "orders", "K"))
        ),
        what="B to wait for the advisory lock",
    )
    session_a.rollback()
    b.join(10)
    assert not b.is_alive() and b.error is None
    assert [json.loads(r.payload)["n"] for r in rows(engine)] == ["b"]
    assert advisory_locks_held(engine) == 0


def test_many_concurrent_writers_of_one_key_commit_in_id_order(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """Each writer inserts, then records the commit order; ids must follow it."""
    commits: list[uuid.UUID] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            with Session(engine) as session, session.begin():
                session.execute(sa.text("SET LOCAL lock_timeout = '30s'"))
                [mid] = outbox.publish_many(session, [Message("t", {"n": i}, key="hot")])
                # Holding the key lock: nobody else of this key can commit before us.
                with lock:
                    commits.append(mid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert [r.message_id for r in rows(engine)] == commits


def test_multi_key_writers_do_not_deadlock(engine: sa.Engine, outbox: Outbox) -> None:
    """publish_many takes its key locks in a fixed order, whatever the list order."""
    keys = [f"k{i}" for i in range(8)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def write(i: int) -> None:
        order = keys if i % 2 else list(reversed(keys))
        try:
            barrier.wait(10)
            for _ in range(5):
                with Session(engine) as session, session.begin():
                    session.execute(sa.text("SET LOCAL lock_timeout = '20s'"))
                    outbox.publish_many(session, [Message("t", {"w": i}, key=k) for k in order])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(rows(engine)) == 6 * 5 * 8
