"""The examples run as documented: the demo of the full flow reports success."""

from __future__ import annotations

import re
import sys
import uuid

import pytest

from tests.conftest import PG_HOST, PG_PORT
from tests.support.broker import Broker
from tests.support.cli import ROOT, run_cli


@pytest.mark.slow
def test_demo_runs_the_full_flow(broker: Broker) -> None:
    env = {
        "OUTBOX_DEMO_PG": f"{PG_HOST}:{PG_PORT}",
        "OUTBOX_DEMO_KAFKA": broker.bootstrap,
        "OUTBOX_DEMO_ORDERS": "100",
        # An external Kafka may hold "orders" from an earlier run.
        "OUTBOX_DEMO_TOPIC_SUFFIX": f"-{uuid.uuid4().hex[:8]}",
    }
    proc = run_cli(sys.executable, [str(ROOT / "examples" / "demo.py")], env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo: OK" in proc.stdout
    assert "order per customer ok" in proc.stdout
    assert "payments captured:        100 (20 redelivered events skipped" in proc.stdout
    assert "PaymentCaptured in Kafka: 100 unique" in proc.stdout
    # The test extra installs the OpenTelemetry SDK: the demo follows the first order's trace.
    suffix = env["OUTBOX_DEMO_TOPIC_SUFFIX"]
    chain = " -> ".join(
        f"{op} {topic}{suffix}"
        for topic in ("orders", "payments")
        for op in (("create", "send", "process") if topic == "orders" else ("create", "send"))
    )
    assert re.search(rf"^trace [0-9a-f]{{32}}: POST /orders -> {chain}\b", proc.stdout, re.M), (
        proc.stdout
    )
