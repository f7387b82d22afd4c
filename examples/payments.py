"""The payments service: consumes ``OrderPlaced`` through the inbox and captures each order's
payment once, publishing ``PaymentCaptured`` in the same transaction (consume -> update ->
publish, exactly once in effect).

Run: ``PYTHONPATH=examples outbox consume --db-url URL --bootstrap-servers HOST:PORT
--group payments --topic orders --handler payments:capture_payment``
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from outbox.consumer import PoisonMessage, json_value
from outbox.transport.base import IncomingMessage

outbox = Outbox()
PAYMENTS_TOPIC = os.environ.get("PAYMENTS_TOPIC", "payments")


def create_tables(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE IF NOT EXISTS payments ("
                " order_id uuid PRIMARY KEY, customer text NOT NULL,"
                " amount numeric(12, 2) NOT NULL, captured_at timestamptz NOT NULL DEFAULT now())"
            )
        )


def capture_payment(session: Session, message: IncomingMessage) -> None:
    event = json_value(message)
    if event.get("type") != "OrderPlaced":
        return  # other event types on the topic: nothing to do (still recorded as processed)
    try:
        order_id, customer, amount = event["order_id"], event["customer"], event["amount"]
    except KeyError as exc:
        raise PoisonMessage(f"OrderPlaced without {exc}") from exc
    # The primary key would also stop a second capture; the inbox makes sure we never try.
    session.execute(
        sa.text("INSERT INTO payments (order_id, customer, amount) VALUES (:o, :c, :a)"),
        {"o": order_id, "c": customer, "a": amount},
    )
    outbox.publish(
        session,
        PAYMENTS_TOPIC,
        {"type": "PaymentCaptured", "order_id": order_id, "amount": amount},
        key=customer,
        headers={"event-type": "PaymentCaptured", "causation-id": _message_id(message)},
    )


def _message_id(message: IncomingMessage) -> str:
    return (message.header("message-id") or b"").decode()
