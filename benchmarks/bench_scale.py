"""Writers at scale, end to end (issue 11 point 3), measured side by side in one run.

``writers``: N writer processes (1, 4, 16), each running transactions of one order row and
(with the outbox) one event, for a few seconds, with ``outbox-relay`` and ``outbox consume``
running; prints writer transactions/s with vs without the outbox, with a plain second row
instead of the event (the floor of any transactional outbox: a row of the outbox row's shape,
same indexes), and the relay's largest backlog seen (sampled every 0.1 s).

``e2e``: commit-to-consumer-effect latency at 500 events/s (a paced writer process, the relay
and ``outbox consume`` running), p50/p99, once with a per-message handler and once with a
batch handler, each split where the consumer got the message from librdkafka; against a
bare producer -> consumer pair at the same rate with the same consumer settings (the
control: what this broker and librdkafka's fetch settings cost by themselves).

    .venv/bin/python benchmarks/bench_scale.py writers e2e [-C fetch.wait.max.ms=10]

``-C NAME=VALUE``: a consumer setting for both the consumer and the control.
``SCALE_AT_COMMIT=1``: writers use ``Outbox(at_commit=True)``; ``SCALE_CONSUMER_ARGS``:
more ``outbox consume`` options (e.g. ``--batch-max-wait 0``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
import sqlalchemy as sa
from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import Producer
from sqlalchemy.orm import Session

from benchmarks.bench import DB_URL, HOST, KEYS, PARTITIONS, PORT, fresh_db, payload
from outbox import Outbox, define_tables
from outbox.transport.base import IncomingMessage
from outbox.transport.kafka import CONSUMER_DEFAULTS, KafkaSource
from tests.support.broker import Broker

GROUP_SETTINGS = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
ORDERS = (
    "CREATE TABLE IF NOT EXISTS scale_orders (id bigserial PRIMARY KEY, customer text NOT NULL, "
    "body jsonb NOT NULL)"
)
EVENTS_TABLE = (
    "CREATE TABLE IF NOT EXISTS scale_events (id bigint GENERATED ALWAYS AS IDENTITY "
    "PRIMARY KEY, message_id uuid NOT NULL UNIQUE, topic text NOT NULL, key bytea, "
    "payload bytea, created_at timestamptz NOT NULL DEFAULT now())"
)
EVENTS_INDEX = "CREATE INDEX IF NOT EXISTS ix_scale_events ON scale_events (id)"
EFFECTS = (
    "CREATE TABLE IF NOT EXISTS scale_effects (message_id text NOT NULL, created float8, "
    # When the consumer got the message from librdkafka (SCALE_NOTE_POLLED), and the effect's
    # transaction: its effects become visible together, at about its last one's time.
    "polled float8, xid bigint DEFAULT txid_current(), "
    "effected float8 DEFAULT extract(epoch FROM clock_timestamp()))"
)


#: What each writer adds to its order row: nothing, an event through the outbox, or (the
#: floor of any transactional outbox) a plain row of the outbox row's shape in a table with
#: the same three indexes.
WITHOUT, OUTBOX, PLAIN_ROW = "without", "outbox", "plain row"


def _writer(mode: str, topic: str, ready: Any, seconds: float, out: Any) -> None:
    """One writer process: connected and warmed up, it waits for every other writer at the
    barrier, then runs as many transactions as it can for ``seconds``."""
    engine = sa.create_engine(DB_URL, pool_size=1)
    outbox = Outbox(at_commit=os.environ.get("SCALE_AT_COMMIT") == "1")
    insert = sa.text("INSERT INTO scale_orders (customer, body) VALUES (:c, CAST(:b AS jsonb))")
    row = sa.text(
        "INSERT INTO scale_events (message_id, topic, key, payload) VALUES (:m, :t, :k, :p)"
    )
    with engine.connect() as c:
        c.execute(sa.text("SELECT 1"))
    done = 0
    i = 0
    ready.wait()
    end = time.time() + seconds
    while time.time() < end:
        body = payload(i)
        with Session(engine) as s, s.begin():
            s.execute(insert, {"c": body["customer"], "b": json.dumps(body)})
            if mode == OUTBOX:
                # Keyed by the order, as an order's events are: writers do not share keys
                # (same-key writers wait for each other by design; see docs/design.md).
                outbox.publish(s, topic, body, key=f"order-{uuid.uuid4()}")
            elif mode == PLAIN_ROW:
                key = f"order-{uuid.uuid4()}".encode()
                s.execute(
                    row, {"m": uuid.uuid4(), "t": topic, "k": key, "p": json.dumps(body).encode()}
                )
        done += 1
        i += 1
    engine.dispose()
    out.put(done)


_POLLED: dict[tuple[int, int], float] = {}

if os.environ.get("SCALE_NOTE_POLLED") == "1":  # in the outbox consume process only
    from outbox.transport import kafka as _kafka

    _consume = _kafka.KafkaSource._consume

    def _noting(self: Any, max_messages: int, timeout: float) -> list[Any]:
        raw = _consume(self, max_messages, timeout)
        now = time.time()
        for m in raw:
            _POLLED[(m.partition(), m.offset())] = now
        return raw

    _kafka.KafkaSource._consume = _noting  # type: ignore[method-assign]

_EFFECT = sa.text("INSERT INTO scale_effects (message_id, created, polled) VALUES (:m, :c, :p)")


def _effect_row(message: IncomingMessage) -> dict[str, Any]:
    return {
        "m": (message.header("message-id") or b"").decode(),
        "c": json.loads(message.value or b"{}").get("created"),
        "p": _POLLED.pop((message.partition, message.offset), None),
    }


def _effect(session: Session, message: IncomingMessage) -> None:
    session.execute(_EFFECT, _effect_row(message))


def _effects(session: Session, messages: list[IncomingMessage]) -> None:
    session.execute(_EFFECT, [_effect_row(m) for m in messages])


class _Running:
    """``outbox-relay`` and ``outbox consume`` (handler :func:`_effect`) as deployed: two
    processes of their own, not threads of this one (they would share its GIL)."""

    def __init__(
        self,
        broker: Broker,
        topic: str,
        consumer_settings: dict[str, str],
        batch_handler: bool = False,
    ) -> None:
        root = str(Path(__file__).resolve().parents[1])
        bin_dir = Path(sys.executable).parent
        group = f"scale-{uuid.uuid4().hex[:8]}"
        settings = {**GROUP_SETTINGS, **consumer_settings}
        common = ["--db-url", DB_URL, "--bootstrap-servers", broker.bootstrap]
        self.commands = [
            [str(bin_dir / "outbox-relay"), *common, "--log-level", "warning"],
            [
                str(bin_dir / "outbox"),
                "consume",
                *common,
                "--group",
                group,
                "--topic",
                topic,
                *(
                    ("--batch-handler", "benchmarks.bench_scale:_effects")
                    if batch_handler
                    else ("--handler", "benchmarks.bench_scale:_effect")
                ),
                "--app-dir",
                root,
                "--log-level",
                "warning",
                *(arg for k, v in settings.items() for arg in ("-X", f"{k}={v}")),
                *os.environ.get("SCALE_CONSUMER_ARGS", "").split(),
            ],
        ]
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> _Running:
        relay, consumer = self.commands
        self.procs = [
            subprocess.Popen(relay),
            subprocess.Popen(consumer, env={**os.environ, "SCALE_NOTE_POLLED": "1"}),
        ]
        engine = sa.create_engine(DB_URL)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not _relay_leads(engine):
                time.sleep(0.05)
        finally:
            engine.dispose()
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(30)


def _relay_leads(engine: sa.Engine) -> bool:
    with engine.connect() as c:
        return bool(
            c.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                    "WHERE a.application_name = 'outbox-relay' AND l.locktype = 'advisory'"
                )
            ).scalar()
        )


def _backlog(engine: sa.Engine) -> int:
    with engine.connect() as c:
        return int(
            c.execute(
                sa.text("SELECT count(*) FROM outbox_messages WHERE status IN ('pending','retry')")
            ).scalar()
            or 0
        )


def _machine_busy() -> tuple[int, int]:
    """Busy and total jiffies of the whole machine, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # less idle and iowait


