"""Outages of what a handler calls, with the real ``outbox consume`` command, database and
broker, and a local HTTP dependency the test brings down and up
(tests/support/dependency.py). The handlers (tests/support/downstream.py) call it once per
message and raise :class:`outbox.DownstreamUnavailable` (or an exception type of their own)
when it refuses; on success they insert one row into ``downstream_effects``, which has no
unique constraint: a duplicate effect would show up as a second row.

What is proved: an outage neither burns attempts nor dead-letters anything, and the consumer
pauses (no retry storm, no rebalance) until the dependency answers, then every message takes
effect once, in order per key; a poison message is still dead-lettered; expired messages are
never handled, those that expire while the breaker holds them included; a SIGKILL while the
breaker is open loses nothing and doubles nothing; an unmapped exception type is transient
with ``--transient``, and without it the retry budget bounds the dead letters.

Logs are read as JSON lines (``--log-format json``), by their ``event`` field.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import Producer
from sqlalchemy.orm import Session

from outbox import Outbox
from outbox.message import HEADER_DEADLINE, format_deadline
from tests.support.broker import Broker
from tests.support.cli import run_cli
from tests.support.consumerproc import ConsumerProcess, Summary
from tests.support.dependency import Dependency
from tests.support.downstream import SLEEP_ENV, URL_ENV, create_tables
from tests.support.waits import wait_until

pytestmark = pytest.mark.slow

NAME = "downstream"
KAFKA = (
    *("-X", "session.timeout.ms=2000"),
    *("-X", "heartbeat.interval.ms=500"),
    *("-X", "auto.commit.interval.ms=500"),
)
#: The breaker's open periods are drawn from [0.5 s, min(4 s, 2**n s)] here: a recovered
#: dependency is noticed within 4 s (the default cap, 60 s, would make the tests slow).
OPEN_MAX = ("--breaker-open-max", "4")
#: The breaker's first open period is at least --breaker-open / 2 = 0.5 s (the default).
MIN_OPEN_S = 0.5

Body = dict[str, Any]
ConsumerFactory = Callable[..., ConsumerProcess]


# -- messages and effects -----------------------------------------------------------------------


def bodies(n: int, keys: int) -> list[Body]:
    """``{"n": i, "key": "k<i % keys>", "seq": i // keys}``: ``seq`` counts up per key."""
    return [{"n": i, "key": f"k{i % keys}", "seq": i // keys} for i in range(n)]


def produce(
    broker: Broker,
    topic: str,
    messages: list[Body],
    headers: list[tuple[str, bytes]] | None = None,
) -> dict[str, Body]:
    """Each body as one message keyed by its ``key`` (one partition per key) with a unique
    ``message-id`` header (then ``headers``), in order; returns message-id -> body."""
    producer = Producer(
        {"bootstrap.servers": broker.bootstrap, "linger.ms": 5, "enable.idempotence": True}
    )
    sent: dict[str, Body] = {}
    for body in messages:
        mid = str(uuid.uuid4())
        producer.produce(
            topic,
            value=json.dumps(body).encode(),
            key=str(body["key"]).encode(),
            headers=[("message-id", mid.encode()), *(headers or [])],
        )
        sent[mid] = body
    assert producer.flush(30) == 0, "not every message was acknowledged"
    return sent


@dataclasses.dataclass(frozen=True)
class Effect:
    id: int
    kind: str
    message_id: str
    n: int
    key: str
    seq: int
    served: int
    refused: int
    pid: int


def effects_of(engine: sa.Engine, kind: str = "effect") -> list[Effect]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id, kind, message_id, n, key, seq, served, refused, pid "
                "FROM downstream_effects WHERE kind = :kind ORDER BY id"
            ),
            {"kind": kind},
        )
        return [Effect(*r) for r in rows]


def count(engine: sa.Engine, pid: int | None = None) -> int:
    sql = "SELECT count(*) FROM downstream_effects WHERE kind = 'effect'"
    with engine.connect() as conn:
        if pid is None:
            return int(conn.execute(sa.text(sql)).scalar_one())
        return int(conn.execute(sa.text(sql + " AND pid = :pid"), {"pid": pid}).scalar_one())


def check_exactly_once(engine: sa.Engine, expected: dict[str, Body]) -> list[Effect]:
    """Every expected message has exactly one effect, with its own body; nothing else has
    one; and per key, effects committed in the order of the key's messages."""
    effects = effects_of(engine)
    copies = collections.Counter(e.message_id for e in effects)
    doubled = {m: c for m, c in copies.items() if c > 1}
    assert not doubled, f"{len(doubled)} messages took effect more than once: {doubled}"
    missing = set(expected) - set(copies)
    assert not missing, f"{len(missing)} of {len(expected)} messages never took effect"
    unknown = set(copies) - set(expected)
    assert not unknown, f"effects of {len(unknown)} messages that should have none"
    wrong = [e for e in effects if expected[e.message_id]["n"] != e.n]
    assert not wrong, f"effects with another message's body: {wrong[:5]}"
    last: dict[str, int] = {}
    for e in effects:
        assert e.seq > last.get(e.key, -1), f"key {e.key}: seq {e.seq} after {last[e.key]}"
        last[e.key] = e.seq
    return effects


def dead_letters(engine: sa.Engine, topic: str) -> list[dict[str, bytes]]:
    """The headers of each dead letter of ``topic`` (rows of the outbox table, topic
    ``<topic>.dlq``), in the order they were written."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT header_names, header_values FROM outbox_messages "
                "WHERE topic = :t ORDER BY id"
            ),
            {"t": f"{topic}.dlq"},
        ).all()
    return [dict(zip(r.header_names, map(bytes, r.header_values), strict=True)) for r in rows]


def original_ids(letters: list[dict[str, bytes]]) -> list[str]:
    return [letter["dlq-original-message-id"].decode() for letter in letters]


# -- the consumer's log -------------------------------------------------------------------------


def event(name: str) -> str:
    """A regex for a JSON log line of ``event`` ``name``."""
    return rf'"event": "{re.escape(name)}"'


def events(proc: ConsumerProcess, name: str, *, after: int = 0) -> list[dict[str, Any]]:
    """The JSON log records of ``event`` ``name``, parsed."""
    return [json.loads(line) for line in proc.matches(event(name), after=after)]


def stopped_stats(proc: ConsumerProcess) -> dict[str, Any]:
    """The ConsumerStats of the ``consumer.stopped`` record (after a clean exit)."""
    [record] = events(proc, "consumer.stopped")
    return record


def no_storm_of_errors(proc: ConsumerProcess) -> None:
    bad = proc.matches(r"Traceback|" + event("consumer.retry"))
    assert not bad, f"{proc.name}: {bad[:5]}"


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def effects(engine: sa.Engine) -> sa.Engine:
    return create_tables(engine)


@pytest.fixture
def dependency() -> Iterator[Dependency]:
    with Dependency() as dep:
        yield dep


@pytest.fixture
def consumers(tmp_path: Path, dependency: Dependency) -> Iterator[ConsumerFactory]:
    """Start ``outbox consume ARGS...`` subprocesses calling ``dependency``; each is stopped
    (SIGTERM, then SIGKILL) at teardown. Their log is in ``tmp_path/consumer.log``."""
    started: list[ConsumerProcess] = []

    def start(*argv: str, name: str = "consumer", sleep_ms: float = 0) -> ConsumerProcess:
        proc = ConsumerProcess(
            list(argv),
            name=name,
            log_path=tmp_path / "consumer.log",
            env={URL_ENV: dependency.url, SLEEP_ENV: str(sleep_ms)},
        ).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop(timeout=10)


def args(
    db_url: str,
    broker: Broker,
    topic: str,
    *extra: str,
    handler: str = "call_dependency",
    group: str | None = None,
    name: str = NAME,
) -> list[str]:
    return [
        # Batches (the default) small next to the few hundred messages of a test, so that an
        # outage starts mid-stream rather than after one batch did everything.
        *("--batch-size", "20"),
        *("--db-url", db_url),
        *("--bootstrap-servers", broker.bootstrap),
        *("--group", group or f"g-{uuid.uuid4().hex[:8]}"),
        *("--consumer-name", name),
        *("--topic", topic),
        *("--handler", f"tests.support.downstream:{handler}"),
        *("--log-format", "json"),
        *KAFKA,
        *extra,
    ]


def stop(proc: ConsumerProcess) -> int:
    """SIGTERM; it must exit 0. Returns the log position before the signal (a clean close
    revokes the partitions: count rebalances before it)."""
    mark = proc.mark()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.tail()
    return mark


def group_changes(proc: ConsumerProcess, before: int) -> tuple[int, int]:
    """(assignments, revocations) logged before log position ``before``."""
    lines = proc.lines[:before]
    assigned = sum(1 for line in lines if re.search(event("consumer.partitions_assigned"), line))
    revoked = sum(1 for line in lines if re.search(event("consumer.partitions_revoked"), line))
    return assigned, revoked


# -- tests --------------------------------------------------------------------------------------


def test_30s_outage_mid_stream_pauses_and_loses_burns_and_reorders_nothing(
    effects: sa.Engine,
    db_url: str,
    broker: Broker,
    dependency: Dependency,
    consumers: ConsumerFactory,
) -> None:
    n, keys, outage = 5000, 50, 30.0
    topic = broker.create_topic(partitions=4)
    sent = produce(broker, topic, bodies(n, keys))
    proc = consumers(*args(db_url, broker, topic, *OPEN_MAX))

    # The outage starts in the middle of the stream.
    wait_until(lambda: count(effects) >= 1500, 120, "1500 effects", interval=0.05, processes=[proc])
    dependency.set_up(False)
    mark = proc.wait_for(event("consumer.breaker_open"), timeout=30)
    opened = events(proc, "consumer.breaker_open")[0]
    assert opened["reason"].startswith("5 transient failures in a row: DownstreamUnavailable")
    at_open = count(effects)
    # While it lasts: nothing handled, nothing dead-lettered, nothing skipped; the consumer
    # stays paused (a probe now and then) in its group.
    time.sleep(max(0.0, dependency.down_periods()[0][0] + outage - time.monotonic()))
    assert count(effects) == at_open, "messages took effect while the dependency was down"
    assert dead_letters(effects, topic) == []
    assert proc.running, proc.tail()
    dependency.set_up(True)

    wait_until(lambda: count(effects) >= n, 120, "every effect", interval=0.1, processes=[proc])
    proc.wait_for(event("consumer.breaker_closed"), after=mark, timeout=10)
    before_stop = stop(proc)

    result = check_exactly_once(effects, sent)  # ... and in order per key
    assert dead_letters(effects, topic) == []
    assert proc.summary() == Summary(n, 0, 0)
    # Every message was served by the dependency exactly once: no attempt was repeated
    # after its effect, none was skipped.
    served = dependency.served()
    assert set(served) == set(sent) and set(served.values()) == {1}
    assert {e.served for e in result} == {1}
    # Attempts were not burned: no retry, no failed attempt, no dead letter.
    stats = stopped_stats(proc)
    assert stats["failed_attempts"] == 0 and stats["dead_lettered"] == 0
    assert proc.count(event("consumer.retry")) == 0
    assert proc.count(event("consumer.dead_lettered")) == 0
    # The consumer kept its partitions: the initial assignment only, no revocation.
    assert group_changes(proc, before_stop) == (1, 0)

    # No retry storm: 5 refusals to open the breaker, then one probe per open period.
    (start, end), *rest = dependency.down_periods()
    assert rest == []
    down = end - start
    refused = sum(dependency.refused().values())
    assert 5 <= refused <= 5 + down / MIN_OPEN_S + 1, f"{refused} refused in {down:.1f} s"
    assert stats["transient_failures"] == refused  # ... each seen by the consumer
    assert stats["breaker_opened"] >= 1
    # The partitions stayed paused for about the outage (minus detection, plus the last
    # open period); the probed message was refused several times, then took effect once.
    paused = float(stats["paused_seconds"])
    assert outage - 10 <= paused <= outage + 15, paused
    probed = [e for e in result if e.refused > 0]
    assert len(probed) >= 1 and sum(e.refused for e in probed) == refused
    print(
        f"outage {down:.1f}s: refused {refused} ({refused / down:.2f}/down-s), breaker opened "
        f"{stats['breaker_opened']}x, paused {paused:.1f}s, probed message refused "
        f"{[e.refused for e in probed]}; assignments 1, revocations 0"
    )


def test_poison_messages_during_an_outage_are_dead_lettered_and_do_not_block_the_partition(
    effects: sa.Engine,
    db_url: str,
    broker: Broker,
    dependency: Dependency,
    consumers: ConsumerFactory,
) -> None:
    """One partition: ``[poison, good x20, fails, good x19]``. The dependency is down from the
    start: the poison message (refused by the handler's own check, PoisonMessage) is
    dead-lettered during the outage, then the next message is held by the open breaker.
    After recovery the message that ``fails`` (ValueError once the dependency answers) starts
    a second outage when it first calls; it is held through it without an attempt counted,
    and dead-lettered after --max-attempts once the dependency answers. Every other message
    takes effect once, in order."""
    messages = bodies(41, 1)
    messages[0]["poison"] = True
    messages[21]["fails"] = True
    topic = broker.create_topic(partitions=1)
    sent = produce(broker, topic, messages)
    ids = {body["n"]: mid for mid, body in sent.items()}
    dependency.set_up(False)
    proc = consumers(
        *args(db_url, broker, topic, "--max-attempts", "3", "--retry-backoff", "0.05", *OPEN_MAX)
    )

    # Outage 1: the poison message is dead-lettered while the dependency is down.
    wait_until(lambda: dead_letters(effects, topic), 60, "the poison dead letter", processes=[proc])
    proc.wait_for(event("consumer.breaker_open"), timeout=30)
    assert not dependency.up
    [poison] = dead_letters(effects, topic)
    assert poison["dlq-reason"] == b"poison"
    assert poison["dlq-attempts"] == b"1"
    assert poison["dlq-original-message-id"] == ids[0].encode()
    assert poison["dlq-error"].startswith(b"PoisonMessage: message 0 is malformed")
    time.sleep(2)
    # The partition waits at message 1, neither handled nor dead-lettered.
    assert count(effects) == 0 and len(dead_letters(effects, topic)) == 1
    refused = dependency.refused()
    assert set(refused) == {ids[1]} and refused[ids[1]] >= 5
    dependency.down_on(lambda _mid, n: n == 21)
    dependency.set_up(True)

    # Outage 2 starts at the message that fails: it is held, the partition waits behind it.
    mark = proc.wait_for(event("consumer.breaker_closed"), timeout=30)
    mark = proc.wait_for(event("consumer.breaker_open"), after=mark, timeout=30)
    assert [e.n for e in effects_of(effects)] == list(range(1, 21))
    time.sleep(2)
    assert [e.n for e in effects_of(effects)] == list(range(1, 21))
    assert len(dead_letters(effects, topic)) == 1
    assert dependency.served()[ids[21]] == 0
    dependency.set_up(True)

    wait_until(lambda: count(effects) >= 39, 60, "the rest", interval=0.05, processes=[proc])
    stop(proc)
    assert proc.summary() == Summary(39, 0, 2)
    good = {mid: body for mid, body in sent.items() if body["n"] not in (0, 21)}
    result = check_exactly_once(effects, good)
    assert [e.n for e in result] == [n for n in range(41) if n not in (0, 21)]
    first, fails = dead_letters(effects, topic)
    assert first == poison
    assert fails["dlq-original-message-id"] == ids[21].encode()
    assert fails["dlq-reason"] == b"attempts"
    # Its attempts were counted only while the dependency answered: three calls served, each
    # followed by the ValueError; every refused call of outage 2 counted none.
    assert fails["dlq-attempts"] == b"3"
    assert fails["dlq-error"].startswith(b"ValueError: cannot process message 21")
    assert dependency.served()[ids[21]] == 3
    assert dependency.refused()[ids[21]] >= 5
    stats = stopped_stats(proc)
    assert stats["failed_attempts"] == 3 and stats["dead_lettered"] == 2
    assert stats["breaker_opened"] >= 2
    reasons = sorted(r["reason"] for r in events(proc, "consumer.dead_lettered"))
    assert reasons == ["attempts", "poison"]
    print(
        f"refused: message 1 {dependency.refused()[ids[1]]}x, message 21 "
        f"{dependency.refused()[ids[21]]}x; breaker opened {stats['breaker_opened']}x, "
        f"paused {stats['paused_seconds']:.1f}s"
    )


def test_flapping_dependency_does_not_cause_a_retry_storm(
    effects: sa.Engine,
    db_url: str,
    broker: Broker,
    dependency: Dependency,
    consumers: ConsumerFactory,
) -> None:
    """Down 2 s / up 2 s for 20 s. Per down period the breaker lets through at most 5
    refusals (in a row, while closed) and then one probe per open period, which is at least
    0.5 s: at most 5 + 2 / 0.5 = 9 per 2 s down, i.e. 4.5 per down-second. Asserted: at
    most 5 per down-second over the whole run (a consumer retrying every message with its
    0.2 s backoff and no breaker would make several times that)."""
    n, keys = 2500, 20
    topic = broker.create_topic(partitions=3)
    sent = produce(broker, topic, bodies(n, keys))
    proc = consumers(*args(db_url, broker, topic, *OPEN_MAX), sleep_ms=4)
    wait_until(lambda: count(effects) >= 100, 60, "100 effects", interval=0.05, processes=[proc])

    flapping = dependency.flap(up_s=2, down_s=2, duration=20)
    flapping.join(40)
    assert not flapping.is_alive() and dependency.up
    at_end = count(effects)
    assert at_end < n, "the consumer finished before the flapping ended: it showed nothing"
    wait_until(lambda: count(effects) >= n, 120, "every effect", interval=0.1, processes=[proc])
    before_stop = stop(proc)

    check_exactly_once(effects, sent)
    assert dead_letters(effects, topic) == []
    assert proc.summary() == Summary(n, 0, 0)
    assert set(dependency.served().values()) == {1}
    stats = stopped_stats(proc)
    assert stats["failed_attempts"] == 0
    no_storm_of_errors(proc)
    assert group_changes(proc, before_stop) == (1, 0)

    periods = dependency.down_periods()
    down = sum(end - start for start, end in periods)
    requests = dependency.requests()
    refused = [r for r in requests if not r.served]
    per_period = [sum(1 for r in refused if s <= r.at <= e) for s, e in periods]
    assert len(periods) == 5 and sum(per_period) == len(refused)
    rate = len(refused) / down
    assert rate <= 5, f"{len(refused)} refused requests in {down:.1f} down-seconds"
    assert max(per_period) <= 5 + 2 / MIN_OPEN_S + 1, per_period
    assert stats["breaker_opened"] >= 1
    print(
        f"{len(periods)} down periods, {down:.1f} down-s: refused {len(refused)} "
        f"({rate:.2f}/down-s, per period {per_period}); breaker opened "
        f"{stats['breaker_opened']}x, paused {stats['paused_seconds']:.1f}s; "
        f"{at_end} of {n} done when the flapping ended"
    )


def test_expired_messages_are_dead_lettered_unhandled_or_given_to_on_expired(
    effects: sa.Engine,
    db_url: str,
    broker: Broker,
    dependency: Dependency,
    consumers: ConsumerFactory,
) -> None:
    """Published through the outbox and sent by the real relay: messages without a deadline,
    with a far one (ttl=3600), a passed one (deadline= a minute ago) and a short one (ttl=1,
    passed before the consumer starts), interleaved in one partition."""
    topic = broker.create_topic(partitions=1)
    broker.create_topic(f"{topic}.dlq", partitions=1)
    outbox = Outbox()
    kinds = ["none", "far", "passed", "short"]
    expected: dict[str, dict[str, Body]] = {k: {} for k in kinds}
    with Session(effects) as session, session.begin():
        now = datetime.datetime.now(datetime.timezone.utc)
        for i in range(20):
            kind = kinds[i % 4]
            body: Body = {"n": i, "key": f"k{i % 3}", "seq": i, "deadline": kind}
            by_kind: dict[str, dict[str, Any]] = {
                "none": {},
                "far": {"ttl": 3600},
                "passed": {"deadline": now - datetime.timedelta(minutes=1)},
                "short": {"ttl": datetime.timedelta(seconds=1)},
            }
            mid = outbox.publish(session, topic, body, key=body["key"], **by_kind[kind])
            expected[kind][str(mid)] = body
    published = time.time()
    relay = run_cli(
        "outbox-relay",
        ["--db-url", db_url, "--bootstrap-servers", broker.bootstrap, "--once"],
        timeout=90,
    )
    assert relay.returncode == 0, relay.stderr
    handled = {**expected["none"], **expected["far"]}
    expired = {**expected["passed"], **expected["short"]}
    # The short ttl has passed, and the default --clock-skew of 1 s.
    time.sleep(max(0.0, published + 1 + 1 + 0.5 - time.time()))

    group = f"g-{uuid.uuid4().hex[:8]}"
    proc = consumers(*args(db_url, broker, topic, "--idle-timeout", "3", group=group))
    assert proc.wait(90) == 0, proc.tail()
    assert proc.summary() == Summary(10, 0, 10)
    check_exactly_once(effects, handled)
    # The expired ones were never handled: the dependency never heard of them.
    assert set(dependency.served()) == set(handled)
    assert not {r.message_id for r in dependency.requests()} & set(expired)
    letters = dead_letters(effects, topic)
    assert sorted(original_ids(letters)) == sorted(expired)
    for letter in letters:
        assert letter["dlq-reason"] == b"expired"
        assert letter["dlq-attempts"] == b"0"
        assert letter["dlq-error"].startswith(b"expired: ")
        assert letter["outbox-deadline"].endswith(b"Z")  # the original header, kept
    assert sorted(r["reason"] for r in events(proc, "consumer.dead_lettered")) == ["expired"] * 10
    assert stopped_stats(proc)["expired"] == 10
    # Their keys are recorded in the inbox like the handled ones': a redelivery is skipped.
    with effects.connect() as conn:
        keys = set(
            conn.execute(
                sa.text("SELECT key FROM outbox_inbox WHERE consumer = :c"), {"c": NAME}
            ).scalars()
        )
    assert keys == set(handled) | set(expired)
    again = consumers(*args(db_url, broker, topic, "--idle-timeout", "3", group=group))
    assert again.wait(90) == 0, again.tail()
    assert again.summary() == Summary(0, 0, 0)

    # With --on-expired, the function is called instead of the handler (and of a dead letter).
    hook = consumers(
        *args(
            db_url,
            broker,
            topic,
            "--idle-timeout",
            "3",
            "--on-expired",
            "tests.support.downstream:record_expired",
            name="with-hook",
        ),
        name="hook",
    )
    assert hook.wait(90) == 0, hook.tail()
    assert hook.summary() == Summary(20, 0, 0)
    called = effects_of(effects, "expired")
    assert sorted(e.message_id for e in called) == sorted(expired)
    assert len(dead_letters(effects, topic)) == 10  # none more
    assert set(dependency.served()) == set(handled)  # still never called for them
    assert stopped_stats(hook)["expired"] == 10


def test_messages_that_expire_during_an_outage_are_dead_lettered_not_run_late(
    effects: sa.Engine,
    db_url: str,
    broker: Broker,
    dependency: Dependency,
    consumers: ConsumerFactory,
) -> None:
    """One partition: a message with a deadline 15 s away. The dependency is down: the
    message is refused until the breaker opens and holds it. While it is open, 10 messages
    with a deadline 2 s away arrive behind it, then 10 without one. Once every deadline (plus
    the 1 s clock skew) has passed, the dependency comes back: the held message and the 10
    are dead-lettered as ``expired`` by the probes (during the outage or at its end) instead
    of being run late, and the plain ones behind them take effect, in order."""
    topic = broker.create_topic(partitions=1)
    messages = bodies(21, 1)
    dependency.set_up(False)
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=15)
    [held] = produce(
        broker, topic, messages[:1], headers=[(HEADER_DEADLINE, format_deadline(soon))]
    )
    proc = consumers(*args(db_url, broker, topic, *OPEN_MAX))
    proc.wait_for(event("consumer.breaker_open"), timeout=12)
    assert dependency.refused()[held] >= 5  # it was tried, and is held by the open breaker
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)
    queued = produce(
        broker, topic, messages[1:11], headers=[(HEADER_DEADLINE, format_deadline(later))]
    )
    plain = produce(broker, topic, messages[11:])
    time.sleep(
        max(0.0, (soon - datetime.datetime.now(datetime.timezone.utc)).total_seconds() + 1.5)
    )
    # Nothing ran late; a probe since the deadlines may already have expired some of them
    # (it dead-letters them without calling the dependency), the rest go at the next one.
    assert count(effects) == 0
    dependency.set_up(True)

    wait_until(lambda: count(effects) >= 10, 30, "the plain messages", processes=[proc])
    stop(proc)
    assert proc.summary() == Summary(10, 0, 11)
    letters = dead_letters(effects, topic)
    assert original_ids(letters) == [held, *queued]
    assert {letter["dlq-reason"] for letter in letters} == {b"expired"}
    result = check_exactly_once(effects, plain)
    assert [e.n for e in result] == list(range(11, 21))
    # Never run late: the dependency served none of the expired messages.
    assert set(dependency.served()) == set(plain)
    stats = stopped_stats(proc)
    assert stats["expired"] == 11 and stats["failed_attempts"] == 0
    print(f"held message refused {dependency.refused()[held]}x, then expired")


@pytest.mark.parametrize("commit_ms", [500, 60000], ids=["offsets-committed", "none-committed"])
def test_sigkill_while_the_breaker_is_open_loses_nothing_and_doubles_nothing(
    commit_ms: int,
    effects: sa.Engine,
    db_url: str,
    broker: Broker,
    dependency: Dependency,
    consumers: ConsumerFactory,
) -> None:
    """The consumer is killed while its breaker is open, holding a message. With offsets
    committed every 500 ms, the drain starts at the held message; with none committed before
    the kill (auto-commit every 60 s), every message the killed consumer handled comes back
    and the inbox must skip each one."""
    n, keys = 600, 20
    topic = broker.create_topic(partitions=3)
    sent = produce(broker, topic, bodies(n, keys))
    argv = args(db_url, broker, topic, *OPEN_MAX, group=f"g-{uuid.uuid4().hex[:8]}")
    commits = ("-X", f"auto.commit.interval.ms={commit_ms}")
    first = consumers(*argv, *commits, name="first", sleep_ms=2)
    wait_until(lambda: count(effects) >= 200, 60, "200 effects", interval=0.05, processes=[first])
    dependency.set_up(False)
    first.wait_for(event("consumer.breaker_open"), timeout=30)
    time.sleep(1)  # in the middle of an open period, or a probe
    assert first.kill() == -signal.SIGKILL
    done = count(effects)
    assert done < n

    dependency.set_up(True)
    drain = consumers(*argv, "--idle-timeout", "3", name="drain")
    assert drain.wait(90) == 0, drain.tail()
    result = check_exactly_once(effects, sent)  # ... and in order per key across both
    assert dead_letters(effects, topic) == []
    by_pid = collections.Counter(e.pid for e in result)
    assert by_pid == {first.pid: done, drain.pid: n - done}
    summary = drain.summary()
    assert (summary.processed, summary.dead_lettered) == (n - done, 0)
    if commit_ms == 60000:
        assert summary.duplicates == done  # all of them came back, and were skipped
    # Each message was served by the dependency once: what the killed consumer had
    # committed came back only as a skipped duplicate.
    assert set(dependency.served().values()) == {1}
    assert set(dependency.served()) == set(sent)
    no_storm_of_errors(drain)
    print(f"killed after {done} effects; the drain did {n - done}, skipped {summary.duplicates}")


def test_transient_option_maps_an_unknown_exception_to_an_outage(
    effects: sa.Engine,
    db_url: str,
    broker: Broker,
    dependency: Dependency,
    consumers: ConsumerFactory,
) -> None:
    """The handler raises ``DependencyError`` (a type of its own, not DownstreamUnavailable)
    when the dependency closes the connection unanswered; ``--transient`` names it."""
    n = 200
    dependency.refusal = "close"
    topic = broker.create_topic(partitions=2)
    sent = produce(broker, topic, bodies(n, 10))
    proc = consumers(
        *args(
            db_url,
            broker,
            topic,
            *("--transient", "tests.support.downstream.DependencyError"),
            *OPEN_MAX,
            handler="call_unmapped",
        ),
        sleep_ms=5,
    )
    wait_until(lambda: count(effects) >= 50, 60, "50 effects", interval=0.05, processes=[proc])
    dependency.set_up(False)
    proc.wait_for(event("consumer.breaker_open"), timeout=30)
    time.sleep(5)
    dependency.set_up(True)
    wait_until(lambda: count(effects) >= n, 60, "every effect", interval=0.05, processes=[proc])
    stop(proc)

    check_exactly_once(effects, sent)
    assert dead_letters(effects, topic) == []
    assert proc.summary() == Summary(n, 0, 0)
    [opened, *_] = events(proc, "consumer.breaker_open")
    assert opened["reason"].startswith("5 transient failures in a row: DependencyError")
    stats = stopped_stats(proc)
    assert stats["failed_attempts"] == 0 and stats["transient_failures"] >= 5
    no_storm_of_errors(proc)


def test_unclassified_outage_is_bounded_by_the_retry_budget(
    effects: sa.Engine,
    db_url: str,
    broker: Broker,
    dependency: Dependency,
    consumers: ConsumerFactory,
) -> None:
    """The same handler without ``--transient``: its DependencyError is the message's own
    failure as far as the consumer can tell. The dependency is down from the start, for 8 s
    (from its first refusal), shorter than the breaker's 30 s window.

    The bound: the first messages are retried as usual (4 retries each, then dead-lettered
    at --max-attempts 5) until the window holds 10 retries (the budget applies past
    ``budget_min_retries`` = 10; 20 % of the window's few attempts is less): 2 messages
    dead-lettered, the third has used 2 attempts. Then every failure counts as transient
    ("retry budget spent"): 5 in a row open the breaker. Each half-open probe still counts an
    attempt of the message it tries (it may be poison), so the third is dead-lettered at its
    third probe, and each further message at its fifth (a probe that dead-letters a message
    tries the next one too). Probes are at least 0.5 s apart: at most 16 in 8 s, so at most
    2 + 1 + 3 = 6 dead letters of 200; 2 were seen (the breaker opens after about 3 s and its
    growing open periods, 0.5-1, 0.5-2, 0.5-4 s, leave time for 2 or 3 probes). The budget
    stays spent until the breaker closes, so the bound holds for open periods longer than the
    window too (tests/integration/test_consumer_breaker.py; before that fix, each probe after
    an open period longer than the window found a fresh budget: 14 dead letters in a 60 s
    outage with --breaker-window 8 --breaker-open-max 16)."""
    n = 200
    dependency.refusal = "close"
    dependency.set_up(False)
    topic = broker.create_topic(partitions=2)
    sent = produce(broker, topic, bodies(n, 10))
    proc = consumers(*args(db_url, broker, topic, *OPEN_MAX, handler="call_unmapped"))
    mark = proc.wait_for(event("consumer.breaker_open"), timeout=60)
    started = dependency.requests()[0].at  # the outage as the consumer sees it
    time.sleep(max(0.0, started + 8 - time.monotonic()))
    dependency.set_up(True)
    proc.wait_for(event("consumer.breaker_closed"), after=mark, timeout=30)

    def finished() -> bool:
        return count(effects) + len(dead_letters(effects, topic)) >= n

    wait_until(finished, 60, "every message handled", interval=0.05, processes=[proc])
    stop(proc)

    letters = dead_letters(effects, topic)
    lost = original_ids(letters)
    assert 1 <= len(letters) <= 6, f"{len(letters)} dead letters"
    assert all(letter["dlq-reason"] == b"attempts" for letter in letters)
    assert all(letter["dlq-attempts"] == b"5" for letter in letters)
    check_exactly_once(effects, {m: b for m, b in sent.items() if m not in lost})
    assert proc.summary() == Summary(n - len(letters), 0, len(letters))
    [opened, *_] = events(proc, "consumer.breaker_open")
    assert "retry budget" in opened["reason"], opened
    assert opened["reason"].startswith("5 transient failures in a row: retry budget spent")
    retries = proc.count(event("consumer.retry"))
    stats = stopped_stats(proc)
    refused = sum(dependency.refused().values())
    print(
        f"{len(letters)} of {n} dead-lettered; {retries} retries logged; refused {refused} in "
        f"{dependency.down_periods()[0][1] - started:.1f}s; breaker opened "
        f"{stats['breaker_opened']}x; failed attempts {stats['failed_attempts']}"
    )
