"""Domain events against a real PostgreSQL: entities record events, and the session hook writes
them in the session's transaction at flush or commit, in recording order; rollbacks (of the
transaction or of a savepoint) discard what was recorded inside them."""

from __future__ import annotations

import asyncio
import json
import pickle
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from outbox import Message, Outbox, PayloadError, collect_events
from tests.support.models import Base, DataBase, Invoice, Order, Shipment


class EventSession(Session):
    pass


OUTBOX = Outbox()


def written(target: sa.Engine | Session) -> list[Any]:
    """The payloads in the outbox table, decoded, in id order."""
    sql = sa.text("SELECT payload FROM outbox_messages ORDER BY id")
    if isinstance(target, Session):  # not session.execute(): that would autoflush
        payloads = target.connection().execute(sql).scalars().all()
    else:
        with target.connect() as conn:
            payloads = conn.execute(sql).scalars().all()
    return [json.loads(p) for p in payloads]


@pytest.fixture
def maker(engine: sa.Engine) -> sessionmaker[Session]:
    Base.metadata.create_all(engine)
    DataBase.metadata.create_all(engine)
    factory = sessionmaker(engine)
    collect_events(OUTBOX, factory)
    return factory


@pytest.fixture
def order(maker: sessionmaker[Session]) -> int:
    """A committed order (no events) to load and change."""
    with maker() as s, s.begin():
        s.add(Order(id=1))
    return 1


# -- when events are written -------------------------------------------------------------------


def test_flush_writes_events_of_all_entities_in_recording_order(
    engine: sa.Engine, maker: sessionmaker[Session], order: int
) -> None:
    with maker() as s, s.begin():
        old = s.get_one(Order, order)
        a, b = Order(id=2), Order(id=3)
        s.add_all([a, b])
        a.record_event("orders", {"n": 1})
        old.record_event("orders", {"n": 2})  # attached, unchanged: still written at this flush
        b.record_event("orders", {"n": 3})
        a.record_event("orders", {"n": 4})
        assert written(s) == []
        s.flush()
        assert written(s) == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}]
        assert a.pending_events == old.pending_events == ()
        s.flush()
    assert written(engine) == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}]


def test_event_of_an_unchanged_entity_is_written_at_commit(
    engine: sa.Engine, maker: sessionmaker[Session], order: int
) -> None:
    with maker() as s:
        o = s.get_one(Order, order)
        mid = o.record_event("orders", {"n": 1}, key="k")
        s.flush()  # a clean session does not flush: before_flush does not run
        assert written(s) == []
        s.commit()
        assert o.pending_events == ()
    with engine.connect() as conn:
        [row] = conn.execute(sa.text("SELECT message_id, key FROM outbox_messages")).all()
    assert (row.message_id, row.key) == (mid, b"k")


def test_transient_entity_events_are_written_when_it_is_flushed_as_new(
    engine: sa.Engine, maker: sessionmaker[Session]
) -> None:
    o = Order(id=5)
    o.record_event("orders", {"type": "OrderPlaced"})
    with maker() as s, s.begin():
        s.execute(sa.text("SELECT 1"))
    assert written(engine) == []  # not in the session: not written
    with maker() as s, s.begin():
        s.add(o)
        s.flush()
        assert written(s) == [{"type": "OrderPlaced"}]
    assert o.pending_events == ()


def test_deleted_entity_events_are_written(
    engine: sa.Engine, maker: sessionmaker[Session], order: int
) -> None:
    with maker() as s, s.begin():
        o = s.get_one(Order, order)
        o.cancel()
        s.delete(o)
        s.add(Order(id=2))
        s.flush()
        o.record_event("orders", {"type": "OrderDeleted"})  # after the DELETE: at commit
    assert written(engine) == [{"type": "OrderCancelled", "id": 1}, {"type": "OrderDeleted"}]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id FROM de_orders")).scalars().all() == [2]


def test_events_recorded_during_the_commit_flush_are_written_by_that_commit(
    engine: sa.Engine, maker: sessionmaker[Session]
) -> None:
    with maker() as s, s.begin():
        s.add(Invoice(id=1))
    with maker() as s, s.begin():
        s.get_one(Invoice, 1).status = "paid"
    assert written(engine) == [{"status": "paid"}]


def test_expunged_entity_keeps_its_events_for_the_session_it_joins(
    engine: sa.Engine, maker: sessionmaker[Session], order: int
) -> None:
    with maker() as s, s.begin():
        o = s.get_one(Order, order)
        o.record_event("orders", {"n": 1})
        s.expunge(o)
        s.add(Order(id=2))
    assert written(engine) == []
    with maker() as s, s.begin():
        s.add(o)
    assert written(engine) == [{"n": 1}]


# -- rollback ------------------------------------------------------------------------------------


