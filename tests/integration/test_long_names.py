"""Names that are valid one by one but too long once derived: a 30-character schema and a
40-character table passed validation and `db upgrade`, then every publish failed with
"channel name too long" (the NOTIFY channel exceeds PostgreSQL's 63 bytes)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, define_tables, migrate
from outbox.transport.memory import MemoryTransport
from tests.support.relay import Running, make_relay
from tests.support.waits import wait_until

SCHEMA = "s" * 30
TABLE = "t" * 40


def test_the_longest_names_publish_and_wake_the_relay(engine: sa.Engine, db_url: str) -> None:
    assert len(define_tables(table=TABLE, schema=SCHEMA).channel) <= 63
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {SCHEMA}"))
    migrate.upgrade(db_url, table=TABLE, schema=SCHEMA, inbox_table="i" * 40)
    outbox = Outbox(table=TABLE, schema=SCHEMA)
    transport = MemoryTransport()
    # Only the notification can wake it within the test: the fallback poll is a minute.
    relay = make_relay(db_url, transport, table=TABLE, schema=SCHEMA, poll_interval=60.0)
    with Running(relay) as running:
        wait_until(lambda: relay.is_leader, 10, "leadership")
        for i in range(3):
            with Session(engine) as session, session.begin():
                outbox.publish(session, "orders", {"n": i}, key="k")
            expected = i + 1
            wait_until(lambda: len(transport.sent) == expected, 10, f"message {i} sent")
        running.stop()


def test_short_names_keep_their_readable_channel() -> None:
    assert define_tables(table="outbox_messages", schema="app").channel == "app__outbox_messages"
    assert define_tables().channel == "outbox_messages"
