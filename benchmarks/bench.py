"""Benchmarks of the outbox and relay, each printed as a ratio to a limit measured in the same
run on the same PostgreSQL and broker. Prints numbers; asserts nothing.

    .venv/bin/python benchmarks/bench.py            # everything (a few minutes)
    .venv/bin/python benchmarks/bench.py throughput latency write idle claim consumer notify
    .venv/bin/python benchmarks/bench.py consumer-latency   # what batching adds at light traffic

Environment: OUTBOX_BENCH_PG (host:port, default 127.0.0.1:5432, user postgres; the database
``outbox_bench`` is dropped and re-created), OUTBOX_BENCH_KAFKA (bootstrap servers; default:
start a Tansu broker).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from confluent_kafka import Producer
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from outbox import (
    BatchOutcome,
    ConsumerObserver,
    Message,
    Outbox,
    Relay,
    RelayConfig,
    RelayObserver,
    migrate,
    statements,
)
from outbox.message import encode
from outbox.schema import define_tables
from outbox.transport.base import DeliveryFailure, OnDelivery, OutgoingMessage
from outbox.transport.kafka import DEFAULTS as PRODUCER_DEFAULTS
from outbox.transport.kafka import KafkaTransport
from tests.support.broker import Broker

EVENTS = 20_000
KEYS = 100
PARTITIONS = 8
TXN_SIZE = 100

PG = os.environ.get("OUTBOX_BENCH_PG", "127.0.0.1:5432")
HOST, _, PORT = PG.partition(":")
DB_URL = f"postgresql+psycopg://postgres@{HOST}:{PORT or 5432}/outbox_bench"


def payload(i: int) -> dict[str, Any]:
    # About 200 bytes of JSON.
    return {
        "type": "OrderPlaced",
        "order_id": str(uuid.UUID(int=i)),
        "customer": f"customer-{i % KEYS:03d}",
        "amount": f"{(i % 997) + 0.99:.2f}",
        "currency": "EUR",
        "lines": [{"sku": f"SKU-{i % 37:04d}", "qty": 1 + i % 3}],
        "note": "x" * 40,
    }


def fresh_db() -> None:
    with psycopg.connect(
        host=HOST, port=PORT or "5432", user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        conn.execute("DROP DATABASE IF EXISTS outbox_bench WITH (FORCE)")
        conn.execute("CREATE DATABASE outbox_bench")
    migrate.upgrade(DB_URL)


def fill(engine: sa.Engine, topic: str, n: int = EVENTS) -> None:
    outbox = Outbox()
    for start in range(0, n, TXN_SIZE):
        with Session(engine) as s, s.begin():
            outbox.publish_many(
                s,
                [
                    Message(topic, payload(i), key=f"key-{i % KEYS}")
                    for i in range(start, min(n, start + TXN_SIZE))
                ],
            )
    with engine.connect() as c:
        c.execute(sa.text("ANALYZE outbox_messages"))
        c.commit()


def count(engine: sa.Engine) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.text("SELECT count(*) FROM outbox_messages")).scalar() or 0)


def kafka_settings(extra: dict[str, str]) -> dict[str, str]:
    return {"message.timeout.ms": "30000", **extra}


# -- throughput --------------------------------------------------------------------------------


def machine_cpu() -> float:
    """CPU seconds used by the whole machine so far (all processes: relay, librdkafka's
    threads, the broker, PostgreSQL), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def measured(fn: Callable[[], float], cpu: list[float]) -> float:
    """Run one phase; record the machine's CPU seconds per 1000 events."""
    before = machine_cpu()
    rate = fn()
    cpu.append((machine_cpu() - before) / EVENTS * 1000)
    return rate


def bare_drain() -> float:
    """Select a batch, delete it, commit: the database's share of relaying, with no broker."""
    tables = define_tables()
    claim = statements.to_driver_sql(statements.claim(tables))
    delete = statements.to_driver_sql(statements.delete_sent(tables))
    conninfo = f"host={HOST} port={PORT or 5432} user=postgres dbname=outbox_bench"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        start = time.perf_counter()
        n = 0
        while True:
            rows = conn.execute(claim, {"exclude": [], "limit": 1000}).fetchall()
            if not rows:
                break
            conn.execute(delete, {"ids": [r[0] for r in rows]})
            n += len(rows)
        return n / (time.perf_counter() - start)


def limit_settings(bootstrap: str, extra: dict[str, str]) -> dict[str, Any]:
    """The hand-written producers' settings: the relay's own client defaults (linger, socket
    options; not its gapless flag, which only adds a warning), idempotent with acks=all like
    the relay's, and the same -X overrides."""
    defaults = {k: v for k, v in PRODUCER_DEFAULTS.items() if k != "enable.gapless.guarantee"}
    return {
        **defaults,
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        **extra,
    }


