"""A message the broker client refuses is retried, then parked; it holds back its own key only."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from tests.support.broker import Broker
from tests.support.delivery import RelayFactory
from tests.support.events import event
from tests.support.waits import wait_until

pytestmark = pytest.mark.slow


def test_too_large_message_is_parked_and_holds_back_only_its_key(
    engine: sa.Engine, db_url: str, broker: Broker, topic: str, relays: RelayFactory
) -> None:
    outbox = Outbox()
    with Session(engine) as session, session.begin():
        # Tansu does not enforce the topic's max.message.bytes; librdkafka refuses the message
        # client-side against its own message.max.bytes (set below), before sending it.
        big = outbox.publish(session, topic, b"x" * 20_000, key="big")
        after_big = [outbox.publish(session, topic, {"n": i}, key="big") for i in range(5)]
        others = [outbox.publish(session, topic, {"n": i}, key=f"other-{i % 3}") for i in range(15)]
    with Session(engine) as session, session.begin():  # a later transaction, same key
        after_big.append(outbox.publish(session, topic, {"n": 5}, key="big"))

    relay = relays(
        db_url,
        broker.bootstrap,
        "-X",
        "message.max.bytes=10000",
        "--max-attempts",
        "3",
        "--retry-backoff",
        "0.05",
        "--poll-interval",
        "60",
        "--log-level",
        "debug",
    )
    # Retries follow the per-message backoff (about 0.05 s, 0.1 s), not the fallback poll.
    relay.wait_for(event("relay.parked"), timeout=20)

    def status(message_id: object) -> tuple[str, int, str | None]:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT status, attempts, last_error FROM outbox_messages "
                    "WHERE message_id = :id"
                ),
                {"id": message_id},
            ).one()
        return row.status, row.attempts, row.last_error

    wait_until(lambda: status(big)[0] == "dead", 10, "the big message parked", interval=0.1)
    # The others must have been sent already; give a wrongly released key time to show up.
    got = broker.read_all(topic, expect=len(others), idle=1.0)
    assert relay.count(event("relay.send_failed")) == 3
    # Which message, on the line itself: topic, key and message id (never the payload).
    failed = event("relay.send_failed", f"topic={topic}", "key=", f"message_id={big}")
    assert relay.count(failed) == 3
    assert relay.count(event("relay.parked", f"topic={topic}", f"message_id={big}")) == 1

    state, attempts, error = status(big)
    assert (state, attempts) == ("dead", 3)
    assert error and "MSG_SIZE_TOO_LARGE" in error, error
    for mid in after_big:  # held back behind the parked message, never attempted
        assert status(mid) == ("pending", 0, None)

    assert sorted(m.message_id for m in got) == sorted(str(i) for i in others)
    assert not [m for m in got if m.key == b"big"]
    for k in ("other-0", "other-1", "other-2"):
        ns = [m.value for m in sorted(got, key=lambda m: m.offset) if m.key == k.encode()]
        assert len(ns) == 5
    relay.stop()
