"""The health state and its rules (on a fake clock), the relay's and the consumer's readiness
as their hooks drive it, and the HTTP server on a real socket."""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from outbox import cli
from outbox.breaker import State, Transition
from outbox.cli_options import serve_metrics
from outbox.config import RelayConfig
from outbox.exceptions import ConfigurationError
from outbox.health import (
    MARGIN,
    ConsumerHealth,
    Health,
    HealthServer,
    RelayHealth,
    Response,
    consumer_stale_after,
    health_routes,
    relay_stale_after,
)
from outbox.observe import BatchOutcome, LogRelay
from tests.support.incoming import message


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def transition(state: State, reason: str = "why") -> Transition:
    return Transition(state, reason, 0, 0, 0, 1.0)


# -- Health -------------------------------------------------------------------------------------


def test_alive_until_stale_after_without_a_tick() -> None:
    clock = Clock()
    health = Health({}, stale_after=30, clock=clock)
    assert health.liveness() == (True, "ok")
    clock.now += 30
    assert health.liveness() == (True, "ok")
    clock.now += 0.5
    alive, reason = health.liveness()
    assert not alive
    assert reason == "stalled: the loop gave no sign of life for 30 s (limit 30 s)"
    health.tick()
    assert health.liveness() == (True, "ok")


def test_a_tick_announcing_a_wait_moves_the_deadline() -> None:
    clock = Clock()
    health = Health({}, stale_after=30, clock=clock)
    health.tick(quiet_for=100)
    clock.now += 129
    assert health.liveness() == (True, "ok")
    clock.now += 2
    assert health.liveness()[0] is False
    assert "limit 130 s" in health.liveness()[1]
    # A later plain tick has the last word.
    health.tick(quiet_for=100)
    health.tick()
    clock.now += 31
    assert health.liveness()[0] is False


def test_readiness_gives_the_first_check_that_is_wrong_in_their_order() -> None:
    health = Health({"a": "a is down", "b": None, "c": "c is down"}, clock=Clock())
    assert health.readiness() == (False, "a is down")
    health.update(a=None)
    assert health.readiness() == (False, "c is down")
    health.update(b="b is down")
    assert health.readiness() == (False, "b is down")
    health.update(b=None, c=None, status="ok: fine")
    assert health.readiness() == (True, "ok: fine")


def test_not_ready_while_stalled_nor_once_stopped() -> None:
    clock = Clock()
    health = Health({"a": None}, stale_after=10, clock=clock)
    assert health.readiness() == (True, "ok")
    clock.now += 11
    ready, reason = health.readiness()
    assert not ready and reason.startswith("stalled: ")
    health.tick()
    health.stop()
    assert health.liveness() == (False, "stopped")
    assert health.readiness() == (False, "stopped")


def test_reasons_are_one_short_line() -> None:
    health = Health({"a": None}, clock=Clock())
    health.update(a="  first line\nsecond line\n")
    assert health.readiness() == (False, "first line")
    health.update(a="x" * 1000)
    reason = health.readiness()[1]
    assert len(reason) == 300 and reason.endswith("...")


def test_unknown_checks_and_bad_limits_are_refused() -> None:
    health = Health({"a": None})
    with pytest.raises(KeyError, match="unknown checks"):
        health.update(b="typo")
    with pytest.raises(ValueError, match="stale_after"):
        Health({}, stale_after=0)


# -- the relay's readiness ----------------------------------------------------------------------


def test_relay_starting_then_leader() -> None:
    relay = RelayHealth(clock=Clock())
    assert relay.health.readiness() == (False, "starting")
    relay.leadership(True)
    assert relay.health.readiness() == (True, "ok: leader")


def test_relay_leader_with_the_broker_down_is_degraded_until_it_answers() -> None:
    relay = RelayHealth(clock=Clock())
    relay.leadership(True)
    relay.broker_unavailable("KafkaError{_TRANSPORT}\nmore", 0.5, 1)
    relay.breaker_changed(transition("open", "KafkaError{_TRANSPORT}"))
    assert relay.health.readiness() == (
        False,
        "degraded: broker unreachable (KafkaError{_TRANSPORT})",
    )
    relay.breaker_changed(transition("half_open"))
    assert relay.health.readiness()[0] is False
    relay.broker_unavailable("timed out", 1.0, 2)
    assert relay.health.readiness() == (False, "degraded: broker unreachable (timed out)")
    relay.breaker_changed(transition("closed"))
    assert relay.health.readiness() == (True, "ok: leader")
    relay.broker_unavailable("down", 0.5, 1)
    relay.broker_available()
    assert relay.health.readiness() == (True, "ok: leader")


