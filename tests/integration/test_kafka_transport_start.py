"""A new Kafka producer is ready to send once check() returns (real broker)."""

from __future__ import annotations

import time

from outbox.transport.base import OutgoingMessage
from outbox.transport.kafka import KafkaTransport
from tests.support.broker import Broker


def test_the_first_message_after_check_does_not_wait_for_a_producer_id(
    broker: Broker, topic: str
) -> None:
    # The idempotent producer sends nothing before it has a producer id, which librdkafka asks
    # for on a metadata response or every 500 ms. After a single metadata request, about
    # every other new client made its first batch wait for that timer: the relay's start,
    # and every round of the throughput benchmark (its dips to half speed).
    took: list[float] = []
    for _ in range(8):
        transport = KafkaTransport(broker.bootstrap, {"message.timeout.ms": "10000"})
        try:
            transport.check(10)
            reports: list[object] = []

            def report(err: object, _msg: object = None) -> None:
                reports.append(err)

            start = time.monotonic()
            transport.send(OutgoingMessage(topic, b"k", b"v", []), report)
            while not reports and time.monotonic() - start < 10:
                transport.flush(0.01)
            took.append(time.monotonic() - start)
            assert reports == [None]
        finally:
            transport.close(5)
    assert max(took) < 0.3, [f"{t:.3f}" for t in took]
