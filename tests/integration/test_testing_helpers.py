"""outbox.testing.drain: what a user's test sees of its published messages."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from outbox.testing import drain


def test_drain_returns_committed_messages_in_order_and_empties_the_table(
    engine: sa.Engine, db_url: str
) -> None:
    outbox = Outbox()
    with Session(engine) as session, session.begin():
        outbox.publish(session, "orders", {"n": 1}, key="c1", headers={"event-type": "A"})
        outbox.publish(session, "orders", {"n": 2}, key="c1")
    got = drain(db_url)
    assert [(m.topic, m.key, m.value) for m in got] == [
        ("orders", b"c1", b'{"n":1}'),
        ("orders", b"c1", b'{"n":2}'),
    ]
    assert dict(got[0].headers)["event-type"] == b"A"
    assert drain(db_url) == []
