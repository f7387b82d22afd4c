"""Messages as a consumer receives them, for tests on the in-memory source."""

from __future__ import annotations

import json

from outbox.transport.base import IncomingMessage


def message(n: int = 0, topic: str = "orders") -> IncomingMessage:
    """Message ``n`` of partition 0 (offset ``n``): value ``{"n": n}``, id ``m-<n>``."""
    return IncomingMessage(
        topic=topic,
        partition=0,
        offset=n,
        key=b"k",
        value=json.dumps({"n": n}).encode(),
        headers=[("message-id", f"m-{n}".encode())],
    )
