"""Hold-back of keys across the relay's pipeline, retries and wake-ups: regressions of bugs
found while pipelining (a held key filling whole batches must neither stall nor reorder; every
retry time wakes the relay; retries fly alone; --once rides out one transient failure)."""

from __future__ import annotations

import random
from typing import Any

import psycopg
import sqlalchemy as sa

from outbox import RelayConfig, RelayObserver, define_tables
from outbox.claims import Claims
from outbox.config import relay_conninfo
from outbox.statements import claim, to_driver_sql
from outbox.transport.base import DeliveryFailure, FailureKind, OutgoingMessage
from outbox.transport.memory import MemoryTransport
from tests.support.relay import (
    Running,
    by_key,
    count_rows,
    db_rows,
    make_relay,
    publish,
)
from tests.support.waits import wait_until


class NoDelay(random.Random):
    """Retries are due at once: the failed message is claimable again right away."""

    def uniform(self, a: float, b: float) -> float:
        return a


def test_a_failing_key_that_fills_batches_neither_stalls_nor_reorders(
    engine: sa.Engine, db_url: str
) -> None:
    # 60 messages of one key, batches of 5, two in flight: while its first message is in
    # backoff, every claim is full of that key's messages.
    specs = [("K", f"K-{i:03d}") for i in range(60)] + [("L", f"L-{i:03d}") for i in range(5)]
    publish(engine, specs)
    refused: set[str] = set()

    def reject(m: OutgoingMessage) -> str | None:
        # Refused at send (no delivery report, so nothing drains the pipeline).
        value = (m.value or b"").decode()
        if value in ("K-000", "K-020") and value not in refused:
            refused.add(value)
            return "refused once"
        return None

    transport = MemoryTransport(reject=reject)
    relay = make_relay(db_url, transport, NoDelay(), batch_size=5, max_inflight_batches=2)
    with Running(relay) as running:
        wait_until(lambda: count_rows(engine) == 0 and running.check_alive(), 20, "all sent")
        stats = running.stop()
    sent = by_key(transport.sent)
    assert sent["K"] == [v for k, v in specs if k == "K"]
    assert sent["L"] == [v for k, v in specs if k == "L"]
    assert stats.failed_attempts == 2


def test_outage_mid_batch_resends_the_rest_of_each_key_in_order(
    engine: sa.Engine, db_url: str
) -> None:
    specs = [(f"k{i % 3}", f"v{i:03d}") for i in range(40)]
    publish(engine, specs)

    class FlakyTransport(MemoryTransport):
        sends = 0

        def send(self, message: OutgoingMessage, on_delivery: object) -> None:
            FlakyTransport.sends += 1
            if FlakyTransport.sends in (7, 19):
                from outbox.exceptions import TransportUnavailable

                raise TransportUnavailable("connection reset")
            super().send(message, on_delivery)  # type: ignore[arg-type]

    transport = FlakyTransport()
    relay = make_relay(db_url, transport, batch_size=6, max_inflight_batches=2)
    with Running(relay) as running:
        wait_until(lambda: count_rows(engine) == 0 and running.check_alive(), 20, "all sent")
        running.stop()
    sent = by_key(transport.sent)
    for key in ("k0", "k1", "k2"):
        assert sent[key] == [v for k, v in specs if k == key]


class _Scripted(random.Random):
    delays: list[float]

    def uniform(self, a: float, b: float) -> float:
        return self.delays.pop(0)


def scripted(delays: list[float]) -> random.Random:
    """Backoff delays from a script, in order. (A factory: Python 3.10's Random.__new__ takes
    the constructor's arguments as a seed.)"""
    rng = _Scripted()
    rng.delays = list(delays)
    return rng


def test_each_retry_wakes_the_relay_not_only_the_earliest(engine: sa.Engine, db_url: str) -> None:
    # Two messages fail once, in separate batches, with retries due after 0.3 s and 1.5 s;
    # the fallback poll (60 s) must not be what sends the second one.
    publish(engine, [("x", "X"), ("y", "Y")])
    failed: set[str] = set()

    def fail(m: OutgoingMessage) -> DeliveryFailure | None:
        value = (m.value or b"").decode()
        if value not in failed:
            failed.add(value)
            return DeliveryFailure(FailureKind.MESSAGE, "first attempt fails")
        return None

    transport = MemoryTransport(fail=fail)
    relay = make_relay(
        db_url,
        transport,
        scripted([0.3, 1.5]),
        batch_size=1,
        max_inflight_batches=1,
        poll_interval=60.0,
        retry_backoff_base=2.0,
        retry_backoff_max=2.0,
    )
    with Running(relay) as running:
        wait_until(lambda: count_rows(engine) == 0 and running.check_alive(), 15, "both retried")
        running.stop()
    assert sorted((m.value or b"").decode() for m in transport.sent) == ["X", "Y"]


