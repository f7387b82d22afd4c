"""Reading the outbox table back."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa


def rows(engine: sa.Engine, table: str = "outbox_messages") -> list[Any]:
    """Every row of the outbox table ``table``, in id order."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT id, message_id, topic, key, payload, headers, status, attempts "
                    f"FROM {table} ORDER BY id"
                )
            )
        )
