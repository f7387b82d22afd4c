"""PgBouncer (Debian's, 1.18) between the library and the shared PostgreSQL.

Writers (``Outbox.publish``, both modes, through a SQLAlchemy engine) and ``outbox consume``
work through a pool in transaction mode: everything they do is one transaction at a time. The
relay does not: its LISTEN and its leader lock belong to its session, which such a pool hands
to other clients between transactions. The relay finds that out when it connects (its session
moves to another backend between two statements, or a second, short connection lands on its
session's backend: ``outbox.leader.check_own_session``) and exits 2 with one line, in
transaction and statement mode, with 1 to 10 idle server connections handed out in either
order. In a session-mode pool it runs, a leader and a standby.

Two things users of PgBouncer 1.18 must know, both shown here: it refuses the ``options``
startup parameter (the relay sends it) unless ``ignore_startup_parameters = options``; and in
transaction mode psycopg's automatic prepared statements break (a statement prepared on one
server connection is executed on another: ``prepared statement "_pg3_0" does not exist``), so
writers' engines need ``connect_args={"prepare_threshold": None}`` (PgBouncer 1.21 and later
can keep them, with ``max_prepared_statements``). ``outbox consume`` needs neither setting: it
prepares nothing and sets its time limit per transaction, with its inbox claim.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import ConfigurationError, Outbox, RelayConfig
from outbox.config import relay_conninfo
from outbox.consumer import Consumer, ConsumerConfig
from outbox.leader import SESSION_NEEDED, LeaderSession
from outbox.schema import define_tables
from outbox.transport.memory import MemorySource
from tests.conftest import PG_HOST, PG_PORT, PG_USER
from tests.support.broker import Broker
from tests.support.cli import run_cli
from tests.support.consumerproc import ConsumerProcess
from tests.support.delivery import LEADER, STANDBY, RelayFactory, wait_drained
from tests.support.events import event
from tests.support.handlers import create_effects_table, hang_in_database
from tests.support.incoming import message
from tests.support.pgbouncer import PgBouncer, unavailable
from tests.support.waits import wait_until

#: What a writer's engine needs in front of a transaction pool of PgBouncer < 1.21.
NO_PREPARE: dict[str, Any] = {"prepare_threshold": None}

PoolFactory = Callable[..., PgBouncer]

JOINED = event("consumer.joined")
UNPREPARED_RETRY = event("consumer.retry", r"error=.*prepared statement \S+ does not exist")


@pytest.fixture
def pools(db_url: str) -> Iterator[PoolFactory]:
    """Start PgBouncers (``PgBouncer`` arguments after the mode) in front of the shared server;
    stopped at teardown, before the test's database is dropped (this fixture needs it)."""
    reason = unavailable()
    if reason:
        pytest.skip(f"PgBouncer: {reason}")
    started: list[PgBouncer] = []

    def start(pool_mode: str, **kwargs: Any) -> PgBouncer:
        pool = PgBouncer(pool_mode, (PG_HOST, int(PG_PORT)), PG_USER, **kwargs)
        started.append(pool)
        return pool.start()

    yield start
    for pool in started:
        pool.stop()


def dbname(url: str) -> str:
    return sa.make_url(url).database or ""


def admin(pool: PgBouncer, command: str) -> list[dict[str, Any]]:
    """A ``SHOW`` command on the pool's admin console, as dicts."""
    with psycopg.connect(
        f"host=127.0.0.1 port={pool.port} dbname=pgbouncer user={PG_USER}", autocommit=True
    ) as conn:
        cur = conn.execute(command)
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


# -- writers and the consumer through a transaction pool ----------------------------------------


