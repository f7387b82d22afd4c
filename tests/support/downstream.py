"""Handlers that call a downstream dependency (:class:`tests.support.dependency.Dependency`),
for ``outbox consume --handler tests.support.downstream:NAME``.

A message's body is ``{"n": N, "key": K, "seq": S}`` (``seq``: its place among the messages of
key ``K``), optionally with ``"poison": true`` (the handler refuses it before calling anything:
:class:`~outbox.PoisonMessage`) or ``"fails": true`` (the handler calls the dependency, then
raises ``ValueError`` for it: a message that can never be processed, though the handler cannot
tell it apart from any other failure).

On success a handler inserts one row into ``downstream_effects`` (:func:`create_tables`; no
unique constraint, so a duplicate effect shows up as a second row) in its session, with what
the dependency answered: how many times it has served this message (1 unless the message was
handled twice) and refused it before.

From the environment (the command runs in its own process): ``DOWNSTREAM_URL``, the
dependency's address; ``DOWNSTREAM_SLEEP_MS``, slept after the call, inside the transaction.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import DownstreamUnavailable, PoisonMessage
from outbox.consumer import json_value
from outbox.transport.base import IncomingMessage

URL_ENV = "DOWNSTREAM_URL"
SLEEP_ENV = "DOWNSTREAM_SLEEP_MS"
#: Seconds one call may take.
CALL_TIMEOUT = 5.0


class DependencyError(Exception):
    """A failure of the dependency as a client library would raise it: a type of its own that
    the consumer knows nothing about, unless told with ``--transient``."""


def create_tables(engine: sa.Engine) -> sa.Engine:
    """``downstream_effects``: one row per effect (``kind`` ``effect``) or per call of the
    ``--on-expired`` function (``kind`` ``expired``)."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE downstream_effects (id bigserial PRIMARY KEY, "
                "kind text NOT NULL, message_id text NOT NULL, n int NOT NULL, "
                "key text NOT NULL, seq int NOT NULL, served int NOT NULL, "
                "refused int NOT NULL, pid int NOT NULL, "
                "at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
        )
    return engine


def _message_id(message: IncomingMessage) -> str:
    return (message.header("message-id") or b"").decode()


class _Refused(Exception):
    """The dependency did not answer, or answered 5xx."""


def _call(message_id: str, n: int) -> dict[str, Any]:
    """Call the dependency for one message; its JSON answer, or :class:`_Refused`."""
    query = urllib.parse.urlencode({"m": message_id, "n": n})
    try:
        with urllib.request.urlopen(f"{os.environ[URL_ENV]}?{query}", timeout=CALL_TIMEOUT) as r:
            answer: dict[str, Any] = json.loads(r.read())
            return answer
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise _Refused(f"HTTP {exc.code}") from exc
        raise  # a 4xx is not the dependency being down
    except (OSError, http.client.HTTPException) as exc:  # URLError, a reset, a timeout
        raise _Refused(f"{type(exc).__name__}: {exc}") from exc


def _handle(session: Session, message: IncomingMessage, unavailable: type[Exception]) -> None:
    body = json_value(message)
    if body.get("poison"):
        raise PoisonMessage(f"message {body['n']} is malformed")
    message_id = _message_id(message)
    try:
        answer = _call(message_id, int(body["n"]))
    except _Refused as exc:
        raise unavailable(f"dependency unavailable: {exc}") from exc
    if body.get("fails"):
        raise ValueError(f"cannot process message {body['n']}")
    _insert(session, "effect", message_id, body, answer)
    ms = float(os.environ.get(SLEEP_ENV) or 0)
    if ms > 0:
        time.sleep(ms / 1000)


def _insert(
    session: Session, kind: str, message_id: str, body: dict[str, Any], answer: dict[str, Any]
) -> None:
    session.execute(
        sa.text(
            "INSERT INTO downstream_effects (kind, message_id, n, key, seq, served, refused, pid) "
            "VALUES (:kind, :m, :n, :key, :seq, :served, :refused, :pid)"
        ),
        {
            "kind": kind,
            "m": message_id,
            "n": int(body["n"]),
            "key": str(body["key"]),
            "seq": int(body["seq"]),
            "served": int(answer.get("served", 0)),
            "refused": int(answer.get("refused", 0)),
            "pid": os.getpid(),
        },
    )


def call_dependency(session: Session, message: IncomingMessage) -> None:
    """Calls the dependency; raises :class:`~outbox.DownstreamUnavailable` when it is down."""
    _handle(session, message, DownstreamUnavailable)


def call_unmapped(session: Session, message: IncomingMessage) -> None:
    """Calls the dependency; raises :class:`DependencyError` (unknown to the consumer unless
    passed as ``--transient``) when it is down."""
    _handle(session, message, DependencyError)


def record_expired(session: Session, message: IncomingMessage) -> None:
    """``--on-expired``: records the call (kind ``expired``); calls nothing."""
    _insert(session, "expired", _message_id(message), json_value(message), {})
