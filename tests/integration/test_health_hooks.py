"""The relay and the consumer drive their health (``outbox.health``) through their hooks, on
the real database and the in-memory transports: ticks while idle or a standby, leader and
standby, a broker outage and its end, the circuit breaker's states, the stop. The real
commands serving it over HTTP: tests/acceptance/test_health.py."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import DownstreamUnavailable
from outbox.breaker import BreakerPolicy, Transition
from outbox.consumer import Consumer, ConsumerConfig
from outbox.health import ConsumerHealth, RelayHealth
from outbox.transport.base import IncomingMessage
from outbox.transport.memory import MemorySource, MemoryTransport
from tests.support.handlers import create_effects_table, record_effect
from tests.support.incoming import message
from tests.support.relay import Running, make_relay, publish
from tests.support.waits import wait_until


class CountingRelayHealth(RelayHealth):
    def __init__(self) -> None:
        super().__init__()
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1
        super().tick()


def readiness_is(health: RelayHealth | ConsumerHealth, expected: tuple[bool, str]) -> bool:
    return health.health.readiness() == expected


def test_relay_leader_and_standby_tick_and_report_a_broker_outage(
    db_url: str, engine: sa.Engine
) -> None:
    transport = MemoryTransport()
    leader_health, standby_health = CountingRelayHealth(), CountingRelayHealth()
    assert leader_health.health.readiness() == (False, "starting")
    with Running(make_relay(db_url, transport, observers=[leader_health])) as leader:
        wait_until(lambda: readiness_is(leader_health, (True, "ok: leader")), what="a leader")
        standby = make_relay(db_url, MemoryTransport(), observers=[standby_health])
        with Running(standby):
            wait_until(
                lambda: readiness_is(standby_health, (True, "ok: standby")), what="a standby"
            )
            # Idle, both loops come round: the leader at each poll (0.5 s), the standby after
            # each wait on the lock (0.05 s).
            ticks = leader_health.ticks, standby_health.ticks
            wait_until(
                lambda: leader_health.ticks >= ticks[0] + 2 and standby_health.ticks > ticks[1] + 5,
                what="ticks while idle",
            )

            transport.available = False
            publish(engine, [("k", "a"), ("k", "b")])
            wait_until(
                lambda: readiness_is(
                    leader_health, (False, "degraded: broker unreachable (broker unavailable)")
                ),
                what="the leader degraded",
            )
            assert standby_health.health.readiness() == (True, "ok: standby")
            transport.available = True
            wait_until(lambda: readiness_is(leader_health, (True, "ok: leader")), what="ok again")
            wait_until(lambda: len(transport.sent) == 2, what="the messages sent")
        assert standby_health.health.readiness() == (False, "stopped")
        assert leader.check_alive()
    assert leader_health.health.liveness() == (False, "stopped")


class RecordingConsumerHealth(ConsumerHealth):
    """Readiness as it was right after each breaker transition, and at the join."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, str]] = []
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1
        super().tick()

    def joined(self) -> None:
        self.seen.append(self.health.readiness())
        super().joined()
        self.seen.append(self.health.readiness())

    def breaker_changed(self, transition: Transition) -> None:
        super().breaker_changed(transition)
        self.seen.append(self.health.readiness())


def test_consumer_joins_then_is_degraded_while_its_breaker_is_open(
    db_url: str, engine: sa.Engine
) -> None:
    create_effects_table(engine)
    calls = [0]

    def handler(session: Session, m: IncomingMessage) -> None:
        calls[0] += 1
        if calls[0] <= 3:
            raise DownstreamUnavailable("payment provider answered 503")
        record_effect(session, m)

    health = RecordingConsumerHealth()
    config = ConsumerConfig(
        db_url=db_url,
        name="payments",
        retry_backoff_base=0.001,
        retry_backoff_max=0.002,
        breaker=BreakerPolicy(failures=3, open_base=0.02, open_max=0.05, min_attempts=1000),
    )
    source = MemorySource([message(0), message(1)])
    stats = Consumer(config, handler, lambda: source, observers=[health]).run(idle_timeout=0.3)
    assert stats.processed == 2
    opened = (
        "degraded: circuit breaker open (3 transient failures in a row: "
        "DownstreamUnavailable: payment provider answered 503)"
    )
    assert health.seen == [
        (False, "starting: not joined yet"),
        (True, "ok"),
        (False, opened),
        (False, "degraded: circuit breaker half_open (open period over, trying one message)"),
        (True, "ok"),
    ]
    assert health.ticks > 2
    assert health.health.readiness() == (False, "stopped")
