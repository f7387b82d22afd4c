"""MemoryTransport behaves like librdkafka where the relay's guarantees depend on it."""

from __future__ import annotations

import pytest

from outbox.exceptions import MessageRejected, TransportUnavailable
from outbox.transport.base import DeliveryFailure, FailureKind, OutgoingMessage
from outbox.transport.memory import MemoryTransport


def msg(key: bytes | None, value: bytes, topic: str = "t") -> OutgoingMessage:
    return OutgoingMessage(topic=topic, key=key, value=value, headers=[])


class Reports:
    def __init__(self) -> None:
        self.got: list[tuple[bytes | None, DeliveryFailure | None]] = []

    def cb(self, m: OutgoingMessage):  # type: ignore[no-untyped-def]
        return lambda failure, _message: self.got.append((m.value, failure))

    def kinds(self) -> list[tuple[bytes | None, FailureKind | None]]:
        return [(v, f.kind if f else None) for v, f in self.got]


def send_all(t: MemoryTransport, r: Reports, msgs: list[OutgoingMessage]) -> None:
    for m in msgs:
        t.send(m, r.cb(m))


def test_reports_are_served_by_poll_in_order() -> None:
    t, r = MemoryTransport(), Reports()
    send_all(t, r, [msg(b"k", b"1"), msg(None, b"2"), msg(b"j", b"3")])
    assert r.got == [] and t.sent == []
    t.poll(0)
    assert r.kinds() == [(b"1", None), (b"2", None), (b"3", None)]
    assert [m.value for m in t.sent] == [b"1", b"2", b"3"]


def test_reject_is_synchronous_and_queues_nothing() -> None:
    t, r = MemoryTransport(reject=lambda m: "too big" if m.value == b"x" else None), Reports()
    with pytest.raises(MessageRejected, match="too big"):
        t.send(msg(b"k", b"x"), r.cb(msg(b"k", b"x")))
    t.poll(0)
    assert r.got == [] and t.sent == []


def test_a_failed_message_leaves_no_gap_for_its_key() -> None:
    t = MemoryTransport(
        fail=lambda m: DeliveryFailure(FailureKind.MESSAGE, "bad") if m.value == b"k2" else None
    )
    r = Reports()
    send_all(
        t,
        r,
        [
            msg(b"k", b"k1"),
            msg(b"k", b"k2"),
            msg(b"j", b"j1"),
            msg(b"k", b"k3"),
            msg(b"k", b"k4", topic="other"),  # same key, other topic: independent
            msg(None, b"n1"),
        ],
    )
    t.poll(0)
    assert r.kinds() == [
        (b"k1", None),
        (b"k2", FailureKind.MESSAGE),
        (b"j1", None),
        (b"k3", FailureKind.TRANSPORT),
        (b"k4", None),
        (b"n1", None),
    ]
    assert [m.value for m in t.sent] == [b"k1", b"j1", b"k4", b"n1"]
    assert [(m.value, f.kind) for m, f in t.failed] == [
        (b"k2", FailureKind.MESSAGE),
        (b"k3", FailureKind.TRANSPORT),
    ]
    # The gap is per poll: the relay sends the key again later, and it is accepted.
    t.fail = None
    send_all(t, r, [msg(b"k", b"k2"), msg(b"k", b"k3")])
    t.poll(0)
    assert [m.value for m in t.sent][-2:] == [b"k2", b"k3"]


def test_outage_fails_everything_with_transport() -> None:
    t, r = MemoryTransport(), Reports()
    t.available = False
    with pytest.raises(TransportUnavailable):
        t.check(1)
    send_all(t, r, [msg(b"k", b"1"), msg(None, b"2")])
    t.poll(0)
    assert r.kinds() == [(b"1", FailureKind.TRANSPORT), (b"2", FailureKind.TRANSPORT)]
    assert t.sent == []
    t.available = True
    t.check(1)


def test_fatal_breaks_the_client() -> None:
    t = MemoryTransport(
        fail=lambda m: DeliveryFailure(FailureKind.FATAL, "fenced") if m.value == b"2" else None
    )
    r = Reports()
    send_all(t, r, [msg(b"a", b"1"), msg(b"b", b"2"), msg(b"c", b"3"), msg(None, b"4")])
    t.poll(0)
    assert r.kinds() == [
        (b"1", None),
        (b"2", FailureKind.FATAL),
        (b"3", FailureKind.FATAL),
        (b"4", FailureKind.FATAL),
    ]
    assert t.broken
    assert [m.value for m in t.sent] == [b"1"]
    with pytest.raises(TransportUnavailable):
        t.send(msg(b"a", b"5"), r.cb(msg(b"a", b"5")))


def test_close_serves_the_remaining_reports() -> None:
    t, r = MemoryTransport(), Reports()
    send_all(t, r, [msg(b"k", b"1")])
    t.close(0)
    assert r.kinds() == [(b"1", None)]
