"""KafkaSource's pause, resume and rewind on the real broker, which the consumer's circuit
breaker rests on: paused, the member stays in its group and gets nothing; the rewound message
comes back first; partitions assigned while paused start paused. And what a polled batch
holds: what librdkafka has fetched."""

from __future__ import annotations

import collections
import threading
import time

from confluent_kafka import Producer

from outbox.transport.base import IncomingMessage
from outbox.transport.kafka import KafkaSource
from tests.support.broker import Broker
from tests.support.waits import wait_until

GROUP_SETTINGS = {"session.timeout.ms": "2000", "heartbeat.interval.ms": "500"}


def produce(broker: Broker, topic: str, n: int) -> None:
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(n):
        producer.produce(topic, value=str(i).encode(), key=f"k{i % 8}".encode())
    producer.flush(10)


def poll_until(source: KafkaSource, seconds: float) -> list[IncomingMessage]:
    got: list[IncomingMessage] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        m = source.poll(0.1)
        if m is not None:
            got.append(m)
    return got


def first_message(source: KafkaSource) -> IncomingMessage:
    found: list[IncomingMessage] = []

    def polled() -> bool:
        m = source.poll(0.2)
        if m is not None:
            found.append(m)
        return bool(found)

    wait_until(polled, timeout=30, what="a first message")
    return found[0]


def in_partition_order(messages: list[IncomingMessage]) -> bool:
    offsets: dict[int, list[int]] = collections.defaultdict(list)
    for m in messages:
        offsets[m.partition].append(m.offset)
    return all(o == sorted(o) for o in offsets.values())


def test_paused_source_hands_out_nothing_then_the_rewound_message_first(
    broker: Broker,
) -> None:
    topic = broker.create_topic(partitions=4)
    produce(broker, topic, 40)
    source = KafkaSource(broker.bootstrap, f"g-{topic}", [topic], GROUP_SETTINGS)
    try:
        m = first_message(source)
        source.pause()
        source.rewind(m)
        assert poll_until(source, 3.0) == []  # in the group, heartbeating, and silent
        source.resume()
        rest = poll_until(source, 5.0)
        assert rest and rest[0] == m
        everything = rest
        assert sorted(int(x.value or b"") for x in everything) == list(range(40))
        assert in_partition_order(everything)
        assert source.assignments == 1  # no rebalance while paused
    finally:
        source.close()


def test_partitions_assigned_while_paused_start_paused(broker: Broker) -> None:
    topic = broker.create_topic(partitions=4)
    group = f"g-{topic}"
    a = KafkaSource(broker.bootstrap, group, [topic], GROUP_SETTINGS)
    b = KafkaSource(broker.bootstrap, group, [topic], GROUP_SETTINGS)
    try:
        # Both join (nothing to read yet), then a pauses and b leaves: a is given b's
        # partitions while paused.
        wait_until(
            lambda: (a.poll(0.1), b.poll(0.1)) and a.joined and b.joined,
            timeout=30,
            what="both members joined",
        )
        a.pause()
        before = a.assignments
        b.close()
        produce(broker, topic, 40)
        wait_until(
            lambda: a.poll(0.1) is None and a.assignments > before,
            timeout=30,
            what="a rebalance giving a every partition",
        )
        assert poll_until(a, 3.0) == []
        a.resume()
        got = poll_until(a, 5.0)
        assert sorted(int(x.value or b"") for x in got) == list(range(40))
        assert in_partition_order(got)
    finally:
        a.close()


def batch_until(source: KafkaSource, seconds: float, size: int = 50) -> list[IncomingMessage]:
    got: list[IncomingMessage] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got += source.poll_batch(size, 0.1, 0.01)
    return got


def test_poll_batch_then_several_rewinds_in_one_partition_come_back_first_in_order(
    broker: Broker,
) -> None:
    topic = broker.create_topic(partitions=2)
    produce(broker, topic, 60)
    source = KafkaSource(broker.bootstrap, f"g-{topic}", [topic], GROUP_SETTINGS)
    try:
        batch: list[IncomingMessage] = []

        def polled() -> bool:
            batch.extend(source.poll_batch(20, 0.2, 0.05))
            return len(batch) >= 10

        wait_until(polled, timeout=30, what="a first batch")
        assert len(batch) <= 20 + 19 and in_partition_order(batch)
        # The batch's tail from its fourth message on goes back (as when the breaker opens
        # there), rewound in reverse and twice over: held per partition in offset order.
        tail = batch[3:]
        source.pause()
        for m in [*reversed(tail), *tail]:
            source.rewind(m)
        assert batch_until(source, 2.0) == []  # paused: nothing
        source.resume()
        again = batch_until(source, 5.0)
        by_partition: dict[int, list[IncomingMessage]] = collections.defaultdict(list)
        for m in tail:
            by_partition[m.partition].append(m)
        for partition, held in by_partition.items():
            mine = [m for m in again if m.partition == partition]
            assert mine[: len(held)] == held  # the held ones first, in order, once
        everything = batch[:3] + again
        assert sorted(int(x.value or b"") for x in everything) == list(range(60))
        assert in_partition_order(everything)
        assert source.assignments == 1
    finally:
        source.close()


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
