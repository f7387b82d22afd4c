"""Message validation and encoding: what publish() stores, and what it refuses up front."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import time
import uuid
from typing import Any

import pytest

from outbox import HEADER_CONTENT_TYPE, Message, PayloadError, uuid7
from outbox.message import JSON, OCTET_STREAM, TEXT, encode, encode_payload


class Color(enum.Enum):
    RED = "red"
    BLUE = 2


@dataclasses.dataclass
class Line:
    sku: str
    price: decimal.Decimal


@dataclasses.dataclass
class Order:
    id: uuid.UUID
    lines: list[Line]
    at: datetime.datetime


class FakeModel:
    """Quacks like a pydantic v2 model."""

    def __init__(self, **fields: Any) -> None:
        self.fields = fields

    def model_dump_json(self) -> str:
        return json.dumps(self.fields, separators=(",", ":"))

    def model_dump(self, mode: str = "python") -> dict[str, Any]:
        assert mode == "json"
        return dict(self.fields)


class BrokenModel:
    def model_dump_json(self) -> str:
        raise ValueError("cannot serialize field x")


def payload_json(payload: Any) -> Any:
    data, ctype = encode_payload(payload)
    assert ctype == JSON
    assert data is not None
    return json.loads(data)


# -- payloads ---------------------------------------------------------------------------------


def test_dict_and_list_are_compact_utf8_json() -> None:
    data, ctype = encode_payload({"name": "Zoë", "n": [1, 2.5, None, True]})
    assert ctype == JSON
    assert data == '{"name":"Zoë","n":[1,2.5,null,true]}'.encode()
    assert payload_json([1, "a", {"b": None}]) == [1, "a", {"b": None}]


def test_scalars_are_json() -> None:
    assert encode_payload(42) == (b"42", JSON)
    assert encode_payload(True) == (b"true", JSON)
    assert encode_payload(1.5) == (b"1.5", JSON)


def test_str_is_utf8_text() -> None:
    assert encode_payload("héllo") == ("héllo".encode(), TEXT)
    assert encode_payload("") == (b"", TEXT)


@pytest.mark.parametrize(
    "raw", [b"\x00\xffraw", bytearray(b"\x00\xffraw"), memoryview(b"\x00\xffraw")]
)
def test_bytes_like_are_sent_as_is(raw: Any) -> None:
    data, ctype = encode_payload(raw)
    assert data == b"\x00\xffraw" and type(data) is bytes
    assert ctype == OCTET_STREAM


def test_none_is_a_tombstone_without_content_type() -> None:
    assert encode_payload(None) == (None, None)
    enc = encode(Message("t", None, key="k"))
    assert enc.payload is None
    assert enc.headers == ()


def test_rich_values_inside_json() -> None:
    oid = uuid.UUID("0190c2d4-0000-7000-8000-000000000001")
    at = datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc)
    got = payload_json(
        {
            "id": oid,
            "at": at,
            "day": datetime.date(2024, 5, 1),
            "time": datetime.time(8, 15),
            "amount": decimal.Decimal("12345678901234567890.0000000001"),
            "colors": [Color.RED, Color.BLUE],
        }
    )
    assert got == {
        "id": str(oid),
        "at": "2024-05-01T12:30:00+00:00",
        "day": "2024-05-01",
        "time": "08:15:00",
        # Decimals keep every digit: they are sent as strings, never through a float.
        "amount": "12345678901234567890.0000000001",
        "colors": ["red", 2],
    }


def test_dataclass_nested_is_json() -> None:
    oid = uuid.uuid4()
    order = Order(
        id=oid,
        lines=[Line("a", decimal.Decimal("1.10")), Line("b", decimal.Decimal("2"))],
        at=datetime.datetime(2024, 1, 2, 3, 4, 5),
    )
    assert payload_json(order) == {
        "id": str(oid),
        "lines": [{"sku": "a", "price": "1.10"}, {"sku": "b", "price": "2"}],
        "at": "2024-01-02T03:04:05",
    }


def test_pydantic_like_model_uses_model_dump_json() -> None:
    assert encode_payload(FakeModel(a=1, b="x")) == (b'{"a":1,"b":"x"}', JSON)
    # Nested in a plain structure: model_dump(mode="json").
    assert payload_json({"m": FakeModel(a=1)}) == {"m": {"a": 1}}


@pytest.mark.parametrize(
    "bad",
    [
        float("nan"),
        {"x": float("inf")},
        [float("-inf")],
        {"x": object()},
        {"s": {1, 2}},
        {("tuple", "key"): 1},
        Order,  # a dataclass class, not an instance
        {"c": complex(1, 2)},
    ],
    ids=["nan", "inf", "-inf", "object", "set", "tuple-key", "dataclass-type", "complex"],
)
def test_unencodable_payload_is_a_payload_error(bad: Any) -> None:
    with pytest.raises(PayloadError, match="JSON"):
        encode_payload(bad)
    with pytest.raises(PayloadError):
        encode(Message("t", bad))


def test_circular_payload_is_a_payload_error() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(PayloadError):
        encode_payload(loop)


def test_model_whose_serializer_fails_is_a_payload_error() -> None:
    with pytest.raises(PayloadError):
        encode(Message("t", BrokenModel()))


# -- topic, key, headers, id --------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic", ["orders", "a", "A.b_c-9", "x" * 249, "__consumer_like", "..a", "a.."]
)
def test_valid_topics(topic: str) -> None:
    assert encode(Message(topic, {})).topic == topic


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "x" * 250,
        "with space",
        "slash/topic",
        "ümlaut",
        "orders\n",
        "\norders",
        "or\nders",
        ".",
        "..",
        None,
        b"orders",
        42,
    ],
    ids=repr,
)
def test_invalid_topics_are_refused(topic: Any) -> None:
    with pytest.raises(PayloadError, match="topic"):
        encode(Message(topic, {}))


def test_keys() -> None:
    assert encode(Message("t", {}, key="clé")).key == "clé".encode()
    assert encode(Message("t", {}, key=b"\x00\x01")).key == b"\x00\x01"
    assert encode(Message("t", {}, key=None)).key is None
    # An empty key is a key (distinct from none), as in Kafka.
    assert encode(Message("t", {}, key="")).key == b""


@pytest.mark.parametrize("key", [1, 1.5, uuid.uuid4(), ["k"], object()], ids=repr)
def test_invalid_keys_are_refused(key: Any) -> None:
    with pytest.raises(PayloadError, match="key"):
        encode(Message("t", {}, key=key))


def test_headers_are_kept_and_content_type_added_first() -> None:
    enc = encode(Message("t", {"a": 1}, headers={"trace": "abc", "empty": ""}))
    assert enc.headers == (
        (HEADER_CONTENT_TYPE, JSON.encode()),
        ("trace", b"abc"),
        ("empty", b""),
    )


def test_explicit_content_type_wins() -> None:
    enc = encode(Message("t", b"\x01", content_type="application/avro"))
    assert enc.headers == ((HEADER_CONTENT_TYPE, b"application/avro"),)


def test_content_type_header_set_by_the_caller_is_not_overwritten() -> None:
    enc = encode(Message("t", b"\x01", headers={"content-type": "application/x-protobuf"}))
    assert enc.headers == (("content-type", b"application/x-protobuf"),)
    enc = encode(
        Message("t", b"\x01", headers=[("a", "1"), ("Content-Type", "application/x-protobuf")])
    )
    # Where the caller put it.
    assert enc.headers == (("a", b"1"), ("Content-Type", b"application/x-protobuf"))


@pytest.mark.parametrize("name", ["message-id", "Message-ID", "MESSAGE-ID"])
def test_reserved_header_is_refused(name: str) -> None:
    with pytest.raises(PayloadError, match="message_id"):
        encode(Message("t", {}, headers={name: "x"}))


@pytest.mark.parametrize("value", [1, None, ["x"], 1.5], ids=repr)
def test_header_values_neither_str_nor_bytes_are_refused(value: Any) -> None:
    with pytest.raises(PayloadError, match="must be a str or bytes"):
        encode(Message("t", {}, headers={"h": value}))


@pytest.mark.parametrize("name", ["", 1, b"h", None], ids=repr)
def test_invalid_header_names_are_refused(name: Any) -> None:
    with pytest.raises(PayloadError, match="header name"):
        encode(Message("t", {}, headers={name: "v"}))


def test_message_id_defaults_to_uuid7_and_can_be_chosen() -> None:
    enc = encode(Message("t", {}))
    assert enc.message_id.version == 7
    chosen = uuid.uuid4()
    assert encode(Message("t", {}, message_id=chosen)).message_id == chosen


def test_message_id_must_be_a_uuid() -> None:
    with pytest.raises(PayloadError, match="uuid"):
        encode(Message("t", {}, message_id=str(uuid.uuid4())))  # type: ignore[arg-type]


# -- uuid7 ------------------------------------------------------------------------------------


def test_uuid7_version_and_variant() -> None:
    for _ in range(1000):
        u = uuid7()
        assert u.version == 7
        assert u.variant == uuid.RFC_4122
    assert len({uuid7() for _ in range(10_000)}) == 10_000


def test_uuid7_carries_the_unix_time_in_ms() -> None:
    before = time.time_ns() // 1_000_000
    u = uuid7()
    after = time.time_ns() // 1_000_000
    assert before <= u.int >> 80 <= after


def test_uuid7_orders_by_time_across_milliseconds() -> None:
    ids = []
    for _ in range(5):
        ids.append(uuid7())
        ms = time.time_ns() // 1_000_000
        while time.time_ns() // 1_000_000 <= ms:  # spin into the next millisecond
            pass
    assert ids == sorted(ids)
    assert [u.bytes for u in ids] == sorted(u.bytes for u in ids)
    assert [str(u) for u in ids] == sorted(str(u) for u in ids)


@pytest.mark.parametrize("headers", ["a=b", b"ab", 42, {("a", "b")}], ids=repr)
def test_headers_neither_mapping_nor_pairs_are_a_payload_error(headers: Any) -> None:
    with pytest.raises(PayloadError, match="headers must be a mapping or a list of"):
        encode(Message("t", {}, headers=headers))


def test_bytes_like_keys_are_accepted() -> None:
    # Beyond the declared str | bytes: any bytes-like key works at run time.
    assert encode(Message("t", {}, key=bytearray(b"k"))).key == b"k"  # type: ignore[arg-type]
    assert encode(Message("t", {}, key=memoryview(b"k"))).key == b"k"  # type: ignore[arg-type]


def test_content_type_argument_replaces_a_header_in_any_case() -> None:
    enc = encode(
        Message("t", b"x", headers=[("h", "1"), ("Content-Type", "a/b")], content_type="c/d")
    )
    assert enc.headers == (("content-type", b"c/d"), ("h", b"1"))
