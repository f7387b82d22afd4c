"""The health endpoints of the real ``outbox-relay`` and ``outbox consume`` (``--metrics-port``)
against the real database and broker, as a Kubernetes probe sees them: ``/healthz`` 200 while
the loop runs; ``/readyz`` 200 for the leader and a standby, 503 with its reason while the
broker is cut off (behind the fault-injecting proxy) and 200 again after; the consumer's 503
before it joins its group and while its circuit breaker is open; a port in use is one line and
exit status 2."""

from __future__ import annotations

import json
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from confluent_kafka import Producer
from sqlalchemy.orm import Session

from outbox import Outbox
from tests.acceptance.conftest import ProxiedBroker
from tests.support.broker import Broker, free_port
from tests.support.cli import run_cli
from tests.support.consumerproc import ConsumerProcess
from tests.support.delivery import RelayFactory, wait_drained
from tests.support.handlers import create_effects_table
from tests.support.health import DOWN_FILE_ENV, get, wait_answer
from tests.support.waits import wait_until

pytestmark = pytest.mark.slow

LOCAL = ("--metrics-host", "127.0.0.1")


def test_relay_leader_standby_and_a_broker_outage(
    proxied_broker: ProxiedBroker, engine: sa.Engine, db_url: str, relays: RelayFactory
) -> None:
    pb = proxied_broker
    topic = pb.broker.create_topic(partitions=1)
    port, standby_port = free_port(), free_port()
    fast = ("--delivery-timeout", "3", "--broker-backoff-max", "1")
    leader = relays(db_url, pb.bootstrap, *fast, "--metrics-port", str(port), *LOCAL)
    wait_answer(port, "/readyz", 200, "ok: leader", processes=[leader])
    assert get(port, "/healthz") == (200, "ok\n")
    metrics = get(port, "/metrics")  # the metrics themselves: test_observability.py
    assert metrics is not None and metrics[0] == 200
    assert get(port, "/nope") == (404, "not found\n")

    standby = relays(
        db_url, pb.bootstrap, *fast, "--metrics-port", str(standby_port), *LOCAL, name="standby"
    )
    wait_answer(standby_port, "/readyz", 200, "ok: standby", processes=[standby])
    assert get(standby_port, "/healthz") == (200, "ok\n")

    # The broker goes away; the leader finds out when a batch is not acknowledged.
    pb.proxy.cut()
    with Session(engine) as session, session.begin():
        Outbox().publish(session, topic, {"n": 1}, key="k")
    reason = wait_answer(
        port, "/readyz", 503, r"degraded: broker unreachable \(.+\)", processes=[leader]
    )
    print(f"while cut: {reason}")
    assert get(port, "/healthz") == (200, "ok\n")
    assert get(standby_port, "/readyz") == (200, "ok: standby\n")

    pb.proxy.restore()
    wait_answer(port, "/readyz", 200, "ok: leader", timeout=60, processes=[leader])
    wait_drained(engine, timeout=30)

    # Stopped, the server goes with the process.
    leader.send_signal(signal.SIGTERM)
    assert leader.wait(30) == 0, leader.tail()
    assert get(port, "/healthz") is None
    wait_answer(standby_port, "/readyz", 200, "ok: leader", processes=[standby])


def produce(broker: Broker, topic: str, n: int) -> None:
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(n):
        producer.produce(
            topic,
            value=json.dumps({"n": i}).encode(),
            key=b"k",
            headers=[("message-id", str(uuid.uuid4()).encode())],
        )
    assert producer.flush(30) == 0


@pytest.fixture
def consumer_proc() -> Iterator[list[ConsumerProcess]]:
    started: list[ConsumerProcess] = []
    yield started
    for proc in started:
        proc.stop(timeout=10)


def test_consumer_starting_joined_and_degraded_while_its_breaker_is_open(
    broker: Broker,
    engine: sa.Engine,
    db_url: str,
    tmp_path: Path,
    consumer_proc: list[ConsumerProcess],
) -> None:
    create_effects_table(engine)
    topic = broker.create_topic(partitions=1)
    down = tmp_path / "dependency-down"
    port = free_port()
    proc = ConsumerProcess(
        [
            *("--db-url", db_url),
            *("--bootstrap-servers", broker.bootstrap),
            *("--group", f"g-{uuid.uuid4().hex[:8]}"),
            *("--topic", topic),
            *("--handler", "tests.support.health:gated_effect"),
            *("--retry-backoff", "0.01"),
            *("--breaker-failures", "2"),
            *("--breaker-open", "1"),
            *("--breaker-open-max", "2"),
            *("--metrics-port", str(port)),
            *LOCAL,
            *("-X", "session.timeout.ms=6000"),
            *("-X", "heartbeat.interval.ms=1000"),
        ],
        env={DOWN_FILE_ENV: str(down), "CONSUMER_TEST_SLEEP_MS": "0"},
    ).start()
    consumer_proc.append(proc)

    # The server is up before the group is joined (about 3 s with these settings).
    first = wait_until(lambda: get(port, "/readyz"), 20, "the server", processes=[proc])
    assert first == (503, "starting: not joined yet\n")
    assert get(port, "/healthz") == (200, "ok\n")
    wait_answer(port, "/readyz", 200, "ok", processes=[proc])

    down.touch()
    produce(broker, topic, 3)
    reason = wait_answer(
        port,
        "/readyz",
        503,
        r"degraded: circuit breaker open \(2 transient failures in a row: "
        r"DownstreamUnavailable: the test turned the dependency off\)",
        processes=[proc],
    )
    print(f"while down: {reason}")
    # Paused, not stuck: the loop still comes round.
    assert get(port, "/healthz") == (200, "ok\n")

    down.unlink()
    wait_answer(port, "/readyz", 200, "ok", processes=[proc])
    wait_until(lambda: _effects(engine) == 3, 30, "the three effects", processes=[proc])

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.tail()
    assert get(port, "/readyz") is None


def _effects(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM effects")).scalar_one())


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_port_in_use_is_one_line_and_exit_2(db_url: str, taken_port: int) -> None:
    common = ["--db-url", db_url, "--bootstrap-servers", "127.0.0.1:9"]
    relay = run_cli("outbox-relay", [*common, "--metrics-port", str(taken_port)])
    consume = run_cli(
        "outbox",
        [
            "consume",
            *common,
            *("--group", "g", "--topic", "t"),
            *("--handler", "tests.support.handlers:record_effect"),
        ],
        env={"OUTBOX_METRICS_PORT": str(taken_port)},
        import_tests=True,
    )
    for result in (relay, consume):
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"error: --metrics-port {taken_port}: address in use\n"
        assert result.stdout == ""
