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
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from outbox.exceptions import PayloadError

#: Kafka header carrying the message id: consumers deduplicate on it.
HEADER_MESSAGE_ID = "message-id"
#: Kafka header carrying the payload's media type.
HEADER_CONTENT_TYPE = "content-type"
#: Kafka header carrying the message's deadline (``publish(deadline=...)`` or ``ttl=``), as
#: RFC 3339 UTC with milliseconds: a consumer does not run its handler past it.
HEADER_DEADLINE = "outbox-deadline"
_RESERVED_HEADERS = frozenset({HEADER_MESSAGE_ID})

#: The longest header name ``publish`` accepts, in UTF-8 bytes. Kafka sets no limit; this
#: one keeps names short (trace and routing headers are a few dozen bytes), not data.
MAX_HEADER_NAME = 255

#: Headers as ``publish`` takes them: a mapping, or a sequence of ``(name, value)`` pairs
#: (order and repeated names kept); values are ``str`` (sent as UTF-8) or ``bytes``.
Headers: TypeAlias = "Mapping[str, str | bytes] | Sequence[tuple[str, str | bytes]]"
#: Headers as they are stored and sent: ordered ``(name, value)`` pairs.
HeaderList: TypeAlias = "tuple[tuple[str, bytes], ...]"

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
    ``headers``: a mapping of names to values, or a sequence of ``(name, value)`` pairs, sent
    in the order given (repeated names too); values are ``str`` (UTF-8) or ``bytes``, names
    non-empty ``str`` of at most :data:`MAX_HEADER_NAME` UTF-8 bytes, without NUL characters
    or lone surrogates. ``message_id`` defaults to a new time-ordered UUID (version 7).
    ``deadline`` (a timezone-aware ``datetime``) or ``ttl`` (a ``timedelta`` or seconds from
    now): past it, consumers do not run their handler but dead-letter the message with reason
    ``expired`` (header :data:`HEADER_DEADLINE`).
    """

    topic: str
    payload: Any
    key: str | bytes | None = None
    headers: Headers | None = None
    message_id: uuid.UUID | None = None
    content_type: str | None = None
    deadline: datetime.datetime | None = None
    ttl: datetime.timedelta | float | None = None


@dataclasses.dataclass(frozen=True)
class EncodedMessage:
    """A message in the form it is stored and sent."""

    message_id: uuid.UUID
    topic: str
    key: bytes | None
    payload: bytes | None
    #: In the order they are stored and sent (after ``message-id``), repeated names kept.
    headers: HeaderList


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


def _check_text(text: str, what: str) -> bytes:
    """Header names and the content type are stored as ``text``, which holds neither a NUL
    character nor a lone surrogate: refuse them here, before any SQL, rather than let the
    INSERT fail and abort the caller's transaction. Returns the UTF-8 bytes."""
    nul = text.find("\x00")
    if nul >= 0:
        raise PayloadError(f"{what} contains a NUL character (at position {nul})")
    return _utf8(text, what)


def storable_text(text: str) -> bool:
    """Whether a ``text`` column can hold ``text`` as it is: no NUL, no lone surrogate. (Empty
    and long header names can be stored; :func:`encode` refuses them for other reasons.)"""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _header_pairs(headers: object) -> list[tuple[object, object]]:
    if isinstance(headers, Mapping):
        return list(headers.items())
    if isinstance(headers, (list, tuple)):
        pairs: list[tuple[object, object]] = []
        for i, pair in enumerate(headers):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise PayloadError(
                    f"headers[{i}] must be a (name, value) pair, not {type(pair).__name__}"
                )
            pairs.append((pair[0], pair[1]))
        return pairs
    raise PayloadError(
        f"headers must be a mapping or a list of (name, value) pairs, not {type(headers).__name__}"
    )


def encode_headers(headers: object) -> list[tuple[str, bytes]]:
    """Validate headers (a mapping or a sequence of pairs) and return them as ordered
    ``(name, bytes)`` pairs; raises :class:`PayloadError`."""
    out: list[tuple[str, bytes]] = []
    for name, value in _header_pairs(headers):
        if not isinstance(name, str) or not name:
            raise PayloadError(f"invalid header name {name!r}: use a non-empty str")
        size = len(_check_text(name, f"header name {name!r}"))
        if size > MAX_HEADER_NAME:
            raise PayloadError(
                f"header name {name[:40]!r}... is {size} bytes long: at most "
                f"{MAX_HEADER_NAME} (UTF-8)"
            )
        if name.lower() in _RESERVED_HEADERS:
            raise PayloadError(f"header {name!r} is set by the outbox; pass message_id= instead")
        if isinstance(value, str):
            data = _utf8(value, f"the value of header {name!r}")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        else:
            raise PayloadError(
                f"header {name!r} must be a str or bytes, not {type(value).__name__}"
            )
        out.append((name, data))
    return out


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


