"""The relay's logic against a real PostgreSQL, with the in-memory transport: order per key,
retries and parking, broker outages, fatal clients, leadership, wake-ups and shutdown."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Message, Outbox, OutboxError, TransportError, migrate
from outbox.admin import replay_dead
from outbox.relay import RelayStats
from outbox.transport.base import (
    DeliveryFailure,
    FailureKind,
    OnDelivery,
    OutgoingMessage,
)
from outbox.transport.memory import MemoryTransport
from tests.support.relay import (
    Running,
    Spec,
    by_key,
    count_rows,
    db_rows,
    expected_by_key,
    make_relay,
    publish,
    row_of,
)
from tests.support.waits import wait_until


def fail_values(
    values: dict[str, int], kind: FailureKind = FailureKind.MESSAGE
) -> Callable[[OutgoingMessage], DeliveryFailure | None]:
    """Fail the delivery of each listed payload the given number of times (-1: always)."""
    left = dict(values)

    def fail(m: OutgoingMessage) -> DeliveryFailure | None:
        value = (m.value or b"").decode()
        if left.get(value, 0) != 0:
            left[value] -= 1
            return DeliveryFailure(kind, f"refused {value}")
        return None

    return fail


class FixedRng(random.Random):
    """Backoff always at 3/4 of its bound: deterministic delays."""

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * 0.75


def relay_is_waiting(engine: sa.Engine) -> bool:
    """The relay's connection is idle and its last statement was a claim: it found nothing and
    is (about to be) waiting for a notification; a row committed from now on is found only
    by a wake-up (or the fallback poll)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT state, query FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'outbox-relay'"
            )
        ).all()
    return len(rows) == 1 and rows[0].state == "idle" and "SELECT o.id" in rows[0].query


# -- order ------------------------------------------------------------------------------------


def test_per_key_order_over_many_keys_and_batches(engine: sa.Engine, db_url: str) -> None:
    rnd = random.Random(42)
    specs: list[Spec] = []
    for i in range(400):
        key = None if i % 13 == 0 else f"k{rnd.randrange(25)}"
        specs.append((key, f"{key}-{i}"))
    # Several transactions, so that batches cut across them.
    for start in range(0, len(specs), 37):
        publish(engine, specs[start : start + 37])
    transport = MemoryTransport()
    stats = make_relay(db_url, transport, batch_size=7, max_inflight_batches=2).run_once()
    assert stats.sent == 400
    assert stats.batches >= 400 // 7
    assert by_key(transport.sent) == expected_by_key(specs)
    assert count_rows(engine) == 0
    # Headers: message id first, then the stored headers.
    m = transport.sent[0]
    assert m.headers[0][0] == "message-id"
    assert dict(m.headers)["content-type"] == b"text/plain; charset=utf-8"


def test_per_key_commit_order_with_concurrent_writers(engine: sa.Engine, db_url: str) -> None:
    """Writers race on overlapping keys while the relay runs; each key arrives in commit order,
    and failed first attempts do not reorder anything."""
    outbox = Outbox()
    commits: list[list[Spec]] = []
    commit_lock = threading.Lock()
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        rnd = random.Random(w)
        try:
            for t in range(15):
                keys = rnd.sample([f"k{i}" for i in range(6)], 3)
                specs: list[Spec] = [(k, f"{k}-w{w}-t{t}-{j}") for j in range(2) for k in keys]
                with Session(engine) as session, session.begin():
                    session.execute(sa.text("SET LOCAL lock_timeout = '30s'"))
                    outbox.publish_many(session, [Message("t", v, key=k) for k, v in specs])
                    # Still holding the key locks: per key, this is the commit order.
                    with commit_lock:
                        commits.append(specs)
        except BaseException as exc:
            errors.append(exc)

    # Every 5th message fails its first attempt.
    counter = iter(range(10**9))
    fails_left: dict[str, int] = {}

    def fail(m: OutgoingMessage) -> DeliveryFailure | None:
        value = (m.value or b"").decode()
        if value not in fails_left:
            fails_left[value] = 1 if next(counter) % 5 == 0 else 0
        if fails_left[value]:
            fails_left[value] -= 1
            return DeliveryFailure(FailureKind.MESSAGE, "first attempt fails")
        return None

    transport = MemoryTransport(fail=fail)
    relay = make_relay(db_url, transport, batch_size=7, max_inflight_batches=2, max_attempts=5)
    with Running(relay) as running:
        writers = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in writers:
            t.start()
        for t in writers:
            t.join(60)
        assert errors == []
        total = sum(len(c) for c in commits)
        try:
            wait_until(lambda: len(transport.sent) >= total and running.check_alive(), 30, "all")
        except AssertionError as exc:
            left = [(r.id, r.key, r.value, r.status, r.attempts) for r in db_rows(engine)]
            raise AssertionError(
                f"{exc}; sent {len(transport.sent)}/{total}; left {left}"
            ) from None
        wait_until(lambda: count_rows(engine) == 0, 10, "rows deleted")
        stats = running.stop()
    expected = expected_by_key([s for c in commits for s in c])
    assert by_key(transport.sent) == expected
    assert stats.sent == total
    assert stats.failed_attempts > 0
    assert stats.parked == 0


