"""Handlers for the consumer acceptance tests, run by the real ``outbox consume`` command
(importable as ``tests.acceptance.handlers:NAME``). The test creates the ``effects`` table.

Tuning comes from the environment, since the command runs in its own process:
``CONSUMER_TEST_SLEEP_MS`` (float) is slept after the handler's database work, inside its
transaction, so that processing takes long enough for a test to interrupt it.
"""

from __future__ import annotations

import collections
import os
import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox.consumer import json_value
from outbox.transport.base import IncomingMessage

#: Messages whose ``n`` is a multiple of this fail twice in :func:`flaky_effect`.
FLAKY_EVERY = 7

_attempts: collections.Counter[str] = collections.Counter()


def _sleep() -> None:
    ms = float(os.environ.get("CONSUMER_TEST_SLEEP_MS") or 0)
    if ms > 0:
        time.sleep(ms / 1000)


def _insert(session: Session, message: IncomingMessage) -> int:
    n = int(json_value(message)["n"])
    session.execute(
        sa.text("INSERT INTO effects (message_id, n, pid) VALUES (:m, :n, :pid)"),
        {"m": (message.header("message-id") or b"").decode(), "n": n, "pid": os.getpid()},
    )
    return n


def record_effect(session: Session, message: IncomingMessage) -> None:
    """One effect row per message, then a short sleep before the transaction commits."""
    _insert(session, message)
    _sleep()


def flaky_effect(session: Session, message: IncomingMessage) -> None:
    """Like :func:`record_effect`, but every message whose ``n`` is a multiple of
    :data:`FLAKY_EVERY` raises on its first two attempts (after writing its row, which the
    rollback removes), so the consumer must retry it before moving on."""
    n = _insert(session, message)
    key = (message.header("message-id") or b"").decode()
    _attempts[key] += 1
    if n % FLAKY_EVERY == 0 and _attempts[key] <= 2:
        raise TimeoutError(f"flaky dependency (n={n}, attempt {_attempts[key]})")
    _sleep()
