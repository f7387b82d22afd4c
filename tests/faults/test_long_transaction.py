"""A transaction that publishes for key K and stays open for seconds, while other writers
publish K and other keys: the other keys flow meanwhile; K's later messages wait (their
writers wait for the per-key lock at their publish call or, with ``at_commit``, at their
commit) and are delivered after the held one, in commit order.

Commit order is read from the server itself, not inferred from ids: the cluster tracks commit
timestamps (``track_commit_timestamp = on``), and every K transaction records its xid.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from tests.faults.conftest import ACKED, RELAY_ARGS, SEEDS, Clusters, RetryingWriters, install
from tests.support.broker import Broker, Message
from tests.support.delivery import (
    LEADER,
    RelayFactory,
    check_delivery,
    table_ids,
    wait_drained,
)

pytestmark = pytest.mark.slow

HELD_KEY = "held"
HOLD = 5.0

XID = sa.text("SELECT CAST(pg_current_xact_id() AS text)")


class KeyWriters:
    """Threads that each keep committing one message of ``key`` per transaction (odd threads
    with ``Outbox(at_commit=True)``), recording (message id, xid)."""

    def __init__(self, engine: sa.Engine, topic: str, key: str, threads: int = 3) -> None:
        self.engine = engine
        self.topic = topic
        self.key = key
        self.committed: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    def start(self) -> KeyWriters:
        for t in self._threads:
            t.start()
        return self

    def count(self) -> int:
        with self._lock:
            return len(self.committed)

    def stop(self) -> list[tuple[str, str]]:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        if self._errors:
            raise self._errors[0]
        return self.committed

    def _run(self, index: int) -> None:
        outbox = Outbox(at_commit=index % 2 == 1)
        try:
            while not self._stop.is_set():
                with Session(self.engine) as session, session.begin():
                    xid = session.execute(XID).scalar_one()
                    mid = outbox.publish(session, self.topic, {"xid": xid}, key=self.key)
                with self._lock:
                    self.committed.append((str(mid), xid))
                time.sleep(0.01)
        except BaseException as exc:
            self._errors.append(exc)


def commit_order(engine: sa.Engine, txns: list[tuple[str, str]]) -> list[str]:
    """The message ids of ``txns`` (message id, xid) in the order their transactions
    committed, by the server's commit timestamps."""
    with engine.connect() as conn:
        stamped = [
            (
                conn.execute(
                    sa.text("SELECT pg_xact_commit_timestamp(CAST(:x AS xid))"), {"x": xid}
                ).scalar_one(),
                mid,
            )
            for mid, xid in txns
        ]
    assert all(ts is not None for ts, _ in stamped)
    stamps = [ts for ts, _ in stamped]
    assert len(set(stamps)) == len(stamps), "two K transactions with one commit time"
    return [mid for _, mid in sorted(stamped)]


@pytest.mark.parametrize("seed", SEEDS)
def test_a_long_open_transaction_holds_back_its_key_only(
    seed: int, pg_clusters: Clusters, broker: Broker, relays: RelayFactory
) -> None:
    cluster = pg_clusters.primary(settings={"track_commit_timestamp": "on"})
    url = install(cluster)
    engine = sa.create_engine(url, pool_size=10)
    try:
        topic = broker.create_topic(partitions=3)
        relay = relays(url, broker.bootstrap, *RELAY_ARGS)
        relay.wait_for(LEADER, timeout=30)
        others = RetryingWriters(engine, topic, seed=seed).start()
        others.wait_for(50)

        # The held transaction: publishes K, then stays open.
        held = Session(engine)
        held.begin()
        held_xid = held.execute(XID).scalar_one()
        held_id = str(Outbox().publish(held, topic, {"xid": held_xid}, key=HELD_KEY))
        opened = time.monotonic()
        k_writers = KeyWriters(engine, topic, HELD_KEY).start()
        time.sleep(random.Random(seed).uniform(0.0, 0.5))
        before = relay.mark()
        time.sleep(max(0.0, HOLD - (time.monotonic() - opened)))

        # Meanwhile: no other K transaction could commit, the other keys flowed.
        assert k_writers.count() == 0
        flowed = [c for c in others.snapshot() if opened < c.began < time.monotonic() - 1.5]
        assert len(flowed) > 50, len(flowed)
        left = table_ids(engine) & {c.message_id for c in flowed}
        assert not left, f"{len(left)} messages of other keys waited for the held transaction"
        assert relay.count(ACKED, after=before) > 0
        held.commit()
        held.close()
        held_for = time.monotonic() - opened

        # K's waiting writers go on, one after the other.
        deadline = time.monotonic() + 30
        while k_writers.count() < 30:
            assert time.monotonic() < deadline, "K's writers did not go on"
            time.sleep(0.05)
        k_txns = k_writers.stop()
        committed = others.stop()
        wait_drained(engine, timeout=60)
        assert relay.running, relay.tail()

        got = broker.read_all(topic, expect=len(committed) + len(k_txns) + 1)
        key = HELD_KEY.encode()
        delivery = check_delivery([m for m in got if m.key != key], committed)
        order = commit_order(engine, [(held_id, held_xid), *k_txns])
        assert order[0] == held_id  # the others waited for it
        firsts = first_occurrences([m for m in got if m.key == key])
        assert firsts == order, "K's messages did not arrive in commit order"
        print(
            f"held {held_for:.1f} s: {len(flowed)} messages of other keys delivered meanwhile; "
            f"then {len(k_txns)} K transactions, delivered in commit order; others {delivery}"
        )
    finally:
        engine.dispose()


def first_occurrences(messages: list[Message]) -> list[str]:
    """Message ids in partition-offset order, each once (first occurrence)."""
    assert len({m.partition for m in messages}) <= 1
    seen: dict[str, None] = {}
    for m in sorted(messages, key=lambda m: (m.partition, m.offset)):
        seen.setdefault(m.message_id, None)
    return list(seen)
