"""Reading the outbox table back."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import sqlalchemy as sa


@dataclasses.dataclass(frozen=True)
class StoredRow:
    """One outbox row; ``headers`` are the stored ``(name, value)`` pairs, in sending order."""

    id: int
    message_id: uuid.UUID
    topic: str
    key: Any  # bytes or None (Any, as a database row's: tests json.loads it)
    payload: Any
    headers: list[tuple[str, bytes]]
    status: str
    attempts: int


def rows(engine: sa.Engine, table: str = "outbox_messages") -> list[StoredRow]:
    """Every row of the outbox table ``table``, in id order."""
    with engine.connect() as conn:
        result = conn.execute(
            sa.text(
                "SELECT id, message_id, topic, key, payload, header_names, header_values, "
                f"status, attempts FROM {table} ORDER BY id"
            )
        )
        return [
            StoredRow(
                r.id,
                r.message_id,
                r.topic,
                r.key,
                r.payload,
                list(zip(r.header_names, r.header_values, strict=True)),
                r.status,
                r.attempts,
            )
            for r in result
        ]
