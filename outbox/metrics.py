"""Prometheus metrics for the relay and the consumer (``--metrics-port``: ``GET /metrics``).

Needs the ``metrics`` extra (``prometheus-client``). :class:`RelayMetrics` and
:class:`ConsumerMetrics` are observers (:mod:`outbox.observe`): they count what the loops
report, on the loop's thread, per batch for the relay (never per message on its hot path)
and per message for the consumer. Each keeps its own registry, so two in one process (tests,
an application embedding both) do not collide, and :meth:`render` is the ``/metrics`` route.

Names follow Prometheus conventions: ``outbox_`` prefix, base units (seconds, messages),
``_total`` counters, histograms for durations. Labels are ``topic``, ``kind``, ``outcome``,
``state`` and (for consumer lag) ``partition``: never a key or a message id.

Gauges that need SQL (backlog, oldest pending age, dead messages) are read by the scrape, on
a connection of their own, at most every ``sql_interval`` seconds: a scrape storm costs the
database nothing more.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from outbox.exceptions import ConfigurationError
from outbox.observe import BatchOutcome, ConsumerObserver, MessageRef, Outcome, RelayObserver

try:
    import prometheus_client
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.registry import CollectorRegistry
except ImportError:  # pragma: no cover - exercised without the extra
    prometheus_client = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from outbox.breaker import Transition
    from outbox.config import RelayConfig
    from outbox.transport.base import IncomingMessage

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds, from a millisecond to ten minutes: batch, claim, handler and end-to-end times.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 600.0,
)  # fmt: skip
_STATES = ("closed", "half_open", "open")


def available() -> bool:
    """Whether ``prometheus-client`` is installed."""
    return prometheus_client is not None


def _require() -> None:
    if prometheus_client is None:
        raise ConfigurationError(
            "/metrics needs prometheus-client: pip install 'sqlalchemy-outbox[metrics]'"
        )


class BulkHistogram:
    """A histogram fed a batch of values at once: sorted, each bucket's cumulative count is
    one bisect. Feeding a relay batch of 1,000 latencies costs about what 20 single
    observations would."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(buckets)
        self._counts = [0] * len(self.bounds)
        self._count = 0
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: list[float]) -> None:
        if not values:
            return
        values.sort()
        counts = [bisect.bisect_right(values, b) for b in self.bounds]
        self._add(counts, len(values), sum(values))

    def observe_ages(self, times: list[float], now: float) -> None:
        """Observe ``now - t`` for each of ``times`` (sorted in place) without computing one:
        ``now - t <= bound`` exactly when ``t >= now - bound``."""
        if not times:
            return
        times.sort()  # the relay's rows come in id order: nearly sorted already
        n = len(times)
        counts = [n - bisect.bisect_left(times, now - b) for b in self.bounds]
        self._add(counts, n, now * n - math.fsum(times))

    def _add(self, counts: list[int], n: int, total: float) -> None:
        with self._lock:
            for i, c in enumerate(counts):
                self._counts[i] += c
            self._count += n
            self._sum += total

    def family(self) -> Any:
        with self._lock:
            buckets = [(_le(b), n) for b, n in zip(self.bounds, self._counts, strict=True)]
            buckets.append(("+Inf", self._count))
            total = self._sum
        return HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=total
        )


def _le(bound: float) -> str:
    return repr(float(bound))


class _Collect:
    """A collector from a function (prometheus-client calls ``collect`` at each scrape)."""

    def __init__(self, collect: Callable[[], Iterable[Any]]) -> None:
        self.collect = collect

    def describe(self) -> list[Any]:
        return []  # unchecked: the names are stable, and describing would run the queries