def test_a_retry_is_sent_alone_so_its_key_causes_no_collateral_failures(
    engine: sa.Engine, db_url: str
) -> None:
    # A poison message and the rest of its key: after the first attempt (where the rest fails
    # with it, as librdkafka's gapless mode does), retries go alone; the rest never flies.
    publish(engine, [("K", "poison")] + [("K", f"K-{i}") for i in range(5)] + [("L", "L-0")])
    transport = MemoryTransport(
        fail=lambda m: (
            DeliveryFailure(FailureKind.MESSAGE, "too large") if m.value == b"poison" else None
        )
    )
    relay = make_relay(db_url, transport, NoDelay(), max_attempts=4)
    with Running(relay) as running:
        wait_until(
            lambda: any(r.status == "dead" for r in db_rows(engine)) and running.check_alive(),
            15,
            "the poison message parked",
        )
        stats = running.stop()
    assert stats.transport_failures == 1  # the first attempt only
    assert [m.value for m in transport.sent] == [b"L-0"]
    assert [(r.status, r.attempts) for r in db_rows(engine)] == [("dead", 4)] + [("pending", 0)] * 5


def test_a_new_leader_wakes_for_retries_scheduled_by_the_old_one(
    engine: sa.Engine, db_url: str
) -> None:
    publish(engine, [("k", "v")])
    first = MemoryTransport(fail=lambda m: DeliveryFailure(FailureKind.MESSAGE, "no"))
    make_relay(db_url, first, scripted([1.0])).run_once()
    assert [r.status for r in db_rows(engine)] == ["retry"]
    second = MemoryTransport()
    relay = make_relay(db_url, second, poll_interval=60.0)
    with Running(relay) as running:
        wait_until(lambda: count_rows(engine) == 0 and running.check_alive(), 10, "the retry")
        running.stop()
    assert [m.value for m in second.sent] == [b"v"]


def test_run_once_rides_out_a_single_transport_failure(engine: sa.Engine, db_url: str) -> None:
    publish(engine, [("k", "k1"), ("k", "k2")])
    failed: list[bytes] = []

    def fail(m: OutgoingMessage) -> DeliveryFailure | None:
        if not failed:
            failed.append(m.value or b"")
            return DeliveryFailure(FailureKind.TRANSPORT, "leader moved")
        return None

    transport = MemoryTransport(fail=fail)
    stats = make_relay(db_url, transport).run_once()
    assert stats.sent == 2
    assert [m.value for m in transport.sent] == [b"k1", b"k2"]


class CountingAhead(RelayObserver):
    """Counts the claims that ran ahead, to prove a test used them."""

    def __init__(self) -> None:
        self.count = 0

    def claimed(self, rows: int, ahead: bool) -> None:
        self.count += ahead


def test_a_claim_that_ran_ahead_of_a_failure_does_not_send_past_it(
    engine: sa.Engine, db_url: str
) -> None:
    # Batches of 5, two in flight: claim 3 (holding K-1) is sent ahead while batch 1 (holding
    # K-0) is still in flight; K-0 then fails. Claim 3 ran before the failure was recorded, so
    # K-1 must wait for K-0's retry although the claim returned it.
    specs = [("K", "K-0"), *[("a", f"a-{i}") for i in range(1, 10)], ("K", "K-1")]
    specs += [("b", f"b-{i}") for i in range(8)]
    publish(engine, specs)
    failed: set[str] = set()

    def fail(m: OutgoingMessage) -> DeliveryFailure | None:
        if m.value == b"K-0" and "K-0" not in failed:
            failed.add("K-0")
            return DeliveryFailure(FailureKind.MESSAGE, "refused once")
        return None

    transport = MemoryTransport(fail=fail)
    prefetches = CountingAhead()
    relay = make_relay(
        db_url, transport, NoDelay(), batch_size=5, max_inflight_batches=2, observers=[prefetches]
    )
    with Running(relay) as running:
        wait_until(lambda: count_rows(engine) == 0 and running.check_alive(), 20, "all sent")
        stats = running.stop()
    assert prefetches.count >= 2
    assert stats.failed_attempts == 1
    assert by_key(transport.sent)["K"] == ["K-0", "K-1"]


