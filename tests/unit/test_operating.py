"""The pieces of the operating commands that need no database: durations and times, the
replay of a dead letter (the inverse of what ``outbox.deadletter`` writes), the purge's
bookkeeping, payload previews."""

from __future__ import annotations

import base64
import datetime
import json
import uuid
from collections.abc import Mapping
from typing import Any

import click
import pytest

from outbox import deadletter
from outbox.admin import preview, text_or_hex
from outbox.cli_admin import Since, parse_duration
from outbox.exceptions import PayloadError
from outbox.message import EncodedMessage
from outbox.purge import SentPurge
from outbox.transport.base import IncomingMessage

# -- durations and times ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("15m", 900),
        ("2h", 7200),
        ("7d", 604800),
        ("1w", 604800),
        ("1.5h", 5400),
        ("250ms", 0.25),
        (" 2h ", 7200),
        (".5m", 30),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "h", "abc", "-1", "0", "0s", "2 hours", "1h30m", "1e3"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_since_takes_a_time_or_a_duration_ago() -> None:
    since = Since()
    now = datetime.datetime.now(datetime.timezone.utc)
    ago = since.convert("2h", None, None)
    assert abs((now - ago).total_seconds() - 7200) < 5
    assert since.convert("2026-12-01T10:00:00Z", None, None) == datetime.datetime(
        2026, 12, 1, 10, tzinfo=datetime.timezone.utc
    )
    # Without a zone: UTC.
    assert since.convert("2026-12-01 10:00", None, None).utcoffset() == datetime.timedelta(0)
    zoned = since.convert("2026-12-01T10:00:00+01:00", None, None)
    assert zoned == datetime.datetime(2026, 12, 1, 9, tzinfo=datetime.timezone.utc)
    with pytest.raises(click.BadParameter, match="neither a time"):
        since.convert("yesterday", None, None)


# -- replaying dead letters ---------------------------------------------------------------------


def incoming(
    topic: str,
    headers: list[tuple[str, bytes]],
    *,
    key: bytes | None = b"k",
    value: bytes | None = b"v",
    offset: int = 7,
) -> IncomingMessage:
    return IncomingMessage(topic, 2, offset, key, value, headers)


def as_sent(letter: EncodedMessage, offset: int = 0) -> IncomingMessage:
    """The dead letter as the relay sends it: its own ``message-id`` first."""
    return incoming(
        letter.topic,
        [("message-id", str(letter.message_id).encode()), *letter.headers],
        key=letter.key,
        value=letter.payload,
        offset=offset,
    )


ORIGINAL_HEADERS = [
    ("message-id", b"orig-1"),
    ("content-type", b"application/json"),
    ("trace", b"\xff\x00raw"),
    ("dlq-custom", b"an application's own header"),
    ("trace", b"again"),
    ("bad\x00name", b"x"),
]


def test_the_full_form_replays_the_original() -> None:
    original = incoming("orders", ORIGINAL_HEADERS, key=b"\xfekey", value=b'{"n": 1}')
    letter = deadletter.full(
        original,
        topic="orders.dlq",
        consumer="payments",
        reason="ValueError: no",
        attempts=5,
        key="x" * 600,  # too long for the inbox: dlq-idempotency-key is added
        kind="attempts",
    )
    replay = deadletter.replay(as_sent(letter))
    assert replay.claim == f"dlq-replay:{letter.message_id}"
    assert replay.reason == "attempts"
    message = replay.message
    assert message.message_id == uuid.uuid5(deadletter.REPLAY_NAMESPACE, str(letter.message_id))
    assert (message.topic, message.key, message.payload) == ("orders", b"\xfekey", b'{"n": 1}')
    escaped = "dlq-header-b64:" + base64.b64encode(b"bad\x00name").decode()
    assert list(message.headers) == [
        ("content-type", b"application/json"),
        ("trace", b"\xff\x00raw"),
        ("dlq-custom", b"an application's own header"),
        ("trace", b"again"),
        (escaped, b"x"),  # no column holds the name itself
    ]


def test_the_minimal_form_replays_the_original() -> None:
    original = incoming("orders", ORIGINAL_HEADERS, key=None, value=None)
    letter = deadletter.minimal(
        original,
        topic="orders.dlq",
        consumer="payments",
        reason="boom",
        attempts=1,
        key="orig-1",
        failure="trigger said no",
    )
    replay = deadletter.replay(as_sent(letter))
    message = replay.message
    assert (message.topic, message.key, message.payload) == ("orders", None, None)
    assert [n for n, _ in message.headers] == [
        "content-type",
        "trace",
        "dlq-custom",
        "trace",
        "dlq-header-b64:" + base64.b64encode(b"bad\x00name").decode(),
    ]
    assert message.headers[1] == ("trace", b"\xff\x00raw")
    assert replay.reason == "poison"


