"""``publish(deadline=...)`` and ``ttl=``: the ``outbox-deadline`` header as it is stored."""

from __future__ import annotations

import datetime
import time

import pytest

from outbox.exceptions import PayloadError
from outbox.message import (
    HEADER_DEADLINE,
    Message,
    encode,
    format_deadline,
    parse_deadline,
)

UTC = datetime.timezone.utc


def deadline_of(message: Message) -> bytes:
    [value] = [v for n, v in encode(message).headers if n == HEADER_DEADLINE]
    return value


def test_a_deadline_is_stored_as_rfc3339_utc_with_milliseconds() -> None:
    paris = datetime.timezone(datetime.timedelta(hours=1))
    when = datetime.datetime(2026, 12, 2, 13, 4, 5, 678901, tzinfo=paris)
    assert deadline_of(Message("t", {}, deadline=when)) == b"2026-12-02T12:04:05.678Z"
    assert parse_deadline(b"2026-12-02T12:04:05.678Z") == pytest.approx(when.timestamp(), abs=0.001)


@pytest.mark.parametrize("ttl", [30, 30.0, datetime.timedelta(seconds=30)])
def test_a_ttl_is_a_deadline_that_many_seconds_from_now(
    ttl: float | datetime.timedelta,
) -> None:
    stored = parse_deadline(deadline_of(Message("t", {}, ttl=ttl)))
    assert stored == pytest.approx(time.time() + 30, abs=1)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"deadline": datetime.datetime(2030, 1, 1)}, "timezone-aware"),
        ({"deadline": "2030-01-01T00:00:00Z"}, "timezone-aware"),
        ({"ttl": 0}, "positive"),
        ({"ttl": -5}, "positive"),
        ({"ttl": float("nan")}, "positive"),
        ({"ttl": float("inf")}, "positive"),
        ({"ttl": True}, "timedelta or seconds"),
        ({"ttl": "30"}, "timedelta or seconds"),
        (
            {"ttl": 5, "deadline": datetime.datetime(2030, 1, 1, tzinfo=UTC)},
            "not both",
        ),
    ],
)
def test_a_careless_deadline_is_refused_before_anything_is_written(
    kwargs: dict[str, object], error: str
) -> None:
    with pytest.raises(PayloadError, match=error):
        encode(Message("t", {}, **kwargs))  # type: ignore[arg-type]


def test_deadline_wins_over_a_header_of_the_same_name() -> None:
    when = datetime.datetime(2030, 1, 1, tzinfo=UTC)
    encoded = encode(
        Message("t", {}, headers={"Outbox-Deadline": "2020-01-01T00:00:00Z"}, deadline=when)
    )
    assert [(n, v) for n, v in encoded.headers if n.lower() == HEADER_DEADLINE] == [
        (HEADER_DEADLINE, b"2030-01-01T00:00:00.000Z")
    ]


def test_a_deadline_header_given_by_hand_must_be_readable() -> None:
    ok = encode(Message("t", {}, headers={HEADER_DEADLINE: "2030-01-01T00:00:00+02:00"}))
    assert (HEADER_DEADLINE, b"2030-01-01T00:00:00+02:00") in ok.headers
    for bad in ("tomorrow", "2030-01-01", "2030-01-01T00:00:00"):
        with pytest.raises(PayloadError, match="RFC 3339"):
            encode(Message("t", {}, headers={HEADER_DEADLINE: bad}))


def test_no_deadline_no_header() -> None:
    assert all(n != HEADER_DEADLINE for n, _ in encode(Message("t", {})).headers)


def test_format_and_parse_round_trip() -> None:
    now = datetime.datetime.now(UTC)
    assert parse_deadline(format_deadline(now)) == pytest.approx(now.timestamp(), abs=0.001)