def test_gapless_failure_inside_a_batch_keeps_key_order(engine: sa.Engine, db_url: str) -> None:
    """k2 fails; the transport fails the later k messages of that poll (no gap): they are sent
    again after k2, in order, and their failures count no attempt."""
    specs: list[Spec] = [(k, f"{k}{i}") for i in range(1, 7) for k in ("k", "l")]
    publish(engine, specs)
    transport = MemoryTransport(fail=fail_values({"k2": 1}))
    relay = make_relay(db_url, transport, batch_size=7, max_inflight_batches=2, retain_sent=True)
    with Running(relay):
        wait_until(lambda: all(r.status == "sent" for r in db_rows(engine)), what="all sent")
    assert by_key(transport.sent) == expected_by_key(specs)
    gapless = [m.value for m, f in transport.failed if f.kind is FailureKind.TRANSPORT]
    assert set(gapless) >= {b"k3", b"k4"}  # in k2's batch, so in its poll
    attempts = {r.value: r.attempts for r in db_rows(engine)}
    assert attempts.pop("k2") == 1
    assert set(attempts.values()) == {0}


@pytest.mark.parametrize("how", ["fail", "reject"])
def test_failure_in_a_later_inflight_batch_holds_its_key(
    engine: sa.Engine, db_url: str, how: str
) -> None:
    """Batch 2 (in flight with batch 1) has k1 failing; batch 3 holds later k messages. They
    must not be sent before k1 is recorded as failed, nor before k1 is finally sent."""
    specs: list[Spec] = [("l", f"l{i}") for i in range(1, 8)]  # batch 1
    specs += [("k", "k1"), *[("m", f"m{i}") for i in range(1, 7)]]  # batch 2
    specs += [("k", "k2"), ("k", "k3"), ("n", "n1")]  # batch 3
    publish(engine, specs)
    if how == "fail":
        transport = MemoryTransport(fail=fail_values({"k1": 1}))
    else:
        once = {"k1": 1}

        def reject(m: OutgoingMessage) -> str | None:
            if m.value == b"k1" and once["k1"]:
                once["k1"] -= 1
                return "too large"
            return None

        transport = MemoryTransport(reject=reject)
    relay = make_relay(
        db_url,
        transport,
        batch_size=7,
        max_inflight_batches=2,
        retry_backoff_base=30.0,
        retry_backoff_max=30.0,
    )
    relay.run_once()
    # k1 waits for its retry; k2 and k3 wait behind it; everything else went.
    assert "k" not in by_key(transport.sent)
    assert by_key(transport.sent)["n"] == ["n1"]
    assert row_of(engine, "k1").status == "retry"
    assert [r.value for r in db_rows(engine)] == ["k1", "k2", "k3"]
    # Make the retry due now; then the key flows, in order.
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE outbox_messages SET next_attempt_at = now()"))
    make_relay(db_url, transport, batch_size=7).run_once()
    assert by_key(transport.sent)["k"] == ["k1", "k2", "k3"]
    assert count_rows(engine) == 0


# -- failing messages: retry, park, replay ----------------------------------------------------


def poison_specs() -> list[Spec]:
    return [
        ("k", "k1"),
        ("l", "l1"),
        ("k", "poison"),
        ("l", "l2"),
        ("k", "k3"),
        ("l", "l3"),
        (None, "n1"),
        ("k", "k4"),
        ("l", "l4"),
    ]


