"""Handlers used by the consumer tests (importable as tests.integration.handlers:...)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox.consumer import json_value
from outbox.transport.base import IncomingMessage

NOT_CALLABLE = 42


def record_effect(session: Session, message: IncomingMessage) -> None:
    """One effect row per processed message (the table is created by the test)."""
    body = json_value(message)
    session.execute(
        sa.text("INSERT INTO effects (message_id, n) VALUES (:m, :n)"),
        {"m": (message.header("message-id") or b"").decode(), "n": body["n"]},
    )


def order_id_key(message: IncomingMessage) -> str | None:
    """A foreign producer's idempotency key: the order id in the payload."""
    body = json_value(message)
    return str(body["order_id"]) if "order_id" in body else None


def record_order(session: Session, message: IncomingMessage) -> None:
    body = json_value(message)
    session.execute(
        sa.text("INSERT INTO effects (message_id, n) VALUES (:m, :n)"),
        {"m": str(body["order_id"]), "n": body["n"]},
    )