def direct_produce(bootstrap: str, topic: str, engine: sa.Engine, extra: dict[str, str]) -> float:
    """The same events, already in memory, produced straight from confluent-kafka."""
    with engine.connect() as c:
        rows = c.execute(
            sa.text(
                "SELECT message_id, topic, key, payload, header_names, header_values "
                "FROM outbox_messages ORDER BY id"
            )
        ).all()
    producer = Producer(limit_settings(bootstrap, extra))
    for r in rows[:1000]:  # warm up: connections, metadata, producer id
        producer.produce(topic, value=r.payload, key=r.key)
    producer.flush(30)
    acked = 0

    def on_delivery(err: Any, _m: Any) -> None:
        nonlocal acked
        if err is None:
            acked += 1

    start = time.perf_counter()
    for r in rows:
        headers = [
            ("message-id", str(r.message_id).encode()),
            *zip(r.header_names, r.header_values, strict=True),
        ]
        while True:
            try:
                producer.produce(
                    topic, value=r.payload, key=r.key, headers=headers, on_delivery=on_delivery
                )
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(60)
    elapsed = time.perf_counter() - start
    assert acked == len(rows), (acked, len(rows))
    return len(rows) / elapsed


def minimal_relay(bootstrap: str, topic: str, extra: dict[str, str]) -> float:
    """The naive relay, for scale: select a batch, produce it, flush, delete, commit. No
    ordering guarantees across failures, no retries, no parking, no pipelining."""
    producer = Producer(limit_settings(bootstrap, extra))
    # Twice, as KafkaTransport.check() does: after one metadata request, about every other
    # new producer waited 0.5 s for its producer id before sending anything (librdkafka's
    # timer), and this relay's rounds were bimodal for that alone.
    producer.list_topics(timeout=10)
    producer.list_topics(timeout=10)
    conninfo = f"host={HOST} port={PORT or 5432} user=postgres dbname=outbox_bench"
    n = 0
    with psycopg.connect(conninfo) as conn:
        start = time.perf_counter()
        while True:
            rows = conn.execute(
                "SELECT id, message_id, topic, key, payload, header_names, header_values "
                "FROM outbox_messages ORDER BY id LIMIT 1000"
            ).fetchall()
            if not rows:
                break
            for r in rows:
                headers = [("message-id", str(r[1]).encode()), *zip(r[5], r[6], strict=True)]
                producer.produce(r[2], value=r[4], key=r[3], headers=headers)
            producer.flush(30)
            conn.execute("DELETE FROM outbox_messages WHERE id = ANY(%s)", ([r[0] for r in rows],))
            conn.commit()
            n += len(rows)
        return n / (time.perf_counter() - start)