def test_relay_standby_is_ready_with_its_database_and_leaves_the_broker_out() -> None:
    relay = RelayHealth(clock=Clock())
    relay.standby()
    assert relay.health.readiness() == (True, "ok: standby")
    relay.broker_unavailable("down", 0.5, 1)
    assert relay.health.readiness() == (True, "ok: standby")
    # Taking over, it reports the broker state it last saw (its first probe tells more).
    relay.leadership(True)
    assert relay.health.readiness() == (False, "degraded: broker unreachable (down)")


def test_relay_database_lost_until_it_leads_or_waits_again() -> None:
    clock = Clock()
    relay = RelayHealth(stale_after=30, clock=clock)
    relay.leadership(True)
    relay.leadership(False)
    relay.database_lost("connection refused", 10, 20.0)
    assert relay.health.readiness() == (False, "database unreachable (connection refused)")
    # It sleeps the announced backoff: still alive past stale_after.
    clock.now += 45
    assert relay.health.liveness() == (True, "ok")
    relay.tick()
    relay.standby()
    assert relay.health.readiness() == (True, "ok: standby")
    relay.leadership(False)
    relay.database_lost("connection refused", 0, 1.0)
    relay.leadership(True)
    assert relay.health.readiness() == (True, "ok: leader")


def test_relay_failed_statement_until_one_succeeds() -> None:
    relay = RelayHealth(clock=Clock())
    relay.leadership(True)
    relay.database_error("canceling statement due to lock timeout", 0.5)
    assert relay.health.readiness() == (
        False,
        "degraded: database statement failed (canceling statement due to lock timeout)",
    )
    relay.claimed(0, False)
    assert relay.health.readiness() == (True, "ok: leader")
    relay.database_error("deadlock detected", 0.5)
    relay.batch_finished(BatchOutcome(1, 1, 0, 0, 0, 0.01))
    assert relay.health.readiness() == (True, "ok: leader")


def test_relay_stopped() -> None:
    relay = RelayHealth(clock=Clock())
    relay.leadership(True)
    relay.leadership(False)
    relay.stopped(object())
    assert relay.health.readiness() == (False, "stopped")
    assert relay.health.liveness() == (False, "stopped")


def test_the_relay_logs_standby_once_until_it_leads(caplog: pytest.LogCaptureFixture) -> None:
    log = LogRelay()
    with caplog.at_level(logging.INFO, logger="outbox.relay"):
        for _ in range(3):
            log.standby()
        log.leadership(True)
        log.standby()
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events == ["relay.standby", "relay.leader", "relay.standby"]


def test_liveness_limits_cover_the_longest_silence() -> None:
    defaults = RelayConfig(db_url="postgresql://h/d")
    # A batch may await its reports for delivery_timeout + 5 s (35 s by default).
    assert relay_stale_after(defaults) == MARGIN + 35.0
    slow_poll = RelayConfig(db_url="postgresql://h/d", poll_interval=120.0)
    assert relay_stale_after(slow_poll) == MARGIN + 120.0
    # A handler runs up to its limit, plus the watchdog's grace.
    assert consumer_stale_after(60.0) == MARGIN + 65.0
    assert consumer_stale_after(None) == MARGIN


# -- the consumer's readiness -------------------------------------------------------------------


def test_consumer_not_ready_until_joined() -> None:
    consumer = ConsumerHealth(clock=Clock())
    assert consumer.health.readiness() == (False, "starting: not joined yet")
    consumer.joined()
    assert consumer.health.readiness() == (True, "ok")


def test_consumer_degraded_while_the_breaker_is_not_closed() -> None:
    consumer = ConsumerHealth(clock=Clock())
    consumer.joined()
    consumer.breaker_changed(transition("open", "5 transient failures in a row: Timeout"))
    assert consumer.health.readiness() == (
        False,
        "degraded: circuit breaker open (5 transient failures in a row: Timeout)",
    )
    consumer.breaker_changed(transition("half_open", "open period over, trying one message"))
    assert consumer.health.readiness() == (
        False,
        "degraded: circuit breaker half_open (open period over, trying one message)",
    )
    consumer.breaker_changed(transition("closed", "the dependency answered"))
    assert consumer.health.readiness() == (True, "ok")


def test_consumer_database_unreachable_until_a_message_is_done() -> None:
    clock = Clock()
    consumer = ConsumerHealth(stale_after=30, clock=clock)
    consumer.joined()
    consumer.database_unavailable("connection refused", 25.0)
    assert consumer.health.readiness() == (
        False,
        "degraded: database unreachable (connection refused)",
    )
    clock.now += 50
    assert consumer.health.liveness() == (True, "ok")
    consumer.message_finished(message(), "processed", 0.1)
    assert consumer.health.readiness() == (True, "ok")


