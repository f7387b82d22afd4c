"""Consumer handlers for the tests, importable as ``tests.support.handlers:NAME`` (by the real
``outbox consume`` command too: see :class:`tests.support.consumerproc.ConsumerProcess`).

They write to the ``effects`` table (:func:`create_effects_table`), one row per time a
message's effect happened, with the pid of the process that committed it. ``effects`` has no
unique constraint on purpose: a duplicate effect shows up as a second row.

Tuning comes from the environment, since the command runs in its own process:
``CONSUMER_TEST_SLEEP_MS`` (float) is slept after the handler's database work, inside its
transaction, so that processing takes long enough for a test to interrupt it.
"""

from __future__ import annotations

import collections
import os
import threading
import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import PoisonMessage
from outbox.consumer import json_value
from outbox.observe import ConsumerObserver, Outcome
from outbox.transport.base import IncomingMessage
from outbox.transport.memory import MemorySource

#: Messages whose ``n`` is a multiple of this fail twice in :func:`flaky_effect`.
FLAKY_EVERY = 7

#: Not a handler: ``--handler tests.support.handlers:NOT_CALLABLE`` is refused.
NOT_CALLABLE = 42

_attempts: collections.Counter[str] = collections.Counter()


def create_effects_table(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE effects (seq bigserial PRIMARY KEY, message_id text NOT NULL, "
                "n int NOT NULL, pid int NOT NULL, "
                "at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
        )
    return engine


def _sleep() -> None:
    ms = float(os.environ.get("CONSUMER_TEST_SLEEP_MS") or 0)
    if ms > 0:
        time.sleep(ms / 1000)


def _insert(session: Session, message_id: str, n: int) -> None:
    session.execute(
        sa.text("INSERT INTO effects (message_id, n, pid) VALUES (:m, :n, :pid)"),
        {"m": message_id, "n": n, "pid": os.getpid()},
    )


def _message_id(message: IncomingMessage) -> str:
    return (message.header("message-id") or b"").decode()


def record_effect(session: Session, message: IncomingMessage) -> None:
    """One effect row per message (its body is ``{"n": N}``), then the sleep."""
    _insert(session, _message_id(message), int(json_value(message)["n"]))
    _sleep()


def flaky_effect(session: Session, message: IncomingMessage) -> None:
    """Like :func:`record_effect`, but every message whose ``n`` is a multiple of
    :data:`FLAKY_EVERY` raises on its first two attempts (after writing its row, which the
    rollback removes), so the consumer must retry it before moving on."""
    n = int(json_value(message)["n"])
    key = _message_id(message)
    _insert(session, key, n)
    _attempts[key] += 1
    if n % FLAKY_EVERY == 0 and _attempts[key] <= 2:
        raise TimeoutError(f"flaky dependency (n={n}, attempt {_attempts[key]})")
    _sleep()


#: Messages whose ``n`` is this modulo 100 are poison in :func:`poison_at_50`.
POISON_AT = 50


def poison_at_50(session: Session, message: IncomingMessage) -> None:
    """Like :func:`record_effect`, but a message whose ``n`` is :data:`POISON_AT` modulo 100
    writes its row and then raises :class:`PoisonMessage` (in the middle of a batch of 100:
    the batch rolls back and its prefix is committed again)."""
    n = int(json_value(message)["n"])
    _insert(session, _message_id(message), n)
    if n % 100 == POISON_AT:
        raise PoisonMessage(f"message {n} is poison")
    _sleep()


def record_batch(session: Session, messages: list[IncomingMessage]) -> None:
    """A batch handler: the effect rows of every message, in one statement."""
    session.execute(
        sa.text(
            "INSERT INTO effects (message_id, n, pid) "
            "SELECT m, n, :pid FROM unnest(CAST(:ms AS text[]), CAST(:ns AS int[])) AS u(m, n)"
        ),
        {
            "ms": [_message_id(m) for m in messages],
            "ns": [int(json_value(m)["n"]) for m in messages],
            "pid": os.getpid(),
        },
    )


def order_id_key(message: IncomingMessage) -> str | None:
    """A foreign producer's idempotency key: the order id in the payload."""
    body = json_value(message)
    return str(body["order_id"]) if "order_id" in body else None


def record_order(session: Session, message: IncomingMessage) -> None:
    """The effect of a foreign producer's ``{"order_id": ID, "n": N}``, recorded as ``ID``."""
    body = json_value(message)
    _insert(session, str(body["order_id"]), int(body["n"]))


class Payments:
    """A handler reached through a nested name: ``tests.support.handlers:Payments.capture``."""

    @staticmethod
    def capture(session: Session, message: IncomingMessage) -> None:
        record_effect(session, message)


def hang_in_database(session: Session, message: IncomingMessage) -> None:
    """A handler whose statement never ends (until ``statement_timeout`` cancels it)."""
    session.execute(sa.text("SELECT pg_sleep(3600)"))


#: Set to release :func:`hang_in_python` (in-process tests).
release_hang = threading.Event()


def hang_in_python(session: Session, message: IncomingMessage) -> None:
    """A handler stuck outside the database on the first message whose ``n`` is 1 (until
    :data:`release_hang` is set: an hour in another process)."""
    if json_value(message)["n"] == 1:
        release_hang.wait(3600)
    record_effect(session, message)


class Finished(ConsumerObserver):
    """Records each message's outcome, by offset."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[int, Outcome]] = []

    def message_finished(self, message: IncomingMessage, outcome: Outcome, seconds: float) -> None:
        self.outcomes.append((message.offset, outcome))


class Handed(MemorySource):
    """Records the offsets handed out, and the pauses."""

    def __init__(self, messages: list[IncomingMessage]) -> None:
        super().__init__(messages)
        self.handed: list[int] = []
        self.pauses = 0

    def pause(self) -> None:
        self.pauses += 1
        super().pause()

    def poll(self, timeout: float) -> IncomingMessage | None:
        m = super().poll(timeout)
        if m is not None:
            self.handed.append(m.offset)
        return m