class _Clock(RelayObserver):
    """Starts when the relay becomes the leader (connected, claims connection open) and
    records when the last expected row was marked sent."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.sent = 0
        self.start = 0.0
        self.done_at = 0.0

    def leadership(self, leader: bool) -> None:
        if leader and not self.start:
            self.start = time.perf_counter()

    def batch_finished(self, outcome: BatchOutcome) -> None:
        self.sent += outcome.acked
        if self.sent >= self.expected and not self.done_at:
            self.done_at = time.perf_counter()


def relay_drain(
    bootstrap: str,
    extra: dict[str, str],
    observers: Sequence[RelayObserver] = (),
    **config: Any,
) -> float:
    """The relay's steady state, like the two limits: connected and leading before the clock
    starts (as the direct producer is created and warmed up before its clock), and the clock
    stops when the last row is marked sent (as the direct one stops at its last
    acknowledgement), not after closing the producer and the connections."""
    n = count(sa.create_engine(DB_URL))
    transport = KafkaTransport(bootstrap, kafka_settings(extra))
    clock = _Clock(n)
    relay = Relay(
        RelayConfig(db_url=DB_URL, **config), lambda: transport, observers=[clock, *observers]
    )
    transport.check(10)
    check = transport.check
    transport.check = lambda timeout: None  # type: ignore[method-assign]  # just done
    stats = relay.run_once()
    transport.check = check  # type: ignore[method-assign]
    assert stats.sent == n, (stats.sent, n)
    return n / (clock.done_at - clock.start)


def bench_throughput(
    broker: Broker, engine: sa.Engine, extra: dict[str, str], rounds: int = 10
) -> None:
    """Issue 11 point 4: ``rounds`` interleaved rounds of the relay and the two limits (the
    broker's: the same events produced straight from memory; the database's: a bare claim
    and delete), plus the naive relay for scale. Targets: the slowest relay round >= 0.85 x
    the median, the median >= 0.75 x min(direct, drain) medians."""
    topic = broker.create_topic(partitions=PARTITIONS)
    print(
        f"\n== relay throughput: {EVENTS} events, {KEYS} keys, {PARTITIONS} partitions, "
        f"transactions of {TXN_SIZE}, producer {extra or 'defaults'}, {rounds} rounds"
    )
    results: dict[str, list[float]] = {"relay": [], "direct": [], "drain": [], "minimal": []}
    cpu: dict[str, list[float]] = {"relay": [], "direct": [], "drain": [], "minimal": []}

    def phase(fn: Callable[[], float], cpu: list[float]) -> float:
        # A full garbage collection first: the harness's own garbage (fill()'s sessions and
        # messages, the rows direct_produce() read) otherwise sets one off in whichever phase
        # next allocates most -- the relay's, in about 2 rounds of 10 (50 ms, a tenth of it).
        gc.collect()
        return measured(fn, cpu)

    for _ in range(rounds):  # interleaved rounds: noise hits all of a round alike
        fill(engine, topic)
        results["drain"].append(phase(bare_drain, cpu["drain"]))
        fill(engine, topic)
        results["direct"].append(
            phase(lambda: direct_produce(broker.bootstrap, topic, engine, extra), cpu["direct"])
        )
        results["relay"].append(phase(lambda: relay_drain(broker.bootstrap, extra), cpu["relay"]))
        fill(engine, topic)
        results["minimal"].append(
            phase(lambda: minimal_relay(broker.bootstrap, topic, extra), cpu["minimal"])
        )
        with engine.begin() as c:
            c.execute(sa.text("DELETE FROM outbox_messages"))
    med = {k: statistics.median(v) for k, v in results.items()}
    for k in ("relay", "direct", "drain", "minimal"):
        runs = ", ".join(f"{x / 1000:,.0f}k" for x in results[k])
        print(
            f"  {k:7} median {med[k]:>9,.0f} events/s, slowest/median "
            f"{min(results[k]) / med[k]:.2f}   (runs: {runs})   machine CPU "
            f"{statistics.median(cpu[k]) * 1000:5.1f} ms per 1000 events"
        )
    limit = min(med["direct"], med["drain"])
    print(
        f"  relay: slowest / median {min(results['relay']) / med['relay']:.2f} (target >= 0.85); "
        f"median / min(direct, drain) {med['relay'] / limit:.2f} (target >= 0.75)"
    )


def bench_metrics(broker: Broker, engine: sa.Engine, extra: dict[str, str]) -> None:
    """The relay with and without its metrics (what --metrics-port adds: RelayMetrics as an
    observer, its SQL gauges, and a scrape every 0.5 s, ten times Prometheus' usual rate)."""
    from outbox.metrics import RelayMetrics, relay_table_gauges

    topic = broker.create_topic(partitions=PARTITIONS)
    print(f"\n== metrics overhead: {EVENTS} events, relay with vs without --metrics-port")
    results: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(9):  # interleaved; the relay's rounds are bimodal (see performance.md)
        for mode in ("without", "with"):
            fill(engine, topic)
            if mode == "without":
                results[mode].append(relay_drain(broker.bootstrap, extra))
                continue
            metrics = RelayMetrics(relay_table_gauges(RelayConfig(db_url=DB_URL), 5.0))
            done = threading.Event()

            def scrape(m: RelayMetrics = metrics, stop: threading.Event = done) -> None:
                while not stop.wait(0.5):
                    m.render()

            scraper = threading.Thread(target=scrape, daemon=True)
            scraper.start()
            try:
                results[mode].append(relay_drain(broker.bootstrap, extra, [metrics]))
            finally:
                done.set()
                scraper.join()
    for mode, runs in results.items():
        print(
            f"  {mode:8} median {statistics.median(runs):>9,.0f} events/s   "
            f"(runs: {', '.join(f'{x:,.0f}' for x in runs)})"
        )
    ratios = [w / o for w, o in zip(results["with"], results["without"], strict=True)]
    print(
        f"  with / without, per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"median {statistics.median(ratios):.2f}; ratio of the medians "
        f"{statistics.median(results['with']) / statistics.median(results['without']):.2f}"
        "   (target >= 0.95)"
    )
    # The same cost without the noise: the hooks' CPU time per message, against the relay's.
    hooks = RelayMetrics()
    now = time.time()
    created = [now - i / 100_000 for i in range(1000)]
    rounds = 2000
    start = time.perf_counter()
    for _ in range(rounds):
        hooks.claim_finished(1000, True, 0.001)
        hooks.messages_acked(["orders"] * 1000, list(reversed(created)), now)
        hooks.batch_finished(BatchOutcome(1000, 1000, 0, 0, 0, 0.01))
    per_message = (time.perf_counter() - start) / rounds / 1000
    relay_per_message = 1 / statistics.median(results["without"])
    print(
        f"  metric hooks: {per_message * 1e6:.3f} us per message, "
        f"{per_message / relay_per_message:.1%} of the relay's {relay_per_message * 1e6:.1f} us"
    )


# -- latency -----------------------------------------------------------------------------------


class TimingTransport:
    """Wraps a transport and records when each message id was acknowledged."""

    def __init__(self, inner: KafkaTransport, acked: dict[str, float]) -> None:
        self.inner = inner
        self.acked = acked

    def send(self, message: OutgoingMessage, on_delivery: OnDelivery) -> None:
        mid = dict(message.headers)["message-id"].decode()

        def report(error: Any, msg: Any) -> None:
            if error is None:
                self.acked[mid] = time.monotonic()
            on_delivery(error, msg)

        self.inner.send(message, report)

    def poll(self, timeout: float) -> None:
        self.inner.poll(timeout)

    def flush(self, timeout: float) -> None:
        self.inner.flush(timeout)

    def failure(self, error: Any) -> DeliveryFailure:
        return self.inner.failure(error)

    def check(self, timeout: float) -> None:
        self.inner.check(timeout)

    @property
    def broken(self) -> bool:
        return self.inner.broken

    def close(self, timeout: float) -> None:
        self.inner.close(timeout)


def _paced_writer(topic: str, rate: int, seconds: float, out: Any) -> None:
    """Runs in its own process: one event per transaction at ``rate``/s; reports commit times
    (CLOCK_MONOTONIC is system-wide on Linux, so the parent can compare)."""
    engine = sa.create_engine(DB_URL)
    outbox = Outbox()
    commits: dict[str, float] = {}
    interval = 1.0 / rate
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        target = start + i * interval
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        with Session(engine) as s, s.begin():
            mid = outbox.publish(s, topic, payload(i), key=f"key-{i % KEYS}")
        commits[str(mid)] = time.monotonic()
    out.put(commits)


def bench_latency(
    broker: Broker, extra: dict[str, str], rate: int = 500, seconds: float = 10.0
) -> None:
    topic = broker.create_topic(partitions=PARTITIONS)
    acked: dict[str, float] = {}
    relay = Relay(
        RelayConfig(db_url=DB_URL),
        lambda: TimingTransport(KafkaTransport(broker.bootstrap, kafka_settings(extra)), acked),
    )
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    while not relay.is_leader:
        time.sleep(0.01)
    q: Any = multiprocessing.get_context("spawn").Queue()
    writer = multiprocessing.get_context("spawn").Process(
        target=_paced_writer, args=(topic, rate, seconds, q)
    )
    writer.start()
    commits: dict[str, float] = q.get(timeout=seconds * 3 + 30)
    writer.join()
    deadline = time.monotonic() + 30
    while len(acked) < len(commits) and time.monotonic() < deadline:
        time.sleep(0.05)
    relay.stop()
    thread.join(30)
    if os.environ.get("OUTBOX_BENCH_DEBUG"):
        t0 = min(commits.values())
        slow = sorted(
            (t - t0, (acked[m] - t) * 1000)
            for m, t in commits.items()
            if m in acked and acked[m] - t > 0.05
        )
        print("slow (s since start, ms):", [(round(a, 2), round(b)) for a, b in slow][:60])
    # Steady state: leave out the first second (connections, caches, plans warming up).
    t0 = min(commits.values())
    commits = {m: t for m, t in commits.items() if t - t0 >= 1.0}
    lat = sorted((acked[m] - t) * 1000 for m, t in commits.items() if m in acked)
    missing = len(commits) - len(lat)

    def p(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))]

    print(
        f"\n== commit-to-acknowledged latency at {rate} events/s for {seconds:.0f} s "
        f"({len(lat)} events{f', {missing} missing' if missing else ''}), producer "
        f"{extra or 'defaults'}"
    )
    print(
        f"  p50 {p(0.50):.2f} ms   p90 {p(0.90):.2f} ms   p99 {p(0.99):.2f} ms   "
        f"max {lat[-1]:.2f} ms   (targets: p50 <= 5, p99 <= 25)"
    )


