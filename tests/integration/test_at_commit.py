"""``Outbox(at_commit=True)``: messages written in the same round trip as the COMMIT."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from outbox import (
    ConfigurationError,
    DatabaseError,
    Message,
    MissingTablesError,
    Outbox,
    PayloadError,
)
from tests.support.db import rows
from tests.support.models import Base, DataBase, Order
from tests.support.waits import wait_until


@pytest.fixture
def outbox() -> Outbox:
    return Outbox(at_commit=True)


@pytest.fixture
def business(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE orders (id int PRIMARY KEY)"))
    return engine


def orders(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT id FROM orders ORDER BY id")).scalars())


def count_statements(engine: sa.Engine) -> list[str]:
    """Statements SQLAlchemy sends (the commit pipeline goes around it: not listed)."""
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda c, cur, stmt, *a: seen.append(stmt))
    return seen


def test_rows_are_written_by_the_commit_only(business: sa.Engine, outbox: Outbox) -> None:
    seen = count_statements(business)
    with Session(business) as session, session.begin():
        session.execute(sa.text("INSERT INTO orders VALUES (1)"))
        a = outbox.publish(session, "t", {"n": 1}, key="k")
        b = outbox.publish_many(session, [Message("t", {"n": 2}, key="k"), Message("u", b"3")])
        # Nothing is sent at the publish calls...
        assert len(seen) == 1
        own = session.execute(sa.text("SELECT count(*) FROM outbox_messages")).scalar()
        assert own == 0
    # ...and all of it is written, in call order, with the COMMIT.
    stored = rows(business)
    assert [r.message_id for r in stored] == [a, *b]
    assert [r.payload for r in stored] == [b'{"n":1}', b'{"n":2}', b"3"]
    assert orders(business) == [1]


def test_rollback_and_close_write_nothing_and_leak_nothing(
    business: sa.Engine, outbox: Outbox
) -> None:
    with Session(business) as session:
        session.begin()
        outbox.publish(session, "t", "rolled back")
        session.rollback()
        session.begin()
        outbox.publish(session, "t", "closed without commit")
    # The pool hands out the same connection again: nothing may be left on it.
    with Session(business) as session, session.begin():
        session.execute(sa.text("INSERT INTO orders VALUES (2)"))
        outbox.publish(session, "t", "committed")
    assert [r.payload for r in rows(business)] == [b"committed"]


def test_savepoints(business: sa.Engine, outbox: Outbox) -> None:
    with Session(business) as session, session.begin():
        outbox.publish(session, "t", "before")
        with session.begin_nested() as sp:
            outbox.publish(session, "t", "in rolled back savepoint")
            with session.begin_nested():
                outbox.publish(session, "t", "in released inner savepoint")
            sp.rollback()
        with session.begin_nested():
            outbox.publish(session, "t", "in released savepoint")
        sp2 = session.begin_nested()
        outbox.publish(session, "t", "first in a rolled back savepoint")
        sp2.rollback()
    assert [r.payload for r in rows(business)] == [b"before", b"in released savepoint"]


def test_a_savepoint_before_the_first_publish(business: sa.Engine, outbox: Outbox) -> None:
    with Session(business) as session, session.begin():
        sp = session.begin_nested()
        outbox.publish(session, "t", "inside")
        sp.rollback()
        outbox.publish(session, "t", "after")
    assert [r.payload for r in rows(business)] == [b"after"]


def test_on_a_connection(business: sa.Engine, outbox: Outbox) -> None:
    with business.begin() as conn:
        conn.execute(sa.text("INSERT INTO orders VALUES (3)"))
        outbox.publish(conn, "t", "via connection")
    with business.connect() as conn:
        outbox.publish(conn, "t", "committed explicitly")
        conn.commit()
        outbox.publish(conn, "t", "never committed")
    assert [r.payload for r in rows(business)] == [b"via connection", b"committed explicitly"]


def test_a_failing_insert_rolls_the_whole_transaction_back(
    business: sa.Engine, outbox: Outbox
) -> None:
    mid = uuid.uuid4()
    with Session(business) as session, session.begin():
        outbox.publish(session, "t", "first", message_id=mid)
    with (
        pytest.raises(DatabaseError, match="duplicate"),
        Session(business) as session,
        session.begin(),
    ):
        session.execute(sa.text("INSERT INTO orders VALUES (4)"))
        outbox.publish(session, "t", "same id", message_id=mid)
    assert orders(business) == []  # the business row went with it
    assert len(rows(business)) == 1
    # The session and its pooled connection are usable again.
    with Session(business) as session, session.begin():
        session.execute(sa.text("INSERT INTO orders VALUES (5)"))
        outbox.publish(session, "t", "after")
    assert orders(business) == [5]


def test_missing_tables_surface_at_commit(empty_db_url: str, outbox: Outbox) -> None:
    engine = sa.create_engine(empty_db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE orders (id int PRIMARY KEY)"))
        with pytest.raises(MissingTablesError), Session(engine) as session, session.begin():
            session.execute(sa.text("INSERT INTO orders VALUES (6)"))
            outbox.publish(session, "t", {})
        assert orders(engine) == []
    finally:
        engine.dispose()


def test_bad_payload_still_fails_at_the_call(business: sa.Engine, outbox: Outbox) -> None:
    with Session(business) as session, session.begin():
        with pytest.raises(PayloadError):
            outbox.publish(session, "", {})
        with pytest.raises(PayloadError):
            outbox.publish(session, "t", float("nan"))


def test_autocommit_connections_are_refused(db_url: str, outbox: Outbox) -> None:
    engine = sa.create_engine(db_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn, pytest.raises(ConfigurationError, match="autocommit"):
            outbox.publish(conn, "t", {})
    finally:
        engine.dispose()


def test_two_phase_commit_is_refused(business: sa.Engine, outbox: Outbox) -> None:
    with Session(business, twophase=True) as session:
        session.begin()
        outbox.publish(session, "t", {})
        with pytest.raises(ConfigurationError, match="two-phase"):
            session.prepare()
        session.rollback()
    assert rows(business) == []


def test_a_commit_sent_as_sql_is_logged_as_dropping_messages(
    business: sa.Engine, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="outbox.deferred")
    with Session(business) as session:
        session.begin()
        session.execute(sa.text("INSERT INTO orders VALUES (9)"))
        outbox.publish(session, "t", "lost")
        session.connection().connection.driver_connection.commit()  # type: ignore[union-attr]
        session.close()
    assert rows(business) == []
    assert orders(business) == [9]  # committed by the raw COMMIT, without its event
    assert [r.getMessage() for r in caplog.records] == [
        "published messages dropped: their transaction ended without a SQLAlchemy commit or "
        "rollback"
    ]
    assert caplog.records[0].dropped == 1  # type: ignore[attr-defined]


def test_same_key_writers_get_ids_in_commit_order(db_url: str, outbox: Outbox) -> None:
    # The per-key lock is taken at commit: the transaction that publishes first but commits
    # last gets the later id, so the relay sends in commit order.
    engine = sa.create_engine(db_url, pool_size=2)
    try:
        first = Session(engine)
        first.begin()
        outbox.publish(first, "t", "published first, committed last", key="k")
        with Session(engine) as second, second.begin():
            outbox.publish(second, "t", "published second, committed first", key="k")
        first.commit()
        first.close()
        assert [r.payload for r in rows(engine)] == [
            b"published second, committed first",
            b"published first, committed last",
        ]
    finally:
        engine.dispose()


def test_the_lock_is_held_only_while_committing(db_url: str, outbox: Outbox) -> None:
    # A writer that published a key and is still working does not block another writer of
    # that key (unlike Outbox(), where the lock is taken at the publish call).
    engine = sa.create_engine(db_url, pool_size=2)
    try:
        with Session(engine) as slow:
            slow.begin()
            outbox.publish(slow, "t", "slow", key="k")
            done = threading.Event()

            def other() -> None:
                with Session(engine) as fast, fast.begin():
                    outbox.publish(fast, "t", "fast", key="k")
                done.set()

            t = threading.Thread(target=other)
            t.start()
            wait_until(done.is_set, 10, "the other writer committed")
            t.join()
            slow.commit()
        assert [r.payload for r in rows(engine)] == [b"fast", b"slow"]
    finally:
        engine.dispose()


def test_notification_fires_with_the_commit(db_url: str, outbox: Outbox, engine: Any) -> None:
    dsn = db_url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {outbox.tables.channel}")
        with Session(engine) as session, session.begin():
            outbox.publish(session, "t", {})
        assert len(list(listener.notifies(timeout=10, stop_after=1))) == 1


def test_async_session_and_connection(business: sa.Engine, db_url: str, outbox: Outbox) -> None:
    async def main() -> list[uuid.UUID]:
        aengine = create_async_engine(db_url)
        try:
            async with AsyncSession(aengine) as session:
                async with session.begin():
                    await session.execute(sa.text("INSERT INTO orders VALUES (7)"))
                    a = await outbox.apublish(session, "t", {"n": 1}, key="k")
                    b = await outbox.apublish_many(session, [Message("t", {"n": 2}, key="k")])
                async with session.begin():
                    await outbox.apublish(session, "t", {"n": "rolled back"}, key="k")
                    await session.rollback()
                mid = uuid.uuid4()
                async with session.begin():
                    await outbox.apublish(session, "t", "x", message_id=mid)
                with pytest.raises(DatabaseError, match="duplicate"):
                    async with session.begin():
                        await session.execute(sa.text("INSERT INTO orders VALUES (8)"))
                        await outbox.apublish(session, "t", "dup", message_id=mid)
            async with aengine.begin() as conn:
                c = await outbox.apublish(conn, "t", "via connection")
            async with aengine.connect() as conn:  # commit as you go, nothing executed before
                d = await outbox.apublish(conn, "t", "committed explicitly")
                await conn.commit()
            return [a, *b, mid, c, d]
        finally:
            await aengine.dispose()

    ids = asyncio.run(main())
    assert [r.message_id for r in rows(business)] == ids
    assert orders(business) == [7]


def test_domain_events_with_at_commit(engine: sa.Engine) -> None:
    # Entities' events go through publish_many, which buffers them until the COMMIT; a
    # savepoint rollback drops what was written inside it from the buffer, and the events
    # recorded before it are pending again and written with the commit.
    from sqlalchemy.orm import sessionmaker

    from outbox import collect_events

    Base.metadata.create_all(engine)
    DataBase.metadata.create_all(engine)
    maker = sessionmaker(engine)
    collect_events(Outbox(at_commit=True), maker)
    with maker() as s, s.begin():
        s.add(Order(id=1))
    with maker() as s, s.begin():
        o = s.get_one(Order, 1)
        o.record_event("orders", {"n": "before"})
        with pytest.raises(ZeroDivisionError), s.begin_nested():
            o.record_event("orders", {"n": "inside, flushed"})
            s.add(Order(id=2))
            s.flush()
            o.record_event("orders", {"n": "inside, pending"})
            1 / 0
        after = Order(id=3)
        after.record_event("orders", {"n": "after"})
        s.add(after)
    assert [r.payload for r in rows(engine)] == [b'{"n":"before"}', b'{"n":"after"}']


def test_an_unmatched_savepoint_rollback_fails_the_commit(
    business: sa.Engine, outbox: Outbox
) -> None:
    # Should a savepoint's name ever not be recognised (say, a SQLAlchemy that names them
    # differently), the commit fails rather than guess which events the rollback discarded.
    from outbox import deferred

    with (
        pytest.raises(ConfigurationError, match="savepoint"),
        Session(business) as session,
        session.begin(),
    ):
        session.execute(sa.text("INSERT INTO orders VALUES (10)"))
        outbox.publish(session, "t", "kept or not?")
        deferred._on_rollback_savepoint(session.connection(), "not_a_known_name", None)
    assert orders(business) == []
    assert rows(business) == []


# -- the commit pipeline: prepared statements, errors, lost connections ------------------------


def prepared_here(session: Session) -> list[str]:
    return list(
        session.execute(
            sa.text("SELECT name FROM pg_prepared_statements WHERE name LIKE 'outbox%' ORDER BY 1")
        ).scalars()
    )


def test_no_prepared_statements_when_the_connection_wants_none(db_url: str, outbox: Outbox) -> None:
    """prepare_threshold=None (psycopg's switch, e.g. behind PgBouncer in transaction mode):
    the commit pipeline prepares nothing either."""
    engine = sa.create_engine(
        db_url, pool_size=1, max_overflow=0, connect_args={"prepare_threshold": None}
    )
    try:
        for i in range(3):
            with Session(engine) as session, session.begin():
                outbox.publish_many(
                    session, [Message("t", {"i": i}, key="k"), Message("t", "b", key="j")]
                )
        with Session(engine) as session:
            assert prepared_here(session) == []
        assert len(rows(engine)) == 6
    finally:
        engine.dispose()


def test_commits_keep_working_after_rollbacks_that_deallocate_prepared_statements(
    business: sa.Engine, outbox: Outbox
) -> None:
    """psycopg sends DEALLOCATE ALL after a ROLLBACK once it has prepared statements of its
    own (five executions of the same statement): statements prepared behind its back would
    vanish, and the next commit would fail. Writers in both modes on one connection, with
    rollbacks between them, all commit."""
    engine = sa.create_engine(business.url, pool_size=1, max_overflow=0)
    default = Outbox()
    try:
        for i in range(12):
            with Session(engine) as session, session.begin():
                default.publish(session, "t", f"default {i}")  # psycopg prepares it
            with Session(engine) as session, session.begin():
                outbox.publish(session, "t", f"at commit {i}")
            with Session(engine) as session:
                session.begin()
                session.execute(sa.text(f"INSERT INTO orders VALUES ({i})"))
                outbox.publish(session, "t", "rolled back")
                session.rollback()
            with Session(engine) as session, session.begin():
                session.execute(sa.text("DEALLOCATE ALL"))
        assert len(rows(engine)) == 24
        assert orders(engine) == []
    finally:
        engine.dispose()


def test_a_connection_lost_before_the_commit_fails_it_and_the_pool_recovers(
    business: sa.Engine, outbox: Outbox
) -> None:
    engine = sa.create_engine(business.url, pool_size=1, max_overflow=0, pool_pre_ping=True)
    try:
        with (
            pytest.raises(DatabaseError),
            Session(engine) as session,
            session.begin(),
        ):
            session.execute(sa.text("INSERT INTO orders VALUES (9)"))
            outbox.publish(session, "t", "never")
            with business.connect() as killer:
                pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
                killer.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        assert orders(engine) == []
        assert rows(engine) == []
        with Session(engine) as session, session.begin():
            session.execute(sa.text("INSERT INTO orders VALUES (10)"))
            outbox.publish(session, "t", "after")
        assert orders(engine) == [10]
    finally:
        engine.dispose()