def test_consumer_retries_announce_their_wait() -> None:
    clock = Clock()
    consumer = ConsumerHealth(stale_after=30, clock=clock)
    consumer.attempt_failed(message(), "k", 1, "ValueError: x", 25.0)
    clock.now += 50
    assert consumer.health.liveness()[0] is True
    consumer.transient_failure(message(), "k", "DownstreamUnavailable: x", 10.0)
    clock.now += 41
    assert consumer.health.liveness()[0] is False
    consumer.stopped(object())
    assert consumer.health.readiness() == (False, "stopped")


# -- the server ---------------------------------------------------------------------------------


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


@pytest.fixture
def relay_server() -> Iterator[tuple[RelayHealth, HealthServer]]:
    relay = RelayHealth()
    routes = health_routes(relay.health)
    with HealthServer(routes, "127.0.0.1", 0) as server:
        yield relay, server


def test_the_endpoints_answer_with_status_and_one_line(
    relay_server: tuple[RelayHealth, HealthServer],
) -> None:
    relay, server = relay_server
    status, body, headers = get(server.port, "/healthz")
    assert (status, body) == (200, "ok\n")
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert get(server.port, "/readyz")[:2] == (503, "starting\n")
    relay.leadership(True)
    assert get(server.port, "/readyz")[:2] == (200, "ok: leader\n")
    assert get(server.port, "/readyz?verbose=1")[:2] == (200, "ok: leader\n")
    status, body, headers = get(server.port, "/readyz", method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, "", "11")
    for path in ("/", "/metrics", "/healthz/x", "/ready"):
        assert get(server.port, path)[:2] == (404, "not found\n")


def test_more_routes_plug_in_and_a_failing_one_is_a_500(caplog: pytest.LogCaptureFixture) -> None:
    def metrics() -> Response:
        return 200, "text/plain; version=0.0.4", b"outbox_sent_total 3\n"

    def broken() -> Response:
        raise RuntimeError("boom\nand more")

    routes = health_routes(Health({}))
    routes["/metrics"] = metrics
    routes["/broken"] = broken
    with HealthServer(routes, "127.0.0.1", 0) as server:
        status, body, headers = get(server.port, "/metrics")
        assert (status, body) == (200, "outbox_sent_total 3\n")
        assert headers["Content-Type"] == "text/plain; version=0.0.4"
        with caplog.at_level(logging.ERROR, logger="outbox.health"):
            assert get(server.port, "/broken")[:2] == (500, "error: boom\n")
        assert [getattr(r, "event", None) for r in caplog.records] == ["health.endpoint_failed"]


def test_close_releases_the_port() -> None:
    server = HealthServer(health_routes(Health({})), "127.0.0.1", 0).start()
    port = server.port
    server.close()
    server.close()  # twice is harmless
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_port_in_use_is_one_configuration_error(taken_port: int) -> None:
    with pytest.raises(OSError):
        HealthServer({}, "127.0.0.1", taken_port).start()
    with pytest.raises(ConfigurationError) as caught:
        serve_metrics("0.0.0.0", taken_port, {})
    assert str(caught.value) == f"--metrics-port {taken_port}: address in use"
    assert serve_metrics("0.0.0.0", None, {}) is None


def test_an_address_not_of_this_machine_names_the_host() -> None:
    with pytest.raises(ConfigurationError, match=r"^--metrics-host 192\.0\.2\.1: not an address"):
        serve_metrics("192.0.2.1", 0, {})


@pytest.mark.parametrize("command", [["relay"], ["consume"]])
@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_the_port_must_be_a_port_number(command: list[str], port: str) -> None:
    result = CliRunner().invoke(cli.main, [*command, "--metrics-port", port])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--metrics-port'" in result.output


def test_the_options_read_the_environment() -> None:
    def defaults(command: Any) -> dict[str, Any]:
        return {p.name: p.envvar for p in command.params if p.name and "metrics" in p.name}

    expected = {"metrics_port": "OUTBOX_METRICS_PORT", "metrics_host": "OUTBOX_METRICS_HOST"}
    for command in (cli.relay_main, cli.main.commands["relay"], cli.main.commands["consume"]):
        assert defaults(command) == expected


def test_a_long_reason_keeps_its_parenthesis() -> None:
    consumer = ConsumerHealth(clock=Clock())
    consumer.joined()
    consumer.database_unavailable("y" * 1000 + "\nsecond line", 1.0)
    reason = consumer.health.readiness()[1]
    assert len(reason) <= 300
    assert reason.startswith("degraded: database unreachable (yyy") and reason.endswith("...)")