def test_a_message_never_reported_holds_its_key_like_a_failure(
    engine: sa.Engine, db_url: str
) -> None:
    # K-0's delivery report never comes; the batch hits its deadline. A claim that ran ahead
    # (holding K-1) must not send K-1 before K-0 is sent again.
    specs = [("K", "K-0"), *[("a", f"a-{i}") for i in range(1, 10)], ("K", "K-1")]
    publish(engine, specs)

    class LosesOneReport(MemoryTransport):
        lost = False

        def send(self, message: OutgoingMessage, on_delivery: Any) -> None:
            if message.value == b"K-0" and not LosesOneReport.lost:
                LosesOneReport.lost = True
                return  # accepted, then never reported (nor stored)
            super().send(message, on_delivery)

    transport = LosesOneReport()
    prefetches = CountingAhead()
    relay = make_relay(
        db_url,
        transport,
        batch_size=5,
        max_inflight_batches=2,
        delivery_timeout=0.1,
        observers=[prefetches],
    )
    with Running(relay) as running:
        wait_until(lambda: count_rows(engine) == 0 and running.check_alive(), 30, "all sent")
        running.stop()
    assert prefetches.count >= 2
    assert by_key(transport.sent)["K"] == ["K-0", "K-1"]


def test_losing_the_claim_connection_only_falls_back_to_the_leader_connection(
    engine: sa.Engine, db_url: str
) -> None:
    specs = [(f"k{i % 4}", f"v{i:03d}") for i in range(60)]
    publish(engine, specs)
    dsn = db_url.replace("postgresql+psycopg", "postgresql")

    class KillsClaims(MemoryTransport):
        """Terminates the relay's claims connection (found by its application name) while
        the relay awaits a batch."""

        killed = 0

        def poll(self, timeout: float) -> None:
            if not KillsClaims.killed:
                with psycopg.connect(dsn, autocommit=True) as admin:
                    row = admin.execute(
                        "SELECT pg_terminate_backend(pid), pid FROM pg_stat_activity "
                        "WHERE application_name = 'holdback-kill claims'"
                    ).fetchone()
                KillsClaims.killed = row[1] if row else 0
            super().poll(timeout)

    class Lost(RelayObserver):
        databases = 0

        def database_lost(self, reason: str, abandoned: int, retry_in: float) -> None:
            self.databases += 1

    lost = Lost()
    transport = KillsClaims()
    relay = make_relay(
        db_url,
        transport,
        batch_size=5,
        max_inflight_batches=2,
        application_name="holdback-kill",
        observers=[lost],
    )
    stats = relay.run_once()
    assert KillsClaims.killed
    assert stats.sent == 60
    assert lost.databases == 0  # the leader's session went on
    sent = by_key(transport.sent)
    for key in ("k0", "k1", "k2", "k3"):
        assert sent[key] == [v for k, v in specs if k == key]  # no duplicates either


def test_claims_are_never_prepared(db_url: str, engine: sa.Engine) -> None:
    # A prepared claim gets a generic plan after five runs, which cannot see how many ids are
    # excluded; at some backlogs it was ten times slower. Claims are planned each time, on
    # the leader's connection and ahead on the claims connection.
    publish(engine, [(f"k{i % 5}", f"v{i}") for i in range(60)])
    config = RelayConfig(db_url=db_url, batch_size=5)
    tables = define_tables()
    claims = Claims(relay_conninfo(config), to_driver_sql(claim(tables)), config.batch_size)
    with psycopg.connect(relay_conninfo(config), autocommit=True) as leader:
        try:
            for number in range(8):
                assert len(claims.claim(leader, "{}")) == 5
                claims.send_ahead("{}", number)
                ahead = claims.take_ahead(leader)
                assert ahead is not None and len(ahead[0]) == 5
            claims.sync()
            for conn in (leader, claims._conn):
                assert conn is not None
                prepared = [
                    r[0] for r in conn.execute("SELECT statement FROM pg_prepared_statements")
                ]
                assert not [s for s in prepared if "LIMIT" in s], prepared
        finally:
            claims.close()


def test_a_claim_waits_for_the_mark_of_the_batch_it_stops_excluding(
    engine: sa.Engine, db_url: str
) -> None:
    # Marks are sent without waiting and read later; a claim sent before the last mark is
    # in would no longer exclude that batch's ids and send them again.
    specs = [(f"k{i % 7}", f"v{i:03d}") for i in range(200)]
    publish(engine, specs)
    transport = MemoryTransport()
    prefetches = CountingAhead()
    relay = make_relay(
        db_url, transport, batch_size=10, max_inflight_batches=2, observers=[prefetches]
    )
    stats = relay.run_once()
    assert prefetches.count >= 10
    assert stats.sent == 200
    assert sorted((m.value or b"").decode() for m in transport.sent) == sorted(v for _, v in specs)
    assert count_rows(engine) == 0
