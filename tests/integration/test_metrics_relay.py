"""The relay's metrics against the real database (in-memory transport): per-topic sends, the
commit-to-acknowledge histogram, and the SQL gauges (backlog, oldest pending age, dead)."""

from __future__ import annotations

import sqlalchemy as sa

from outbox import RelayConfig
from outbox.metrics import RelayMetrics, relay_table_gauges
from outbox.transport.base import DeliveryFailure, FailureKind, OutgoingMessage
from outbox.transport.memory import MemoryTransport
from tests.support.relay import make_relay, publish
from tests.support.scrape import sample


def test_a_relay_run_is_counted_and_the_table_is_measured(engine: sa.Engine, db_url: str) -> None:
    publish(engine, [(f"k{i % 4}", f"o{i}") for i in range(30)], topic="orders")
    publish(engine, [("p", "x"), ("p", "y")], topic="payments")

    def refuse(m: OutgoingMessage) -> DeliveryFailure | None:
        return DeliveryFailure(FailureKind.MESSAGE, "too large") if m.value == b"x" else None

    gauges = relay_table_gauges(RelayConfig(db_url=db_url), interval=0.0)
    metrics = RelayMetrics(gauges)
    text = metrics.render()[2].decode()
    assert sample(text, "outbox_relay_backlog_messages") == 32
    assert sample(text, "outbox_relay_oldest_pending_age_seconds") >= 0
    assert sample(text, "outbox_relay_dead_messages") == 0

    relay = make_relay(db_url, MemoryTransport(fail=refuse), observers=[metrics], max_attempts=1)
    stats = relay.run_once()
    assert stats.sent == 30 and stats.parked == 1
    text = metrics.render()[2].decode()
    assert sample(text, "outbox_relay_messages_sent_total", topic="orders") == 30
    assert sample(text, "outbox_relay_send_failures_total", kind="message") == 1
    assert sample(text, "outbox_relay_parked_total", topic="payments") == 1
    assert sample(text, "outbox_relay_commit_to_ack_seconds_count") == 30
    # Created a moment ago: every latency is under a minute, none negative.
    assert sample(text, "outbox_relay_commit_to_ack_seconds_bucket", le="60.0") == 30
    assert sample(text, "outbox_relay_claim_duration_seconds_count") >= 1
    # "y" waits behind the parked "x" of its key: still pending.
    assert sample(text, "outbox_relay_backlog_messages") == 1
    assert sample(text, "outbox_relay_dead_messages") == 1
    assert sample(text, "outbox_relay_leader") == 0  # stopped
    gauges.close()


def test_the_gauges_survive_a_database_they_cannot_read(db_url: str) -> None:
    gauges = relay_table_gauges(RelayConfig(db_url=db_url, table="no_such_table"), interval=0.0)
    metrics = RelayMetrics(gauges)
    text = metrics.render()[2].decode()
    assert "outbox_relay_backlog_messages" not in text  # no value yet: no sample, no error
    assert gauges.errors == 1