def _round(
    n: int, mode: str, topic: str, seconds: float, engine: sa.Engine
) -> tuple[float, int, float]:
    """``n`` writer processes for ``seconds``: transactions/s, the largest backlog seen, and
    the machine's CPU per transaction (ms; every process, the relay's and consumer's too)."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    ready = ctx.Barrier(n + 1)  # every writer imported and connected
    procs = [ctx.Process(target=_writer, args=(mode, topic, ready, seconds, q)) for _ in range(n)]
    for p in procs:
        p.start()
    ready.wait()
    busy0, _ = _machine_busy()
    start_at = time.time()
    most = 0
    if mode == OUTBOX:
        while time.time() < start_at + seconds:
            most = max(most, _backlog(engine))
            time.sleep(0.1)
    total = sum(q.get(timeout=seconds + 60) for _ in procs)
    busy = (_machine_busy()[0] - busy0) / os.sysconf("SC_CLK_TCK")
    for p in procs:
        p.join()
    return total / seconds, most, busy / max(total, 1) * 1000


def bench_writers(broker: Broker, engine: sa.Engine, settings: dict[str, str]) -> None:
    """Writer transactions/s with vs without the outbox, the relay and the consumer running
    (the target); with a plain second row instead (the floor: what writing any row in the
    transaction costs); and, for where the cost lies, with the outbox but nothing running
    (the writers' own cost: the publish, its insert; rows pile up unsent; a session holds the
    leading lock as a running relay does, so that writers do not notify)."""
    topic = broker.create_topic(partitions=PARTITIONS)
    seconds = 5.0
    sizes = (1, 4, 16)
    alone: dict[int, float] = {}
    tables = define_tables()
    with psycopg.connect(f"host={HOST} port={PORT or 5432} user=postgres dbname=outbox_bench") as c:
        c.execute("SELECT pg_advisory_lock(%s)", (tables.leading_lock_id,))
        for n in sizes:
            alone[n] = max(_round(n, OUTBOX, topic, seconds, engine)[0] for _ in range(2))
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM outbox_messages"))
    mode = "Outbox(at_commit=True)" if os.environ.get("SCALE_AT_COMMIT") == "1" else "Outbox()"
    print(
        f"\n== writers at scale: transactions of one order row (+ one event, {mode}), "
        f"{seconds:.0f} s each, relay and consumer running"
    )
    with _Running(broker, topic, settings):
        for n in sizes:
            rates: dict[str, float] = {}
            cpu: dict[str, float] = {}
            most = 0
            for m in (WITHOUT, OUTBOX, PLAIN_ROW) * 2:  # interleaved: two rounds
                rate, backlog, ms = _round(n, m, topic, seconds, engine)
                most = max(most, backlog)
                if rate > rates.get(m, 0.0):
                    rates[m], cpu[m] = rate, ms
            base = rates[WITHOUT]
            print(
                f"  {n:2} writers: {base:>6,.0f} tx/s without, {rates[OUTBOX]:>6,.0f} with "
                f"the outbox: ratio {rates[OUTBOX] / base:.2f} (target >= 0.85 at 16); "
                f"a plain second row {rates[PLAIN_ROW] / base:.2f}; "
                f"largest backlog {most} (a batch is 1000); nothing running: "
                f"{alone[n]:,.0f} ({alone[n] / base:.2f}); machine CPU per transaction "
                f"{cpu[WITHOUT]:.2f} / {cpu[OUTBOX]:.2f} / {cpu[PLAIN_ROW]:.2f} ms"
            )


def _paced(topic: str, rate: int, seconds: float) -> None:
    """A writer process: one order and one event per transaction at ``rate``/s; each event
    carries its commit-side timestamp (wall clock: the consumer runs in another process)."""
    engine = sa.create_engine(DB_URL, pool_size=1)
    outbox = Outbox()
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        with Session(engine) as s, s.begin():
            outbox.publish(s, topic, {"i": i, "created": time.time()}, key=f"key-{i % KEYS}")
    engine.dispose()


def _percentiles(values: list[float]) -> tuple[float, float]:
    values.sort()
    return values[len(values) // 2], values[min(len(values) - 1, int(0.99 * len(values)))]


def bench_e2e(
    broker: Broker,
    engine: sa.Engine,
    settings: dict[str, str],
    rate: int = 500,
    seconds: float = 10.0,
) -> None:
    """End to end with each handler shape, then the control."""
    got = {batch: _e2e(broker, engine, settings, rate, seconds, batch) for batch in (False, True)}
    control = _control(broker, settings, rate, seconds)
    c50, c99 = _percentiles(control)
    print(
        f"\n== commit-to-consumer-effect latency at {rate}/s for {seconds:.0f} s, consumer "
        f"settings {settings or 'defaults'}"
    )
    for batch, (lat, polled, inside, transactions) in got.items():
        p50, p99 = _percentiles(lat)
        shape = "batch handler" if batch else "per-message handler"
        print(
            f"  end to end, {shape:19} p50 {p50:5.1f} ms  p99 {p99:5.1f} ms   "
            f"p99 - control p99: {p99 - c99:+.1f} ms (target <= +25 ms)"
        )
        print(
            "      of which commit -> polled by the consumer p50 {:.1f} p99 {:.1f}, "
            "polled -> effect committed p50 {:.1f} p99 {:.1f}".format(
                *_percentiles(polled), *_percentiles(inside)
            )
        )
        # What batching saves the database: a transaction (and a commit) per this many.
        print(
            f"      consumer transactions {transactions} for {len(lat)} messages "
            f"({len(lat) / max(transactions, 1):.1f} per transaction)"
        )
    print(f"  control (bare producer -> consumer):     p50 {c50:5.1f} ms  p99 {c99:5.1f} ms")


def _e2e(
    broker: Broker,
    engine: sa.Engine,
    settings: dict[str, str],
    rate: int,
    seconds: float,
    batch_handler: bool,
) -> tuple[list[float], list[float], list[float], int]:
    topic = broker.create_topic(partitions=PARTITIONS)
    with engine.begin() as c:
        c.execute(sa.text("TRUNCATE scale_effects"))
    with _Running(broker, topic, settings, batch_handler):
        time.sleep(3)  # the consumer joins
        writer = multiprocessing.get_context("spawn").Process(
            target=_paced, args=(topic, rate, seconds)
        )
        writer.start()
        writer.join()
        expected = int(rate * seconds)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with engine.connect() as c:
                got = int(c.execute(sa.text("SELECT count(*) FROM scale_effects")).scalar() or 0)
            if got >= expected:
                break
            time.sleep(0.2)
    return _effect_latencies(engine)


def _effect_latencies(engine: sa.Engine) -> tuple[list[float], list[float], list[float], int]:
    """Per effect, in ms: from when the writer created the event (just before its
    transaction committed) to when the effect's transaction committed (its last effect's
    time: the commit follows within about a millisecond); and that split at the moment the
    consumer got the message from librdkafka. Then how many transactions the consumer ran."""
    with engine.connect() as c:
        rows = c.execute(
            sa.text(
                "SELECT created, polled, max(effected) OVER (PARTITION BY xid), xid "
                "FROM scale_effects WHERE created IS NOT NULL"
            )
        ).all()
    total = [(done - created) * 1000 for created, _, done, _ in rows]
    polled = [(p - created) * 1000 for created, p, _, _ in rows if p is not None]
    inside = [(done - p) * 1000 for _, p, done, _ in rows if p is not None]
    return total, polled, inside, len({xid for *_, xid in rows})


def _control(broker: Broker, settings: dict[str, str], rate: int, seconds: float) -> list[float]:
    topic = broker.create_topic(partitions=PARTITIONS)
    consumer = KafkaConsumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": f"control-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            **GROUP_SETTINGS,
            # The same fetch wait as outbox consume's default: the control is the same
            # consumer without the outbox.
            "fetch.wait.max.ms": CONSUMER_DEFAULTS["fetch.wait.max.ms"],
            **settings,
        }
    )
    consumer.subscribe([topic])
    while not consumer.assignment():
        consumer.poll(0.1)
    producer = Producer(
        {"bootstrap.servers": broker.bootstrap, "linger.ms": "5", "enable.idempotence": True}
    )
    lat: list[float] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            m = consumer.poll(0.1)
            if m is not None and m.error() is None:
                created = json.loads(m.value() or b"{}").get("created")
                if created is not None:  # not a warm-up message
                    lat.append((time.time() - created) * 1000)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # Warm up as the relay's producer is (connected, metadata, producer id): otherwise the
    # first messages' connection set-up is the control's p99.
    for i in range(KEYS):
        producer.produce(topic, b"{}", f"key-{i}")
    producer.flush(30)
    time.sleep(1)
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        producer.produce(
            topic, json.dumps({"i": i, "created": time.time()}).encode(), f"key-{i % KEYS}"
        )
        producer.poll(0)
    producer.flush(30)
    deadline = time.monotonic() + 30
    while len(lat) < int(rate * seconds) and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    reader.join(5)
    consumer.close()
    return lat


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_fetch(broker: Broker, engine: sa.Engine, seconds: float = 10.0) -> None:
    """The consumer's fetch wait, on purpose: for each ``fetch.wait.max.ms``, the broker's
    CPU while one idle consumer (8 partitions) polls it, and the end-to-end latency at
    500/s against the bare control with the same setting."""
    assert broker.proc is not None
    print("\n== fetch.wait.max.ms: idle broker cost vs latency")
    for wait in ("500", "100", "25", "10"):
        settings = {"fetch.wait.max.ms": wait}
        topic = broker.create_topic(partitions=PARTITIONS)
        source = KafkaSource(
            broker.bootstrap,
            f"idle-{uuid.uuid4().hex[:8]}",
            [topic],
            {**GROUP_SETTINGS, **settings},
        )
        try:
            joined = time.monotonic() + 30
            while not source.assignments and time.monotonic() < joined:
                source.poll(0.1)
            before = _cpu_seconds(broker.proc.pid)
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                source.poll(0.5)
            idle = (_cpu_seconds(broker.proc.pid) - before) / seconds * 100
        finally:
            source.close()
        print(
            f"  fetch.wait.max.ms={wait:>3}: idle consumer costs the broker {idle:4.1f} % of a core"
        )
        bench_e2e(broker, engine, settings)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("which", nargs="*", default=["writers", "e2e"])
    parser.add_argument("-C", action="append", default=[], help="consumer setting NAME=VALUE")
    args = parser.parse_args()
    settings = dict(x.split("=", 1) for x in args.C)
    fresh_db()
    engine = sa.create_engine(DB_URL)
    with engine.begin() as c:
        c.execute(sa.text(ORDERS))
        c.execute(sa.text(EVENTS_TABLE))
        c.execute(sa.text(EVENTS_INDEX))
        c.execute(sa.text(EFFECTS))
    broker = Broker()
    broker.start()
    try:
        for name in args.which:
            if name == "writers":
                bench_writers(broker, engine, settings)
            elif name == "e2e":
                bench_e2e(broker, engine, settings)
            elif name == "fetch":
                bench_fetch(broker, engine)
            else:
                parser.error(f"unknown benchmark {name}")
    finally:
        broker.stop()
        engine.dispose()


if __name__ == "__main__":
    main()
