"""Messages as the application hands them over, and their stored (encoded) form."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import os
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from outbox.exceptions import PayloadError

#: Kafka header carrying the message id: consumers deduplicate on it.
HEADER_MESSAGE_ID = "message-id"
#: Kafka header carrying the payload's media type.
HEADER_CONTENT_TYPE = "content-type"
_RESERVED_HEADERS = frozenset({HEADER_MESSAGE_ID})

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
TEXT = "text/plain; charset=utf-8"

# Kafka's own rule for topic names.
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


@dataclasses.dataclass(frozen=True)
class Message:
    """One event to publish.

    ``payload``: ``dict``/``list`` (and other JSON values), a dataclass or pydantic model (sent as
    JSON), ``str`` (UTF-8 text), ``bytes`` (as is), or ``None`` (a tombstone for compacted
    topics). ``key``: ``str`` or ``bytes``; messages with the same key keep their order.
    ``headers``: ``str`` names to ``str`` values, without NUL characters or lone surrogates
    (the table stores them as ``jsonb``). ``message_id`` defaults to a new time-ordered UUID
    (version 7).
    """

    topic: str
    payload: Any
    key: str | bytes | None = None
    headers: Mapping[str, str] | None = None
    message_id: uuid.UUID | None = None
    content_type: str | None = None


@dataclasses.dataclass(frozen=True)
class EncodedMessage:
    """A message in the form it is stored and sent."""

    message_id: uuid.UUID
    topic: str
    key: bytes | None
    payload: bytes | None
    headers: dict[str, str]


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7): ids sort by creation time, which keeps the
    unique index on ``message_id`` append-mostly."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = (rand >> 64) & 0xFFF
    rand_b = rand & 0x3FFF_FFFF_FFFF_FFFF
    value = ((ms & 0xFFFF_FFFF_FFFF) << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, decimal.Decimal):
        # A string keeps every digit: money must not go through a float.
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    dump = getattr(obj, "model_dump", None)
    if callable(dump):  # pydantic v2
        return dump(mode="json")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _utf8(text: str, what: str) -> bytes:
    """``text`` as UTF-8; a lone surrogate (which UTF-8 cannot encode) is a PayloadError."""
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise PayloadError(
            f"{what} cannot be encoded as UTF-8: a lone surrogate at position {exc.start}"
        ) from None


def _check_text(text: str, what: str) -> str:
    """Header names and values are stored in a ``jsonb`` column, which holds neither a NUL
    character nor a lone surrogate: refuse them here, before any SQL, rather than let the
    INSERT fail and abort the caller's transaction."""
    nul = text.find("\x00")
    if nul >= 0:
        raise PayloadError(f"{what} contains a NUL character (at position {nul})")
    _utf8(text, what)
    return text


def encode_payload(payload: Any) -> tuple[bytes | None, str | None]:
    """Return the payload's bytes and its default content type."""
    if payload is None:
        return None, None
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload), OCTET_STREAM
    if isinstance(payload, str):
        return _utf8(payload, "payload"), TEXT
    dump_json = getattr(payload, "model_dump_json", None)
    if callable(dump_json) and not isinstance(payload, type):
        try:
            text = str(dump_json())
        except (TypeError, ValueError) as exc:  # pydantic's serialization errors are ValueErrors
            raise PayloadError(f"payload cannot be encoded as JSON ({exc})") from exc
        return _utf8(text, "payload"), JSON
    try:
        text = json.dumps(
            payload,
            default=_json_default,
            ensure_ascii=False,
            allow_nan=False,
            separators=(",", ":"),
        )
    except (TypeError, ValueError) as exc:
        raise PayloadError(
            f"payload cannot be encoded as JSON ({exc}); pass bytes, str, or JSON-compatible data"
        ) from exc
    return _utf8(text, "payload"), JSON


def encode(message: Message) -> EncodedMessage:
    """Validate and encode; raises :class:`PayloadError` with what to fix."""
    topic = message.topic
    # fullmatch: with match, "$" would accept a trailing newline. "." and ".." are not
    # allowed by Kafka either.
    if not isinstance(topic, str) or not _TOPIC.fullmatch(topic) or topic in (".", ".."):
        raise PayloadError(
            f"invalid topic {topic!r}: use 1-249 characters from letters, digits, '.', '_', '-'"
        )
    key = message.key
    if isinstance(key, str):
        key = _utf8(key, "key")
    elif isinstance(key, (bytearray, memoryview)):
        key = bytes(key)
    elif key is not None and not isinstance(key, bytes):
        raise PayloadError(f"invalid key of type {type(key).__name__}: use str, bytes or None")
    payload, content_type = encode_payload(message.payload)
    headers: dict[str, str] = {}
    if message.headers is not None and not isinstance(message.headers, Mapping):
        raise PayloadError(
            f"headers must be a mapping of str to str, not {type(message.headers).__name__}"
        )
    for name, value in (message.headers or {}).items():
        if not isinstance(name, str) or not name:
            raise PayloadError(f"invalid header name {name!r}: use a non-empty str")
        _check_text(name, f"header name {name!r}")
        if name.lower() in _RESERVED_HEADERS:
            raise PayloadError(f"header {name!r} is set by the outbox; pass message_id= instead")
        if not isinstance(value, str):
            raise PayloadError(f"header {name!r} must be a str, not {type(value).__name__}")
        headers[name] = _check_text(value, f"the value of header {name!r}")
    if message.content_type is not None:
        if not isinstance(message.content_type, str):
            raise PayloadError(
                f"content_type must be a str, not {type(message.content_type).__name__}"
            )
        _check_text(message.content_type, "content_type")
    ctype = message.content_type or content_type
    if message.content_type is None and any(n.lower() == HEADER_CONTENT_TYPE for n in headers):
        ctype = None  # the caller's own content-type header wins over the default
    if message.content_type is not None:
        # content_type= wins over a content-type header in any letter case: one header only.
        headers = {n: v for n, v in headers.items() if n.lower() != HEADER_CONTENT_TYPE}
    if ctype is not None:
        headers[HEADER_CONTENT_TYPE] = ctype
    message_id = message.message_id if message.message_id is not None else uuid7()
    if not isinstance(message_id, uuid.UUID):
        raise PayloadError(f"message_id must be a uuid.UUID, not {type(message_id).__name__}")
    return EncodedMessage(
        message_id=message_id, topic=topic, key=key, payload=payload, headers=headers
    )
