"""SIGTERM / SIGINT to a busy ``outbox-relay``: it finishes what is in flight and exits 0."""

from __future__ import annotations

import re
import signal
import time

import pytest
import sqlalchemy as sa

from tests.support.broker import Broker
from tests.support.delivery import (
    BATCH_DONE,
    LEADER,
    RelayFactory,
    Writers,
    check_delivery,
    table_ids,
)

pytestmark = pytest.mark.slow

#: How long a relay under load may take to stop (shutdown_timeout is 10 s; with a healthy
#: broker the in-flight batches are acknowledged in milliseconds).
EXIT_BOUND = 10.0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_under_load_exits_0_and_removes_only_acknowledged_rows(
    sig: signal.Signals,
    engine: sa.Engine,
    db_url: str,
    broker: Broker,
    topic: str,
    relays: RelayFactory,
) -> None:
    writers = Writers(engine, topic, keys=10, threads=3, seed=int(sig)).start()
    relay = relays(db_url, broker.bootstrap, "--batch-size", "50", "--log-level", "debug")
    relay.wait_for(LEADER, timeout=30)
    pos = 0
    for _ in range(5):  # it is busy
        pos = relay.wait_for(BATCH_DONE, after=pos, timeout=30)

    started = time.monotonic()
    relay.send_signal(sig)
    rc = relay.wait(EXIT_BOUND + 5)
    took = time.monotonic() - started
    committed = writers.stop()

    assert rc == 0, relay.tail()
    assert took < EXIT_BOUND, f"took {took:.1f}s to stop"
    assert relay.count("relay stopped") == 1
    assert not relay.matches("Traceback|could not mark")
    summary = relay.matches(r"^sent \d+, failed attempts 0, parked 0$")
    assert summary, relay.tail()
    sent = int(re.findall(r"\d+", summary[0])[0])

    # Every row that left the table is in Kafka (removed only once acknowledged) ...
    committed_ids = {c.message_id for c in committed}
    gone = committed_ids - table_ids(engine)
    assert len(gone) == sent
    got = broker.read_all(topic, expect=len(gone))
    in_kafka = {m.message_id for m in got}
    assert gone <= in_kafka, f"{len(gone - in_kafka)} rows removed but never acknowledged"
    # ... and a graceful stop leaves nothing acknowledged-but-unmarked behind (no duplicates
    # for the next relay to send).
    assert in_kafka == gone
    delivery = check_delivery(got, committed, complete=False)
    assert delivery.duplicates == 0
    print(f"{sig.name}: stopped in {took:.2f}s; {sent} sent, {len(committed) - sent} left")
