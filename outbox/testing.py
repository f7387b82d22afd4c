"""Helpers for your own tests: see what your code published, without a broker.

    from outbox.testing import drain

    def test_placing_an_order_publishes_order_placed(db_url):
        place_order(...)
        [message] = drain(db_url)
        assert message.topic == "orders"

Nothing in the library imports this module.
"""

from __future__ import annotations

from outbox.config import RelayConfig
from outbox.relay import Relay
from outbox.schema import DEFAULT_TABLE
from outbox.transport.base import OutgoingMessage
from outbox.transport.memory import MemoryTransport


def drain(
    db_url: str, *, table: str = DEFAULT_TABLE, schema: str | None = None
) -> list[OutgoingMessage]:
    """Relay every committed, due message to an in-memory broker and return what it got, in
    the order sent. The rows are deleted, as the real relay does. Raises
    :class:`~outbox.OutboxError` if a relay is running on the same table (it holds the lock).
    """
    transport = MemoryTransport()
    config = RelayConfig(db_url=db_url, table=table, schema=schema, shutdown_timeout=1.0)
    Relay(config, lambda: transport).run_once()
    return list(transport.sent)
