"""The key gate: which claims may send a key after one of its messages failed or was held."""

from __future__ import annotations

from outbox.claims import Row
from outbox.keygate import KeyGate
from outbox.relay import _Batch, _Report
from outbox.transport.base import DeliveryFailure, FailureKind
from outbox.transport.memory import MemoryTransport

K = ("t", b"k")
L = ("t", b"l")


def test_an_unheld_key_passes_every_claim() -> None:
    gate = KeyGate()
    assert not gate.blocks(K, gate.next_claim())


def test_a_held_key_blocks_every_claim_until_released() -> None:
    gate = KeyGate()
    batch: set[tuple[str, bytes]] = set()
    gate.hold(K, batch)
    assert batch == {K}
    for _ in range(3):
        assert gate.blocks(K, gate.next_claim())
    assert not gate.blocks(L, gate.claims)


def test_release_passes_only_claims_numbered_after_it() -> None:
    gate = KeyGate()
    batch: set[tuple[str, bytes]] = set()
    gate.hold(K, batch)
    ran_ahead = gate.next_claim()  # sent before the failure was recorded
    gate.release(batch, [])
    assert gate.blocks(K, ran_ahead)  # it cannot have seen the record
    later = gate.next_claim()
    assert not gate.blocks(K, later)
    assert K not in gate.held  # forgotten once passed


def test_a_key_held_by_another_batch_in_flight_stays_held() -> None:
    gate = KeyGate()
    first: set[tuple[str, bytes]] = set()
    second: set[tuple[str, bytes]] = set()
    gate.hold(K, first)
    gate.hold(K, second)
    gate.release(first, [second])
    assert gate.blocks(K, gate.next_claim())
    gate.release(second, [])
    assert not gate.blocks(K, gate.next_claim())


def test_clear_forgets_everything() -> None:
    gate = KeyGate()
    gate.hold(K, set())
    gate.clear()
    assert not gate.blocks(K, gate.next_claim())


def _batch(gate: KeyGate) -> tuple[_Batch, Row]:
    row = Row(
        id=1,
        message_id="m",
        topic="t",
        key=b"k",
        payload=b"v",
        header_names=b"",
        header_values=b"",
        attempts=0,
    )
    batch = _Batch(rows=[row], transport=MemoryTransport(), gate=gate, started=0.0)
    batch.outstanding = 1
    return batch, row


def test_a_failure_report_holds_its_key() -> None:
    gate = KeyGate()
    batch, row = _batch(gate)
    _Report(batch, row)(DeliveryFailure(FailureKind.MESSAGE, "too large"), None)
    assert gate.blocks(K, gate.next_claim())
    assert batch.failed == [(1, "too large")] and batch.done


def test_a_report_after_the_batch_was_abandoned_holds_nothing() -> None:
    # A lost database session abandons the batches in flight; discarding the client then
    # purges them, and those late reports must not hold their keys for good.
    gate = KeyGate()
    batch, row = _batch(gate)
    batch.closed = True
    gate.clear()
    _Report(batch, row)(DeliveryFailure(FailureKind.TRANSPORT, "purged"), None)
    assert gate.held == {} and batch.failed == [] and batch.transport_failures == []
