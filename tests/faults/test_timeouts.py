"""Timeouts an operator sets on the relay's role (``ALTER ROLE relay SET ...``), with a backlog,
writers, and a standby relay: the relay keeps going and delivers everything.

* ``statement_timeout`` / ``lock_timeout``: a session holds a row lock on the oldest message,
  so the relay's mark (``DELETE``) waits and is cancelled. The relay classifies it as
  transient, keeps its session and leadership, and marks again until the lock is gone.
* ``idle_in_transaction_session_timeout``: the relay never idles inside a transaction; the
  standby waits for the leader lock inside a short one, which is never idle. Nobody's session
  ends, leadership never moves.
* ``idle_session_timeout`` (PostgreSQL 14+): the leader idles between notifications and while
  the broker acknowledges a batch; the relay's sessions opt out of this timeout (meant for
  leaked application sessions), so none is ended, even when it is shorter than the broker's
  latency (which used to re-send the same batch forever).

A standby waits for the leader lock in slices of ``--leader-retry-interval`` (1 s, one
statement each) under a transaction-local ``statement_timeout``: a shorter one on the role
does not cut every slice short.
"""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Message, Outbox
from tests.faults.conftest import (
    ACKED,
    DATABASE_ERROR,
    DATABASE_LOST,
    RELAY_ARGS,
    SEEDS,
    FaultDb,
    RetryingWriters,
)
from tests.faults.slowbroker import slow_broker
from tests.support.broker import Broker
from tests.support.delivery import (
    LEADER,
    STANDBY,
    Committed,
    RelayFactory,
    check_delivery,
    wait_drained,
)
from tests.support.relayproc import RelayProcess

pytestmark = pytest.mark.slow

BACKLOG = 5000


@dataclasses.dataclass(frozen=True)
class Case:
    setting: str
    value: str
    #: A session holds a row lock on the oldest message until the relay has hit the timeout.
    blocker: bool


CASES = [
    Case("statement_timeout", "50ms", blocker=True),
    Case("lock_timeout", "50ms", blocker=True),
    Case("idle_in_transaction_session_timeout", "50ms", blocker=False),
    Case("idle_session_timeout", "2s", blocker=False),
]


@pytest.fixture
def relay_role(fault_db: FaultDb) -> str:
    """A login role with the relay's privileges (see the how-to, least-privilege roles)."""
    role = f"relay_{uuid.uuid4().hex[:8]}"
    fault_db.cluster.execute(f"CREATE ROLE {role} LOGIN", dbname="app")
    fault_db.cluster.execute(
        f"GRANT SELECT, UPDATE, DELETE ON outbox_messages TO {role}", dbname="app"
    )
    fault_db.cluster.execute(
        f"GRANT SELECT, UPDATE ON outbox_messages_leader TO {role}", dbname="app"
    )
    return role


def backlog(engine: sa.Engine, topic: str, n: int, keys: int = 8) -> list[Committed]:
    """``n`` messages committed before the relay starts (keys ``backlog-NN``, numbered)."""
    outbox = Outbox()
    committed: list[Committed] = []
    seqs = [0] * keys
    with Session(engine) as session, session.begin():
        messages = []
        for i in range(n):
            k = i % keys
            seqs[k] += 1
            key = f"backlog-{k:02d}"
            messages.append(Message(topic, {"key": key, "seq": seqs[k], "pad": ""}, key=key))
            committed.append(Committed("", key, seqs[k], 0.0))
        ids = outbox.publish_many(session, messages)
    return [dataclasses.replace(c, message_id=str(i)) for c, i in zip(committed, ids, strict=True)]


def leaders(*relays: RelayProcess) -> int:
    return sum(r.count(LEADER) for r in relays)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES, ids=[c.setting for c in CASES])