def test_rollback_discards_written_and_pending_events(
    engine: sa.Engine, maker: sessionmaker[Session], order: int
) -> None:
    with maker() as s:
        o = s.get_one(Order, order)
        s.add(Order(id=2))
        o.record_event("orders", {"n": "flushed"})
        s.flush()
        o.record_event("orders", {"n": "pending"})
        s.rollback()
        assert o.pending_events == ()
        o.status = "paid"  # the next transaction of the same session
        s.commit()
    assert written(engine) == []


def test_closing_without_commit_discards_pending_events(
    engine: sa.Engine, maker: sessionmaker[Session], order: int
) -> None:
    s = maker()
    o = s.get_one(Order, order)
    o.record_event("orders", {"n": "abandoned"})
    s.close()
    assert o.pending_events == ()
    with maker() as s2, s2.begin():
        s2.add(o)
        o.status = "paid"
    assert written(engine) == []


def test_savepoint_rollback_discards_its_events_and_restores_older_ones(
    engine: sa.Engine, maker: sessionmaker[Session], order: int
) -> None:
    with maker() as s, s.begin():
        o = s.get_one(Order, order)
        o.record_event("orders", {"n": "before"})  # unchanged entity: still pending
        with pytest.raises(ZeroDivisionError), s.begin_nested():
            o.record_event("orders", {"n": "inside, flushed"})
            s.add(Order(id=2))
            s.flush()  # writes both, inside the savepoint
            o.record_event("orders", {"n": "inside, pending"})
            1 / 0
        assert [m.payload for m in o.pending_events] == [b'{"n":"before"}']
        assert written(s) == []
    assert written(engine) == [{"n": "before"}]


def test_released_savepoint_keeps_events_until_an_enclosing_one_rolls_back(
    engine: sa.Engine, maker: sessionmaker[Session], order: int
) -> None:
    with maker() as s, s.begin():
        o = s.get_one(Order, order)
        with s.begin_nested():
            o.record_event("orders", {"n": "kept"})
        outer = s.begin_nested()
        with s.begin_nested():
            o.record_event("orders", {"n": "released, then rolled back"})
        assert written(s) == [{"n": "kept"}, {"n": "released, then rolled back"}]
        outer.rollback()
        assert o.pending_events == ()
    assert written(engine) == [{"n": "kept"}]


def test_savepoint_rollback_restores_events_written_after_an_inner_savepoint_was_released(
    engine: sa.Engine, maker: sessionmaker[Session], order: int
) -> None:
    placed = Order(id=2)
    placed.record_event("orders", {"n": "placed"})
    with maker() as s, s.begin():
        outer = s.begin_nested()
        with s.begin_nested():
            s.get_one(Order, order).status = "paid"
        s.add(placed)
        s.flush()  # writes "placed" inside the outer savepoint
        outer.rollback()  # placed is transient again, and has its event back
        assert [m.payload for m in placed.pending_events] == [b'{"n":"placed"}']
        s.add(placed)
    assert written(engine) == [{"n": "placed"}]


def test_event_recorded_after_commit_waits_for_the_next_transaction(
    engine: sa.Engine, maker: sessionmaker[Session], order: int
) -> None:
    with maker() as s:
        o = s.get_one(Order, order)

        @sa.event.listens_for(s, "after_commit", once=True)
        def follow_up(session: Session) -> None:
            o.record_event("orders", {"n": "follow-up"})

        o.status = "paid"
        s.commit()
        assert written(engine) == []
        assert len(o.pending_events) == 1
        s.commit()
    assert written(engine) == [{"n": "follow-up"}]


# -- async ---------------------------------------------------------------------------------------


def test_async_session(engine: sa.Engine, db_url: str, order: int) -> None:
    async def main() -> None:
        aengine = create_async_engine(db_url)
        try:
            amaker = async_sessionmaker(aengine)
            collect_events(OUTBOX, amaker)
            async with amaker() as s, s.begin():
                new = Order(id=2)
                s.add(new)
                new.record_event("orders", {"n": 1})
                old = await s.get_one(Order, order)
                old.record_event("orders", {"n": 2})  # unchanged: at commit
            async with amaker() as s:
                old = await s.get_one(Order, order)
                old.record_event("orders", {"n": "rolled back"})
                await s.rollback()
                old.status = "paid"
                await s.commit()
            async with AsyncSession(aengine) as s:  # one session, not a factory
                collect_events(OUTBOX, s)
                async with s.begin():
                    (await s.get_one(Order, 2)).cancel()
        finally:
            await aengine.dispose()

    asyncio.run(main())
    assert written(engine) == [{"n": 1}, {"n": 2}, {"type": "OrderCancelled", "id": 2}]


# -- recording -----------------------------------------------------------------------------------


