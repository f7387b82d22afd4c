"""Hold-back of a key across the relay's pipeline, when the key's messages fill whole batches:
the relay must neither stall nor reorder (regressions of two bugs found while pipelining)."""

from __future__ import annotations

import random

import sqlalchemy as sa

from outbox.transport.base import OutgoingMessage
from outbox.transport.memory import MemoryTransport
from tests.integration.test_relay_logic import (
    Running,
    by_key,
    count_rows,
    make_relay,
    publish,
    wait_for,
)


class NoDelay(random.Random):
    """Retries are due at once: the failed message is claimable again right away."""

    def uniform(self, a: float, b: float) -> float:
        return a


def test_a_failing_key_that_fills_batches_neither_stalls_nor_reorders(
    engine: sa.Engine, db_url: str
) -> None:
    # 60 messages of one key, batches of 5, two in flight: while its first message is in
    # backoff, every claim is full of that key's messages.
    specs = [("K", f"K-{i:03d}") for i in range(60)] + [("L", f"L-{i:03d}") for i in range(5)]
    publish(engine, specs)
    refused: set[str] = set()

    def reject(m: OutgoingMessage) -> str | None:
        # Refused at send (no delivery report, so nothing drains the pipeline).
        value = (m.value or b"").decode()
        if value in ("K-000", "K-020") and value not in refused:
            refused.add(value)
            return "refused once"
        return None

    transport = MemoryTransport(reject=reject)
    relay = make_relay(db_url, transport, NoDelay(), batch_size=5, max_inflight_batches=2)
    with Running(relay) as running:
        wait_for(lambda: count_rows(engine) == 0 and running.check_alive(), 20, "all sent")
        stats = running.stop()
    sent = by_key(transport.sent)
    assert sent["K"] == [v for k, v in specs if k == "K"]
    assert sent["L"] == [v for k, v in specs if k == "L"]
    assert stats.failed_attempts == 2


def test_outage_mid_batch_resends_the_rest_of_each_key_in_order(
    engine: sa.Engine, db_url: str
) -> None:
    specs = [(f"k{i % 3}", f"v{i:03d}") for i in range(40)]
    publish(engine, specs)

    class FlakyTransport(MemoryTransport):
        sends = 0

        def send(self, message: OutgoingMessage, on_delivery: object) -> None:
            FlakyTransport.sends += 1
            if FlakyTransport.sends in (7, 19):
                from outbox.transport.base import TransportUnavailable

                raise TransportUnavailable("connection reset")
            super().send(message, on_delivery)  # type: ignore[arg-type]

    transport = FlakyTransport()
    relay = make_relay(db_url, transport, batch_size=6, max_inflight_batches=2)
    with Running(relay) as running:
        wait_for(lambda: count_rows(engine) == 0 and running.check_alive(), 20, "all sent")
        running.stop()
    sent = by_key(transport.sent)
    for key in ("k0", "k1", "k2"):
        assert sent[key] == [v for k, v in specs if k == key]
