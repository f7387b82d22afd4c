"""Fault tests: the real ``outbox-relay`` against throwaway PostgreSQL clusters (restarted,
paused, failed over, with timeouts on the relay's role) and the real broker, with writers
that retry what a fault made fail.

The writers' record (``Committed``) and the delivery checks come from
``tests/support/delivery.py``, the ``relays`` fixture from ``tests/acceptance/conftest.py``;
the throwaway clusters from ``tests/support/pgcluster.py``. Every test here that starts a
process or a cluster is marked ``slow``.

Environment: ``OUTBOX_FAULT_SEEDS="1 2 3"`` runs every seeded test once per seed (default
``1``): the seed drives the writers' keys and batch sizes, the moment of the fault and its
length, and (failover) the URL form.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.orm import Session

from outbox import Outbox, OutboxError, migrate
from tests.acceptance.conftest import relays  # noqa: F401 (the fixture, for these tests too)
from tests.support.delivery import Committed, Writers
from tests.support.events import event
from tests.support.pgcluster import PgCluster, clusters, unavailable

#: Seeds of the seeded fault tests: OUTBOX_FAULT_SEEDS="1 2 3" for a longer soak.
SEEDS = [int(s) for s in os.environ.get("OUTBOX_FAULT_SEEDS", "1").split()]

#: The relay's options in these tests: small batches (many marks, so a fault lands between
#: them) and a short database backoff cap (reconnects within 2 s of the server's return).
RELAY_ARGS = (
    *("--batch-size", "50"),
    *("--db-backoff", "0.2", "--db-backoff-max", "2"),
    *("--log-level", "debug"),
)

#: What one fault may cost in duplicates: the two batches of 50 in flight, whose marks could
#: not be made, plus marks the server lost (the relay marks with synchronous_commit=off: an
#: immediate stop loses up to a few hundred milliseconds of them). Seen: 0 to 8.
DUPLICATES_PER_FAULT = 300

ACKED = event("relay.batch", "acked=[1-9]")
DATABASE_LOST = event("relay.database_lost")
DATABASE_ERROR = event("relay.database_error")

# -- throwaway clusters ------------------------------------------------------------------------


class Clusters:
    """Makes throwaway clusters for one test; :meth:`destroy_all` stops them and keeps their
    logs in the test's ``tmp_path``."""

    def __init__(self, base: Path, logs: Path) -> None:
        self.base = base
        self.logs = logs
        self.made: list[PgCluster] = []

    def primary(
        self, name: str = "primary", settings: Mapping[str, str] | None = None
    ) -> PgCluster:
        cluster = PgCluster(self.base, name)
        self.made.append(cluster)
        return cluster.init(settings).start()

    def standby(
        self, of: PgCluster, name: str = "standby", settings: Mapping[str, str] | None = None
    ) -> PgCluster:
        cluster = of.standby(name, settings)
        self.made.append(cluster)
        return cluster

    def destroy_all(self) -> None:
        for cluster in reversed(self.made):
            cluster.destroy()
            if cluster.log.exists():
                shutil.copy(cluster.log, self.logs / cluster.log.name)


@pytest.fixture
def pg_clusters(tmp_path: Path) -> Iterator[Clusters]:
    reason = unavailable()
    if reason:
        pytest.skip(f"throwaway PostgreSQL clusters: {reason}")
    with clusters() as base:
        made = Clusters(base, tmp_path)
        try:
            yield made
        finally:
            made.destroy_all()


def install(cluster: PgCluster, dbname: str = "app") -> str:
    """A new database with the outbox tables in ``cluster``; returns its URL."""
    cluster.execute(f"CREATE DATABASE {dbname}")
    url = cluster.url(dbname)
    migrate.upgrade(url)
    return url


@dataclasses.dataclass
class FaultDb:
    cluster: PgCluster
    url: str
    engine: sa.Engine


