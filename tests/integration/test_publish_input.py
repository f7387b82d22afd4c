"""Publishing input the table cannot store raises PayloadError before any SQL, so the caller's
transaction goes on; a database that cannot be reached, or a session it ended, raises
DatabaseUnavailableError (not a bare DatabaseError)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from outbox import (
    DatabaseError,
    DatabaseUnavailableError,
    EventSource,
    Message,
    Outbox,
    PayloadError,
    collect_events,
)
from tests.support.broker import free_port
from tests.support.db import rows

LONE = "\udc80"  # a lone (low) surrogate, as os.fsdecode() makes of undecodable bytes

#: (payload, keyword arguments of publish) that PostgreSQL, UTF-8 or the header rules cannot
#: take. (A NUL in a header value is fine: values are bytes.)
BAD: list[tuple[Any, dict[str, Any]]] = [
    ({}, {"headers": {"trace\x00id": "1"}}),
    ({}, {"headers": [("", "1")]}),
    ({}, {"headers": {f"trace{LONE}": "1"}}),
    ({}, {"headers": {"trace-id": f"1{LONE}"}}),
    (b"x", {"content_type": "text/plain\x00"}),
    (b"x", {"content_type": f"text/{LONE}"}),
    ({}, {"key": f"customer-{LONE}"}),
    (f"text {LONE}", {}),
    ({"name": f"file{LONE}.txt"}, {}),
]
BAD_IDS = [
    "nul-header-name",
    "empty-header-name",
    "surrogate-header-name",
    "surrogate-header-value",
    "nul-content-type",
    "surrogate-content-type",
    "surrogate-key",
    "surrogate-text-payload",
    "surrogate-json-payload",
]


@pytest.fixture
def orders(engine: sa.Engine) -> sa.Engine:
    """A business table, written in the same transaction as the events."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE orders (id int PRIMARY KEY)"))
    return engine


def _order_ids(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT id FROM orders ORDER BY id")).scalars())


@pytest.mark.parametrize("at_commit", [False, True], ids=["default", "at-commit"])
@pytest.mark.parametrize(("payload", "kwargs"), BAD, ids=BAD_IDS)
def test_bad_input_is_a_payload_error_and_the_transaction_goes_on(
    orders: sa.Engine, payload: Any, kwargs: dict[str, Any], at_commit: bool
) -> None:
    outbox = Outbox(at_commit=at_commit)
    with Session(orders) as session, session.begin():
        session.execute(sa.text("INSERT INTO orders VALUES (1)"))
        good = outbox.publish(session, "orders", {"id": 1}, key="c1", headers={"h": "v"})
        with pytest.raises(PayloadError):
            outbox.publish(session, "orders", payload, **kwargs)
        with pytest.raises(PayloadError):
            outbox.publish_many(
                session, [Message("orders", {"id": 2}), Message("orders", payload, **kwargs)]
            )
        # Still usable: more business writes and events, then the commit.
        session.execute(sa.text("INSERT INTO orders VALUES (2)"))
        after = outbox.publish(session, "orders", {"id": 2}, key="c1")
    assert _order_ids(orders) == [1, 2]
    assert [r.message_id for r in rows(orders)] == [good, after]


def test_bad_input_on_a_core_connection(orders: sa.Engine) -> None:
    outbox = Outbox()
    with orders.begin() as conn:
        conn.execute(sa.text("INSERT INTO orders VALUES (1)"))
        for payload, kwargs in BAD:
            with pytest.raises(PayloadError):
                outbox.publish(conn, "orders", payload, **kwargs)
        outbox.publish(conn, "orders", {"id": 1})
    assert _order_ids(orders) == [1]
    assert len(rows(orders)) == 1


@pytest.mark.parametrize("at_commit", [False, True], ids=["default", "at-commit"])
def test_bad_input_async(orders: sa.Engine, db_url: str, at_commit: bool) -> None:
    outbox = Outbox(at_commit=at_commit)

    async def main() -> None:
        aengine = create_async_engine(db_url)
        try:
            async with AsyncSession(aengine) as session, session.begin():
                await session.execute(sa.text("INSERT INTO orders VALUES (1)"))
                for payload, kwargs in BAD:
                    with pytest.raises(PayloadError):
                        await outbox.apublish(session, "orders", payload, **kwargs)
                await outbox.apublish(session, "orders", {"id": 1})
        finally:
            await aengine.dispose()

    asyncio.run(main())
    assert _order_ids(orders) == [1]
    assert len(rows(orders)) == 1


def test_bad_domain_event_is_refused_when_recorded(orders: sa.Engine) -> None:
    class Base(sa.orm.DeclarativeBase):
        pass

    class Order(EventSource, Base):
        __tablename__ = "orders"
        id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True)

    outbox = Outbox()
    factory = sa.orm.sessionmaker(orders)
    collect_events(outbox, factory)
    with factory.begin() as session:
        order = Order(id=1)
        session.add(order)
        with pytest.raises(PayloadError):
            order.record_event("orders", {}, headers={"h\x00": "v"})
        order.record_event("orders", {"id": 1})
    assert _order_ids(orders) == [1]
    assert len(rows(orders)) == 1


