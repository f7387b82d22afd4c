"""A handler stuck outside the database, with the real ``outbox consume`` command: past
``--handler-timeout`` it dead-letters the message, commits its offset and exits 3; the
restarted consumer skips that message and processes the rest once each."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import sqlalchemy as sa
from confluent_kafka import Producer

from tests.support.broker import Broker
from tests.support.cli import run_cli
from tests.support.handlers import create_effects_table

pytestmark = pytest.mark.slow

KAFKA = ("-X", "session.timeout.ms=2000", "-X", "heartbeat.interval.ms=500")


@pytest.mark.parametrize("batch_size", ["1", "500"])
def test_a_hung_handler_exits_3_and_the_restart_skips_its_message(
    engine: sa.Engine, db_url: str, broker: Broker, batch_size: str
) -> None:
    create_effects_table(engine)
    topic = broker.create_topic(partitions=1)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for n in range(4):
        producer.produce(
            topic,
            value=json.dumps({"n": n}).encode(),
            key=b"k",
            headers=[("message-id", str(uuid.uuid4()).encode())],
        )
    assert producer.flush(10) == 0

    def consume(handler: str, *extra: str) -> tuple[int, str, float]:
        started = time.monotonic()
        done = run_cli(
            "outbox",
            [
                "consume",
                *("--db-url", db_url, "--bootstrap-servers", broker.bootstrap),
                *("--group", "hang", "--topic", topic, "--handler", handler),
                *("--redelivery-horizon-days", "7", "--batch-size", batch_size, *KAFKA),
                # All four messages in one batch however they are fetched: the batch shape
                # asserted below.
                *("--batch-max-wait", "0.5"),
                *extra,
            ],
            import_tests=True,
            timeout=90,
        )
        return done.returncode, done.stderr, time.monotonic() - started

    status, log, took = consume("tests.support.handlers:hang_in_python", "--handler-timeout", "1")
    assert status == 3, log[-3000:]
    assert "event=consumer.handler_hung" in log
    status, log, _ = consume("tests.support.handlers:record_effect", "--idle-timeout", "3")
    assert status == 0, log[-3000:]
    if batch_size == "1":
        assert log.strip().splitlines()[-1] == "processed 2, duplicates 0, dead-lettered 0"
    else:
        # Message 0 was pending in the hung message's batch (rolled back with it), so the
        # hung message's offset was not committed: the restart handles 0 again and skips the
        # hung one by its dead letter's key (docs/guarantees.md §7).
        assert log.strip().splitlines()[-1] == "processed 3, duplicates 1, dead-lettered 0"
    with engine.connect() as conn:
        effects = sorted(r[0] for r in conn.execute(sa.text("SELECT n FROM effects")))
        dead = conn.execute(
            sa.text("SELECT count(*) FROM outbox_messages WHERE topic = :t"), {"t": f"{topic}.dlq"}
        ).scalar_one()
    assert effects == [0, 2, 3] and dead == 1
    print(f"hung handler noticed and the process exited after {took:.1f} s (limit 1 s)")