def test_timeouts_on_the_relays_role(
    case: Case,
    seed: int,
    fault_db: FaultDb,
    relay_role: str,
    broker: Broker,
    relays: RelayFactory,
) -> None:
    cluster = fault_db.cluster
    cluster.execute(f"ALTER ROLE {relay_role} SET {case.setting} = '{case.value}'")
    relay_url = cluster.url("app", user=relay_role)
    topic = broker.create_topic(partitions=3)
    committed = backlog(fault_db.engine, topic, BACKLOG)

    blocker = psycopg.connect(cluster.dsn("app")) if case.blocker else None
    if blocker is not None:
        blocker.execute("SELECT id FROM outbox_messages ORDER BY id LIMIT 1 FOR UPDATE")
    try:
        writers = RetryingWriters(fault_db.engine, topic, seed=seed, pause=0.01).start()
        a = relays(relay_url, broker.bootstrap, *RELAY_ARGS, name="relay-a")
        a.wait_for(LEADER, timeout=30)
        b = relays(relay_url, broker.bootstrap, *RELAY_ARGS, name="relay-b")
        b.wait_for(STANDBY, timeout=30)
        if blocker is not None:
            # The first batch was sent and acknowledged; marking it waits for the lock and is
            # cancelled, again and again, while the relay keeps its session.
            pos = 0
            for _ in range(3):
                pos = a.wait_for(DATABASE_ERROR, after=pos, timeout=30)
            assert a.count(ACKED) == 0
            blocker.rollback()
        a.wait_for(ACKED, timeout=30)
        writers.wait_for(300, timeout=30)
        time.sleep(random.Random(seed).uniform(0.5, 1.5))
        committed += writers.stop()

        if case.setting == "idle_session_timeout":
            # Nothing written now: the leader idles, longer than the role's timeout. The relay's
            # sessions opt out of it (a lost leader session re-sends its batch), so nothing is
            # ended and what comes next is sent by the same leader.
            time.sleep(3.0)
            later = RetryingWriters(fault_db.engine, topic, keys=4, threads=1, seed=seed + 99)
            later.keys = [f"later-{i}" for i in range(4)]
            later.start().wait_for(50, timeout=30)
            committed += later.stop()
        wait_drained(fault_db.engine, timeout=60)

        assert a.running and b.running, a.tail() + b.tail()
        got = broker.read_all(topic, expect=len(committed))
        delivery = check_delivery(got, committed)
        lost = a.count(DATABASE_LOST) + b.count(DATABASE_LOST)
        errors = a.count(DATABASE_ERROR) + b.count(DATABASE_ERROR)
        # The session (and with it leadership) survived every timeout.
        assert a.count(DATABASE_LOST) == 0, a.matches(DATABASE_LOST)
        assert (a.count(LEADER), b.count(LEADER)) == (1, 0)
        if case.blocker:
            assert errors >= 3
            # Marks were retried, never given up: nothing was sent twice.
            assert delivery.duplicates == 0, delivery
        print(
            f"{case.setting}={case.value}: {len(committed)} committed ({BACKLOG} backlog), "
            f"statement errors {errors}, sessions lost {lost}, leaderships "
            f"{leaders(a, b)}, {delivery}"
        )
    finally:
        if blocker is not None:
            blocker.close()


def sessions_waiting_for_the_lock(fault_db: FaultDb, seconds: float) -> int:
    """How many lock-wait transactions (standbys waiting on the leader lock) ran during
    ``seconds``: sampled from pg_stat_activity (each has its own ``xact_start``)."""
    starts = set()
    with fault_db.cluster.connect("app") as conn:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            rows = conn.execute(
                "SELECT pid, xact_start FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'"
            ).fetchall()
            starts.update(rows)
            time.sleep(0.005)
    return len(starts)


def test_a_short_statement_timeout_does_not_shorten_the_standbys_wait(
    fault_db: FaultDb, relay_role: str, broker: Broker, relays: RelayFactory
) -> None:
    cluster = fault_db.cluster
    cluster.execute(f"ALTER ROLE {relay_role} SET statement_timeout = '50ms'")
    relay_url = cluster.url("app", user=relay_role)
    relays(relay_url, broker.bootstrap, *RELAY_ARGS, name="relay-a").wait_for(LEADER)
    standby = relays(relay_url, broker.bootstrap, *RELAY_ARGS, name="relay-b")
    standby.wait_for(STANDBY)
    waits = sessions_waiting_for_the_lock(fault_db, 3.0)
    print(f"statement_timeout=50ms: {waits} lock waits of the standby in 3 s")
    assert standby.running
    # --leader-retry-interval 1 s: three or four waits in 3 s (20 a second when each is cut
    # at 50 ms).
    assert waits <= 5, waits


def test_an_idle_session_timeout_shorter_than_the_brokers_latency(
    fault_db: FaultDb, relay_role: str, relays: RelayFactory, tmp_path: Path
) -> None:
    cluster = fault_db.cluster
    cluster.execute(f"ALTER ROLE {relay_role} SET idle_session_timeout = '200ms'")
    with slow_broker(0.4, tmp_path / "tansu.log") as broker:
        topic = broker.create_topic(partitions=3)
        committed = backlog(fault_db.engine, topic, 200)
        relay = relays(cluster.url("app", user=relay_role), broker.bootstrap, *RELAY_ARGS)
        try:
            wait_drained(fault_db.engine, timeout=8)
        finally:
            relay.stop()
            print(
                f"idle_session_timeout=200ms, acknowledgements 0.4 s late: sessions lost "
                f"{relay.count(DATABASE_LOST)}, batches marked {relay.count(ACKED)}"
            )
        got = broker.read_all(topic, expect=len(committed))
        check_delivery(got, committed)