class _Base:
    def __init__(self) -> None:
        _require()
        self.registry = CollectorRegistry(auto_describe=False)

    def render(self) -> tuple[int, str, bytes]:
        """The ``/metrics`` route: Prometheus' text format."""
        return 200, CONTENT_TYPE, prometheus_client.generate_latest(self.registry)

    def _counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Any:
        return prometheus_client.Counter(name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Any:
        return prometheus_client.Gauge(name, doc, labels, registry=self.registry)

    def _histogram(self, name: str, doc: str, labels: Sequence[str] = ()) -> Any:
        return prometheus_client.Histogram(
            name, doc, labels, registry=self.registry, buckets=DURATION_BUCKETS
        )


class _Children:
    """A labelled metric's children, cached: ``labels()`` costs a lock and a dict lookup."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class _StateGauge:
    """A breaker's state as ``NAME{state="..."}`` 1 for the current one, 0 for the others."""

    def __init__(self, gauge: Any) -> None:
        self._gauge = gauge
        self.set("closed")

    def set(self, state: str) -> None:
        for s in _STATES:
            self._gauge.labels(s).set(1 if s == state else 0)


class TableGauges:
    """Backlog, oldest pending age and dead count of the outbox table, read with ``sql``
    (:func:`outbox.statements.table_gauges`, for the driver) at most every ``interval``
    seconds on a connection of their own (``connect``); the last good values are kept while
    the database cannot be read."""

    def __init__(
        self,
        connect: Callable[[], Any],
        sql: str,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self._sql = sql
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: Any = None
        self._read_at = -float("inf")
        self.values: tuple[float, float, float] | None = None
        self.errors = 0

    def read(self) -> tuple[float, float, float] | None:
        """(backlog, oldest age in seconds, dead), refreshed if older than the interval."""
        with self._lock:  # one query at a time; concurrent scrapes get the cached values
            if self._clock() - self._read_at >= self._interval:
                self._read_at = self._clock()
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = self._connect()
                    row = self._conn.execute(self._sql).fetchone()
                    self.values = (float(row[0]), float(row[1] or 0.0), float(row[2]))
                except Exception as exc:  # a metric must never break the scrape
                    self.errors += 1
                    logger.warning(
                        "metrics query failed",
                        extra={"event": "metrics.query_failed", "error": str(exc).strip()},
                    )
                    self.close()
            return self.values

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken
                conn.close()


class RelayMetrics(_Base, RelayObserver):
    """The relay's metrics; pass as an observer and serve :meth:`render` as ``/metrics``.

    ``table``: the outbox table's gauges, read by the scrape (None: no SQL gauges)."""

    def __init__(self, table: TableGauges | None = None) -> None:
        _Base.__init__(self)
        c, g, h = self._counter, self._gauge, self._histogram
        self._sent = _Children(
            c("outbox_relay_messages_sent", "Messages acknowledged by the broker", ["topic"])
        )
        self._failures = _Children(
            c(
                "outbox_relay_send_failures",
                "Send failures: kind=message (refused, an attempt counted) or transport "
                "(the broker failed a batch or a probe)",
                ["kind"],
            )
        )
        self._parked = _Children(
            c("outbox_relay_parked", "Messages parked after max_attempts", ["topic"])
        )
        self._retries = c("outbox_relay_retries", "Failed messages scheduled for another attempt")
        self._batches = h("outbox_relay_batch_duration_seconds", "From claim to recorded")
        self._claims = h("outbox_relay_claim_duration_seconds", "Claim statement time")
        self._latency = BulkHistogram(
            "outbox_relay_commit_to_ack_seconds",
            "From the row's creation (its transaction's start) to the broker's acknowledgement",
            DURATION_BUCKETS,
        )
        self._leader = g("outbox_relay_leader", "1 while this relay is the leader")
        self._recreated = c("outbox_relay_producer_recreations", "Broker clients re-created")
        self._reconnects = c("outbox_relay_database_reconnects", "Database sessions lost")
        self._db_errors = c("outbox_relay_database_errors", "Statements failed on a live session")
        self._state = _StateGauge(
            g("outbox_relay_broker_state", "The broker backoff's state (1 = current)", ["state"])
        )
        self._transitions = _Children(
            c("outbox_relay_broker_state_transitions", "Broker backoff transitions", ["state"])
        )
        self._paused = c(
            "outbox_relay_broker_paused_seconds", "Seconds sends were paused for the broker"
        )
        self._table = table
        if table is not None:
            self.registry.register(_Collect(self._table_families))
        self.registry.register(_Collect(lambda: [self._latency.family()]))

    def _table_families(self) -> Iterator[Any]:
        assert self._table is not None
        values = self._table.read()
        if values is None:
            return
        backlog, oldest, dead = values
        yield GaugeMetricFamily(
            "outbox_relay_backlog_messages", "Pending and retrying messages", value=backlog
        )
        yield GaugeMetricFamily(
            "outbox_relay_oldest_pending_age_seconds",
            "Age of the oldest pending message (the lag)",
            value=oldest,
        )
        yield GaugeMetricFamily("outbox_relay_dead_messages", "Parked messages", value=dead)

    # -- hooks ----------------------------------------------------------------------------------

    def leadership(self, leader: bool) -> None:
        self._leader.set(1 if leader else 0)

    def claim_finished(self, rows: int, ahead: bool, seconds: float) -> None:
        self._claims.observe(seconds)

    def batch_finished(self, outcome: BatchOutcome) -> None:
        self._batches.observe(outcome.seconds)
        if outcome.failed:
            self._retries.inc(outcome.failed - outcome.parked)

    def messages_acked(self, topics: Sequence[str], created: list[float], acked_at: float) -> None:
        for topic, n in collections.Counter(topics).items():  # counted in C
            self._sent(topic).inc(n)
        self._latency.observe_ages(created, acked_at)

    def send_failed(self, message: MessageRef, reason: str) -> None:
        self._failures("message").inc()

    def parked(self, message: MessageRef, attempts: int) -> None:
        self._parked(message.topic).inc()

    def broker_unavailable(self, reason: str, retry_in: float, failures: int) -> None:
        self._failures("transport").inc()

    def breaker_changed(self, transition: Transition) -> None:
        self._state.set(transition.state)
        self._transitions(transition.state).inc()
        if transition.state == "closed":
            self._paused.inc(transition.seconds)

    def producer_recreated(self) -> None:
        self._recreated.inc()

    def database_error(self, reason: str, retry_in: float) -> None:
        self._db_errors.inc()

    def database_lost(self, reason: str, abandoned: int, retry_in: float) -> None:
        self._reconnects.inc()
        self._leader.set(0)

    def stopped(self, stats: Any) -> None:
        self._leader.set(0)
        if self._table is not None:
            self._table.close()


class ConsumerMetrics(_Base, ConsumerObserver):
    """The consumer's metrics; pass as an observer, then :meth:`watch` the consumer (for its
    source's lag and commits, and the breaker's retry budget), and serve :meth:`render`."""

    def __init__(self) -> None:
        _Base.__init__(self)
        c, g, h = self._counter, self._gauge, self._histogram
        self._messages = _Children(
            c(
                "outbox_consumer_messages",
                "Messages done: outcome=processed, duplicate or dead_lettered",
                ["topic", "outcome"],
            )
        )
        self._seconds = _Children(
            h(
                "outbox_consumer_message_duration_seconds",
                "From receipt to done, handler attempts and retries included",
                ["topic"],
            )
        )
        self._retries = _Children(
            c("outbox_consumer_retries", "Handler failures retried (an attempt)", ["topic"])
        )
        self._transient = _Children(
            c(
                "outbox_consumer_transient_failures",
                "Failures of the handler's dependency (no attempt counted)",
                ["topic"],
            )
        )
        self._db = c("outbox_consumer_database_unavailable", "Database outages met")
        self._state = _StateGauge(
            g("outbox_consumer_breaker_state", "The circuit breaker (1 = current)", ["state"])
        )
        self._transitions = _Children(
            c("outbox_consumer_breaker_transitions", "Circuit breaker transitions", ["state"])
        )
        self._paused = c(
            "outbox_consumer_paused_seconds", "Seconds the breaker kept the partitions paused"
        )
        self._consumer: Any = None
        self.registry.register(_Collect(self._live_families))

    def watch(self, consumer: Any) -> None:
        """Read ``consumer``'s source (lag, offset commits) and breaker at each scrape."""
        self._consumer = consumer

    def _live_families(self) -> Iterator[Any]:
        consumer = self._consumer
        if consumer is None:
            return
        source = consumer.source
        lag = dict(getattr(source, "lag", {}) or {})
        family = GaugeMetricFamily(
            "outbox_consumer_lag_messages",
            "Messages behind the partition's end (librdkafka statistics)",
            labels=["topic", "partition"],
        )
        for (topic, partition), n in sorted(lag.items()):
            family.add_metric([topic, str(partition)], n)
        yield family
        commits = getattr(source, "commits", None)
        if commits is not None:
            counter = CounterMetricFamily(
                "outbox_consumer_offset_commits", "Offset commits that succeeded"
            )
            counter.add_metric([], commits)
            yield counter
        retries, attempts = consumer.breaker.budget()
        yield GaugeMetricFamily(
            "outbox_consumer_retry_budget_used_ratio",
            "Retries of unclassified failures over attempts in the breaker's window",
            value=retries / attempts if attempts else 0.0,
        )

    # -- hooks ----------------------------------------------------------------------------------

    def message_finished(self, message: IncomingMessage, outcome: Outcome, seconds: float) -> None:
        self._messages(message.topic, outcome).inc()
        self._seconds(message.topic).observe(seconds)

    def attempt_failed(
        self,
        message: IncomingMessage,
        key: str,
        attempts: int,
        error: str,
        retry_in: float,
        exception: BaseException | None = None,
    ) -> None:
        self._retries(message.topic).inc()

    def transient_failure(
        self,
        message: IncomingMessage,
        key: str,
        error: str,
        retry_in: float,
        exception: BaseException | None = None,
    ) -> None:
        self._transient(message.topic).inc()

    def breaker_changed(self, transition: Transition) -> None:
        self._state.set(transition.state)
        self._transitions(transition.state).inc()
        if transition.state == "closed":
            self._paused.inc(transition.seconds)

    def database_unavailable(self, error: str, retry_in: float) -> None:
        self._db.inc()


def missing() -> tuple[int, str, bytes]:
    """``/metrics`` without prometheus-client: 501 and what to install."""
    return 501, "text/plain; charset=utf-8", b"install sqlalchemy-outbox[metrics] for /metrics\n"


def relay_table_gauges(config: RelayConfig, interval: float = 5.0) -> TableGauges:
    """:class:`TableGauges` for the relay of ``config``: its own connection (application name
    ``<name>-metrics``), statements limited to 5 s."""
    import psycopg

    from outbox import statements
    from outbox.config import relay_conninfo
    from outbox.schema import define_tables

    conninfo = relay_conninfo(config)
    tables = define_tables(table=config.table, schema=config.schema)
    sql = statements.to_driver_sql(statements.table_gauges(tables))

    def connect() -> Any:
        return psycopg.connect(
            conninfo,
            autocommit=True,
            application_name=f"{config.application_name}-metrics",
            options="-c statement_timeout=5000",
        )

    return TableGauges(connect, sql, interval)