# -- an unreachable database ---------------------------------------------------------------------


@pytest.fixture
def nowhere() -> Iterator[sa.Engine]:
    """An engine whose server is down: nothing listens on its port."""
    engine = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/app")
    yield engine
    engine.dispose()


@pytest.mark.parametrize("at_commit", [False, True], ids=["default", "at-commit"])
def test_publish_without_a_server_is_unavailable(nowhere: sa.Engine, at_commit: bool) -> None:
    # The session connects at the first statement: the publish call.
    outbox = Outbox(at_commit=at_commit)
    with Session(nowhere) as session:
        with pytest.raises(DatabaseUnavailableError, match="cannot reach the database"):
            outbox.publish(session, "orders", {"id": 1})
        with pytest.raises(DatabaseUnavailableError):
            outbox.publish_many(session, [Message("orders", {"id": 1})])


def test_apublish_without_a_server_is_unavailable() -> None:
    async def main() -> None:
        aengine = create_async_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")
        try:
            async with AsyncSession(aengine) as session:
                await Outbox().apublish(session, "orders", {"id": 1})
        finally:
            await aengine.dispose()

    with pytest.raises(DatabaseUnavailableError, match="cannot reach the database"):
        asyncio.run(main())


def _terminate(engine: sa.Engine, conn: sa.Connection) -> None:
    pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    with engine.connect() as other:
        other.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})


def test_publish_after_the_server_ended_the_session_is_unavailable(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        transaction = conn.begin()
        Outbox().publish(conn, "orders", {"id": 1})
        _terminate(engine, conn)
        with pytest.raises(DatabaseUnavailableError, match="cannot reach the database"):
            Outbox().publish(conn, "orders", {"id": 2})
        # SQLAlchemy knows the connection is gone: the rollback ends the transaction quietly.
        assert conn.invalidated
        transaction.rollback()
    assert rows(engine) == []


def test_a_session_ended_by_the_server_ends_the_with_block_as_unavailable(
    engine: sa.Engine,
) -> None:
    with pytest.raises(DatabaseUnavailableError):  # noqa: SIM117
        with Session(engine) as session, session.begin():
            Outbox().publish(session, "orders", {"id": 1})
            _terminate(engine, session.connection())
            Outbox().publish(session, "orders", {"id": 2})


def test_a_lost_connection_rolls_back_quietly_with_an_at_commit_outbox(engine: sa.Engine) -> None:
    # Once any Outbox(at_commit=True) existed in the process, the rollback of an invalidated
    # connection raised PendingRollbackError from the at-commit listener.
    Outbox(at_commit=True)
    with pytest.raises(DatabaseUnavailableError):  # noqa: SIM117
        with Session(engine) as session, session.begin():
            Outbox().publish(session, "orders", {"id": 1})
            _terminate(engine, session.connection())
            Outbox().publish(session, "orders", {"id": 2})


def test_a_statement_failure_is_still_a_database_error(engine: sa.Engine) -> None:
    mid = uuid.uuid4()
    with Session(engine) as session, session.begin():
        Outbox().publish(session, "orders", {"id": 1}, message_id=mid)
        with pytest.raises(DatabaseError) as info:
            Outbox().publish(session, "orders", {"id": 1}, message_id=mid)
        assert not isinstance(info.value, DatabaseUnavailableError)
        session.rollback()
