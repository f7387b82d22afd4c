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
import binascii
import dataclasses
import hashlib
import json
import uuid
from typing import Any

from outbox import statements
from outbox.exceptions import DatabaseUnavailableError, PayloadError, TransientDatabaseError
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
#: The headers the full form adds after the original ones, in this order (the last one only
#: for an idempotency key the inbox cannot hold).
TRAILER = (
    "dlq-original-topic",
    "dlq-original-partition",
    "dlq-original-offset",
    "dlq-consumer",
    "dlq-reason",
    "dlq-error",
    "dlq-attempts",
    "dlq-idempotency-key",
)
#: The inbox consumer under which ``outbox dlq replay`` claims the dead letters it replayed.
REPLAY_CONSUMER = "outbox-dlq-replay"
#: Replayed messages get ``uuid5(REPLAY_NAMESPACE, <the dead letter's message-id>)``.
REPLAY_NAMESPACE = uuid.UUID("7275f11b-5f26-4d1f-8a8f-0a1622ac59e7")


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


# -- replaying dead letters -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Replay:
    """What ``outbox dlq replay`` does with one dead letter: claim ``claim`` in the inbox
    (consumer :data:`REPLAY_CONSUMER`) and publish ``message``, in one transaction."""

    #: ``dlq-replay:`` and the dead letter's own ``message-id`` (the relay's; its topic,
    #: partition and offset when it has none).
    claim: str
    #: The original message: its topic, key and value, its headers without the ``dlq-*`` ones
    #: and without its ``message-id``; a new message id derived from the dead letter's.
    message: EncodedMessage
    #: Why it was dead-lettered (``dlq-reason``, or the envelope's ``reason``), if it says.
    reason: str | None = None


def replay(letter: IncomingMessage) -> Replay:
    """The replay of a dead letter that :func:`full` or :func:`minimal` wrote, as read from the
    dead-letter topic. Raises :class:`~outbox.PayloadError` for a message that is neither."""
    own = next((v for n, v in letter.headers if n.lower() == HEADER_MESSAGE_ID), None)
    if own is not None:
        try:
            letter_id = own.decode()
        except UnicodeDecodeError:
            raise PayloadError("its message-id header is not UTF-8") from None
    else:
        letter_id = f"{letter.topic}:{letter.partition}:{letter.offset}"
    stored = [(n, v) for n, v in letter.headers if n.lower() != HEADER_MESSAGE_ID]
    names = [n for n, _ in stored]
    if names == [ENVELOPE]:
        topic, headers, reason = _from_envelope(stored[0][1])
    elif TRAILER[0] in names:
        # The trailer starts at the last dlq-original-topic; what comes before it are the
        # original headers (its message-id renamed, which the replay does not keep).
        start = len(names) - 1 - names[::-1].index(TRAILER[0])
        trailer = dict(stored[start:])
        if [n for n in names[start:] if n not in TRAILER]:
            raise PayloadError("unexpected headers after dlq-original-topic")
        topic = trailer[TRAILER[0]].decode("utf-8", "replace")
        reason = (
            trailer["dlq-reason"].decode("utf-8", "replace") if "dlq-reason" in trailer else None
        )
        headers = [(n, v) for n, v in stored[:start] if n != "dlq-original-message-id"]
    else:
        raise PayloadError("no dlq-original-topic or dlq-envelope header: not a dead letter")
    if not valid_topic(topic):
        raise PayloadError(f"invalid original topic {topic[:255]!r}")
    message = EncodedMessage(
        message_id=uuid.uuid5(REPLAY_NAMESPACE, letter_id),
        topic=topic,
        key=None if letter.key is None else bytes(letter.key),
        payload=None if letter.value is None else bytes(letter.value),
        headers=tuple(headers),
    )
    return Replay(claim=inbox_key(f"dlq-replay:{letter_id}") or "", message=message, reason=reason)


def _from_envelope(data: bytes) -> tuple[str, list[tuple[str, bytes]], str | None]:
    try:
        envelope = json.loads(data)
        topic = envelope["topic"]
        pairs = envelope.get("headers") or []
        headers = [
            (_stored_name(name), base64.b64decode(value, validate=True))
            for name, value in pairs
            if name.lower() != HEADER_MESSAGE_ID
        ]
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise PayloadError(f"unreadable dlq-envelope: {exc}") from None
    if not isinstance(topic, str):
        raise PayloadError("unreadable dlq-envelope: no topic")
    reason = envelope.get("reason")
    return topic, headers, reason if isinstance(reason, str) else None
