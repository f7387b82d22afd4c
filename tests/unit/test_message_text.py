"""Text the outbox table cannot store, or that UTF-8 cannot encode, is a PayloadError at encode
time (before any SQL): a NUL or a lone surrogate in a header name or in content_type (``text``
holds neither), a lone surrogate in a ``str`` header value, key or payload. A NUL in a header
value is fine: values are bytes (``bytea[]``)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from outbox import Message, PayloadError
from outbox.message import encode

LONE = "\ud800"


class Model:
    """Quacks like a pydantic v2 model whose JSON holds a lone surrogate."""

    def model_dump_json(self) -> str:
        return '{"name":"' + LONE + '"}'


@pytest.mark.parametrize(
    ("message", "expect"),
    [
        (Message("t", {}, headers={"a\x00b": "v"}), r"header name 'a\\x00b' contains a NUL"),
        (Message("t", {}, headers={f"x{LONE}": "v"}), r"header name .* lone surrogate"),
        (Message("t", {}, headers={"h": f"v{LONE}"}), r"value of header 'h' .* lone surrogate"),
        (Message("t", b"x", content_type="a\x00b"), r"content_type contains a NUL"),
        (Message("t", b"x", content_type=LONE), r"content_type .* lone surrogate"),
        (Message("t", {}, key=f"k{LONE}"), r"key cannot be encoded as UTF-8: .* position 1"),
        (Message("t", f"text {LONE}"), r"payload cannot be encoded as UTF-8"),
        (Message("t", {"name": LONE}), r"payload cannot be encoded as UTF-8"),
        (Message("t", [{"deep": ["x", LONE]}]), r"payload cannot be encoded as UTF-8"),
        (Message("t", Model()), r"payload cannot be encoded as UTF-8"),
        (Message("t", b"x", content_type=42), r"content_type must be a str, not int"),  # type: ignore[arg-type]
    ],
    ids=[
        "nul-header-name",
        "surrogate-header-name",
        "surrogate-header-value",
        "nul-content-type",
        "surrogate-content-type",
        "surrogate-key",
        "surrogate-str-payload",
        "surrogate-json-payload",
        "surrogate-nested-json",
        "surrogate-model",
        "content-type-not-str",
    ],
)
def test_text_that_cannot_be_stored_is_a_payload_error(message: Message, expect: str) -> None:
    with pytest.raises(PayloadError, match=expect) as info:
        encode(message)
    str(info.value).encode()  # the message itself is printable UTF-8
    assert info.value.__cause__ is None or not isinstance(info.value.__cause__, UnicodeError)


@pytest.mark.parametrize(
    "value",
    [
        "\x01\x1f\x7f tab\t newline\n",  # other control characters are fine in jsonb
        "\U0001f600 a proper surrogate pair, in UTF-16 terms",
        "ü €",
    ],
)
def test_other_text_is_kept(value: str) -> None:
    encoded = encode(Message("t", value, key=value, headers={value: value}))
    assert encoded.key == value.encode() and encoded.payload == value.encode()
    assert dict(encoded.headers)[value] == value.encode()


def test_nul_in_a_header_value_is_fine() -> None:
    encoded = encode(Message("t", {}, headers={"h": "v\x00", "b": b"\x00\xff"}))
    assert encoded.headers[1:] == (("h", b"v\x00"), ("b", b"\x00\xff"))


@pytest.mark.parametrize("payload", ["a\x00b", {"a": "\x00"}, b"\x00"])
def test_nul_in_key_and_payload_is_fine(payload: Any) -> None:
    # bytea holds anything; JSON escapes the NUL.
    encoded = encode(Message("t", payload, key="k\x00"))
    assert encoded.key == b"k\x00"
    if isinstance(payload, dict):
        assert json.loads(encoded.payload or b"") == payload
