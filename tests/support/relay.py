"""Shared helpers for relay tests: a relay on the in-memory transport, publishing test
messages, reading the table, and running the relay on a thread."""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Message, Outbox, Relay, RelayConfig, RelayObserver
from outbox.relay import RelayStats
from outbox.transport.base import OutgoingMessage
from outbox.transport.memory import MemoryTransport

FAST: dict[str, Any] = {
    "retry_backoff_base": 0.01,
    "retry_backoff_max": 0.05,
    "broker_backoff_base": 0.01,
    "broker_backoff_max": 0.05,
    "poll_interval": 0.5,
    "leader_retry_interval": 0.05,
    "delivery_timeout": 5.0,
    "shutdown_timeout": 5.0,
}

Spec = tuple[str | None, str]  # (key, payload text)


# -- helpers ----------------------------------------------------------------------------------


def make_relay(
    db_url: str,
    transport: MemoryTransport | Callable[[], MemoryTransport],
    rng: random.Random | None = None,
    observers: Sequence[RelayObserver] = (),
    **overrides: Any,
) -> Relay:
    config = RelayConfig(db_url=db_url, **{**FAST, **overrides})
    factory = transport if callable(transport) else (lambda: transport)
    return Relay(config, factory, rng=rng, observers=observers)


def publish(
    engine: sa.Engine, specs: Sequence[Spec], *, topic: str = "t", outbox: Outbox | None = None
) -> None:
    """Publish ``specs`` in one transaction, in order."""
    outbox = outbox or Outbox()
    with Session(engine) as session, session.begin():
        outbox.publish_many(session, [Message(topic, value, key=key) for key, value in specs])


def by_key(sent: Sequence[OutgoingMessage]) -> dict[str | None, list[str]]:
    out: dict[str | None, list[str]] = defaultdict(list)
    for m in sent:
        assert m.value is not None
        out[m.key.decode() if m.key is not None else None].append(m.value.decode())
    return dict(out)


def expected_by_key(specs: Sequence[Spec]) -> dict[str | None, list[str]]:
    out: dict[str | None, list[str]] = defaultdict(list)
    for key, value in specs:
        out[key].append(value)
    return dict(out)


def db_rows(engine: sa.Engine, table: str = "outbox_messages") -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT id, convert_from(payload, 'UTF8') AS value, "
                    "convert_from(key, 'UTF8') AS key, status, attempts, last_error, "
                    f"next_attempt_at, sent_at FROM {table} ORDER BY id"
                )
            )
        )


def row_of(engine: sa.Engine, value: str) -> Any:
    [row] = [r for r in db_rows(engine) if r.value == value]
    return row


def count_rows(engine: sa.Engine, table: str = "outbox_messages") -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


class Running:
    """``relay.run()`` on a thread; stopped (and checked to return) on exit."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.stats: RelayStats | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.stats = self.relay.run()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> RelayStats:
        self.relay.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run() did not return after stop()"
        if self.error is not None:
            raise self.error
        assert self.stats is not None
        return self.stats

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive() or self.stats is None:
            self.stop()

    def check_alive(self) -> bool:
        if self.error is not None:
            raise self.error
        return self.thread.is_alive()
