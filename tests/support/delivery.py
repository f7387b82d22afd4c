"""What the acceptance and fault tests share: writer threads that record what they committed,
the delivery checks (nothing lost, order per key, bounded duplicates), the relay's log events
they wait for, and table probes."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from tests.support.broker import Message
from tests.support.events import event
from tests.support.relayproc import RelayProcess
from tests.support.waits import wait_until

#: Log lines of the relay (text format) that tests wait for.
LEADER = event("relay.leader")
STANDBY = event("relay.standby")
BATCH_DONE = event("relay.batch")

# -- writers ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Committed:
    """A message whose transaction committed."""

    message_id: str
    key: str
    seq: int
    #: time.monotonic() before its transaction began.
    began: float


W = TypeVar("W", bound="Writers")


class Writers:
    """Threads that keep publishing in their own transactions until :meth:`stop`.

    ``mode="owned"``: each key belongs to one thread, which numbers that key's messages 1, 2, 3
    ... (1 to 3 messages of its keys per transaction). ``mode="counter"``: every thread writes
    every key; a transaction increments the key's row in ``counters`` and publishes that number,
    so the row lock serializes the writers of a key and the number is the business order.
    Odd-numbered threads use ``Outbox(at_commit=True)``, even ones ``Outbox()``.
    """

    def __init__(
        self,
        engine: sa.Engine,
        topic: str,
        *,
        keys: int = 20,
        threads: int = 3,
        mode: str = "owned",
        pause: float = 0.003,
        seed: int = 0,
        payload_size: int = 0,
    ) -> None:
        self.engine = engine
        self.topic = topic
        self.keys = [f"key-{i:02d}" for i in range(keys)]
        self.mode = mode
        self.pause = pause
        self.padding = "x" * payload_size
        self.committed: list[Committed] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._run, args=(i, seed * 1000 + i), daemon=True)
            for i in range(threads)
        ]
        if mode == "counter":
            with engine.begin() as conn:
                conn.execute(
                    sa.text(
                        "CREATE TABLE IF NOT EXISTS counters "
                        "(key text PRIMARY KEY, n bigint NOT NULL DEFAULT 0)"
                    )
                )
                conn.execute(
                    sa.text("INSERT INTO counters (key) SELECT unnest(CAST(:keys AS text[]))"),
                    {"keys": self.keys},
                )

    def start(self: W) -> W:
        for t in self._threads:
            t.start()
        return self

    #: How long stop() waits for each thread.
    join_timeout = 30.0

    def stop(self) -> list[Committed]:
        self._stop.set()
        for t in self._threads:
            t.join(self.join_timeout)
        if self._errors:
            raise self._errors[0]
        return self.committed

    def count(self) -> int:
        with self._lock:
            return len(self.committed)

    def snapshot(self) -> list[Committed]:
        """The messages committed so far (the writers keep going)."""
        with self._lock:
            return list(self.committed)

    def wait_for(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            if self._errors:
                raise self._errors[0]
            assert time.monotonic() < deadline, f"writers committed only {self.count()}/{n}"
            time.sleep(0.02)

    def _run(self, index: int, seed: int) -> None:
        rng = random.Random(seed)
        # Odd threads write with the COMMIT: both modes share the keys and their order.
        outbox = Outbox(at_commit=index % 2 == 1)
        mine = self.keys[index :: len(self._threads)] if self.mode == "owned" else self.keys
        seqs = dict.fromkeys(mine, 0)
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                batch: list[tuple[str, int, str]] = []
                with Session(self.engine) as session, session.begin():
                    if self.mode == "counter":
                        key = rng.choice(mine)
                        n = session.execute(
                            sa.text("UPDATE counters SET n = n + 1 WHERE key = :k RETURNING n"),
                            {"k": key},
                        ).scalar_one()
                        batch.append((key, n, self._publish(outbox, session, key, n)))
                    else:
                        for _ in range(rng.randint(1, 3)):
                            key = rng.choice(mine)
                            seqs[key] += 1
                            n = seqs[key]
                            batch.append((key, n, self._publish(outbox, session, key, n)))
                with self._lock:
                    self.committed.extend(Committed(mid, k, n, began) for k, n, mid in batch)
                if self.pause:
                    time.sleep(rng.uniform(0, 2 * self.pause))
        except BaseException as exc:
            self._errors.append(exc)

    def _publish(self, outbox: Outbox, session: Session, key: str, n: int) -> str:
        payload = {"key": key, "seq": n, "pad": self.padding}
        return str(outbox.publish(session, self.topic, payload, key=key))


# -- checks -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Delivery:
    received: int
    distinct: int
    duplicates: int
    max_copies: int


def check_delivery(
    got: list[Message], committed: list[Committed], *, complete: bool = True
) -> Delivery:
    """Every committed message arrived (when ``complete``), nothing else did, and per key the
    first occurrences keep the business order (strictly increasing ``seq``) in one partition."""
    by_id = {c.message_id: c for c in committed}
    ordered = sorted(got, key=lambda m: (m.partition, m.offset))
    copies: collections.Counter[str] = collections.Counter()
    firsts: dict[str, list[int]] = collections.defaultdict(list)
    partitions: dict[str, set[int]] = collections.defaultdict(set)
    for m in ordered:
        mid = m.message_id
        assert mid in by_id, f"a message that no committed transaction wrote: {mid}"
        c = by_id[mid]
        body = json.loads(m.value or b"null")
        assert m.key == c.key.encode() and body["key"] == c.key and body["seq"] == c.seq
        partitions[c.key].add(m.partition)
        copies[mid] += 1
        if copies[mid] == 1:
            firsts[c.key].append(c.seq)
    if complete:
        missing = set(by_id) - set(copies)
        assert not missing, f"{len(missing)} committed messages never arrived"
    for key, seqs in firsts.items():
        assert len(partitions[key]) == 1, f"{key} spread over partitions {partitions[key]}"
        inversions = [(a, b) for a, b in itertools.pairwise(seqs) if b <= a]
        assert not inversions, f"{key}: first occurrences out of order at {inversions[:5]}"
    return Delivery(
        received=len(got),
        distinct=len(copies),
        duplicates=len(got) - len(copies),
        max_copies=max(copies.values(), default=0),
    )


def table_ids(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return {str(r[0]) for r in conn.execute(sa.text("SELECT message_id FROM outbox_messages"))}


def table_count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM outbox_messages")).scalar_one())


def wait_drained(engine: sa.Engine, timeout: float = 60.0) -> None:
    wait_until(lambda: table_count(engine) == 0, timeout, "an empty outbox table", interval=0.1)


RelayFactory = Callable[..., RelayProcess]
