"""The claim that runs ahead overlaps the sending of the batch before it (real PostgreSQL)."""

from __future__ import annotations

import sqlalchemy as sa

from outbox.transport.base import OnDelivery, OutgoingMessage
from outbox.transport.memory import MemoryTransport
from tests.support.relay import by_key, count_rows, db_rows, expected_by_key, make_relay, publish


def test_the_claim_ahead_is_sent_before_the_batch_and_excludes_it(
    engine: sa.Engine, db_url: str
) -> None:
    # Handing 1000 messages to the producer takes about 8 ms of Python. The next claim used to
    # be sent after that, so the relay then waited for its rows; sent first, it runs in the
    # database meanwhile. It must exclude the batch about to be sent, or it would return it.
    specs = [(f"k{i % 3}", f"v{i:03d}") for i in range(40)]
    publish(engine, specs)
    ids = {row.value: row.id for row in db_rows(engine)}
    events: list[tuple[str, object]] = []

    class Recording(MemoryTransport):
        def send(self, message: OutgoingMessage, on_delivery: OnDelivery) -> None:
            events.append(("send", ids[(message.value or b"").decode()]))
            super().send(message, on_delivery)

    transport = Recording()
    relay = make_relay(db_url, transport, batch_size=5, max_inflight_batches=2)
    send_ahead = relay._claims.send_ahead

    def recording_ahead(exclude: str, number: int) -> None:
        events.append(("ahead", {int(i) for i in exclude.strip("{}").split(",") if i}))
        send_ahead(exclude, number)

    relay._claims.send_ahead = recording_ahead  # type: ignore[method-assign]
    stats = relay.run_once()

    assert stats.sent == 40 and count_rows(engine) == 0
    assert by_key(transport.sent) == expected_by_key(specs)  # in order, no duplicates
    aheads = [i for i, (kind, _) in enumerate(events) if kind == "ahead"]
    assert len(aheads) >= 5
    for i in aheads:
        following = events[i + 1 : i + 6]
        excluded = events[i][1]
        assert isinstance(excluded, set)
        # Right after the claim ahead: the five messages of the batch it follows, which it
        # excludes.
        assert [kind for kind, _ in following] == ["send"] * 5, events
        assert {row_id for _, row_id in following} <= excluded, (following, excluded)