# -- write overhead ----------------------------------------------------------------------------


class _Base(DeclarativeBase):
    pass


class BenchOrder(_Base):
    __tablename__ = "bench_orders"
    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    customer: Mapped[str]
    amount: Mapped[Any] = mapped_column(sa.Numeric(12, 2))
    body: Mapped[Any] = mapped_column(JSONB)


def bench_write(engine: sa.Engine, n: int = 3000) -> None:
    with engine.begin() as c:
        c.execute(
            sa.text(
                "CREATE TABLE IF NOT EXISTS bench_orders (id bigserial PRIMARY KEY, "
                "customer text NOT NULL, amount numeric(12,2) NOT NULL, body jsonb NOT NULL)"
            )
        )
        # The floors: a second row of the outbox row's shape, in a plain table with the same
        # indexes, written as each mode writes its row (what any transactional outbox costs).
        c.execute(
            sa.text(
                "CREATE TABLE IF NOT EXISTS bench_events (id bigint GENERATED ALWAYS AS IDENTITY "
                "PRIMARY KEY, message_id uuid NOT NULL UNIQUE, topic text NOT NULL, key bytea, "
                "payload bytea, created_at timestamptz NOT NULL DEFAULT now())"
            )
        )
        # The third index, as the outbox's unsent rows index.
        c.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_bench_events ON bench_events (id)"))
    modes: dict[str, Outbox | str | None] = {
        "without event": None,
        "Outbox()": Outbox(),
        "Outbox(at_commit=True)": Outbox(at_commit=True),
        "plain row, own round trip": "row",
        "plain row, with the COMMIT": "row at commit",
    }
    insert = sa.text(
        "INSERT INTO bench_orders (customer, amount, body) VALUES (:c, :a, CAST(:b AS jsonb))"
    )
    row = "INSERT INTO bench_events (message_id, topic, key, payload) VALUES (%s, %s, %s, %s)"

    events = 1
    orm = False

    def plain_rows(s: Session, i: int, with_commit: bool) -> None:
        driver = s.connection().connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        rows: list[tuple[Any, ...]] = []
        for j in range(events):
            args = (
                uuid.uuid4(),
                "orders",
                f"customer-{(i + j) % KEYS}".encode(),
                json.dumps(payload(i)).encode(),
            )
            if not with_commit:
                driver.execute(row, args)
            else:
                rows.append(args)
        if with_commit:
            # As Outbox(at_commit=True) sends its inserts: with the COMMIT, in one round
            # trip; SQLAlchemy's commit after it finds the transaction over.
            with driver.pipeline():
                for args in rows:
                    driver.execute(row, args)
                driver.execute("COMMIT")

    def txn(i: int, outbox: Outbox | str | None) -> float:
        start = time.perf_counter()
        with Session(engine) as s, s.begin():
            if orm:
                s.add(BenchOrder(customer=f"customer-{i % KEYS}", amount=i % 997, body=payload(i)))
                s.flush()
            else:
                s.execute(
                    insert,
                    {"c": f"customer-{i % KEYS}", "a": i % 997, "b": json.dumps(payload(i))},
                )
            if isinstance(outbox, str):
                plain_rows(s, i, outbox == "row at commit")
            elif outbox is not None:
                for j in range(events):  # one publish call per event
                    outbox.publish(s, "orders", payload(i), key=f"customer-{(i + j) % KEYS}")
        return time.perf_counter() - start

    for i in range(300):  # warm up the pool, caches, plans
        txn(i, list(modes.values())[i % len(modes)])
    print(f"\n== write overhead: business transaction of one order row, {n} each, interleaved")
    for events, orm in ((1, False), (3, False), (1, True)):
        times: dict[str, list[float]] = {name: [] for name in modes}
        for i in range(n if events == 1 else n // 3):  # interleaved: noise hits all alike
            for name, outbox in modes.items():
                times[name].append(txn(i, outbox))
        base = statistics.median(times["without event"])
        how = "ORM (session.add + flush)" if orm else "Core text INSERT"
        print(f"  order row by {how}, {events} event(s), one publish call each (medians):")
        for name, t in times.items():
            m = statistics.median(t)
            target = ""
            if name.startswith("Outbox") and events == 1:
                target = "   (target <= 1.15)" if "at_commit" in name else "   (target <= 1.25)"
            print(f"    {name:24} {m * 1000:.3f} ms   ratio {m / base:.2f}{target}")


# -- idle cost ---------------------------------------------------------------------------------


class CountingClaims(RelayObserver):
    """Counts claims: once leading, the only statements a relay runs (waiting for
    notifications runs none)."""

    def __init__(self) -> None:
        self.claims = 0

    def claimed(self, rows: int, ahead: bool) -> None:
        self.claims += 1


def bench_idle(broker: Broker, seconds: float = 30.0) -> None:
    counter = CountingClaims()
    relay = Relay(
        RelayConfig(db_url=DB_URL),
        lambda: KafkaTransport(broker.bootstrap, kafka_settings({})),
        observers=[counter],
    )
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    while not relay.is_leader:
        time.sleep(0.01)
    time.sleep(1.0)
    before = counter.claims
    cpu0 = time.process_time()
    time.sleep(seconds)
    n = counter.claims - before
    cpu = time.process_time() - cpu0
    relay.stop()
    thread.join(30)
    print(
        f"\n== idle cost over {seconds:.0f} s: {n} statements = {n / seconds:.2f}/s "
        f"(target <= 1); process CPU {cpu / seconds * 100:.2f}%"
    )


# -- claim time vs backlog ---------------------------------------------------------------------


def bench_claim(engine: sa.Engine) -> None:
    tables = define_tables()
    claim = statements.to_driver_sql(statements.claim(tables))
    conninfo = f"host={HOST} port={PORT or 5432} user=postgres dbname=outbox_bench"
    print("\n== claim time (1000 rows) by backlog, median of 30")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("DELETE FROM outbox_messages")
        have = 0
        for target in (10_000, 100_000, 1_000_000):
            conn.execute(
                "INSERT INTO outbox_messages (message_id, topic, key, payload) "
                "SELECT gen_random_uuid(), 'bench', convert_to('key-' || (g %% 100), 'UTF8'), "
                "convert_to(repeat('x', 200), 'UTF8') FROM generate_series(%s::int, %s::int) AS g",
                (have, target - 1),
            )
            have = target
            conn.execute("VACUUM ANALYZE outbox_messages")
            times = []
            for _ in range(30):
                start = time.perf_counter()
                # As the relay runs it: ids as an array literal, planned for each call.
                conn.execute(claim, {"exclude": "{}", "limit": 1000}, prepare=False).fetchall()
                times.append(time.perf_counter() - start)
            # With 1000 rows in flight excluded, as the pipelined relay asks.
            exclude = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM outbox_messages ORDER BY id LIMIT 1000"
                ).fetchall()
            ]
            times_ex = []
            for _ in range(30):
                start = time.perf_counter()
                conn.execute(
                    claim,
                    {"exclude": "{" + ",".join(map(str, exclude)) + "}", "limit": 1000},
                    prepare=False,
                ).fetchall()
                times_ex.append(time.perf_counter() - start)
            print(
                f"  {target:>9,} pending: {statistics.median(times) * 1000:6.2f} ms   "
                f"(1000 in flight excluded: {statistics.median(times_ex) * 1000:6.2f} ms)"
            )
        conn.execute("DELETE FROM outbox_messages")