def check_parked_then_replayed(
    engine: sa.Engine, transport: MemoryTransport, running: Running, max_attempts: int
) -> None:
    wait_until(lambda: row_of(engine, "poison").status == "dead", what="poison parked")
    wait_until(lambda: by_key(transport.sent).get("l") == ["l1", "l2", "l3", "l4"], what="l sent")
    poison = row_of(engine, "poison")
    assert poison.attempts == max_attempts
    assert "refused" in poison.last_error or "too large" in poison.last_error
    assert poison.next_attempt_at is None
    # Other keys keep flowing while the key is parked.
    publish(engine, [("other", "o1")])
    wait_until(lambda: by_key(transport.sent).get("other") == ["o1"], what="o1 sent")
    # Handed to the transport comes before its row is marked (deleted): wait for that too.
    wait_until(lambda: all(r.value != "o1" for r in db_rows(engine)), what="o1 marked sent")
    sent = by_key(transport.sent)
    assert sent["k"] == ["k1"]
    assert sent[None] == ["n1"]
    assert [(r.value, r.status, r.attempts) for r in db_rows(engine)] == [
        ("poison", "dead", max_attempts),
        ("k3", "pending", 0),
        ("k4", "pending", 0),
    ]
    # The operator fixes the cause and replays: the key flows again, in order.
    transport.fail = None
    transport.reject = None
    with engine.begin() as conn:
        assert replay_dead(conn) == [poison.id]
    wait_until(lambda: count_rows(engine) == 0, what="replayed key sent")
    assert by_key(transport.sent)["k"] == ["k1", "poison", "k3", "k4"]
    running.check_alive()


def test_failing_message_is_retried_then_parked_and_holds_its_key(
    engine: sa.Engine, db_url: str
) -> None:
    publish(engine, poison_specs())
    transport = MemoryTransport(fail=fail_values({"poison": -1}))
    relay = make_relay(db_url, transport, max_attempts=4, batch_size=3)
    with Running(relay) as running:
        check_parked_then_replayed(engine, transport, running, max_attempts=4)
        stats = running.stop()
    failures = [(m.value, f.kind) for m, f in transport.failed if f.kind is FailureKind.MESSAGE]
    assert failures == [(b"poison", FailureKind.MESSAGE)] * 4
    assert stats.failed_attempts == 4
    assert stats.parked == 1


def test_rejected_message_is_retried_then_parked_and_holds_its_key(
    engine: sa.Engine, db_url: str
) -> None:
    publish(engine, poison_specs())
    rejected: list[bytes | None] = []

    def reject(m: OutgoingMessage) -> str | None:
        if m.value == b"poison":
            rejected.append(m.value)
            return "too large"
        return None

    transport = MemoryTransport(reject=reject)
    relay = make_relay(db_url, transport, max_attempts=3, batch_size=20)
    with Running(relay) as running:
        check_parked_then_replayed(engine, transport, running, max_attempts=3)
        stats = running.stop()
    assert rejected == [b"poison"] * 3
    assert stats.failed_attempts == 3 and stats.parked == 1
    # A synchronous rejection is the message's fault only: no relay-wide backoff.
    assert stats.transport_failures == 0


def test_retry_succeeds_and_counts_attempts(engine: sa.Engine, db_url: str) -> None:
    specs: list[Spec] = [("k", f"k{i}") for i in range(1, 6)]
    publish(engine, specs)
    transport = MemoryTransport(fail=fail_values({"k2": 2}))
    relay = make_relay(db_url, transport, retain_sent=True, max_attempts=5)
    with Running(relay):
        wait_until(lambda: all(r.status == "sent" for r in db_rows(engine)), what="all sent")
    assert by_key(transport.sent) == expected_by_key(specs)
    k2 = row_of(engine, "k2")
    assert k2.attempts == 2 and k2.last_error == "refused k2"
    assert {r.attempts for r in db_rows(engine) if r.value != "k2"} == {0}


def test_keyless_failure_holds_back_nothing(engine: sa.Engine, db_url: str) -> None:
    publish(engine, [(None, "n1"), (None, "bad"), (None, "n3"), ("k", "k1")])
    transport = MemoryTransport(fail=fail_values({"bad": -1}))
    make_relay(db_url, transport, max_attempts=1).run_once()
    assert by_key(transport.sent) == {None: ["n1", "n3"], "k": ["k1"]}
    assert [(r.value, r.status) for r in db_rows(engine)] == [("bad", "dead")]


