"""The alert rules and the dashboard in ``deploy/`` against what the commands really export.

The real ``outbox-relay`` and ``outbox consume`` run with ``--metrics-port``; messages go
through them with every outcome that makes a metric appear (sent, refused and parked, a
consumer retry, a dependency failure, a dead letter); then every ``outbox_*`` name that a rule
or a dashboard query uses must be among the scraped samples (a histogram's as ``_bucket``, a
counter's as ``_total``). ``promtool`` checks the rules and runs their unit tests
(``deploy/prometheus/outbox-alerts.test.yml``) when it is installed (``scripts/test`` installs
Debian's ``prometheus`` for it).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from tests.support.broker import Broker, free_port
from tests.support.consumerproc import ConsumerProcess
from tests.support.delivery import LEADER, RelayFactory
from tests.support.events import event
from tests.support.health import get
from tests.support.observability import (
    RULE_TESTS,
    RULES,
    dashboard,
    dashboard_queries,
    metric_names,
    rules,
)
from tests.support.scrape import names, sample, scrape
from tests.support.waits import wait_until

LOCAL = ("--metrics-host", "127.0.0.1")


def referenced() -> dict[str, set[str]]:
    """The metric names used, by where: ``rules`` and ``dashboard``."""
    return {
        "rules": metric_names([rule["expr"] for rule in rules()]),
        "dashboard": metric_names(list(dashboard_queries(dashboard()))),
    }


def test_the_rules_and_the_dashboard_use_our_metrics_and_a_datasource_variable() -> None:
    used = referenced()
    assert len(used["rules"]) >= 6 and len(used["dashboard"]) >= 20, used
    for name in set.union(*used.values()):
        assert name.startswith(("outbox_relay_", "outbox_consumer_")), name
    for rule in rules():
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule
        assert rule["annotations"]["runbook_url"].endswith("#when-an-alert-fires"), rule
        assert rule["labels"]["severity"] in ("critical", "warning"), rule

    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.slow
def test_every_metric_the_rules_and_the_dashboard_use_is_exported(
    engine: sa.Engine,
    db_url: str,
    broker: Broker,
    relays: RelayFactory,
    consumers: list[ConsumerProcess],
) -> None:
    used = referenced()
    topic = broker.create_topic(partitions=1)
    broker.create_topic(f"{topic}.dlq", partitions=1)
    relay_port, consumer_port = free_port(), free_port()

    outbox = Outbox()
    with Session(engine) as session, session.begin():
        # librdkafka refuses this one client-side (message.max.bytes below): a failure, then
        # parked at the second attempt. Its own key, so it holds back nothing.
        outbox.publish(session, topic, b"x" * 20_000, key="too-big")
        for n in range(20):
            outbox.publish(session, topic, {"n": n}, key=f"k{n % 4}")

    relay = relays(
        db_url,
        broker.bootstrap,
        *("--metrics-port", str(relay_port), *LOCAL),
        *("-X", "message.max.bytes=10000"),
        *("--max-attempts", "2", "--retry-backoff", "0.05"),
    )
    relay.wait_for(LEADER)
    consumer = ConsumerProcess(
        [
            *("--db-url", db_url),
            *("--bootstrap-servers", broker.bootstrap),
            *("--group", f"g-{uuid.uuid4().hex[:8]}"),
            *("--topic", topic),
            *("--handler", "tests.support.observability:every_outcome"),
            *("--retry-backoff", "0.01"),
            *("--metrics-port", str(consumer_port), *LOCAL),
            *("-X", "session.timeout.ms=6000"),
            *("-X", "heartbeat.interval.ms=1000"),
        ]
    ).start()
    consumers.append(consumer)
    relay.wait_for(event("relay.parked"), timeout=30)

    relay_url = f"http://127.0.0.1:{relay_port}/metrics"
    consumer_url = f"http://127.0.0.1:{consumer_port}/metrics"

    def done() -> bool:
        got = get(consumer_port, "/metrics")  # None until the command's server is up
        if got is None:
            return False
        counts = [
            sample(got[1], "outbox_consumer_messages_total", topic=topic, outcome=outcome)
            for outcome in ("processed", "dead_lettered")
            if f'outcome="{outcome}"' in got[1]
        ]
        return sum(counts) >= 20

    wait_until(
        done, 60, "the consumer to finish the 20 messages", processes=[consumer], interval=0.5
    )

    # Consumer lag comes with librdkafka's statistics (every 5 s), dead messages with the
    # relay's table gauges (read at most every 5 s): scrape until every name is there.
    def missing() -> set[str]:
        exported = names(scrape(relay_url)) | names(scrape(consumer_url))
        return set.union(*used.values()) - exported

    deadline = time.monotonic() + 30
    while (gone := missing()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not gone, {where: sorted(gone & names_) for where, names_ in used.items()}

    # And they count what happened. The consumer stores its dead letter through the outbox,
    # in its own transaction: the relay sends it too.
    wait_until(
        lambda: sample(scrape(relay_url), "outbox_relay_commit_to_ack_seconds_count") == 21,
        15,
        "the relay to send the dead letter",
        interval=0.2,
    )
    relay_text, consumer_text = scrape(relay_url), scrape(consumer_url)
    assert sample(relay_text, "outbox_relay_messages_sent_total", topic=topic) == 20
    assert sample(relay_text, "outbox_relay_send_failures_total", kind="message") == 2
    assert sample(relay_text, "outbox_relay_parked_total", topic=topic) == 1
    assert sample(relay_text, "outbox_relay_leader") == 1
    assert sample(relay_text, "outbox_relay_messages_sent_total", topic=f"{topic}.dlq") == 1
    wait_until(
        lambda: sample(scrape(relay_url), "outbox_relay_dead_messages") == 1,
        15,
        "the dead message in the table gauge",
        interval=0.5,
    )
    by_outcome = {
        outcome: sample(
            consumer_text, "outbox_consumer_messages_total", topic=topic, outcome=outcome
        )
        for outcome in ("processed", "dead_lettered")
    }
    assert by_outcome == {"processed": 19, "dead_lettered": 1}
    assert sample(consumer_text, "outbox_consumer_retries_total", topic=topic) == 1
    assert sample(consumer_text, "outbox_consumer_transient_failures_total", topic=topic) == 1
    assert sample(consumer_text, "outbox_consumer_breaker_state", state="closed") == 1


@pytest.fixture
def consumers() -> Iterator[list[ConsumerProcess]]:
    started: list[ConsumerProcess] = []
    yield started
    for proc in started:
        proc.stop(timeout=10)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip(
            "promtool is not installed (Debian: apt-get install prometheus; scripts/test "
            "does it as root)"
        )
    return found


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_promtool_runs_the_rules_unit_tests() -> None:
    """``outbox-alerts.test.yml``: no leader (the gauge at 0, and no relay at all, which only
    ``absent`` sees), the lag SLO (once for two relays), the consumer's breaker."""
    done = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        check=False,
        cwd=RULE_TESTS.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
