"""outbox.metrics without a database or broker: the bulk histogram, the SQL gauges' cache, and
what the relay's and the consumer's hooks turn into."""

from __future__ import annotations

import random
from typing import Any

import pytest

from outbox.breaker import Breaker, BreakerPolicy, Transition
from outbox.metrics import BulkHistogram, ConsumerMetrics, RelayMetrics, TableGauges
from outbox.observe import BatchOutcome, MessageRef, Outcome
from tests.support.incoming import message
from tests.support.scrape import sample


def test_bulk_histogram_counts_are_cumulative_and_exact() -> None:
    h = BulkHistogram("x_seconds", "doc", (0.01, 0.1, 1.0))
    h.observe_many([0.5, 0.005, 0.05, 0.01, 2.0])
    h.observe_many([])
    family = h.family()
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[("x_seconds_bucket", "0.01")] == 2  # 0.005 and 0.01 (le is inclusive)
    assert samples[("x_seconds_bucket", "0.1")] == 3
    assert samples[("x_seconds_bucket", "1.0")] == 4
    assert samples[("x_seconds_bucket", "+Inf")] == 5
    assert samples[("x_seconds_count", None)] == 5
    assert samples[("x_seconds_sum", None)] == pytest.approx(2.565)


class FakeConnection:
    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows
        self.closed = False
        self.queries = 0

    def execute(self, sql: str) -> FakeConnection:
        self.queries += 1
        if isinstance(self.rows[0], Exception):
            raise self.rows.pop(0)
        return self

    def fetchone(self) -> Any:
        return self.rows.pop(0) if len(self.rows) > 1 else self.rows[0]

    def close(self) -> None:
        self.closed = True


def test_table_gauges_query_at_most_once_per_interval_and_keep_the_last_values() -> None:
    now = [100.0]
    conn = FakeConnection([(7, 12.5, 1), RuntimeError("server closed the connection"), (3, 0, 0)])
    connects = []

    def connect() -> FakeConnection:
        connects.append(1)
        return conn

    gauges = TableGauges(connect, "outbox_messages", interval=5.0, clock=lambda: now[0])
    assert gauges.read() == (7.0, 12.5, 1.0)
    for _ in range(50):  # a scrape storm
        assert gauges.read() == (7.0, 12.5, 1.0)
    assert conn.queries == 1
    now[0] += 5
    assert gauges.read() == (7.0, 12.5, 1.0)  # the query failed: last values kept
    assert gauges.errors == 1 and conn.closed
    conn.closed = False
    now[0] += 5
    assert gauges.read() == (3.0, 0.0, 0.0)
    assert len(connects) == 2  # reconnected after the failure


def test_relay_hooks_become_metrics() -> None:
    m = RelayMetrics()
    m.leadership(True)
    m.claim_finished(100, False, 0.002)
    m.messages_acked(["orders"] * 3 + ["payments"], [1000.0, 1000.5, 1001.0, 1001.0], 1001.0)
    m.batch_finished(BatchOutcome(claimed=6, acked=4, failed=2, parked=1, unsent=0, seconds=0.01))
    m.send_failed(MessageRef(1, "orders", b"k", "m-1"), "too large")
    m.send_failed(MessageRef(2, "orders", b"k", "m-2"), "too large")
    m.parked(MessageRef(2, "orders", b"k", "m-2"), 5)
    m.broker_unavailable("down", 1.0, 1)
    m.breaker_changed(Transition("open", "down", 1, 0, 0, 1.0))
    text = m.render()[2].decode()
    assert sample(text, "outbox_relay_leader") == 1
    assert sample(text, "outbox_relay_messages_sent_total", topic="orders") == 3
    assert sample(text, "outbox_relay_messages_sent_total", topic="payments") == 1
    assert sample(text, "outbox_relay_send_failures_total", kind="message") == 2
    assert sample(text, "outbox_relay_send_failures_total", kind="transport") == 1
    assert sample(text, "outbox_relay_parked_total", topic="orders") == 1
    assert sample(text, "outbox_relay_retries_total") == 1
    assert sample(text, "outbox_relay_commit_to_ack_seconds_count") == 4
    assert sample(text, "outbox_relay_commit_to_ack_seconds_sum") == pytest.approx(1.5)
    assert sample(text, "outbox_relay_claim_duration_seconds_count") == 1
    assert sample(text, "outbox_relay_broker_state", state="open") == 1
    assert sample(text, "outbox_relay_broker_state", state="closed") == 0
    m.breaker_changed(Transition("closed", "back", 0, 0, 0, 4.5))
    m.database_lost("gone", 0, 1.0)
    text = m.render()[2].decode()
    assert sample(text, "outbox_relay_broker_paused_seconds_total") == 4.5
    assert sample(text, "outbox_relay_leader") == 0
    assert sample(text, "outbox_relay_database_reconnects_total") == 1
    # No message id or key ever becomes a label.
    assert "message_id" not in text and 'key="' not in text


class FakeSource:
    def __init__(self) -> None:
        self.lag = {("orders", 0): 5, ("orders", 1): 0}
        self.commits = 3


class FakeConsumer:
    source = FakeSource()
    breaker = Breaker(BreakerPolicy(), random.Random(1))


def test_consumer_hooks_and_live_values_become_metrics() -> None:
    m = ConsumerMetrics()
    m.watch(FakeConsumer())
    outcomes: list[Outcome] = ["processed", "processed", "duplicate", "dead_lettered"]
    for outcome in outcomes:
        m.message_finished(message(0), outcome, 0.01)
    m.attempt_failed(message(0), "k", 1, "boom", 0.1)
    m.transient_failure(message(0), "k", "down", 0.1)
    m.breaker_changed(Transition("open", "down", 5, 10, 5, 1.0))
    text = m.render()[2].decode()
    assert sample(text, "outbox_consumer_messages_total", topic="orders", outcome="processed") == 2
    assert sample(text, "outbox_consumer_messages_total", topic="orders", outcome="duplicate") == 1
    assert (
        sample(text, "outbox_consumer_messages_total", topic="orders", outcome="dead_lettered") == 1
    )
    assert sample(text, "outbox_consumer_retries_total", topic="orders") == 1
    assert sample(text, "outbox_consumer_transient_failures_total", topic="orders") == 1
    assert sample(text, "outbox_consumer_message_duration_seconds_count", topic="orders") == 4
    assert sample(text, "outbox_consumer_lag_messages", topic="orders", partition="0") == 5
    assert sample(text, "outbox_consumer_offset_commits_total") == 3
    assert sample(text, "outbox_consumer_breaker_state", state="open") == 1
    assert sample(text, "outbox_consumer_retry_budget_used_ratio") == 0