def test_retry_is_not_forgotten_when_a_notification_wakes_the_relay(
    engine: sa.Engine, db_url: str
) -> None:
    """A retry falls due while the relay waits with a long poll interval; another commit wakes
    the relay in between. The retry must still go out when it is due."""
    publish(engine, [("k", "x")])
    transport = MemoryTransport(fail=fail_values({"x": 1}))
    # First retry after 0.75 * 2.0 = 1.5 s.
    relay = make_relay(
        db_url,
        transport,
        rng=FixedRng(),
        poll_interval=60.0,
        retry_backoff_base=2.0,
        retry_backoff_max=2.0,
    )
    with Running(relay):
        wait_until(lambda: row_of(engine, "x").status == "retry", what="x to fail once")
        wait_until(lambda: relay_is_waiting(engine), 10, "the relay to wait for x's retry")
        publish(engine, [("other", "y")])  # wakes the relay before x is due
        wait_until(lambda: by_key(transport.sent).get("other") == ["y"], 10, "y sent")
        wait_until(lambda: by_key(transport.sent).get("k") == ["x"], 10, "x retried")


def test_transport_kind_failure_counts_no_attempt(engine: sa.Engine, db_url: str) -> None:
    specs: list[Spec] = [("k", "k1"), ("k", "k2"), ("l", "l1")]
    publish(engine, specs)
    transport = MemoryTransport(fail=fail_values({"k1": 3}, FailureKind.TRANSPORT))
    relay = make_relay(db_url, transport, retain_sent=True, max_attempts=2)
    with pytest.raises(TransportError):
        relay.run_once()
    with Running(relay) as running:
        wait_until(lambda: all(r.status == "sent" for r in db_rows(engine)), what="all sent")
        stats = running.stop()
    assert by_key(transport.sent) == expected_by_key(specs)
    assert {r.attempts for r in db_rows(engine)} == {0}
    assert stats.failed_attempts == 0 and stats.parked == 0


# -- broker outage and fatal clients ----------------------------------------------------------


class CountingTransport(MemoryTransport):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.checks = 0

    def check(self, timeout: float) -> None:
        self.checks += 1
        super().check(timeout)


def test_outage_counts_no_attempts_and_resumes(engine: sa.Engine, db_url: str) -> None:
    specs: list[Spec] = [(f"k{i % 3}", f"m{i}") for i in range(20)]
    publish(engine, specs)
    transport = CountingTransport()
    transport.available = False
    # run_once refuses to start while the broker is down, and changes nothing.
    with pytest.raises(TransportError):
        make_relay(db_url, transport).run_once()
    relay = make_relay(db_url, transport, retain_sent=True, batch_size=6, max_attempts=1)
    with Running(relay) as running:
        # The relay keeps probing the broker (backing off) without touching the rows.
        wait_until(lambda: transport.checks >= 5, what="repeated broker checks")
        rows = db_rows(engine)
        assert len(rows) == 20
        assert {(r.status, r.attempts) for r in rows} == {("pending", 0)}
        assert transport.sent == []
        transport.available = True
        wait_until(lambda: all(r.status == "sent" for r in db_rows(engine)), what="all sent")
        stats = running.stop()
    assert by_key(transport.sent) == expected_by_key(specs)
    assert {r.attempts for r in db_rows(engine)} == {0}
    assert stats.failed_attempts == 0 and stats.parked == 0


def test_outage_in_the_middle_of_a_batch(engine: sa.Engine, db_url: str) -> None:
    """The broker goes down after accepting some messages of a batch; nothing is lost or
    reordered, and no attempt is counted."""
    specs: list[Spec] = [(f"k{i % 4}", f"m{i}") for i in range(40)]
    publish(engine, specs)
    transport = MemoryTransport()
    accepted = iter(range(10**9))

    def go_down_after_9(m: OutgoingMessage) -> DeliveryFailure | None:
        if next(accepted) == 9:
            transport.available = False  # the following messages fail with TRANSPORT
        return None

    transport.fail = go_down_after_9
    relay = make_relay(db_url, transport, retain_sent=True, batch_size=7, max_attempts=1)
    with Running(relay) as running:
        wait_until(lambda: len(transport.failed) > 0, what="the outage to hit")
        assert sum(1 for r in db_rows(engine) if r.status == "sent") <= 10
        transport.fail = None
        transport.available = True
        wait_until(lambda: all(r.status == "sent" for r in db_rows(engine)), what="all sent")
        running.stop()
    assert by_key(transport.sent) == expected_by_key(specs)
    assert {r.attempts for r in db_rows(engine)} == {0}