def format_deadline(deadline: datetime.datetime) -> bytes:
    """``deadline`` as the header holds it: RFC 3339, UTC, milliseconds."""
    utc = deadline.astimezone(datetime.timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.").encode() + b"%03dZ" % (utc.microsecond // 1000)


def parse_time(text: str) -> datetime.datetime:
    """An ISO 8601 time, ``Z`` for UTC included on every supported Python (``fromisoformat``
    takes it only from 3.11); naive if it has no zone. ``ValueError`` if it is not one."""
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    return datetime.datetime.fromisoformat(text)


def parse_deadline(value: bytes) -> float:
    """The header's deadline as a POSIX timestamp; ``ValueError`` if it is not RFC 3339 with a
    time zone."""
    text = value.decode("ascii")
    parsed = parse_time(text)
    if parsed.tzinfo is None or "T" not in text.upper():
        raise ValueError(f"not an RFC 3339 time with a zone: {value!r}")
    return parsed.timestamp()


def _deadline(message: Message) -> bytes | None:
    deadline, ttl = message.deadline, message.ttl
    if deadline is not None and ttl is not None:
        raise PayloadError("pass deadline= or ttl=, not both")
    if ttl is not None:
        if isinstance(ttl, datetime.timedelta):
            seconds = ttl.total_seconds()
        elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
            seconds = float(ttl)
        else:
            raise PayloadError(f"ttl must be a timedelta or seconds, not {type(ttl).__name__}")
        if not 0 < seconds < 10 * 366 * 86400:
            raise PayloadError(f"ttl must be positive (and under ten years), not {seconds:g} s")
        deadline = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            seconds=seconds
        )
    if deadline is None:
        return None
    if not isinstance(deadline, datetime.datetime) or deadline.tzinfo is None:
        raise PayloadError(
            "deadline must be a timezone-aware datetime, e.g. "
            "datetime.now(timezone.utc) + timedelta(minutes=5)"
        )
    return format_deadline(deadline)


def valid_topic(topic: object) -> bool:
    """Whether Kafka accepts ``topic`` as a topic name."""
    # fullmatch: with match, "$" would accept a trailing newline. "." and ".." are not
    # allowed by Kafka either.
    return isinstance(topic, str) and bool(_TOPIC.fullmatch(topic)) and topic not in (".", "..")


def encode(message: Message) -> EncodedMessage:
    """Validate and encode; raises :class:`PayloadError` with what to fix."""
    topic = message.topic
    if not valid_topic(topic):
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
    headers = encode_headers(message.headers) if message.headers is not None else []
    if message.content_type is not None:
        if not isinstance(message.content_type, str):
            raise PayloadError(
                f"content_type must be a str, not {type(message.content_type).__name__}"
            )
        ctype: bytes | None = _check_text(message.content_type, "content_type")
        # content_type= wins over a content-type header in any letter case: one header only.
        headers = [(n, v) for n, v in headers if n.lower() != HEADER_CONTENT_TYPE]
    elif any(n.lower() == HEADER_CONTENT_TYPE for n, _ in headers):
        ctype = None  # the caller's own content-type header wins, where the caller put it
    else:
        ctype = None if content_type is None else content_type.encode()
    if ctype is not None:
        # First, right after the message-id the relay sends: see docs/reference.md.
        headers.insert(0, (HEADER_CONTENT_TYPE, ctype))
    deadline = _deadline(message)
    if deadline is not None:
        # deadline= wins over a header of the same name: one deadline only.
        headers = [(n, v) for n, v in headers if n.lower() != HEADER_DEADLINE]
        headers.append((HEADER_DEADLINE, deadline))
    else:
        for name, value in headers:
            if name.lower() == HEADER_DEADLINE:
                try:
                    parse_deadline(value)
                except ValueError:
                    raise PayloadError(
                        f"header {name!r} must be an RFC 3339 time with a zone, e.g. "
                        "2026-01-31T12:00:00.000Z; or pass deadline= or ttl="
                    ) from None
    message_id = message.message_id if message.message_id is not None else uuid7()
    if not isinstance(message_id, uuid.UUID):
        raise PayloadError(f"message_id must be a uuid.UUID, not {type(message_id).__name__}")
    return EncodedMessage(
        message_id=message_id, topic=topic, key=key, payload=payload, headers=tuple(headers)
    )
