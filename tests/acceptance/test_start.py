"""The relay's first moments: a signal during start-up stops it cleanly (it used to die with
-15 in the first ~0.3 s, before its handlers were installed), and a long-running relay
started while the database is unreachable waits for it instead of exiting."""

from __future__ import annotations

import re
import signal
import time

import pytest

from tests.support.broker import Broker, free_port
from tests.support.events import event
from tests.support.relayproc import RelayProcess
from tests.support.waits import wait_until

pytestmark = pytest.mark.slow


def catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (Linux: SigCgt in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.parametrize("delay", ["caught", 0.15, 0.3])
def test_sigterm_while_starting_exits_0(db_url: str, broker: Broker, delay: str | float) -> None:
    # The signal is caught from the first lines of outbox._entry, about 30 ms after exec on an
    # idle machine (the interpreter starting before that is nobody's to handle): "caught"
    # sends it the moment the handler is in place, whatever the machine's load.
    relay = RelayProcess(
        ["--db-url", db_url, "--bootstrap-servers", broker.bootstrap], name="early"
    ).start()
    if delay == "caught":
        wait_until(lambda: catches_sigterm(relay.pid), 10, "the SIGTERM handler", interval=0.001)
    else:
        time.sleep(float(delay))
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(20) == 0, relay.tail()


def test_a_relay_started_without_its_database_waits_for_it(broker: Broker) -> None:
    closed = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/outbox"
    relay = RelayProcess(
        ["--db-url", closed, "--bootstrap-servers", broker.bootstrap, "--db-backoff-max", "0.5"],
        name="no-db",
    ).start()
    try:
        relay.wait_for(event("relay.database_unreachable_at_start"), timeout=20)
        relay.wait_for(event("relay.database_lost"), timeout=20)
        assert relay.running
    finally:
        relay.send_signal(signal.SIGTERM)
    assert relay.wait(20) == 0, relay.tail()


def test_a_consumer_without_its_broker_says_so_and_idles_out(db_url: str) -> None:
    # It used to hang silently, also with --idle-timeout (the idle clock waited for a group
    # join that an unreachable broker never gives).
    from tests.support.cli import run_cli

    started = time.monotonic()
    done = run_cli(
        "outbox",
        [
            "consume",
            "--db-url",
            db_url,
            "--bootstrap-servers",
            f"127.0.0.1:{free_port()}",
            "--group",
            "g",
            "--topic",
            "orders",
            "--handler",
            "tests.support.handlers:record_effect",
            "--idle-timeout",
            "2",
            "--redelivery-horizon-days",
            "7",
        ],
        import_tests=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(event("consumer.broker_unreachable"), done.stderr), done.stderr[-2000:]
    assert time.monotonic() - started < 30
