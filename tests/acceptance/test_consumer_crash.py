"""The inbox consumer's exactly-once effects with the real ``outbox consume`` command, database
and broker: SIGKILL between the database commit and the offset commit, a rebalance while
processing, SIGTERM mid-stream, and retries that keep a partition's order.

Every message carries a unique ``message-id`` header and the body ``{"n": i}``; the handlers
(tests/support/handlers.py) insert one row per message into ``effects`` with the pid of the
process that committed it. ``effects`` has no unique constraint on purpose: a duplicate effect
would show up as a second row.

Group timing: this broker (Tansu) holds a restarted member's JoinGroup until the killed member's
session has expired; with ``session.timeout.ms=6000`` a restart after SIGKILL took about 12 s
to get partitions, with 2000 1 to 4 s (measured). The SIGKILL test restarts the consumer nine
times, so the tests use 2000 / 500 (librdkafka heartbeats from its own thread, so a busy
Python handler does not make the session expire).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from confluent_kafka import Producer

from tests.support.broker import Broker
from tests.support.consumerproc import ConsumerProcess, Summary
from tests.support.events import event
from tests.support.handlers import FLAKY_EVERY, POISON_AT, create_effects_table
from tests.support.waits import wait_until

pytestmark = pytest.mark.slow

NAME = "payments"
KAFKA = (
    *("-X", "session.timeout.ms=2000"),
    *("-X", "heartbeat.interval.ms=500"),
    # Offsets are committed in the background every 500 ms: a SIGKILL loses up to that much
    # committed-in-the-database work's offsets, which is the window under test.
    *("-X", "auto.commit.interval.ms=500"),
)
#: Slept after the handler's database work, inside its transaction (see
#: tests/support/handlers.py).
SLEEP_MS = "5"
#: A drain run stops after this long without a message, counted from its group join (which
#: took 1 to 4 s here after a SIGKILL).
DRAIN_IDLE = "2"
DUPLICATE_KEY = re.compile(event("consumer.duplicate") + r".*\bkey=(\S+)")

ConsumerFactory = Callable[..., ConsumerProcess]


# -- helpers ------------------------------------------------------------------------------------


def produce(broker: Broker, topic: str, n: int, partitions: int) -> dict[str, int]:
    """Messages ``{"n": i}`` round-robin over the partitions (message i in partition
    i % partitions); returns message-id -> n."""
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
    sent: dict[str, int] = {}
    for i in range(n):
        mid = str(uuid.uuid4())
        producer.produce(
            topic,
            value=json.dumps({"n": i}).encode(),
            key=f"k{i}".encode(),
            partition=i % partitions,
            headers=[("message-id", mid.encode())],
        )
        sent[mid] = i
    assert producer.flush(30) == 0, "not every message was acknowledged"
    return sent


@dataclasses.dataclass(frozen=True)
class Effect:
    seq: int
    message_id: str
    n: int
    pid: int


def effects_of(engine: sa.Engine) -> list[Effect]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT seq, message_id, n, pid FROM effects ORDER BY seq"))
        return [Effect(*r) for r in rows]


def count(engine: sa.Engine, pid: int | None = None) -> int:
    with engine.connect() as conn:
        if pid is None:
            return int(conn.execute(sa.text("SELECT count(*) FROM effects")).scalar_one())
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM effects WHERE pid = :pid"), {"pid": pid}
            ).scalar_one()
        )


def check_exactly_once(engine: sa.Engine, sent: dict[str, int]) -> list[Effect]:
    """Every message has exactly one effect, with its own body; nothing else has one."""
    effects = effects_of(engine)
    copies = collections.Counter(e.message_id for e in effects)
    doubled = {m: c for m, c in copies.items() if c > 1}
    assert not doubled, f"{len(doubled)} messages took effect more than once: {doubled}"
    missing = set(sent) - set(copies)
    assert not missing, f"{len(missing)} of {len(sent)} messages never took effect"
    unknown = set(copies) - set(sent)
    assert not unknown, f"effects of messages nobody sent: {unknown}"
    wrong = [e for e in effects if sent[e.message_id] != e.n]
    assert not wrong, f"effects with another message's body: {wrong[:5]}"
    return effects


#: Batches (the default) small enough that a few hundred messages make many of them: the
#: tests stop or kill the consumer between two commits.
BATCH = ("--batch-size", "25")


def args(db_url: str, broker: Broker, topic: str, group: str, *extra: str) -> list[str]:
    return [
        *BATCH,
        *("--db-url", db_url),
        *("--bootstrap-servers", broker.bootstrap),
        *("--group", group),
        *("--consumer-name", NAME),
        *("--topic", topic),
        *("--handler", "tests.support.handlers:record_effect"),
        *("--log-level", "debug"),
        *KAFKA,
        *extra,
    ]


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def effects(engine: sa.Engine) -> sa.Engine:
    return create_effects_table(engine)


@pytest.fixture
def consumers(tmp_path: Path) -> Iterator[ConsumerFactory]:
    """Start ``outbox consume ARGS...`` subprocesses; each is stopped (SIGTERM, then SIGKILL)
    at teardown. Their log is in ``tmp_path/consumer.log``."""
    started: list[ConsumerProcess] = []

    def start(
        *argv: str, name: str = "consumer", sleep_ms: str = SLEEP_MS, handler: str | None = None
    ) -> ConsumerProcess:
        argv_list = list(argv)
        if handler is not None:
            argv_list[argv_list.index("--handler") + 1] = handler
        proc = ConsumerProcess(
            argv_list,
            name=name,
            log_path=tmp_path / "consumer.log",
            env={"CONSUMER_TEST_SLEEP_MS": sleep_ms},
        ).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop(timeout=10)


def drain(consumers: ConsumerFactory, argv: list[str], name: str = "drain") -> ConsumerProcess:
    """Run the consumer with ``--idle-timeout`` until nothing is left; it must exit 0."""
    proc = consumers(*argv, "--idle-timeout", DRAIN_IDLE, name=name)
    rc = proc.wait(60)
    assert rc == 0, proc.tail()
    return proc


def no_errors(*procs: ConsumerProcess) -> None:
    for proc in procs:
        bad = proc.matches(
            r"Traceback| ERROR |" + event("consumer.retry") + "|" + event("consumer.dead_lettered")
        )
        assert not bad, f"{proc.name}: {bad[:5]}"


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_between_db_commit_and_offset_commit_leaves_one_effect_per_message(
    seed: int, effects: sa.Engine, db_url: str, broker: Broker, consumers: ConsumerFactory
) -> None:
    rng = random.Random(seed)
    n = 300
    topic = broker.create_topic(partitions=3)
    sent = produce(broker, topic, n, partitions=3)
    # No offset commit in the background while the runs are killed: every kill then lands
    # between effects committed in the database and their offsets. (With the 500 ms of the
    # other tests, a kill could follow the last background commit before any new effect, and
    # in one run of this seed on a loaded machine every kill did: nothing to show.)
    argv = args(
        db_url, broker, topic, f"g-{uuid.uuid4().hex[:8]}", "-X", "auto.commit.interval.ms=600000"
    )

    runs: list[ConsumerProcess] = []
    kills = 0
    for i in range(3):
        proc = consumers(*argv, name=f"kill-{seed}-{i}")
        runs.append(proc)
        # Kill it while it is committing effects of its own (past any redeliveries).
        wait_until(
            lambda: count(effects, proc.pid) > 0 or count(effects) == n,
            30,
            f"{proc.name} to process",
            interval=0.02,
            processes=[proc],
        )
        if count(effects) == n:
            assert proc.stop() == 0, proc.tail()
            break
        time.sleep(rng.uniform(0.0, 0.6))
        assert proc.kill() == -signal.SIGKILL, proc.tail()  # it was still running
        kills += 1
    assert kills >= 2, "the consumer ran out of messages before it could be killed twice"

    last = drain(consumers, argv)
    runs.append(last)
    result = check_exactly_once(effects, sent)

    # Which process committed each effect: the runs above, nothing else.
    by_pid = collections.Counter(e.pid for e in result)
    assert set(by_pid) <= {p.pid for p in runs}
    assert last.summary() == Summary(by_pid[last.pid], last.duplicates_logged(), 0)

    # The window was hit: after a SIGKILL, messages whose effects had committed (in a killed
    # process) came back because their offsets had not, and the inbox skipped them.
    owner = {e.message_id: e.pid for e in result}
    skipped_per_run = []
    for i, proc in enumerate(runs):
        keys = [
            m.group(1)
            for line in proc.matches(DUPLICATE_KEY.pattern)
            if (m := DUPLICATE_KEY.search(line))
        ]
        earlier = {p.pid for p in runs[:i]}
        wrong = [k for k in keys if owner[k] not in earlier]
        assert not wrong, f"{proc.name} skipped keys no earlier run had committed: {wrong[:5]}"
        skipped_per_run.append(len(keys))
    assert sum(skipped_per_run) > 0, "no redelivery after any SIGKILL: the window was not hit"
    no_errors(*runs)
    print(f"seed {seed}: effects per process {sorted(by_pid.values())}, skipped {skipped_per_run}")


def test_sigkill_with_batches_of_100_and_a_poison_message_in_each(
    effects: sa.Engine, db_url: str, broker: Broker, consumers: ConsumerFactory
) -> None:
    """Batches of 100, one partition, a poison message in the middle of each batch (it writes,
    then raises: the batch rolls back, its prefix commits again, the poison one is
    dead-lettered); SIGKILL twice: every other message takes effect once, each poison message
    is dead-lettered once, nothing else."""
    n = 400
    topic = broker.create_topic(partitions=1)
    sent = produce(broker, topic, n, partitions=1)
    poison = {mid for mid, i in sent.items() if i % 100 == POISON_AT}
    argv = [
        *args(db_url, broker, topic, f"g-{uuid.uuid4().hex[:8]}"),
        *("--batch-size", "100"),
    ]
    handler = "tests.support.handlers:poison_at_50"
    kills = 0
    for i in range(3):
        proc = consumers(*argv, name=f"kill-{i}", handler=handler)
        wait_until(
            lambda: count(effects, proc.pid) > 0 or count(effects) == n - len(poison),
            30,
            f"{proc.name} to process",
            interval=0.02,
            processes=[proc],
        )
        if count(effects) == n - len(poison):
            break
        time.sleep(0.1 + 0.2 * i)
        if proc.kill() == -signal.SIGKILL:
            kills += 1
    assert kills >= 1, "the consumer was never killed mid-stream"
    last = consumers(*argv, "--idle-timeout", DRAIN_IDLE, name="drain", handler=handler)
    assert last.wait(60) == 0, last.tail()

    effects_seen = effects_of(effects)
    copies = collections.Counter(e.message_id for e in effects_seen)
    assert set(copies) == set(sent) - poison and set(copies.values()) == {1}
    assert [e.n for e in effects_seen] == sorted(e.n for e in effects_seen)  # in order
    with effects.connect() as conn:
        dead = conn.execute(
            sa.text(
                "SELECT header_values[array_position(header_names, 'dlq-original-message-id')] "
                "FROM outbox_messages WHERE topic = :t"
            ),
            {"t": f"{topic}.dlq"},
        ).all()
    assert sorted(r[0].decode() for r in dead) == sorted(poison)  # each once


def test_rebalance_while_processing_moves_partitions_without_double_effects(
    effects: sa.Engine, db_url: str, broker: Broker, consumers: ConsumerFactory
) -> None:
    n, partitions = 2400, 3
    per_partition = n // partitions
    topic = broker.create_topic(partitions=partitions)
    sent = produce(broker, topic, n, partitions=partitions)
    argv = args(db_url, broker, topic, f"g-{uuid.uuid4().hex[:8]}")

    def part(e: Effect) -> int:
        return e.n % partitions

    # A consumer here works through its partitions one after the other (a fetch returns whole
    # record batches), and B's join takes about 4-5 s (more on a loaded machine): at 10 ms a
    # message, 8 s a partition, A is still in its first partition when B gets one, so the
    # partition B gets has work left whichever it is (with 3 s a partition, B once got the
    # partition A had just finished and waited for work that never came).
    a = consumers(*argv, name="consumer-a", sleep_ms="10")
    wait_until(lambda: count(effects, a.pid) >= 20, 30, "A working", interval=0.05, processes=[a])
    b = consumers(*argv, name="consumer-b", sleep_ms="10")
    # The group rebalanced: B got a partition and commits effects of its own, while A goes on
    # with the ones it kept (an effect of A after B's first one).
    wait_until(lambda: count(effects, b.pid) > 0, 30, "B working", interval=0.05, processes=[a, b])
    b_first = min(e.seq for e in effects_of(effects) if e.pid == b.pid)
    wait_until(
        lambda: any(e.seq > b_first and e.pid == a.pid for e in effects_of(effects)),
        15,
        "A and B working at once",
        interval=0.05,
        processes=[a, b],
    )
    # A is in the middle of a partition that B has not touched (at least 50 messages, 0.5 s,
    # left): the one that must move to B when A stops.
    rows = effects_of(effects)
    done = collections.Counter(part(e) for e in rows)
    a_parts = {part(e) for e in rows if e.pid == a.pid}
    b_parts = {part(e) for e in rows if e.pid == b.pid}
    moving = {p for p in a_parts - b_parts if done[p] < per_partition - 50}
    assert moving, f"A is not in the middle of a partition of its own: {sorted(done.items())}"

    started = time.monotonic()
    a.send_signal(signal.SIGTERM)
    assert a.wait(15) == 0, a.tail()
    took = time.monotonic() - started
    assert took < 5, f"A took {took:.1f}s to stop"
    a_rows = [e for e in effects_of(effects) if e.pid == a.pid]
    assert a.summary().processed == len(a_rows)

    # B takes A's partitions and finishes the topic.
    wait_until(lambda: count(effects) >= n, 60, "B to finish", interval=0.05, processes=[b])
    b.send_signal(signal.SIGTERM)
    assert b.wait(15) == 0, b.tail()
    result = check_exactly_once(effects, sent)
    a_last = max(e.seq for e in a_rows)
    after_a = {part(e) for e in result if e.seq > a_last}
    assert moving <= after_a, f"B did not finish A's partitions {moving}: only {after_a}"
    by_pid = collections.Counter(e.pid for e in result)
    assert set(by_pid) == {a.pid, b.pid}
    assert b.summary().processed == by_pid[b.pid]
    # Offsets were committed at each hand-over (revocation, A's close): nothing was re-read.
    assert (a.summary().duplicates, b.summary().duplicates) == (0, 0)

    # Nothing is left behind for a next member of the group.
    last = drain(consumers, argv)
    assert last.summary() == Summary(0, last.duplicates_logged(), 0)
    no_errors(a, b, last)
    print(
        f"A {by_pid[a.pid]} (stopped in {took:.2f}s), B {by_pid[b.pid]}, moved {moving}; "
        f"duplicates skipped: A {a.summary().duplicates} B {b.summary().duplicates} "
        f"last {last.summary().duplicates}"
    )


def test_sigterm_mid_stream_exits_0_and_commits_its_offsets(
    effects: sa.Engine, db_url: str, broker: Broker, consumers: ConsumerFactory
) -> None:
    n = 300
    topic = broker.create_topic(partitions=3)
    sent = produce(broker, topic, n, partitions=3)
    argv = args(db_url, broker, topic, f"g-{uuid.uuid4().hex[:8]}")

    first = consumers(*argv, name="first")
    wait_until(
        lambda: count(effects, first.pid) >= 50, 30, "work", interval=0.02, processes=[first]
    )
    started = time.monotonic()
    first.send_signal(signal.SIGTERM)
    rc = first.wait(15)
    took = time.monotonic() - started
    assert rc == 0, first.tail()
    assert took < 5, f"took {took:.1f}s to stop"
    done = count(effects)
    assert done < n, "it finished the topic before the signal"
    # Every message it counted took effect (its transactions committed) ...
    assert first.summary() == Summary(done, 0, 0)

    # ... and its offsets were committed: the next member re-reads nothing.
    second = drain(consumers, argv, name="second")
    summary = second.summary()
    assert summary.processed == n - done
    # (It finished the message in hand, stored its offset and committed at close.)
    assert summary.duplicates == 0, f"re-read {summary.duplicates} processed messages"
    check_exactly_once(effects, sent)
    no_errors(first, second)
    print(f"stopped in {took:.2f}s after {done}; restart re-read {summary.duplicates}")


def test_failing_handler_is_retried_in_place_keeping_partition_order(
    effects: sa.Engine, db_url: str, broker: Broker, consumers: ConsumerFactory
) -> None:
    n = 30
    topic = broker.create_topic(partitions=1)
    sent = produce(broker, topic, n, partitions=1)
    flaky = [i for i in range(n) if i % FLAKY_EVERY == 0]
    argv = args(db_url, broker, topic, f"g-{uuid.uuid4().hex[:8]}")

    proc = consumers(
        *argv, "--idle-timeout", DRAIN_IDLE, handler="tests.support.handlers:flaky_effect"
    )
    assert proc.wait(60) == 0, proc.tail()

    # Each flaky message failed twice (its rows rolled back), then succeeded; nothing was
    # dead-lettered, and no later message overtook it.
    assert proc.summary() == Summary(n, 0, 0)
    retries = proc.matches(event("consumer.retry"))
    assert len(retries) == 2 * len(flaky), proc.tail()
    assert all("TimeoutError: flaky dependency" in line for line in retries)
    result = check_exactly_once(effects, sent)
    assert [e.n for e in result] == list(range(n))
    with effects.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM outbox_messages")).scalar_one() == 0


def test_idle_timeout_counts_from_the_group_join(
    effects: sa.Engine, db_url: str, broker: Broker, consumers: ConsumerFactory
) -> None:
    """A drain whose group join takes longer than ``--idle-timeout`` (here about 3 s with a
    6 s session timeout; after a crash, up to the dead member's session timeout) still drains:
    it used to exit 0 at once having processed nothing."""
    n = 20
    topic = broker.create_topic(partitions=3)
    sent = produce(broker, topic, n, partitions=3)
    slow_join = ("-X", "session.timeout.ms=6000", "-X", "heartbeat.interval.ms=1000")
    argv = args(db_url, broker, topic, f"g-{uuid.uuid4().hex[:8]}", *slow_join)

    proc = consumers(*argv, "--idle-timeout", "1", name="drain", sleep_ms="0")
    started = time.monotonic()
    assert proc.wait(60) == 0, proc.tail()
    took = time.monotonic() - started
    assert proc.summary() == Summary(n, 0, 0), f"exited after {took:.1f}s"
    check_exactly_once(effects, sent)
    assert took > 2, "the join was not slower than the idle timeout: this test shows nothing"