def test_record_event_validates_and_snapshots_at_once(
    engine: sa.Engine, maker: sessionmaker[Session]
) -> None:
    o = Order(id=1)
    with pytest.raises(PayloadError, match="topic"):
        o.record_event("no spaces", {})
    with pytest.raises(PayloadError, match="JSON"):
        o.record_event("orders", object())
    with pytest.raises(PayloadError, match="message_id"):
        o.record_event("orders", {}, headers={"message-id": "x"})
    assert o.pending_events == ()
    payload = {"n": 1}
    mid = uuid.uuid4()
    assert o.record_event("orders", payload, key=b"k", message_id=mid) == mid
    payload["n"] = 2  # too late: the event was encoded when recorded
    o.record_event("orders", b"\x00", headers={"Content-Type": "x/y", "h": "v"})
    o.record_event("orders", None, content_type="x/z")
    with maker() as s, s.begin():
        s.add(o)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT message_id, key, payload, header_names, header_values "
                "FROM outbox_messages ORDER BY id"
            )
        ).all()
    assert rows[0].message_id == mid
    assert [(r.key, r.payload, r.header_names, r.header_values) for r in rows] == [
        (b"k", b'{"n":1}', ["content-type"], [b"application/json"]),
        (None, b"\x00", ["Content-Type", "h"], [b"x/y", b"v"]),
        (None, None, ["content-type"], [b"x/z"]),
    ]


def test_pending_events_pickle_with_the_entity_and_are_not_mapped() -> None:
    assert set(Order.__table__.columns.keys()) == {"id", "status"}
    assert set(sa.inspect(Order).attrs.keys()) == {"id", "status"}
    o = Order(id=1)
    mid = o.record_event("orders", {"n": 1})
    copy = pickle.loads(pickle.dumps(o))
    headers = (("content-type", b"application/json"),)
    assert copy.pending_events == (Message("orders", b'{"n":1}', None, headers, mid),)
    assert copy.id == 1


def test_unhashable_dataclass_entities(engine: sa.Engine, maker: sessionmaker[Session]) -> None:
    with maker() as s, s.begin():
        shipment = Shipment(id=1)
        s.add(shipment)
        shipment.record_event("shipments", {"n": 1})
    assert written(engine) == [{"n": 1}]


# -- installing the hook -------------------------------------------------------------------------


def test_collect_events_is_idempotent(engine: sa.Engine) -> None:
    factory = sessionmaker(engine)
    collect_events(OUTBOX, factory)
    collect_events(OUTBOX, factory)
    amaker = async_sessionmaker(create_async_engine("postgresql+psycopg://"))
    collect_events(OUTBOX, amaker)
    sync_class = amaker.kw["sync_session_class"]
    collect_events(OUTBOX, amaker)
    assert amaker.kw["sync_session_class"] is sync_class
    assert sync_class is not Session  # its own class: other sessions are left alone

    class AsyncEventSession(AsyncSession):
        sync_session_class = type("SyncOfAsync", (Session,), {})

    collect_events(OUTBOX, AsyncEventSession)
    collect_events(OUTBOX, AsyncEventSession)
    sync_of_async = AsyncEventSession.sync_session_class(engine)
    for session in (factory(), amaker().sync_session, sync_of_async):
        assert len(session.dispatch.before_flush) == 1
        assert len(session.dispatch.after_transaction_create) == 1


def test_hooked_through_a_class_and_its_factory_events_are_written_once(
    engine: sa.Engine, maker: sessionmaker[Session], order: int
) -> None:
    class Twice(Session):
        pass

    collect_events(OUTBOX, Twice)
    factory = sessionmaker(engine, class_=Twice)
    collect_events(OUTBOX, factory)
    with factory() as s, s.begin():
        o = s.get_one(Order, order)
        o.record_event("orders", {"n": 1})
        with pytest.raises(ZeroDivisionError), s.begin_nested():
            o.record_event("orders", {"n": "rolled back"})
            1 / 0
        o.status = "paid"
    assert written(engine) == [{"n": 1}]


def test_collect_events_rejects_other_targets(engine: sa.Engine) -> None:
    with pytest.raises(TypeError, match="session"):
        collect_events(OUTBOX, engine)  # type: ignore[arg-type]


def test_session_class_and_instance_targets(
    engine: sa.Engine, maker: sessionmaker[Session]
) -> None:
    collect_events(OUTBOX, EventSession)
    with EventSession(engine) as s, s.begin():
        s.add(o := Order(id=1))
        o.record_event("orders", {"n": 1})
    one = Session(engine)
    collect_events(OUTBOX, one)
    with one, one.begin():
        o = Order(id=2)
        one.add(o)
        o.record_event("orders", {"n": 2})
    with Session(engine) as plain, plain.begin():  # neither it nor its class is hooked
        o = Order(id=3)
        plain.add(o)
        o.record_event("orders", {"n": 3})
    assert written(engine) == [{"n": 1}, {"n": 2}]
    assert o.pending_events != ()