@pytest.mark.slow
def test_writers_and_the_consumer_through_a_transaction_pool(
    pools: PoolFactory,
    db_url: str,
    engine: sa.Engine,
    broker: Broker,
    relays: RelayFactory,
    consumers: list[ConsumerProcess],
) -> None:
    """Four writer threads (two of them ``at_commit=True``) and ``outbox consume`` share one
    transaction pool of 3 server connections, so each transaction may get any of them; the
    relay connects to PostgreSQL directly. Every message's effect happens exactly once."""
    # A pool as PgBouncer comes: it refuses the options startup parameter.
    pool = pools("transaction", ignore_options=False, settings={"default_pool_size": "3"})
    create_effects_table(engine)
    topic = broker.create_topic(partitions=3)
    pooled = sa.create_engine(pool.url(dbname(db_url)), pool_size=4, connect_args=NO_PREPARE)
    relays(db_url, broker.bootstrap)
    consumer = ConsumerProcess(
        [
            *("--db-url", pool.url(dbname(db_url))),
            *("--bootstrap-servers", broker.bootstrap),
            *("--group", f"g-{uuid.uuid4().hex[:8]}"),
            *("--topic", topic),
            *("--handler", "tests.support.handlers:record_effect"),
            *("-X", "session.timeout.ms=6000"),
            *("-X", "heartbeat.interval.ms=1000"),
        ]
    ).start()
    consumers.append(consumer)
    consumer.wait_for(JOINED, timeout=30)

    # The writers go on while the consumer works, so they share the server connections.
    threads, transactions, per = 4, 100, 3
    errors: list[BaseException] = []

    def write(index: int) -> None:
        outbox = Outbox(at_commit=index % 2 == 1)
        try:
            for t in range(transactions):
                with Session(pooled) as session, session.begin():
                    for m in range(per):
                        n = (index * transactions + t) * per + m
                        # Keys of its own: writers of one key would wait for each other.
                        outbox.publish(session, topic, {"n": n}, key=f"w{index}-{n % 5}")
                time.sleep(0.01)
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(i,)) for i in range(threads)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    pooled.dispose()
    assert not errors, errors[0]
    total = threads * transactions * per

    wait_until(lambda: effects(engine)[0] >= total, 90, "every effect", processes=[consumer])
    wait_drained(engine)
    rows, distinct, numbers = effects(engine)
    assert (rows, distinct, numbers) == (total, total, total)

    # It all went through the pool: many more transactions than server connections.
    stats = {s["database"]: s for s in admin(pool, "SHOW STATS")}[dbname(db_url)]
    servers = [s for s in admin(pool, "SHOW SERVERS") if s["database"] == dbname(db_url)]
    print(f"pool: {stats['total_xact_count']} transactions on {len(servers)} server connections")
    # (The writers' transactions, and the consumer's: one per batch, not per message.)
    assert stats["total_xact_count"] >= threads * transactions + 1
    assert 0 < len(servers) <= 3

    # outbox consume prepares nothing: no attempt failed on a server connection where a
    # statement had not been prepared.
    assert consumer.count(UNPREPARED_RETRY) == 0
    assert consumer.count(event("consumer.retry")) == 0


@pytest.mark.slow
def test_the_consumers_time_limit_holds_through_a_transaction_pool(
    pools: PoolFactory, db_url: str
) -> None:
    """The limit is set with each inbox claim (``SET LOCAL``), not at connect: a handler
    stuck in the database is cancelled through a pool that drops or refuses the connect-time
    options, and its message is dead-lettered after its attempts."""
    pool = pools("transaction", ignore_options=False, settings={"default_pool_size": "2"})
    config = ConsumerConfig(
        db_url=pool.url(dbname(db_url)),
        name="payments",
        handler_timeout=0.5,
        max_attempts=2,
        retry_backoff_base=0.01,
    )
    source = MemorySource([message(0)])
    started = time.monotonic()
    stats = Consumer(config, hang_in_database, lambda: source).run(idle_timeout=0.5)
    assert (stats.failed_attempts, stats.dead_lettered) == (2, 1)
    assert time.monotonic() - started < 30  # not an hour of pg_sleep
    assert source.committed == {("orders", 0): 1}