# -- inbox consumer ----------------------------------------------------------------------------


class _ConsumerClock(ConsumerObserver):
    def __init__(self) -> None:
        self.last = 0.0

    def message_finished(self, message: Any, outcome: Any, seconds: float) -> None:
        self.last = time.perf_counter()


def _timed_source(*args: Any) -> Any:
    """A KafkaSource that notes when it first hands out a message: the rates are timed from
    there to the last message finished (the group join is not timed)."""
    from outbox.transport.kafka import KafkaSource

    class Timed(KafkaSource):
        first = 0.0

        def poll_batch(self, max_messages: int, timeout: float, max_wait: float = 0.0) -> Any:
            got = super().poll_batch(max_messages, timeout, max_wait)
            if got and not self.first:
                self.first = time.perf_counter()
            return got

        def poll(self, timeout: float) -> Any:
            got = super().poll(timeout)
            if got is not None and not self.first:
                self.first = time.perf_counter()
            return got

    return Timed(*args)


def _message_id(message: Any) -> str:
    return next(v for k, v in message.headers() if k == "message-id").decode()  # type: ignore[no-any-return]


def _hand_written(broker: Broker, topic: str, n: int, multi_row: bool) -> float:
    """What one would write by hand: ``consume(500)``, one transaction per batch (the inbox
    claim of every key in one statement, then the effects: one INSERT per message, or one
    multi-row INSERT), then the offsets stored."""
    from confluent_kafka import Consumer as KafkaConsumer
    from confluent_kafka import TopicPartition

    group = f"bench-{uuid.uuid4().hex[:8]}"
    consumer = KafkaConsumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.offset.store": "false",
            "session.timeout.ms": "6000",
            "heartbeat.interval.ms": "1000",
        }
    )
    consumer.subscribe([topic])
    claim = sa.text(
        "INSERT INTO outbox_inbox (consumer, key, expires_at) "
        "SELECT :consumer, k, now() + interval '7 days' FROM unnest(CAST(:keys AS text[])) AS k "
        "ORDER BY k ON CONFLICT (consumer, key) DO NOTHING RETURNING key"
    )
    one = sa.text("INSERT INTO effects (n) VALUES (1)")
    many = sa.text("INSERT INTO effects (n) SELECT 1 FROM generate_series(1, :rows)")
    engine = sa.create_engine(DB_URL)
    done, first = 0, 0.0
    try:
        with engine.connect() as conn:
            while done < n:
                batch = [m for m in consumer.consume(500, 0.5) if m.error() is None]
                if not batch:
                    continue
                first = first or time.perf_counter()
                with conn.begin():
                    keys = [_message_id(m) for m in batch]
                    fresh = {r[0] for r in conn.execute(claim, {"consumer": group, "keys": keys})}
                    rows = sum(1 for k in keys if k in fresh)
                    if multi_row:
                        conn.execute(many, {"rows": rows})
                    else:
                        for _ in range(rows):
                            conn.execute(one)
                last: dict[tuple[str, int], int] = {}
                for m in batch:
                    last[(str(m.topic()), int(m.partition() or 0))] = int(m.offset() or 0)
                consumer.store_offsets(
                    offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
                )
                done += len(batch)
        return n / (time.perf_counter() - first)
    finally:
        consumer.close()
        engine.dispose()


