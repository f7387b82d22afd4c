"""Failover: the primary dies, its streaming replica is promoted, and the relay -- started
with a multi-host URL -- follows on its own. Nothing committed is lost; per-key order holds.

The URL form: SQLAlchemy's ``make_url`` and ``parse_db_url`` accept both
``postgresql+psycopg://USER@/DB?host=H1:P1&host=H2:P2&target_session_attrs=read-write``
(``host`` repeated, each with its port) and ``...?host=H1,H2&port=P1,P2&...`` (libpq's lists);
the relay's connection string turns either into libpq's ``host=H1,H2 port=P1,P2``
(``relay_conninfo``; it used to drop the repeated form and connect to the default host).
``target_session_attrs=read-write`` makes libpq skip the replica until it is promoted.

"Nothing committed is lost" needs the database not to lose commits in a failover: the primary
replicates synchronously (``synchronous_standby_names = '*'``), so a commit a writer saw
succeed is on the replica. The relay marks rows sent with ``synchronous_commit=off``: marks the
replica had not received are lost, and those messages are sent again (duplicates).
"""

from __future__ import annotations

import random
import time

import psycopg
import pytest
import sqlalchemy as sa

from outbox import RelayConfig
from outbox.config import relay_conninfo
from tests.conftest import PG_HOST, PG_PORT, PG_USER
from tests.faults.conftest import (
    ACKED,
    DATABASE_LOST,
    DUPLICATES_PER_FAULT,
    RELAY_ARGS,
    SEEDS,
    Clusters,
    RetryingWriters,
    install,
)
from tests.support.broker import Broker, free_port
from tests.support.delivery import LEADER, RelayFactory, check_delivery, wait_drained
from tests.support.pgcluster import PgCluster, wait_synchronous


def multi_host_url(dbname: str, *ports: int, comma_form: bool = False) -> str:
    if comma_form:
        hosts = ",".join("127.0.0.1" for _ in ports)
        query = f"host={hosts}&port={','.join(map(str, ports))}"
    else:
        query = "&".join(f"host=127.0.0.1:{port}" for port in ports)
    return f"postgresql+psycopg://postgres@/{dbname}?{query}&target_session_attrs=read-write"


@pytest.mark.parametrize("comma_form", [False, True], ids=["repeated", "comma"])
def test_the_relay_connects_to_the_second_host_when_the_first_is_down(comma_form: bool) -> None:
    """Against the shared server, no cluster needed: the first host refuses (a free port), the
    second is the server. Before the fix the repeated form connected to the default host."""
    url = multi_host_url("postgres", free_port(), int(PG_PORT), comma_form=comma_form)
    url = url.replace("127.0.0.1", PG_HOST).replace("postgres@", f"{PG_USER}@")
    with psycopg.connect(relay_conninfo(RelayConfig(db_url=url)), autocommit=True) as conn:
        # Not libpq's default (the Unix socket), where the relay used to go.
        assert (conn.info.host, conn.info.port) == (PG_HOST, int(PG_PORT))
        assert conn.execute("SELECT current_setting('application_name')").fetchone() == (
            "outbox-relay",
        )


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_failover_to_a_promoted_replica(
    seed: int, pg_clusters: Clusters, broker: Broker, relays: RelayFactory
) -> None:
    rng = random.Random(seed)
    primary = pg_clusters.primary()
    install(primary)
    standby = pg_clusters.standby(primary)
    # Synchronous from now on (not before: a commit would wait for a replica not there yet).
    # The replica has its copy of the settings already: promoted, it waits for nobody.
    primary.configure({"synchronous_standby_names": "'*'"})
    primary.execute("SELECT pg_reload_conf()")
    wait_synchronous(primary)

    url = multi_host_url("app", primary.port, standby.port, comma_form=seed % 2 == 0)
    engine = sa.create_engine(url, pool_pre_ping=True, pool_size=8)
    try:
        topic = broker.create_topic(partitions=3)
        # The writers use the same URL: after the promotion, libpq finds the new primary.
        writers = RetryingWriters(engine, topic, threads=3, seed=seed).start()
        relay = relays(url, broker.bootstrap, *RELAY_ARGS)
        relay.wait_for(ACKED, after=relay.wait_for(LEADER, timeout=30), timeout=30)
        assert _relay_sessions(primary) >= 1
        time.sleep(rng.uniform(0.2, 1.0))

        before = relay.mark()
        stopped = time.monotonic()
        primary.stop("immediate")
        # pg_ctl returns once the server is gone; the writers committed until then (on a
        # loaded machine, 26 messages while pg_ctl ran).
        committed_at_stop = writers.count()
        # The gap: no primary at all. Writers' transactions fail and are tried again; the
        # relay tries to reconnect (the replica refuses read-write sessions).
        time.sleep(rng.uniform(0.5, 1.5))
        # Only a commit answered before the server went can still be counted: one transaction
        # (up to 3 messages) per writer thread.
        assert writers.count() - committed_at_stop <= 3 * 3, "writes went on without a primary"
        standby.promote()
        promoted = time.monotonic()
        lost = relay.wait_for(DATABASE_LOST, after=before, timeout=30)
        leader = relay.wait_for(LEADER, after=lost, timeout=60)
        relay.wait_for(ACKED, after=leader, timeout=30)
        recovered = time.monotonic()
        assert _relay_sessions(standby) >= 1

        writers.wait_for(writers.count() + 100, timeout=30)
        committed = writers.stop()
        wait_drained(engine, timeout=60)
        assert relay.running, relay.tail()
        got = broker.read_all(topic, expect=len(committed))
        delivery = check_delivery(got, committed)
        # In flight at the failover, or marked with synchronous_commit=off and not yet on
        # the replica: sent again. Seen: 1 to 7.
        assert delivery.duplicates <= DUPLICATES_PER_FAULT, delivery
        assert delivery.max_copies <= 2, delivery
        print(
            f"failover ({'comma' if seed % 2 == 0 else 'repeated'} form): primary stopped, "
            f"promoted after {promoted - stopped:.2f} s, relay sending again "
            f"{recovered - promoted:.2f} s after the promotion; {len(committed)} committed, "
            f"writer tries failed {writers.failures} (committed unseen "
            f"{writers.committed_unseen}, longest transaction {writers.longest_wait:.2f} s), "
            f"{delivery}"
        )
    finally:
        engine.dispose()


def _relay_sessions(cluster: PgCluster) -> int:
    rows = cluster.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outbox-relay'"
    )
    return int(rows[0][0])
