"""Broker and database outages under a running ``outbox-relay``: it backs off without spinning,
marks nothing it did not get acknowledged, and recovers on its own with nothing lost and per-key
order kept."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from tests.acceptance.conftest import ProxiedBroker
from tests.support.broker import Broker
from tests.support.delivery import (
    BATCH_DONE,
    LEADER,
    Committed,
    RelayFactory,
    Writers,
    check_delivery,
    table_count,
    table_ids,
    wait_drained,
)
from tests.support.events import event

pytestmark = pytest.mark.slow

FAST = ("--batch-size", "50", "--delivery-timeout", "3", "--log-level", "debug")
BACKING_OFF = event("relay.broker_unavailable")
SEND_FAILED = event("relay.send_failed")
PROBING = event("relay.breaker_half_open")


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_broker_outage_backs_off_marks_nothing_and_recovers(
    fault: str,
    proxied_broker: ProxiedBroker,
    engine: sa.Engine,
    db_url: str,
    relays: RelayFactory,
) -> None:
    pb = proxied_broker
    topic = pb.broker.create_topic(partitions=3)
    writers = Writers(engine, topic, keys=10, threads=2, pause=0.01).start()
    relay = relays(db_url, pb.bootstrap, *FAST)
    relay.wait_for(LEADER, timeout=30)
    pos = 0
    for _ in range(3):
        pos = relay.wait_for(BATCH_DONE, after=pos, timeout=30)

    before_cut = relay.mark()
    cut_at = time.monotonic()
    getattr(pb.proxy, fault)()
    relay.wait_for(BACKING_OFF, after=before_cut, timeout=20)
    # Batches sent before the cut may still report acknowledgements they got before it (the
    # failing batch's own line comes after the backoff line). The relay probes only once none
    # is in flight, so the quiet window starts there.
    relay.wait_for(PROBING, after=before_cut, timeout=20)

    # While the broker is away: no busy loop (CPU time and log volume stay low) ...
    lines, cpu, started = relay.mark(), relay.cpu_seconds(), time.monotonic()
    time.sleep(4.0)
    cpu, elapsed = relay.cpu_seconds() - cpu, time.monotonic() - started
    assert cpu < 0.3 * elapsed, f"relay used {cpu:.2f}s CPU in {elapsed:.1f}s while cut"
    assert relay.count(BACKING_OFF, after=lines) <= 10
    assert relay.count(event("relay.batch", "acked=[1-9]"), after=lines) == 0
    # ... and nothing committed after the cut (so never sent) was removed from the table.
    after_cut = [c for c in writers.snapshot() if c.began > cut_at]
    assert len(after_cut) > 20
    remaining = table_ids(engine)
    assert [c for c in after_cut if c.message_id not in remaining] == []

    restored = relay.mark()
    pb.proxy.restore()
    relay.wait_for(event("relay.batch", "acked=[1-9]"), after=restored, timeout=60)
    time.sleep(0.5)
    committed = writers.stop()
    wait_drained(engine, timeout=60)
    # An outage is not the messages' fault: none was charged a failed attempt.
    assert relay.count(SEND_FAILED) == 0, relay.matches(SEND_FAILED)[:3]

    got = pb.broker.read_all(topic, expect=len(committed))
    delivery = check_delivery(got, committed)
    print(f"{fault}: {cpu:.2f}s CPU in {elapsed:.1f}s cut; {len(committed)} committed, {delivery}")


def test_relay_started_while_broker_unreachable_recovers(
    proxied_broker: ProxiedBroker, engine: sa.Engine, db_url: str, relays: RelayFactory
) -> None:
    pb = proxied_broker
    topic = pb.broker.create_topic(partitions=3)
    outbox = Outbox()
    committed: list[Committed] = []
    with Session(engine) as session, session.begin():
        for n in range(1, 31):
            key = f"key-{n % 4}"
            mid = outbox.publish(session, topic, {"key": key, "seq": n, "pad": ""}, key=key)
            committed.append(Committed(str(mid), key, n, 0.0))

    pb.proxy.cut()
    relay = relays(db_url, pb.bootstrap, *FAST)
    relay.wait_for("broker unreachable at start, will keep trying", timeout=30)
    relay.wait_for(BACKING_OFF, timeout=30)
    assert table_count(engine) == 30

    pb.proxy.restore()
    wait_drained(engine, timeout=60)
    assert relay.count(SEND_FAILED) == 0, relay.matches(SEND_FAILED)[:3]
    got = pb.broker.read_all(topic, expect=30)
    check_delivery(got, committed)


def test_database_connection_killed_under_the_relay(
    engine: sa.Engine, db_url: str, broker: Broker, topic: str, relays: RelayFactory
) -> None:
    writers = Writers(engine, topic, keys=10, threads=2, pause=0.005).start()
    relay = relays(db_url, broker.bootstrap, "--batch-size", "50", "--log-level", "debug")
    pos = relay.wait_for(LEADER, timeout=30)
    dbname = sa.make_url(db_url).database
    for round_ in range(1, 3):
        pos = relay.wait_for(BATCH_DONE, after=pos, timeout=30)
        with engine.connect() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'outbox-relay' AND datname = :db"
                ),
                {"db": dbname},
            ).all()
        # The leader's connection (the relay's claims connection, if open, is named
        # "outbox-relay claims" and is not killed here).
        assert len(killed) == 1, killed
        pos = relay.wait_for(event("relay.database_lost"), after=pos, timeout=30)
        pos = relay.wait_for(LEADER, after=pos, timeout=30)
        assert relay.count(LEADER) == round_ + 1
    relay.wait_for(BATCH_DONE, after=pos, timeout=30)
    committed = writers.stop()
    wait_drained(engine, timeout=60)
    assert relay.running

    got = broker.read_all(topic, expect=len(committed))
    delivery = check_delivery(got, committed)
    # Whatever was in flight at a kill is sent again: at most two batches per kill.
    assert delivery.duplicates <= 2 * 50 * 2, delivery
    print(f"{len(committed)} committed, {delivery}")