def bench_consumer(broker: Broker, engine: sa.Engine, n: int = 20_000) -> None:
    """The inbox consumer with a trivial handler (one row per message) against hand-written
    batched consumers doing the same work, reading the same topic in the same run."""
    from outbox.consumer import Consumer, ConsumerConfig

    topic = broker.create_topic(partitions=PARTITIONS)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
    for i in range(n):
        producer.produce(
            topic,
            value=json.dumps(payload(i)).encode(),
            key=f"key-{i % KEYS}".encode(),
            headers=[("message-id", str(uuid.uuid4()).encode())],
        )
        if i % 10_000 == 0:
            producer.flush(30)
    producer.flush(60)
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE IF NOT EXISTS effects (n int NOT NULL)"))

    def handler(session: Session, message: Any) -> None:
        session.execute(sa.text("INSERT INTO effects (n) VALUES (1)"))

    def batch_handler(session: Session, messages: list[Any]) -> None:
        session.execute(
            sa.text("INSERT INTO effects (n) SELECT 1 FROM generate_series(1, :rows)"),
            {"rows": len(messages)},
        )

    def run(batched: bool, **options: Any) -> float:
        group = f"bench-{uuid.uuid4().hex[:8]}"
        settings = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
        clock = _ConsumerClock()
        sources: list[Any] = []

        def source() -> Any:
            sources.append(_timed_source(broker.bootstrap, group, [topic], settings))
            return sources[0]

        consumer = Consumer(
            ConsumerConfig(db_url=DB_URL, name=group, **options),
            None if batched else handler,
            source,
            observers=[clock],
            batch_handler=batch_handler if batched else None,
        )
        stats = consumer.run(max_messages=n)
        assert stats.processed == n, stats
        first: float = sources[0].first
        return n / (clock.last - first)

    one = _hand_written(broker, topic, n, multi_row=False)
    multi = _hand_written(broker, topic, n, multi_row=True)
    default = run(False)
    batched = run(True)
    single = run(False, batch_size=1)
    print(
        f"\n== inbox consumer: {n} messages, {PARTITIONS} partitions, one effect row per "
        "message, one run each"
    )
    for label, rate in (
        ("hand-written, consume(500), one INSERT per message  ", one),
        ("hand-written, consume(500), one multi-row INSERT    ", multi),
        ("Consumer, default options, per-message handler      ", default),
        ("Consumer, default options, batch handler            ", batched),
        ("Consumer, --batch-size 1 (one transaction a message)", single),
    ):
        print(f"  {label} {rate:>8,.0f} messages/s")
    print(
        f"  ratio per-message handler / hand-written one INSERT a message: {default / one:.2f}"
        "   (target >= 0.5)"
    )
    print(
        f"  ratio batch handler / hand-written multi-row INSERT: {batched / multi:.2f}"
        "   (target >= 0.5)"
    )
    _session_costs(engine)