def test_fatal_failure_recreates_the_transport(engine: sa.Engine, db_url: str) -> None:
    specs: list[Spec] = [(f"k{i % 3}", f"m{i}") for i in range(30)]
    publish(engine, specs)
    created: list[MemoryTransport] = []

    def factory() -> MemoryTransport:
        # The first client is fenced at its 5th message; later ones work.
        if not created:
            n = iter(range(10**9))
            t = MemoryTransport(
                fail=lambda m: (
                    DeliveryFailure(FailureKind.FATAL, "fenced") if next(n) == 4 else None
                )
            )
        else:
            t = MemoryTransport()
        created.append(t)
        return t

    relay = make_relay(db_url, factory, batch_size=8, retain_sent=True)
    with Running(relay) as running:
        wait_until(lambda: all(r.status == "sent" for r in db_rows(engine)), what="all sent")
        stats = running.stop()
    assert len(created) >= 2
    assert created[0].broken
    assert len(created[0].sent) == 4
    all_sent = [m for t in created for m in t.sent]
    assert by_key(all_sent) == expected_by_key(specs)
    assert {r.attempts for r in db_rows(engine)} == {0}
    assert stats.transport_failures >= 1 and stats.failed_attempts == 0


# -- retain mode, custom table ----------------------------------------------------------------


def test_retain_sent_marks_rows_and_never_resends(engine: sa.Engine, db_url: str) -> None:
    specs: list[Spec] = [("k", f"k{i}") for i in range(10)]
    publish(engine, specs)
    transport = MemoryTransport()
    assert make_relay(db_url, transport, retain_sent=True, batch_size=4).run_once().sent == 10
    rows = db_rows(engine)
    assert [r.value for r in rows] == [v for _, v in specs]
    assert all(r.status == "sent" and r.sent_at is not None for r in rows)
    assert all(r.next_attempt_at is None for r in rows)
    # Sent rows are never claimed again; new ones are.
    publish(engine, [("k", "k10")])
    assert make_relay(db_url, transport, retain_sent=True).run_once().sent == 1
    assert by_key(transport.sent)["k"] == [*(v for _, v in specs), "k10"]


def test_custom_table_and_schema(engine: sa.Engine, db_url: str) -> None:
    migrate.upgrade(db_url, table="events", schema="app")
    custom = Outbox(table="events", schema="app")
    publish(engine, [("k", "custom")], outbox=custom)
    publish(engine, [("k", "default")])
    transport = MemoryTransport()
    other = MemoryTransport()
    # Each table has its own leader lock: both relays lead at once.
    with Running(make_relay(db_url, other)) as running_default:
        wait_until(lambda: by_key(other.sent) == {"k": ["default"]}, what="default table sent")
        stats = make_relay(db_url, transport, table="events", schema="app").run_once()
        running_default.stop()
    assert stats.sent == 1
    assert by_key(transport.sent) == {"k": ["custom"]}
    assert count_rows(engine, "app.events") == 0


# -- leadership -------------------------------------------------------------------------------


def test_second_relay_is_a_standby_until_the_leader_stops(engine: sa.Engine, db_url: str) -> None:
    t1, t2 = MemoryTransport(), MemoryTransport()
    leader = make_relay(db_url, t1)
    standby = make_relay(db_url, t2)
    with Running(leader) as running1:
        wait_until(lambda: leader.is_leader, what="the first relay to lead")
        with pytest.raises(OutboxError, match="another relay"):
            standby.run_once()
        assert not standby.is_leader
        with Running(standby) as running2:
            publish(engine, [("k", "a")])
            wait_until(lambda: by_key(t1.sent) == {"k": ["a"]}, what="the leader to send a")
            assert not standby.is_leader and t2.sent == []
            running1.stop()
            assert not leader.is_leader
            wait_until(lambda: standby.is_leader, what="the standby to take over")
            publish(engine, [("k", "b")])
            wait_until(lambda: by_key(t2.sent) == {"k": ["b"]}, what="the new leader to send b")
            running2.stop()
    assert by_key(t1.sent) == {"k": ["a"]}
    assert count_rows(engine) == 0


