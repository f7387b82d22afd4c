"""Headers at publish: a mapping or a list of (name, value) pairs, kept in order with repeated
names, values ``str`` (UTF-8) or bytes; names checked before any SQL."""

from __future__ import annotations

from typing import Any

import pytest

from outbox import HEADER_CONTENT_TYPE, Message, PayloadError
from outbox.message import JSON, MAX_HEADER_NAME, OCTET_STREAM, encode


def test_a_list_of_pairs_keeps_its_order_and_repeated_names() -> None:
    headers: list[tuple[str, str | bytes]] = [
        ("b", "1"),
        ("a", b"\x00\xff"),
        ("b", "2"),
        ("traceparent", "00-ab-cd-01"),
    ]
    enc = encode(Message("t", b"x", headers=headers))
    assert enc.headers == (
        (HEADER_CONTENT_TYPE, OCTET_STREAM.encode()),
        ("b", b"1"),
        ("a", b"\x00\xff"),
        ("b", b"2"),
        ("traceparent", b"00-ab-cd-01"),
    )


def test_a_mapping_keeps_its_insertion_order() -> None:
    enc = encode(Message("t", {}, headers={"zz": "1", "a": "2", "mm": "3"}))
    assert [n for n, _ in enc.headers] == [HEADER_CONTENT_TYPE, "zz", "a", "mm"]


def test_tuples_and_lists_of_pairs_are_accepted() -> None:
    pairs = (["x", "1"], ("y", bytearray(b"2")), ("z", memoryview(b"3")))
    enc = encode(Message("t", None, headers=pairs))  # type: ignore[arg-type]
    assert enc.headers == (("x", b"1"), ("y", b"2"), ("z", b"3"))
    assert all(type(v) is bytes for _, v in enc.headers)


def test_str_values_are_utf8() -> None:
    enc = encode(Message("t", None, headers=[("h", "Zoë €")]))
    assert enc.headers == (("h", "Zoë €".encode()),)


def test_no_headers_and_empty_headers() -> None:
    assert encode(Message("t", b"x")).headers == ((HEADER_CONTENT_TYPE, OCTET_STREAM.encode()),)
    assert encode(Message("t", None, headers=[])).headers == ()
    assert encode(Message("t", None, headers={})).headers == ()


def test_content_type_goes_first_and_the_argument_replaces_every_content_type_header() -> None:
    enc = encode(Message("t", {}, headers=[("a", "1")]))
    assert enc.headers[0] == (HEADER_CONTENT_TYPE, JSON.encode())
    enc = encode(
        Message(
            "t",
            {},
            headers=[("content-type", "x/1"), ("a", "1"), ("CONTENT-TYPE", "x/2")],
            content_type="y/z",
        )
    )
    assert enc.headers == ((HEADER_CONTENT_TYPE, b"y/z"), ("a", b"1"))


def test_repeated_content_type_headers_of_the_caller_are_kept_as_given() -> None:
    headers = [("content-type", "x/1"), ("content-type", "x/2")]
    assert encode(Message("t", b"", headers=headers)).headers == (
        ("content-type", b"x/1"),
        ("content-type", b"x/2"),
    )


def test_encoding_the_encoded_headers_again_changes_nothing() -> None:
    # What EventSource.record_event does to keep a snapshot.
    first = encode(Message("t", {"n": 1}, headers=[("b", b"\xff"), ("a", "1"), ("b", "2")]))
    again = encode(Message("t", first.payload, None, first.headers, first.message_id))
    assert again == first


@pytest.mark.parametrize(
    ("headers", "expect"),
    [
        ([("", "v")], "invalid header name ''"),
        ([(None, "v")], "invalid header name None"),
        ([(b"h", "v")], "invalid header name b'h'"),
        ([("a\x00b", "v")], "contains a NUL"),
        ([("h" * (MAX_HEADER_NAME + 1), "v")], f"at most {MAX_HEADER_NAME}"),
        # Bytes, not characters: 128 two-byte characters are 256 bytes.
        ([("é" * 128, "v")], "256 bytes long"),
        ([("Message-Id", "x")], "set by the outbox"),
        ([("ok", "1"), ("message-id", b"x")], "set by the outbox"),
        ([("h",)], r"headers\[0\] must be a \(name, value\) pair"),
        ([("h", "v", "w")], r"headers\[0\] must be a \(name, value\) pair"),
        ([("ok", "1"), "h=v"], r"headers\[1\] must be a \(name, value\) pair, not str"),
        ([("h", 1)], "must be a str or bytes, not int"),
        ([("h", None)], "must be a str or bytes, not NoneType"),
        ([("h", "\ud800")], "value of header 'h' .* lone surrogate"),
    ],
    ids=repr,
)
def test_what_the_table_or_kafka_cannot_take_is_refused(headers: Any, expect: str) -> None:
    with pytest.raises(PayloadError, match=expect):
        encode(Message("t", {}, headers=headers))


def test_the_longest_name_is_accepted() -> None:
    name = "h" * MAX_HEADER_NAME
    assert encode(Message("t", None, headers=[(name, "v")])).headers == ((name, b"v"),)