def _session_costs(engine: sa.Engine, n: int = 3000) -> None:
    """What the per-message ratio is made of: per message, on one connection in one
    transaction, the hand-written consumer's Core ``execute`` against what a handler gets (its
    own session, joined to the transaction, ``execute``, then the runner's ``commit()``, which
    only flushes), medians of three interleaved rounds."""
    from outbox.handler_session import HandlerSession

    insert = sa.text("INSERT INTO effects (n) VALUES (1)")

    def core(conn: sa.Connection) -> None:
        conn.execute(insert)

    def session(conn: sa.Connection) -> None:
        with HandlerSession(bind=conn, join_transaction_mode="rollback_only") as s:
            s.execute(insert)
            s.commit()

    def empty(conn: sa.Connection) -> None:
        with HandlerSession(bind=conn, join_transaction_mode="rollback_only") as s:
            s.commit()

    shapes: dict[str, Callable[[sa.Connection], None]] = {
        "Core conn.execute (hand-written)": core,
        "handler session: execute + commit()": session,
        "handler session alone (no statement)": empty,
    }
    times: dict[str, list[float]] = {name: [] for name in shapes}
    for _ in range(3):
        for name, shape in shapes.items():
            with engine.connect() as conn, conn.begin():
                for _ in range(200):
                    shape(conn)
                started = time.perf_counter()
                for _ in range(n):
                    shape(conn)
                times[name].append((time.perf_counter() - started) / n * 1e6)
    print("  per message, one connection, one transaction (µs, median of 3 rounds):")
    for name, got in times.items():
        print(f"    {name:38} {statistics.median(got):6.0f}")


def bench_consumer_latency(broker: Broker, rate: int = 50, seconds: float = 6.0) -> None:
    """What batching adds to a message's latency when traffic is light: from the produce call
    to the handler, at ``rate`` messages/s, one partition."""
    from outbox.consumer import Consumer, ConsumerConfig, message_id_key

    def one(**options: Any) -> list[float]:
        topic = broker.create_topic(partitions=1)
        group = f"bench-{uuid.uuid4().hex[:8]}"
        settings = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
        seen: list[float] = []

        def handler(session: Session, message: Any) -> None:
            seen.append(time.time() - float(message.value))

        from outbox.transport.kafka import KafkaSource

        consumer = Consumer(
            ConsumerConfig(db_url=DB_URL, name=group, **options),
            handler,
            lambda: KafkaSource(broker.bootstrap, group, [topic], settings),
            key=message_id_key,
        )
        runner = threading.Thread(target=consumer.run, daemon=True)
        runner.start()
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
        producer.produce(topic, value=b"0", headers=[("message-id", b"warm-up")])
        producer.flush(10)
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:  # joined and serving
            time.sleep(0.05)
        seen.clear()
        for _ in range(int(rate * seconds)):
            producer.produce(
                topic,
                value=repr(time.time()).encode(),
                headers=[("message-id", uuid.uuid4().bytes.hex().encode())],
            )
            producer.poll(0)
            time.sleep(1 / rate)
        producer.flush(10)
        time.sleep(1.0)
        consumer.stop()
        runner.join(30)
        return sorted(seen)

    print(f"\n== consumer latency at {rate} messages/s, produce call to handler (ms)")
    for label, options in (
        ("--batch-size 1                    ", {"batch_size": 1}),
        ("default (500, --batch-max-wait 0)  ", {}),
        ("--batch-max-wait 0.01              ", {"batch_max_wait": 0.01}),
    ):
        lat = one(**options)
        q = statistics.quantiles(lat, n=100)
        print(
            f"  {label} p50 {q[49] * 1000:6.1f}   p99 {q[98] * 1000:6.1f}   ({len(lat)} messages)"
        )