# -- wake-ups and shutdown --------------------------------------------------------------------


def test_commit_wakes_the_relay_long_before_the_poll_interval(
    engine: sa.Engine, db_url: str
) -> None:
    transport = MemoryTransport()
    relay = make_relay(db_url, transport, poll_interval=60.0)
    with Running(relay):
        for i in range(3):
            # Row gone first: the claim seen next is the empty one after the delete.
            wait_until(
                lambda: count_rows(engine) == 0 and relay_is_waiting(engine),
                10,
                "the relay to wait",
            )
            publish(engine, [("k", f"m{i}")])
            expected = i + 1
            wait_until(lambda: len(transport.sent) == expected, 10, f"m{i} sent")
    assert by_key(transport.sent) == {"k": ["m0", "m1", "m2"]}


def test_replay_wakes_the_relay(engine: sa.Engine, db_url: str) -> None:
    publish(engine, [("k", "bad")])
    transport = MemoryTransport(fail=fail_values({"bad": 1}))
    make_relay(db_url, transport, max_attempts=1).run_once()
    assert row_of(engine, "bad").status == "dead"
    publish(engine, [("k", "after")])
    relay = make_relay(db_url, transport, poll_interval=60.0)
    with Running(relay):
        wait_until(lambda: relay_is_waiting(engine), 10, "the relay to wait")
        with engine.begin() as conn:
            replay_dead(conn)
        wait_until(lambda: count_rows(engine) == 0, 10, "replayed messages sent")
    assert by_key(transport.sent) == {"k": ["bad", "after"]}


def test_stop_returns_and_acknowledged_rows_are_gone(engine: sa.Engine, db_url: str) -> None:
    transport = MemoryTransport()
    relay = make_relay(db_url, transport, poll_interval=60.0)
    with Running(relay) as running:
        publish(engine, [(f"k{i % 2}", f"m{i}") for i in range(10)])
        wait_until(lambda: len(transport.sent) == 10, what="all sent")
        stats = running.stop()
    assert stats.sent == 10
    assert count_rows(engine) == 0
    assert not relay.is_leader
    # The leader lock was released: another relay leads at once.
    publish(engine, [("k", "next")])
    assert make_relay(db_url, transport).run_once().sent == 1


class GatedTransport(MemoryTransport):
    """Acknowledges nothing until ``gate`` is set (a broker that does not answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.queued = 0

    def send(self, message: OutgoingMessage, on_delivery: OnDelivery) -> None:
        super().send(message, on_delivery)
        self.queued += 1

    def poll(self, timeout: float) -> None:
        if self.gate.wait(timeout):
            super().poll(timeout)

    def close(self, timeout: float) -> None:
        if self.gate.is_set():
            super().close(timeout)


def test_stop_waits_for_inflight_acknowledgements(engine: sa.Engine, db_url: str) -> None:
    transport = GatedTransport()
    relay = make_relay(db_url, transport, batch_size=3, shutdown_timeout=10.0)
    with Running(relay) as running:
        publish(engine, [(f"k{i % 2}", f"m{i}") for i in range(5)])
        wait_until(lambda: transport.queued >= 3, what="a batch in flight")
        relay.stop()
        transport.gate.set()  # the broker answers during the shutdown
        stats = running.stop()
    assert stats.sent == len(transport.sent) >= 3
    assert count_rows(engine) == 5 - stats.sent


def test_stop_gives_up_on_unacknowledged_batches_after_shutdown_timeout(
    engine: sa.Engine, db_url: str
) -> None:
    transport = GatedTransport()
    relay = make_relay(db_url, transport, batch_size=3, delivery_timeout=30.0, shutdown_timeout=0.5)
    with Running(relay) as running:
        publish(engine, [(f"k{i % 2}", f"m{i}") for i in range(5)])
        wait_until(lambda: transport.queued >= 3, what="a batch in flight")
        stats = running.stop(timeout=10.0)  # far below delivery_timeout + 5; it asserts that
    assert stats.sent == 0
    # Nothing was acknowledged: every row stays, to be sent again.
    assert [(r.status, r.attempts) for r in db_rows(engine)] == [("pending", 0)] * 5
    transport.gate.set()


def test_run_once_with_nothing_to_do(db_url: str) -> None:
    transport = MemoryTransport()
    stats = make_relay(db_url, transport).run_once()
    assert stats == RelayStats()
    assert transport.sent == []
