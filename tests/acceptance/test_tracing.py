"""One trace from an HTTP request to the last consumer, across real processes: the orders
service (examples/orders_service.py), ``outbox-relay``, ``outbox consume`` with the payments
handler (examples/payments.py), and the relay again. Each process configures the OpenTelemetry
SDK at start-up (examples/trace_to_files: a sitecustomize on PYTHONPATH, the stand-in for
``opentelemetry-instrument``) and writes its spans to a file, read here."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.broker import Broker, free_port
from tests.support.cli import ROOT, CliProcess
from tests.support.waits import wait_until

EXAMPLES = ROOT / "examples"


def load(path: Path) -> Any:
    """An example's module, loaded from its file (sys.path left alone)."""
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


payments_service = load(EXAMPLES / "payments.py")
spanfiles = load(EXAMPLES / "trace_to_files" / "spanfiles.py")

# The caller's own trace: the service continues it.
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def traced_env(spans: Path, service: str, **extra: str) -> dict[str, str]:
    return {
        "PYTHONPATH": str(EXAMPLES / "trace_to_files"),
        "SPAN_FILES": str(spans),
        "OTEL_SERVICE_NAME": service,
        **extra,
    }


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def post_order(port: int) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/orders",
        data=json.dumps({"customer": "customer-01", "amount": "12.50"}).encode(),
        method="POST",
        headers={
            "Idempotency-Key": "order-1",
            "Content-Type": "application/json",
            "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
        result: dict[str, Any] = json.loads(response.read())
        return result


@pytest.mark.slow
def test_one_trace_from_the_http_request_to_the_payments_topic(
    db_url: str, engine: sa.Engine, broker: Broker, tmp_path: Path
) -> None:
    orders, payments = broker.create_topic(partitions=1), broker.create_topic(partitions=1)
    payments_service.create_tables(engine)
    spans_dir = tmp_path / "spans"
    log = tmp_path / "processes.log"
    port = free_port()
    service = CliProcess(
        sys.executable,
        [
            str(EXAMPLES / "orders_service.py"),
            *("--db-url", db_url, "--port", str(port), "--topic", orders),
        ],
        name="orders-service",
        log_path=log,
        env=traced_env(spans_dir, "orders-service"),
    )
    relay = CliProcess(
        "outbox-relay",
        ["--db-url", db_url, "--bootstrap-servers", broker.bootstrap],
        name="relay",
        log_path=log,
        env=traced_env(spans_dir, "outbox-relay"),
    )
    consumer = CliProcess(
        "outbox",
        [
            *("consume", "--db-url", db_url, "--bootstrap-servers", broker.bootstrap),
            *("--group", "payments", "--topic", orders, "--handler", "payments:capture_payment"),
            *("--app-dir", str(EXAMPLES), "-X", "session.timeout.ms=6000"),
            *("-X", "heartbeat.interval.ms=1000"),
        ],
        name="payments",
        log_path=log,
        env=traced_env(spans_dir, "payments", PAYMENTS_TOPIC=payments),
    )
    processes = [service.start(), relay.start(), consumer.start()]
    try:
        wait_until(lambda: listening(port), 30, "the orders service to listen")
        order = post_order(port)
        [orders_message] = broker.read_all(orders, expect=1)
        [payments_message] = broker.read_all(payments, expect=1)
    finally:
        for proc in processes:
            proc.stop(timeout=20)
    assert relay.proc is not None and relay.proc.returncode == 0, relay.tail()
    assert consumer.proc is not None and consumer.proc.returncode == 0, consumer.tail()

    # The trace travels in the Kafka headers: both topics carry the request's trace id.
    for message in (orders_message, payments_message):
        value = message.headers["traceparent"]
        assert value is not None and value.decode().split("-")[1] == TRACE_ID
    assert json.loads(payments_message.value or b"")["order_id"] == order["order_id"]

    spans = spanfiles.read(spans_dir)
    by_name = {s["name"]: s for s in spans}
    assert len(by_name) == len(spans), [s["name"] for s in spans]
    chain = [
        ("POST /orders", "SERVER", "orders-service", None),
        (f"create {orders}", "PRODUCER", "orders-service", "POST /orders"),
        (f"send {orders}", "CLIENT", "outbox-relay", f"create {orders}"),
        (f"process {orders}", "CONSUMER", "payments", f"create {orders}"),
        (f"create {payments}", "PRODUCER", "payments", f"process {orders}"),
        (f"send {payments}", "CLIENT", "outbox-relay", f"create {payments}"),
    ]
    assert sorted(by_name) == sorted(name for name, *_ in chain)
    # Every span of every process is in the caller's trace.
    assert {s["trace_id"] for s in spans} == {TRACE_ID}
    for name, kind, service_name, parent in chain:
        span = by_name[name]
        assert (span["kind"], span["service"], span["status"]) == (kind, service_name, "UNSET")
        expected_parent = CALLER_SPAN if parent is None else by_name[parent]["span_id"]
        assert span["parent_id"] == expected_parent, name
    process = by_name[f"process {orders}"]["attributes"]
    assert process["messaging.consumer.group.name"] == "payments"
    assert process["messaging.message.id"] == orders_message.headers["message-id"].decode()  # type: ignore[union-attr]
    assert by_name[f"send {payments}"]["attributes"]["messaging.batch.message_count"] == 1
