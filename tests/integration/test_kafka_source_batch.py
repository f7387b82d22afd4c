"""KafkaSource.poll_batch on the real broker: a batch is what librdkafka has fetched."""

from __future__ import annotations

import threading
import time

from outbox.transport.base import IncomingMessage
from outbox.transport.kafka import KafkaSource
from tests.integration.test_kafka_source_pause import GROUP_SETTINGS, in_partition_order, produce
from tests.support.broker import Broker
from tests.support.waits import wait_until


def test_a_batch_that_waited_for_its_first_message_takes_the_rest_of_its_fetch(
    broker: Broker,
) -> None:
    """With no wait to fill (the default), a poll that found nothing fetched waits for one
    message; the others of the same fetch arrived with it and go in the same batch, rather
    than in a batch of one followed by the rest (two transactions for one clump)."""
    topic = broker.create_topic(partitions=1)
    source = KafkaSource(broker.bootstrap, f"g-{topic}", [topic], GROUP_SETTINGS)
    try:
        wait_until(lambda: source.poll(0.1) is None and source.joined, 30, "the group joined")
        got: list[IncomingMessage] = []
        waiting = threading.Thread(target=lambda: got.extend(source.poll_batch(500, 15.0, 0.0)))
        waiting.start()
        time.sleep(0.3)  # the poll waits for a first message
        produce(broker, topic, 20)  # one produce request, so one fetch
        waiting.join(20)
        assert len(got) == 20, [m.offset for m in got]
        assert in_partition_order(got)
    finally:
        source.close()
