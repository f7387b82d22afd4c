"""A role that is not a relay cannot stall the relays by taking their leader lock first.

Advisory locks are not privileges. The lock id depends on the leader table's epoch, which only
relay roles can read; a relay that finds the current epoch's lock held by a role that may not
change the leader table moves every relay to a new epoch and leads. A lock held by another
relay is never taken away: that relay is a leader, and the others wait."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from outbox import define_tables
from outbox.transport.memory import MemoryTransport
from tests.support.relay import Running, count_rows, make_relay, publish
from tests.support.waits import wait_until


def epoch(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT epoch FROM outbox_messages_leader")).scalar_one())


@pytest.fixture
def squatter(engine: sa.Engine, db_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A session of a login role with no privilege on the outbox tables."""
    role = f"squat_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
    url = sa.make_url(db_url)
    session = psycopg.connect(
        host=url.host, port=url.port, dbname=url.database, user=role, autocommit=True
    )
    try:
        yield session
    finally:
        session.close()
        with engine.begin() as admin:
            admin.execute(sa.text(f"DROP ROLE {role}"))


def test_a_squatter_on_the_leader_lock_does_not_stall_the_relay(
    engine: sa.Engine,
    db_url: str,
    squatter: psycopg.Connection[tuple[object, ...]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    publish(engine, [("k", f"v{i}") for i in range(5)])
    # The squatter learned the lock id (e.g. from pg_locks while a relay held it) and takes it
    # while no relay runs: with a lock id of the table name alone, every relay then waited.
    before = epoch(engine)
    lock_id = define_tables().leader_lock_id(before)
    squatter.execute("SELECT pg_advisory_lock(%s)", (lock_id,))
    transport = MemoryTransport()
    relay = make_relay(db_url, transport, leader_retry_interval=0.2)
    caplog.set_level(logging.ERROR, logger="outbox.relay")
    with Running(relay) as running:
        wait_until(lambda: count_rows(engine) == 0 and running.check_alive(), 15, "all sent")
        running.stop()
    assert len(transport.sent) == 5
    assert epoch(engine) != before
    [record] = [
        r for r in caplog.records if getattr(r, "event", "") == "relay.leader_lock_squatted"
    ]
    assert record.holder_role.startswith("squat_")  # type: ignore[attr-defined]


def test_a_standby_never_moves_the_epoch_away_from_a_leading_relay(
    engine: sa.Engine, db_url: str
) -> None:
    before = epoch(engine)
    first = make_relay(db_url, MemoryTransport(), leader_retry_interval=0.1)
    second = make_relay(db_url, MemoryTransport(), leader_retry_interval=0.1)
    with Running(first) as a:
        wait_until(lambda: first.is_leader and a.check_alive(), 10, "a leader")
        with Running(second) as b:
            wait_until(lambda: b.check_alive() and _waiting(engine), 10, "the standby waiting")
            # Proving a non-event: several of its 0.1 s waits time out (each followed by the
            # check of who holds the lock) while the leader holds it.
            time.sleep(0.6)
            assert not second.is_leader and first.is_leader
            b.stop()
        a.stop()
    assert epoch(engine) == before


def _waiting(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        n = conn.execute(
            sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        ).scalar_one()
    return int(n) > 0