def effects(engine: sa.Engine) -> tuple[int, int, int]:
    """Rows of ``effects``, distinct message ids, distinct message numbers."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT count(*), count(DISTINCT message_id), count(DISTINCT n) FROM effects")
        ).one()
    return int(row[0]), int(row[1]), int(row[2])


@pytest.fixture
def consumers() -> Iterator[list[ConsumerProcess]]:
    started: list[ConsumerProcess] = []
    yield started
    for proc in started:
        proc.stop(timeout=10)


@pytest.mark.slow
def test_prepared_statements_break_in_a_transaction_pool_without_prepare_threshold_none(
    pools: PoolFactory, db_url: str
) -> None:
    """Why the writers above pass ``prepare_threshold=None``: psycopg prepares a statement run
    five times on a connection, on whichever server connection ran it then. Two clients
    alternating on one server connection make the sixth run land where it was not prepared."""
    pool = pools("transaction")
    url = pool.url(dbname(db_url)).replace("+psycopg", "")
    with psycopg.connect(url, autocommit=True) as a, psycopg.connect(url) as hold:
        for _ in range(10):  # one server connection for all (the pool is quiet): prepared
            a.execute("SELECT count(*) FROM outbox_messages")
        hold.execute("SELECT 1")  # holds that server connection in a transaction...
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            a.execute("SELECT count(*) FROM outbox_messages")  # ...so a gets another one


# -- the relay ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pool_mode", "settings"),
    [
        ("transaction", {}),
        ("transaction", {"server_round_robin": "1"}),
        ("statement", {}),
    ],
    ids=["transaction", "transaction-round-robin", "statement"],
)
def test_the_relay_refuses_a_transaction_or_statement_pool(
    pools: PoolFactory, db_url: str, pool_mode: str, settings: dict[str, str]
) -> None:
    pool = pools(pool_mode, settings=settings)
    result = run_cli(
        "outbox-relay",
        ["--db-url", pool.url(dbname(db_url)), "--bootstrap-servers", "127.0.0.1:9"],
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: {SESSION_NEEDED}\n"
    assert result.stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize("idle_servers", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("round_robin", [False, True], ids=["lifo", "fifo"])
def test_the_check_sees_a_transaction_pool_whatever_its_idle_servers(
    pools: PoolFactory, db_url: str, idle_servers: int, round_robin: bool
) -> None:
    """However many idle server connections the pool holds, and in either order it hands them
    out (most recently used first, PgBouncer's default, or oldest first), the check finds the
    pool out within its two rounds."""
    settings = {"server_round_robin": "1" if round_robin else "0"}
    pool = pools("transaction", settings=settings)
    url = pool.url(dbname(db_url))
    warm = [psycopg.connect(url.replace("+psycopg", "")) for _ in range(idle_servers)]
    for c in warm:
        c.execute("SELECT 1")  # each holds a server connection in a transaction...
    for c in warm:
        c.commit()  # ...and gives it back: idle_servers idle server connections
        c.close()
    servers = [s for s in admin(pool, "SHOW SERVERS") if s["database"] == dbname(db_url)]
    assert len(servers) == idle_servers
    session = LeaderSession(
        relay_conninfo(RelayConfig(db_url=url)), define_tables(), retain_sent=False
    )
    with pytest.raises(ConfigurationError, match="needs a session connection"):
        session.connect()


@pytest.mark.slow
def test_a_pool_that_refuses_the_relays_options_is_a_configuration_error(
    pools: PoolFactory, db_url: str
) -> None:
    """PgBouncer's default: no ``options`` startup parameter. Not an outage to wait out."""
    pool = pools("session", ignore_options=False)
    result = run_cli(
        "outbox-relay",
        ["--db-url", pool.url(dbname(db_url)), "--bootstrap-servers", "127.0.0.1:9"],
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "error: a connection pool refused the relay's session options (unsupported startup "
        f"parameter: options): {SESSION_NEEDED}; with PgBouncer in session mode, add options "
        "to ignore_startup_parameters\n"
    )


@pytest.mark.slow
def test_the_relay_runs_through_a_session_pool_a_leader_and_a_standby(
    pools: PoolFactory, db_url: str, engine: sa.Engine, broker: Broker, relays: RelayFactory
) -> None:
    pool = pools("session")
    url = pool.url(dbname(db_url))
    topic = broker.create_topic(partitions=1)
    leader = relays(url, broker.bootstrap)
    leader.wait_for(LEADER, timeout=30)
    standby = relays(url, broker.bootstrap, name="standby")
    standby.wait_for(STANDBY, timeout=30)

    with Session(engine) as session, session.begin():
        for n in range(20):
            Outbox().publish(session, topic, {"n": n}, key="k")
    wait_drained(engine, timeout=30)
    got = broker.read_all(topic, expect=20)
    assert [json.loads(m.value or b"null")["n"] for m in got] == list(range(20))
    assert leader.running and standby.running


def test_a_direct_connection_passes_the_check(db_url: str) -> None:
    """No pool: the check's second connection never shares the session's backend."""
    session = LeaderSession(
        relay_conninfo(RelayConfig(db_url=db_url)), define_tables(), retain_sent=False
    )
    session.connect().close()