def test_a_letter_without_message_id_is_named_by_its_position() -> None:
    headers = [("dlq-original-topic", b"orders"), ("dlq-reason", b"poison")]
    replay = deadletter.replay(incoming("orders.dlq", headers, offset=42))
    assert replay.claim == "dlq-replay:orders.dlq:2:42"
    assert replay.message.message_id == uuid.uuid5(deadletter.REPLAY_NAMESPACE, "orders.dlq:2:42")


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([("message-id", b"m")], "not a dead letter"),
        ([("message-id", b"m"), ("dlq-envelope", b"{not json")], "unreadable dlq-envelope"),
        ([("message-id", b"m"), ("dlq-envelope", b'{"headers": []}')], "unreadable"),
        (
            [("message-id", b"m"), ("dlq-envelope", json.dumps({"topic": 5}).encode())],
            "no topic",
        ),
        ([("message-id", b"m"), ("dlq-original-topic", b"bad topic!")], "invalid original"),
        ([("message-id", b"\xff"), ("dlq-original-topic", b"t")], "not UTF-8"),
        ([("dlq-original-topic", b"t"), ("extra", b"x")], "unexpected headers"),
    ],
)
def test_what_is_no_dead_letter(headers: list[tuple[str, bytes]], why: str) -> None:
    with pytest.raises(PayloadError, match=why):
        deadletter.replay(incoming("orders.dlq", headers))


# -- the purge's bookkeeping --------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_purge_pass_and_the_next() -> None:
    clock = Clock()
    purge = SentPurge(3600, batch_size=10, interval=300, clock=clock)
    seen: list[Mapping[str, Any]] = []
    # (deleted, last id looked at, rows looked at, all newer than the cutoff)
    answers = iter([(10, 10, 10, False), (4, 20, 10, False), (0, 30, 10, True)])

    def run(params: Mapping[str, Any]) -> Any:
        seen.append(dict(params))
        return next(answers)

    assert purge.due() and not purge.running  # the first pass at once
    purge.step(run)
    assert purge.running and purge.due()
    purge.step(run)
    purge.step(run)
    assert not purge.running and purge.deleted == 14
    assert [p["after"] for p in seen] == [0, 10, 20]
    assert seen[0] == {"after": 0, "limit": 10, "age": 3600}
    assert not purge.due()
    clock.now += 299
    assert not purge.due()
    clock.now += 1
    assert purge.due()
    # The end of the table ends a pass too; a new pass starts from the lowest id again.
    answers = iter([(3, 35, 3, False)])
    purge.step(run)
    assert not purge.running and purge.deleted == 3 and seen[-1]["after"] == 0


def test_a_failed_batch_ends_the_pass_until_the_next() -> None:
    clock = Clock()
    purge = SentPurge(60, interval=300, clock=clock)

    def fail(params: Mapping[str, Any]) -> Any:
        raise RuntimeError("statement timeout")

    with pytest.raises(RuntimeError):
        purge.step(fail)
    assert not purge.running and not purge.due()
    clock.now += 300
    assert purge.due()
    assert purge.run_pass(lambda params: (0, None, 0, True)) == 0


def test_purge_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        SentPurge(0)
    with pytest.raises(ValueError):
        SentPurge(1, batch_size=0)
    with pytest.raises(ValueError):
        SentPurge(1, interval=0)


# -- previews -----------------------------------------------------------------------------------


def test_previews() -> None:
    assert preview("é".encode() * 3, 6) == ("utf-8", "ééé")
    # A character cut by the preview's limit is left out; one cut in the payload is not UTF-8.
    assert preview("ab€".encode()[:4], 5) == ("utf-8", "ab")
    assert preview("ab€".encode()[:4], 4) == ("hex", "6162e282")
    assert preview(b"\xff\xfe", 2) == ("hex", "fffe")
    assert text_or_hex("key", b"k") == {"key": "k", "key_hex": "6b"}
    assert text_or_hex("key", b"\xff") == {"key": None, "key_hex": "ff"}
    assert text_or_hex("key", None) == {"key": None, "key_hex": None}