@pytest.fixture
def fault_db(pg_clusters: Clusters) -> Iterator[FaultDb]:
    """One throwaway cluster with a database ``app`` holding the outbox tables, and an engine
    for the writers (pre-ping: a restart leaves dead connections in the pool)."""
    cluster = pg_clusters.primary()
    url = install(cluster)
    engine = sa.create_engine(url, pool_pre_ping=True, pool_size=8)
    try:
        yield FaultDb(cluster, url, engine)
    finally:
        engine.dispose()


# -- writers that retry --------------------------------------------------------------------------


def is_unique_violation(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an error it wraps is a unique violation (SQLSTATE 23505)."""
    seen = 0
    while exc is not None and seen < 10:
        if getattr(exc, "sqlstate", None) == "23505":
            return True
        orig = getattr(exc, "orig", None)
        if orig is not None and getattr(orig, "sqlstate", None) == "23505":
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


#: What a database fault makes a writer's transaction raise.
RETRYABLE = (OutboxError, sqlalchemy.exc.SQLAlchemyError, psycopg.Error)


class RetryingWriters(Writers):
    """Threads that keep publishing, each key owned by one thread that numbers its messages
    1, 2, 3 ... (1 to 3 per transaction; odd threads with ``Outbox(at_commit=True)``), as
    ``tests.support.delivery.Writers`` mode "owned" -- but a transaction that fails (the
    server restarted, paused, failed over) is tried again with the same message ids until it
    commits. A retry that finds its message id taken (unique violation) proves an earlier try
    committed and only its COMMIT's answer was lost. So ``committed`` holds every message
    that committed, once, and per key in commit order."""

    def __init__(
        self,
        engine: sa.Engine,
        topic: str,
        *,
        keys: int = 12,
        threads: int = 3,
        pause: float = 0.004,
        seed: int = 0,
        retry_pause: float = 0.05,
        give_up_after: float = 90.0,
    ) -> None:
        super().__init__(engine, topic, keys=keys, threads=threads, pause=pause, seed=seed)
        self.retry_pause = retry_pause
        self.give_up_after = give_up_after
        self.join_timeout = give_up_after + 30
        #: Failed tries, and how many of the retries found their earlier try committed.
        self.failures = 0
        self.committed_unseen = 0
        #: The longest time one transaction took from its first try to its commit.
        self.longest_wait = 0.0

    def _run(self, index: int, seed: int) -> None:
        rng = random.Random(seed)
        outbox = Outbox(at_commit=index % 2 == 1)
        mine = self.keys[index :: len(self._threads)]
        seqs = dict.fromkeys(mine, 0)
        try:
            while not self._stop.is_set():
                batch: list[tuple[str, int, uuid.UUID]] = []
                for _ in range(rng.randint(1, 3)):
                    key = rng.choice(mine)
                    seqs[key] += 1
                    batch.append((key, seqs[key], uuid.uuid4()))
                began = time.monotonic()
                self._commit(outbox, batch)
                with self._lock:
                    self.committed.extend(Committed(str(m), k, n, began) for k, n, m in batch)
                    self.longest_wait = max(self.longest_wait, time.monotonic() - began)
                if self.pause:
                    time.sleep(rng.uniform(0, 2 * self.pause))
        except BaseException as exc:
            self._errors.append(exc)

    def _commit(self, outbox: Outbox, batch: list[tuple[str, int, uuid.UUID]]) -> None:
        """Commit ``batch`` (once), however many tries it takes."""
        deadline = time.monotonic() + self.give_up_after
        while True:
            try:
                with Session(self.engine) as session, session.begin():
                    for key, n, mid in batch:
                        payload = {"key": key, "seq": n, "pad": ""}
                        outbox.publish(session, self.topic, payload, key=key, message_id=mid)
                return
            except RETRYABLE as exc:
                if is_unique_violation(exc):
                    with self._lock:
                        self.committed_unseen += 1
                    return  # an earlier try committed
                with self._lock:
                    self.failures += 1
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"a transaction failed for {self.give_up_after} s"
                    ) from exc
                time.sleep(self.retry_pause)