# -- the cost of NOTIFY for concurrent writers -------------------------------------------------


def bench_notify(engine: sa.Engine, seconds: float = 1.0, rounds: int = 8) -> None:
    """Issue 11 point 2: what waking the relay costs writers. The publish statement (one order
    row and one event per transaction) from 1, 4, 16 and 64 writer threads, in three forms:
    as shipped with a relay of this version leading and awake (this session holds its leading
    lock: writers take the dozing lock shared and do not notify), with the wake-up removed
    (the baseline), and notifying at every commit (what writers did before, and still do
    for an older relay)."""
    tables = define_tables()
    shipped = statements.to_driver_sql(statements.insert_message(tables))
    wake = statements.wake_if_asleep(tables)
    assert wake in shipped
    variants = {
        "shipped": shipped,
        "no wake-up": shipped.replace(wake, "NULL"),
        "always notify": shipped.replace(wake, f"pg_notify('{tables.channel}', '')"),
    }
    with engine.begin() as c:
        c.execute(
            sa.text(
                "CREATE TABLE IF NOT EXISTS bench_orders (id bigserial PRIMARY KEY, "
                "customer text NOT NULL, amount numeric(12,2) NOT NULL, body jsonb NOT NULL)"
            )
        )
    conninfo = f"host={HOST} port={PORT or 5432} user=postgres dbname=outbox_bench"

    def rate(sql: str, threads: int) -> float:
        stop = time.monotonic() + seconds
        done = [0] * threads
        ready = threading.Barrier(threads + 1)

        def writer(i: int) -> None:
            with psycopg.connect(conninfo) as conn:
                conn.execute("SELECT 1")
                conn.commit()
                ready.wait()
                n = 0
                while time.monotonic() < stop:
                    p = payload(n)
                    msg = encode(Message("orders", p, key=f"k{i}-{n % 10}"))
                    _, params = statements.insert(tables, [msg])
                    conn.execute(
                        "INSERT INTO bench_orders (customer, amount, body) VALUES (%s, %s, %s)",
                        (f"c{i}", n % 997, json.dumps(p)),
                    )
                    conn.execute(sql, params)
                    conn.commit()
                    n += 1
                done[i] = n

        workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        ready.wait()
        stop = time.monotonic() + seconds
        for w in workers:
            w.join()
        return sum(done) / seconds

    print(
        "\n== waking the relay: writer transactions/s (one order + one event), a relay of "
        "this version leading and awake"
    )
    with psycopg.connect(conninfo, autocommit=True) as relay:
        relay.execute("SELECT pg_advisory_lock(%s)", (tables.leading_lock_id,))
        for threads in (1, 4, 16, 64):
            got: dict[str, list[float]] = {name: [] for name in variants}
            # Many short interleaved rounds, medians: the disk's commit time drifts by more
            # than the differences measured.
            for _ in range(rounds):
                for name, sql in variants.items():
                    got[name].append(rate(sql, threads))
            best = {name: statistics.median(v) for name, v in got.items()}
            base = best["no wake-up"]
            print(
                f"  {threads:2} writers: shipped {best['shipped']:7,.0f}  no wake-up "
                f"{base:7,.0f}  always notify {best['always notify']:7,.0f}   "
                f"shipped/no wake-up {best['shipped'] / base:.2f} (target >= 0.97), "
                f"always notify/no wake-up {best['always notify'] / base:.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "which", nargs="*", default=["throughput", "latency", "write", "idle", "claim", "consumer"]
    )
    parser.add_argument("-X", action="append", default=[], help="producer setting NAME=VALUE")
    args = parser.parse_args()
    extra = dict(x.split("=", 1) for x in args.X)
    random.seed(1)
    fresh_db()
    engine = sa.create_engine(DB_URL)
    external = os.environ.get("OUTBOX_BENCH_KAFKA")
    broker = Broker(bootstrap=external) if external else Broker()
    broker.start()
    print(
        f"PostgreSQL {PG}, broker {'external ' + external if external else 'Tansu (local)'}, "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} cores"
    )
    try:
        for name in args.which:
            if name == "throughput":
                bench_throughput(broker, engine, extra)
            elif name == "latency":
                bench_latency(broker, extra)
            elif name == "write":
                bench_write(engine)
            elif name == "idle":
                bench_idle(broker)
            elif name == "claim":
                bench_claim(engine)
            elif name == "consumer":
                bench_consumer(broker, engine)
            elif name == "consumer-latency":
                bench_consumer_latency(broker)
            elif name == "notify":
                bench_notify(engine)
            elif name == "metrics":
                bench_metrics(broker, engine, extra)
            else:
                parser.error(f"unknown benchmark {name}")
    finally:
        broker.stop()
        engine.dispose()


if __name__ == "__main__":
    main()
