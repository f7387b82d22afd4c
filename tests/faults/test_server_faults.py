"""The database server restarted or paused under a running ``outbox-relay`` and writers: the
relay process survives, reconnects and takes leadership again on its own; nothing committed
is lost, per-key order holds, duplicates stay bounded.

Each test runs its own throwaway cluster (``tests/support/pgcluster.py``); the writers retry
what the fault made fail (``RetryingWriters``), so every committed message is known.
"""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from tests.faults.conftest import (
    ACKED,
    DATABASE_LOST,
    DUPLICATES_PER_FAULT,
    RELAY_ARGS,
    SEEDS,
    FaultDb,
    RetryingWriters,
)
from tests.support.broker import Broker
from tests.support.delivery import LEADER, RelayFactory, check_delivery, wait_drained
from tests.support.relayproc import RelayProcess

pytestmark = pytest.mark.slow


@dataclasses.dataclass
class Running:
    topic: str
    writers: RetryingWriters
    relay: RelayProcess


def start(fault_db: FaultDb, broker: Broker, relays: RelayFactory, seed: int) -> Running:
    """Writers and a relay, once the relay has sent something."""
    topic = broker.create_topic(partitions=3)
    writers = RetryingWriters(fault_db.engine, topic, seed=seed).start()
    relay = relays(fault_db.url, broker.bootstrap, *RELAY_ARGS)
    relay.wait_for(ACKED, after=relay.wait_for(LEADER, timeout=30), timeout=30)
    return Running(topic, writers, relay)


def finish(run: Running, fault_db: FaultDb, broker: Broker, what: str) -> None:
    """Let the writers go on a little after the recovery, stop them, and check everything
    they committed arrived, in order per key, with bounded duplicates; the relay still
    runs."""
    run.writers.wait_for(run.writers.count() + 100, timeout=30)
    committed = run.writers.stop()
    wait_drained(fault_db.engine, timeout=60)
    assert run.relay.running, run.relay.tail()
    got = broker.read_all(run.topic, expect=len(committed))
    delivery = check_delivery(got, committed)
    assert delivery.duplicates <= DUPLICATES_PER_FAULT, delivery
    assert delivery.max_copies <= 2, delivery
    print(
        f"{what}: {len(committed)} committed, writer tries failed {run.writers.failures} "
        f"(committed unseen {run.writers.committed_unseen}, longest transaction "
        f"{run.writers.longest_wait:.2f} s), {delivery}"
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_under_writers_and_relay(
    mode: str, seed: int, fault_db: FaultDb, broker: Broker, relays: RelayFactory
) -> None:
    run = start(fault_db, broker, relays, seed)
    time.sleep(random.Random(seed).uniform(0.1, 1.0))
    before = run.relay.mark()
    began = time.monotonic()
    fault_db.cluster.restart(mode)  # -w: returns once the server accepts connections again
    up = time.monotonic()
    lost = run.relay.wait_for(DATABASE_LOST, after=before, timeout=30)
    leader = run.relay.wait_for(LEADER, after=lost, timeout=30)
    run.relay.wait_for(ACKED, after=leader, timeout=30)
    recovered = time.monotonic()
    finish(run, fault_db, broker, f"restart -m {mode}")
    print(
        f"restart -m {mode}: server down/up {up - began:.2f} s, relay sending again "
        f"{recovered - up:.2f} s after the server was up"
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_paused_server_under_writers_and_relay(
    seed: int, fault_db: FaultDb, broker: Broker, relays: RelayFactory
) -> None:
    """SIGSTOP of the postmaster and every backend for a few seconds, then SIGCONT. Nothing
    tells the relay (the kernel still answers TCP): it waits, then goes on in its session,
    still the leader."""
    rng = random.Random(seed)
    run = start(fault_db, broker, relays, seed)
    time.sleep(rng.uniform(0.1, 1.0))
    pause = rng.uniform(3.0, 5.0)
    fault_db.cluster.pause()
    try:
        time.sleep(pause)
        assert run.relay.running, run.relay.tail()
        paused_at = run.relay.mark()
    finally:
        fault_db.cluster.resume()
    resumed = time.monotonic()
    run.relay.wait_for(ACKED, after=paused_at, timeout=30)
    recovered = time.monotonic() - resumed
    finish(run, fault_db, broker, f"paused {pause:.1f} s")
    # The session outlived the pause: no reconnect, no second leadership.
    assert run.relay.count(DATABASE_LOST) == 0, run.relay.matches(DATABASE_LOST)
    assert run.relay.count(LEADER) == 1
    print(f"paused {pause:.1f} s: relay sending again {recovered:.2f} s after SIGCONT")
