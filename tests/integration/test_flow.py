"""Committed events arrive with their headers; rolled-back ones never do (real PG + broker)."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, Relay, RelayConfig
from outbox.transport.kafka import KafkaTransport
from tests.support.broker import Broker


def relay_for(db_url: str, broker: Broker, **kw: object) -> Relay:
    config = RelayConfig(db_url=db_url, **kw)  # type: ignore[arg-type]
    return Relay(config, lambda: KafkaTransport(broker.bootstrap, {"message.timeout.ms": "20000"}))


@pytest.mark.parametrize("at_commit", [False, True], ids=["at-publish", "at-commit"])
def test_committed_events_arrive_with_headers_rolled_back_never(
    engine: sa.Engine, db_url: str, broker: Broker, topic: str, at_commit: bool
) -> None:
    outbox = Outbox(at_commit=at_commit)
    with Session(engine) as session, session.begin():
        ids = [
            outbox.publish(session, topic, {"order": i}, key=f"k{i % 3}", headers={"h": "v"})
            for i in range(10)
        ]
    with Session(engine) as session, session.begin():
        outbox.publish(session, topic, {"order": "rolled back"}, key="k0")
        session.rollback()

    stats = relay_for(db_url, broker).run_once()
    assert stats.sent == 10

    got = broker.read_all(topic, expect=10)
    assert sorted(m.message_id for m in got) == sorted(str(i) for i in ids)
    for m in got:
        assert m.headers["content-type"] == b"application/json"
        assert m.headers["h"] == b"v"
        assert m.value is not None and json.loads(m.value)["order"] != "rolled back"
    # Per key, in publish order.
    for k in ("k0", "k1", "k2"):
        orders = [json.loads(m.value or b"")["order"] for m in got if m.key == k.encode()]
        assert orders == sorted(orders)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM outbox_messages")).scalar() == 0


def test_retain_mode_keeps_rows_marked_sent(
    engine: sa.Engine, db_url: str, broker: Broker, topic: str
) -> None:
    outbox = Outbox()
    with Session(engine) as session, session.begin():
        outbox.publish(session, topic, b"raw", key=b"k")
    relay_for(db_url, broker, retain_sent=True).run_once()
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT status, sent_at FROM outbox_messages")).one()
    assert row.status == "sent" and row.sent_at is not None
    [m] = broker.read_all(topic, expect=1)
    assert m.value == b"raw" and m.headers["content-type"] == b"application/octet-stream"
