"""What the consumer writes for a message it dead-letters: any bytes a Kafka producer can
send must be storable, so that a poison message never stops its partition.

**The full form** (:func:`full`) keeps the original message: its key and value bytes as they
came, its headers in their order, each value's bytes untouched (repeated names too), then the
``dlq-*`` headers that say where it came from and why it failed. Two things change:

* the original ``message-id`` header is renamed ``dlq-original-message-id`` (the relay sends
  the dead letter's own ``message-id`` first);
* a header name the table cannot hold (``text``: a NUL character, a lone surrogate) is stored
  as ``dlq-header-b64:`` followed by the base64 of its UTF-8 bytes (``surrogatepass``), in
  place. An empty name, or a long one, is kept as it is: the table and Kafka both hold it.

An idempotency key the inbox cannot hold (empty, longer than its 512 characters, a NUL or a
lone surrogate: see :func:`inbox_key`) is claimed as ``sha256:`` and the hex digest of its
UTF-8 bytes; the key itself goes into the ``dlq-idempotency-key`` header.

**The minimal form** (:func:`minimal`), written only when the full one failed for a reason
that retrying cannot fix: the original key and value bytes, and one header,
``dlq-envelope``: ASCII JSON with the original position, consumer, attempts, the error that
dead-lettered the message (``error``), the error that stopped the full form
(``dead_letter_error``), the idempotency key, and the original headers in order as
``[name, base64 of the value]`` pairs.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from outbox import statements
from outbox.exceptions import DatabaseUnavailableError, TransientDatabaseError
from outbox.message import (
    HEADER_MESSAGE_ID,
    EncodedMessage,
    storable_text,
    uuid7,
    valid_topic,
)
from outbox.outbox import SyncTarget, run_first
from outbox.schema import OutboxTables
from outbox.transport.base import IncomingMessage

#: The inbox's longest key (``outbox.inbox``).
MAX_INBOX_KEY = 512
#: The prefix of a header name stored in base64 (see the module's docstring).
ESCAPED_NAME = "dlq-header-b64:"
#: The one header of the minimal form.
ENVELOPE = "dlq-envelope"
#: Why a message was dead-lettered (the ``dlq-reason`` header; ``reason`` in the envelope):
#: ``poison`` (:class:`~outbox.PoisonMessage`), ``attempts`` (max_attempts failures),
#: ``expired`` (past its deadline), ``no-key`` (no idempotency key), ``hung`` (the handler
#: outlived its time limit).
KINDS = ("poison", "attempts", "expired", "no-key", "hung")
_MAX_ERROR = 1000
_SUFFIX = ".dlq"


def topic_for(configured: str | None, original: str) -> str:
    """The dead-letter topic: the configured one, else ``<topic>.dlq``, with the original name
    shortened to keep within Kafka's 249 characters (the ``dlq-original-topic`` header keeps
    it whole)."""
    if configured:
        return configured
    topic = original + _SUFFIX
    if not valid_topic(topic):
        topic = original[: 249 - len(_SUFFIX)] + _SUFFIX
    return topic


def inbox_key(key: str | None) -> str | None:
    """``key`` as the inbox can hold it: itself, or ``sha256:<hex>`` of its UTF-8 bytes when it
    is empty, too long, or holds a NUL or a lone surrogate."""
    if key is None:
        return None
    if 0 < len(key) <= MAX_INBOX_KEY and storable_text(key):
        return key
    return "sha256:" + hashlib.sha256(_exact(key)).hexdigest()


def transient(exc: BaseException) -> bool:
    """Whether a database failure may go away by itself (wait and try the same again)."""
    return isinstance(exc, (DatabaseUnavailableError, TransientDatabaseError))


def letter(
    message: IncomingMessage,
    *,
    topic: str,
    consumer: str,
    reason: str,
    attempts: int,
    key: str | None,
    failure: str | None = None,
    kind: str = "poison",
) -> EncodedMessage:
    """The full dead letter; the minimal one when ``failure`` says why the full one could not
    be stored. ``kind``: one of :data:`KINDS`."""
    if failure is None:
        return full(
            message,
            topic=topic,
            consumer=consumer,
            reason=reason,
            attempts=attempts,
            key=key,
            kind=kind,
        )
    return minimal(
        message,
        topic=topic,
        consumer=consumer,
        reason=reason,
        kind=kind,
        attempts=attempts,
        key=key,
        failure=failure,
    )


def full(
    message: IncomingMessage,
    *,
    topic: str,
    consumer: str,
    reason: str,
    attempts: int,
    key: str | None,
    kind: str = "poison",
) -> EncodedMessage:
    """The dead letter that keeps the original message (see the module's docstring)."""
    headers: list[tuple[str, bytes]] = []
    for name, value in message.headers:
        headers.append((_stored_name(name), _value(value)))
    headers += [
        ("dlq-original-topic", _text(message.topic)),
        ("dlq-original-partition", str(message.partition).encode()),
        ("dlq-original-offset", str(message.offset).encode()),
        ("dlq-consumer", _text(consumer)),
        ("dlq-reason", kind.encode()),
        ("dlq-error", _text(reason[:_MAX_ERROR])),
        ("dlq-attempts", str(attempts).encode()),
    ]
    if key is not None and inbox_key(key) != key:
        headers.append(("dlq-idempotency-key", _exact(key)))
    return _letter(message, topic, headers)


def minimal(
    message: IncomingMessage,
    *,
    topic: str,
    consumer: str,
    reason: str,
    attempts: int,
    key: str | None,
    failure: str,
    kind: str = "poison",
) -> EncodedMessage:
    """The dead letter written when the full one could not be (see the module's docstring)."""
    envelope: dict[str, Any] = {
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "consumer": consumer,
        "attempts": attempts,
        "reason": kind,
        "error": reason,
        "dead_letter_error": failure,
        "idempotency_key": key,
        "headers": [
            [name, base64.b64encode(_value(value)).decode()] for name, value in message.headers
        ],
    }
    # ensure_ascii: a NUL or a lone surrogate becomes a \u escape, so any str fits.
    data = json.dumps(envelope, ensure_ascii=True, separators=(",", ":")).encode()
    return _letter(message, topic, [(ENVELOPE, data)])


def write(session: SyncTarget, tables: OutboxTables, letter: EncodedMessage) -> None:
    """Insert ``letter`` into the outbox in ``session``'s transaction (as a publish does, with
    the per-key lock and the relay's wake-up)."""
    stmt, params = statements.insert(tables, [letter])
    run_first(session, stmt, params)


def _letter(
    message: IncomingMessage, topic: str, headers: list[tuple[str, bytes]]
) -> EncodedMessage:
    return EncodedMessage(
        message_id=uuid7(),
        topic=topic,
        key=None if message.key is None else bytes(message.key),
        payload=None if message.value is None else bytes(message.value),
        headers=tuple(headers),
    )


def _stored_name(name: str) -> str:
    if name.lower() == HEADER_MESSAGE_ID:
        return "dlq-original-message-id"
    if not storable_text(name):
        return ESCAPED_NAME + base64.b64encode(_exact(name)).decode()
    return name


def _value(value: bytes | None) -> bytes:
    # A Kafka client may report a null header value as None: stored as empty (the column
    # holds no NULL).
    return b"" if value is None else bytes(value)


def _exact(text: str) -> bytes:
    """UTF-8, lone surrogates included (as the bytes Python would have decoded them from)."""
    return text.encode("utf-8", "surrogatepass")


def _text(text: str) -> bytes:
    """UTF-8 for diagnostic text: what cannot be encoded is written as an escape."""
    return text.encode("utf-8", "backslashreplace")
