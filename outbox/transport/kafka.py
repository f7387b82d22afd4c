"""Kafka transport on confluent-kafka (librdkafka). The only module that imports it.

Kafka client errors are translated here into the library's exceptions and failure kinds.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections.abc import Generator, Mapping
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException

from outbox.exceptions import ConfigurationError, MessageRejected, TransportUnavailable
from outbox.transport.base import (
    DeliveryFailure,
    FailureKind,
    IncomingMessage,
    OnDelivery,
    OutgoingMessage,
)

logger = logging.getLogger(__name__)
librdkafka_logger = logging.getLogger("outbox.transport.librdkafka")


class _Throttle:
    """Passes one event per key per ``interval`` seconds: while a broker is down, librdkafka
    repeats the same error or log line many times a second."""

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self._last: dict[object, float] = {}

    def ready(self, key: object = None) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval) < self.interval:
            return False
        self._last[key] = now
        return True


class _LibrdkafkaFilter(logging.Filter):
    """Keep librdkafka's own log lines useful.

    * It warns that enable.gapless.guarantee is experimental on every start; we set it on
      purpose (see DEFAULTS), so that line would only teach operators to ignore warnings.
    * While a broker is down it logs every reconnect attempt (about 20 lines a second): pass
      one line per facility and level per ``interval`` seconds.
    """

    def __init__(self, interval: float = 30.0) -> None:
        super().__init__()
        self._throttle = _Throttle(interval)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "enable.gapless.guarantee is experimental" in text:
            return False
        return self._throttle.ready((text.split(" ", 1)[0], record.levelno))


librdkafka_logger.addFilter(_LibrdkafkaFilter())

#: Settings the relay's guarantees rest on; a user may not override them.
REQUIRED = {"enable.idempotence": "true", "acks": "all"}
_ALLOWED = {"enable.idempotence": {"true"}, "acks": {"all", "-1"}}

#: Defaults a user may override with ``-X name=value``.
DEFAULTS: dict[str, str] = {
    # Same key -> same partition as the Java client, so mixed producers agree.
    "partitioner": "murmur2_random",
    "linger.ms": "5",
    # How long a message may wait for its acknowledgement before the relay hears it failed.
    "message.timeout.ms": "30000",
    # Turn a batch failure that would leave a gap in a partition into a fatal error instead
    # of letting later messages (of the same key) through: the relay re-creates the producer
    # and sends them again, in order.
    "enable.gapless.guarantee": "true",
    "socket.keepalive.enable": "true",
}

# Errors that are no fault of the message: broker down, slow, moving leaders; or messages
# purged by our own shutdown.
_TRANSPORT_CODES = {
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._PURGE_QUEUE,
    KafkaError._PURGE_INFLIGHT,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
}

# Errors about the producer's identity or sequence state, not about a message: the idempotent
# producer is fenced or lost its state (a message failed with one of them would only fail again
# on the same client), so the client is re-created and nothing is counted against the message.
_PRODUCER_STATE_CODES = {
    KafkaError._FATAL,
    KafkaError._FENCED,
    KafkaError._GAPLESS_GUARANTEE,
    KafkaError._INCONSISTENT,
    KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.INVALID_PRODUCER_ID_MAPPING,
    KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
}

# Settings whose values must never reach a log line.
_SECRET_HINTS = ("password", "secret", "key", "token", "jaas")


def classify(err: KafkaError) -> DeliveryFailure:
    """Map a librdkafka error to what the relay should do about it."""
    reason = f"{err.name()}: {err.str()}"
    if err.fatal() or err.code() in _PRODUCER_STATE_CODES:
        return DeliveryFailure(FailureKind.FATAL, reason)
    if err.code() in _TRANSPORT_CODES or err.retriable():
        return DeliveryFailure(FailureKind.TRANSPORT, reason)
    return DeliveryFailure(FailureKind.MESSAGE, reason)


def redact(config: Mapping[str, str]) -> dict[str, str]:
    """The configuration with secret-looking values hidden, for logs and error messages."""
    return {
        k: ("***" if any(h in k.lower() for h in _SECRET_HINTS) else v) for k, v in config.items()
    }


def producer_config(bootstrap_servers: str, overrides: Mapping[str, str]) -> dict[str, str]:
    """Merge defaults, user overrides and required settings; refuse unsafe overrides."""
    if not bootstrap_servers:
        raise ConfigurationError(
            "no Kafka bootstrap servers: pass --bootstrap-servers (or OUTBOX_BOOTSTRAP_SERVERS)"
        )
    conf = {**DEFAULTS, **overrides, "bootstrap.servers": bootstrap_servers}
    for name, allowed in _ALLOWED.items():
        if name in overrides and str(overrides[name]).lower() not in allowed:
            raise ConfigurationError(
                f"Kafka setting {name}={overrides[name]} is not allowed: the relay needs "
                f"{name}={REQUIRED[name]} for at-least-once, in-order delivery"
            )
        conf[name] = REQUIRED[name]
    return conf


class KafkaTransport:
    """Idempotent Kafka producer (``acks=all``); see :data:`DEFAULTS` and :data:`REQUIRED`."""

    def __init__(self, bootstrap_servers: str, overrides: Mapping[str, str] | None = None) -> None:
        self._config = producer_config(bootstrap_servers, overrides or {})
        self._producer = _client(confluent_kafka.Producer, self._config, self._on_error)
        self._broken = False
        self._error_log = _Throttle()

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._broken = True
            logger.error(
                "kafka producer fatal error",
                extra={"event": "kafka.fatal", "error": err.str()},
            )
            return
        if self._error_log.ready():
            logger.warning(
                "kafka client error",
                extra={"event": "kafka.error", "error": f"{err.name()}: {err.str()}"},
            )

    def send(self, message: OutgoingMessage, on_delivery: OnDelivery) -> None:
        if self._broken:
            raise TransportUnavailable("the Kafka producer is in a fatal state")

        while True:
            try:
                self._producer.produce(
                    message.topic,
                    value=message.value,
                    key=message.key,
                    headers=message.headers
                    if isinstance(message.headers, list)
                    else list(message.headers),
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                # The local queue is full: serve delivery reports to make room.
                self._producer.poll(0.05)
            except KafkaException as exc:
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if err is None:
                    raise TransportUnavailable(_describe(exc)) from exc
                failure = classify(err)
                if failure.kind is FailureKind.MESSAGE:
                    raise MessageRejected(failure.reason) from exc
                if failure.kind is FailureKind.FATAL:
                    self._broken = True
                raise TransportUnavailable(failure.reason) from exc

    def failure(self, error: KafkaError) -> DeliveryFailure:
        failure = classify(error)
        if failure.kind is FailureKind.FATAL:
            self._broken = True
        return failure

    def poll(self, timeout: float) -> None:
        try:
            self._producer.poll(timeout)
        except KafkaException as exc:
            self._fatal(exc)

    def flush(self, timeout: float) -> None:
        # Unlike poll(), flush() makes librdkafka send at once instead of waiting linger.ms:
        # the relay flushes only once a whole batch is queued, so batching is kept and the
        # last messages do not wait.
        try:
            self._producer.flush(timeout)
        except KafkaException as exc:
            self._fatal(exc)

    def _fatal(self, exc: KafkaException) -> None:
        # confluent-kafka raises a fatal error (e.g. fenced, gapless guarantee broken) from
        # poll()/flush() instead of passing it to error_cb. The client must be re-created; the
        # pending delivery reports still arrive on the next polls.
        self._broken = True
        logger.error(
            "kafka producer fatal error",
            extra={"event": "kafka.fatal", "error": _describe(exc)},
        )

    def check(self, timeout: float) -> None:
        """Reach the broker, and leave the producer ready to send: connected to a broker it
        learned of, with its producer id on the way."""
        deadline = time.monotonic() + timeout
        try:
            self._producer.list_topics(timeout=timeout)
            # The idempotent producer sends nothing before it has a producer id, and librdkafka
            # asks for one only when a metadata response arrives or on a 500 ms timer. The
            # first response comes over the bootstrap connection, which librdkafka then
            # closes, often before it has connected to the broker it learned of: no broker is
            # up to ask, and the first batch after a start (or a new client) waited for the
            # timer, about half the time (0.5 s). A second request goes over a learned
            # broker's connection, and its response has the id asked for at once.
            self._producer.list_topics(timeout=max(deadline - time.monotonic(), 0.001))
        except KafkaException as exc:
            raise TransportUnavailable(
                f"cannot reach Kafka at {self._config['bootstrap.servers']} "
                f"({_describe(exc)}); check --bootstrap-servers and that the broker is up"
            ) from exc

    @property
    def broken(self) -> bool:
        return self._broken

    def close(self, timeout: float) -> None:
        try:
            remaining = self._producer.flush(timeout)
        except KafkaException as exc:
            self._fatal(exc)
            remaining = len(self._producer)
        if remaining:
            # Whatever is left was never acknowledged: its rows stay unsent in the database.
            self._producer.purge()
            self.poll(0)
            logger.warning(
                "kafka producer closed with unacknowledged messages",
                extra={"event": "kafka.unacknowledged_at_close", "count": remaining},
            )


#: Consumer settings the runner's guarantees rest on (offsets only after the DB commit).
CONSUMER_REQUIRED = {"enable.auto.offset.store": "false"}
CONSUMER_DEFAULTS: dict[str, str] = {
    "auto.offset.reset": "earliest",
    "enable.auto.commit": "true",  # commits *stored* offsets, i.e. processed ones only
    "auto.commit.interval.ms": "1000",
    "partition.assignment.strategy": "cooperative-sticky",
    "socket.keepalive.enable": "true",
    # How long the broker may hold a fetch with nothing new: librdkafka's 500 ms default is
    # most of a message's end-to-end latency (about 180 ms at p50). At 100 ms an idle consumer
    # costs the broker about 2 % of a core and the latency is 35 ms; at 10-25 ms, 11-14 %
    # for 10-15 ms (benchmarks/bench_scale.py fetch; docs/performance.md).
    "fetch.wait.max.ms": "100",
}


class KafkaSource:
    """A consumer-group member that reads ``topics`` and commits only processed offsets.

    Offsets are stored after the handler's transaction committed and are committed in the
    background, on revocation (rebalance) and at close: a crash in between redelivers, and the
    inbox skips what was already done.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        group_id: str,
        topics: list[str],
        overrides: Mapping[str, str] | None = None,
    ) -> None:
        if not bootstrap_servers:
            raise ConfigurationError("no Kafka bootstrap servers: pass --bootstrap-servers")
        if not group_id:
            raise ConfigurationError("no consumer group: pass --group")
        if not topics:
            raise ConfigurationError("no topics: pass --topic at least once")
        overrides = dict(overrides or {})
        for name, value in CONSUMER_REQUIRED.items():
            if name in overrides and str(overrides[name]).lower() != value:
                raise ConfigurationError(
                    f"Kafka setting {name}={overrides[name]} is not allowed: offsets must be "
                    "stored only after the handler's transaction committed"
                )
        conf: dict[str, Any] = {
            **CONSUMER_DEFAULTS,
            **overrides,
            **CONSUMER_REQUIRED,
            "bootstrap.servers": bootstrap_servers,
            "group.id": group_id,
            # Lag per partition (metrics), when statistics.interval.ms is set.
            "stats_cb": self._on_stats,
            "on_commit": self._on_commit,
        }
        #: Messages behind each assigned partition's end, from librdkafka's statistics.
        self.lag: dict[tuple[str, int], int] = {}
        #: Offset commits that succeeded.
        self.commits = 0
        self._consumer = _client(confluent_kafka.Consumer, conf, self._on_error)
        #: True once this member has joined the group and got its assignment (even an empty
        #: one): until then no message can come, so the runner does not count it as idle.
        self.joined = False
        #: False while librdkafka reports every broker down: the runner does not wait for a
        #: group join that cannot happen.
        self.reachable = True
        self._bootstrap = bootstrap_servers
        #: Group assignments received (a rebalance gives one per member).
        self.assignments = 0
        self._paused = False
        self._repause = False
        #: Per partition, the messages to hand out first, in offset order (see :meth:`rewind`).
        self._held: dict[tuple[str, int], list[IncomingMessage]] = {}
        #: The partitions assigned now: a batch drops messages of partitions revoked while it
        #: was being read (the next owner reads them from the committed position).
        self._assigned: set[tuple[str, int]] = set()
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._error_log = _Throttle()

    def check(self, timeout: float) -> None:
        """Raise :class:`TransportUnavailable` unless the broker answers within ``timeout``."""
        try:
            self._consumer.list_topics(timeout=timeout)
        except KafkaException as exc:
            self.reachable = False
            raise TransportUnavailable(
                f"cannot reach Kafka at {self._bootstrap} ({_describe(exc)}); check "
                "--bootstrap-servers and that the broker is up"
            ) from exc

    def _on_error(self, err: KafkaError) -> None:
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self.reachable = False
        if self._error_log.ready() or err.fatal():
            logger.warning(
                "kafka consumer error",
                extra={"event": "kafka.error", "error": f"{err.name()}: {err.str()}"},
            )

    def _on_stats(self, stats: str) -> None:
        try:
            topics = json.loads(stats).get("topics", {})
            lag: dict[tuple[str, int], int] = {}
            for topic, info in topics.items():
                for partition, p in info.get("partitions", {}).items():
                    n = p.get("consumer_lag", -1)
                    # -1: unknown (not assigned, or no committed/fetched offset yet).
                    if int(partition) >= 0 and n is not None and n >= 0:
                        lag[(topic, int(partition))] = int(n)
            self.lag = lag
        except (ValueError, AttributeError, TypeError):
            logger.debug("unreadable librdkafka statistics", extra={"event": "kafka.bad_stats"})

    def _on_commit(self, err: Any, partitions: Any) -> None:
        if err is None:
            self.commits += 1

    def _on_assign(self, consumer: Any, partitions: Any) -> None:
        # confluent-kafka still applies the assignment itself after this callback returns:
        # a paused source pauses the new partitions once poll() returns.
        self.joined = True
        self.reachable = True
        self.assignments += 1
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        self._repause = self._paused
        logger.info(
            "partitions assigned",
            extra={"event": "consumer.partitions_assigned", "partitions": _names(partitions)},
        )

    def _on_revoke(self, consumer: Any, partitions: Any) -> None:
        for tp in partitions:
            # The next owner reads them from the committed position.
            self._held.pop((tp.topic, tp.partition), None)
            self._assigned.discard((tp.topic, tp.partition))
        logger.info(
            "partitions revoked",
            extra={"event": "consumer.partitions_revoked", "partitions": _names(partitions)},
        )
        # Commit what was processed before the partitions move, so the next owner starts
        # right after it (the inbox would catch repeats anyway; this keeps them rare).
        try:
            self.commit()
        except KafkaException as exc:
            logger.warning(
                "offset commit on revoke failed",
                extra={"event": "consumer.commit_failed", "error": _describe(exc)},
            )

    def poll(self, timeout: float) -> IncomingMessage | None:
        if self._held and not self._paused:
            return self._take_held(1)[0]
        msg = self._consumer.poll(timeout)
        self._after_poll()
        if msg is None:
            return None
        incoming = self._accept(msg)
        if incoming is not None and self._paused:
            # Fetched from a newly assigned partition before it was paused: keep it for
            # resume() (librdkafka resumes fetching after it).
            self._pause_assigned()
            self.rewind(incoming)
            return None
        return incoming

    def poll_batch(
        self, max_messages: int, timeout: float, max_wait: float = 0.0
    ) -> list[IncomingMessage]:
        if self._held and not self._paused:
            # Only held messages: a partition's later messages come after all of its held ones.
            return self._take_held(max_messages)
        raw = self._consume(max_messages, 0)  # what is fetched already
        if not raw:
            raw = self._consume(1, timeout)  # returns as soon as one is there
            if raw and max_messages > 1:
                # The rest of its fetch came with it: the same batch, not one of its own.
                raw += self._consume(max_messages - 1, 0)
        if raw and len(raw) < max_messages and max_wait > 0:
            raw += self._consume(max_messages - len(raw), max_wait)
        batch: list[IncomingMessage] = []
        for msg in raw:
            incoming = self._accept(msg)
            if incoming is None:
                continue
            if (incoming.topic, incoming.partition) not in self._assigned:
                continue  # revoked while this batch was read
            if self._paused:
                # As in poll(): fetched from a newly assigned partition before it was paused.
                self.rewind(incoming)
                continue
            batch.append(incoming)
        if self._paused and self._held:
            self._pause_assigned()
        return batch

    def _consume(self, max_messages: int, timeout: float) -> list[Any]:
        raw: list[Any] = self._consumer.consume(max_messages, timeout)
        self._after_poll()
        return raw

    def _after_poll(self) -> None:
        if self._repause:
            self._repause = False
            self._pause_assigned()

    def _accept(self, msg: Any) -> IncomingMessage | None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                logger.warning(
                    "kafka consume error",
                    extra={"event": "kafka.error", "error": f"{err.name()}: {err.str()}"},
                )
            return None
        return self._incoming(msg)

    def _take_held(self, max_messages: int) -> list[IncomingMessage]:
        """Up to ``max_messages`` held messages, partition by partition, in offset order."""
        out: list[IncomingMessage] = []
        for tp in list(self._held):
            held = self._held[tp]
            take = held[: max_messages - len(out)]
            out += take
            del held[: len(take)]
            if not held:
                del self._held[tp]
            if len(out) >= max_messages:
                break
        return out

    def pause(self) -> None:
        self._paused = True
        self._pause_assigned()

    def resume(self) -> None:
        self._paused = False
        self._repause = False
        try:
            self._consumer.resume(self._consumer.assignment())
        except KafkaException as exc:
            raise TransportUnavailable(f"cannot resume consuming: {_describe(exc)}") from exc

    def rewind(self, message: IncomingMessage) -> None:
        held = self._held.setdefault((message.topic, message.partition), [])
        offsets = [m.offset for m in held]
        at = bisect.bisect_left(offsets, message.offset)
        if at < len(held) and held[at].offset == message.offset:
            return  # held already
        held.insert(at, message)

    def _pause_assigned(self) -> None:
        try:
            self._consumer.pause(self._consumer.assignment())
        except KafkaException as exc:
            raise TransportUnavailable(f"cannot pause consuming: {_describe(exc)}") from exc

    @staticmethod
    def _incoming(msg: Any) -> IncomingMessage:
        raw_key, raw_value = msg.key(), msg.value()
        return IncomingMessage(
            topic=str(msg.topic()),
            partition=int(msg.partition() or 0),
            offset=int(msg.offset() or 0),
            key=raw_key.encode() if isinstance(raw_key, str) else raw_key,
            value=raw_value.encode() if isinstance(raw_value, str) else raw_value,
            headers=_headers(msg.headers()),
        )

    def processed(self, message: IncomingMessage) -> None:
        self._consumer.store_offsets(
            offsets=[
                confluent_kafka.TopicPartition(message.topic, message.partition, message.offset + 1)
            ]
        )

    def commit(self) -> None:
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not (isinstance(err, KafkaError) and err.code() == KafkaError._NO_OFFSET):
                raise

    def close(self) -> None:
        try:
            self.commit()
        except KafkaException as exc:
            logger.warning(
                "offset commit at close failed",
                extra={"event": "consumer.commit_failed", "error": _describe(exc)},
            )
        self._consumer.close()


def read_topic(
    bootstrap_servers: str,
    topic: str,
    overrides: Mapping[str, str] | None = None,
    *,
    timeout: float = 30.0,
) -> Generator[IncomingMessage, None, None]:
    """Every message of ``topic``, from the beginning of each partition to its end as it was
    when reading got there (librdkafka's partition EOF; watermark queries are not reliable on
    every Kafka-compatible broker), in offset order per partition. An ``assign()`` consumer:
    no group is joined, no offset is committed.

    Raises :class:`ConfigurationError` when the topic does not exist, and
    :class:`TransportUnavailable` when the broker cannot be reached or nothing arrives for
    ``timeout`` seconds before every partition's end.
    """
    if not bootstrap_servers:
        raise ConfigurationError("no Kafka bootstrap servers: pass --bootstrap-servers")
    conf: dict[str, Any] = {
        **{k: v for k, v in (overrides or {}).items() if not k.startswith("group.")},
        "bootstrap.servers": bootstrap_servers,
        # A group id is required by the client; nothing joins or commits with it.
        "group.id": "outbox-read-topic",
        "enable.auto.commit": "false",
        "enable.auto.offset.store": "false",
        "enable.partition.eof": "true",
        "allow.auto.create.topics": "false",
    }
    consumer = _client(confluent_kafka.Consumer, conf, _ignore)
    try:
        try:
            meta = consumer.list_topics(topic, timeout=min(timeout, 10.0)).topics.get(topic)
        except KafkaException as exc:
            raise TransportUnavailable(
                f"cannot reach Kafka at {bootstrap_servers} ({_describe(exc)}); check "
                "--bootstrap-servers and that the broker is up"
            ) from exc
        if meta is None or meta.error is not None or not meta.partitions:
            why = f" ({meta.error.str()})" if meta is not None and meta.error else ""
            raise ConfigurationError(f"topic {topic!r} does not exist{why}")
        remaining = set(meta.partitions)
        consumer.assign(
            [
                confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                for p in remaining
            ]
        )
        progress = time.monotonic()
        while remaining:
            msg = consumer.poll(0.5)
            if msg is None:
                if time.monotonic() - progress > timeout:
                    raise TransportUnavailable(
                        f"reading {topic}: nothing from partitions {sorted(remaining)} for "
                        f"{timeout:g} s before their end"
                    )
                continue
            progress = time.monotonic()
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    remaining.discard(msg.partition())
                elif err.fatal():
                    raise TransportUnavailable(f"reading {topic}: {err.name()}: {err.str()}")
                else:
                    logger.warning(
                        "kafka consume error",
                        extra={"event": "kafka.error", "error": f"{err.name()}: {err.str()}"},
                    )
                continue
            if msg.partition() in remaining:
                yield KafkaSource._incoming(msg)
    finally:
        consumer.close()


def topic_retention(
    bootstrap_servers: str, topics: list[str], overrides: Mapping[str, str] | None = None
) -> float | None:
    """The longest ``retention.ms`` of ``topics``, in seconds (``inf`` if unlimited), or None
    when the broker does not say (some Kafka-compatible brokers do not answer DescribeConfigs).
    """
    from confluent_kafka import admin

    AdminClient, ConfigResource = admin.AdminClient, admin.ConfigResource  # type: ignore[attr-defined]

    conf: dict[str, Any] = {
        k: v for k, v in (overrides or {}).items() if not k.startswith(("group.", "enable.auto"))
    }
    try:
        # Connection errors are the caller's to report (it only warns on an answer).
        client = _client(AdminClient, {**conf, "bootstrap.servers": bootstrap_servers}, _ignore)
        futures = client.describe_configs(
            [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics], request_timeout=5
        )
        longest = 0.0
        for future in futures.values():
            entry = future.result(timeout=10).get("retention.ms")
            if entry is None or entry.value is None:
                return None
            ms = float(entry.value)
            longest = max(longest, float("inf") if ms < 0 else ms / 1000)
        return longest
    except Exception as exc:  # an answer we cannot use is no answer: the caller only warns
        logger.debug(
            "cannot read topic retention",
            extra={"event": "kafka.retention_unknown", "error": str(exc)},
        )
        return None


def _client(make: Any, settings: Mapping[str, Any], on_error: Any) -> Any:
    """A librdkafka client with our error callback and logger; a setting it refuses is a
    :class:`ConfigurationError` (the one place both clients fail fast on bad ``-X``)."""
    try:
        return make({**settings, "error_cb": on_error, "logger": librdkafka_logger})
    except (KafkaException, ValueError, TypeError) as exc:
        # librdkafka quotes the refused value, which may be a password: hide every value.
        text = _describe(exc)
        for value in sorted((str(v) for v in settings.values()), key=len, reverse=True):
            if len(value) >= 3:
                text = text.replace(value, "***")
        raise ConfigurationError(f"invalid Kafka setting: {text}") from None


def _ignore(_err: KafkaError) -> None:
    pass


def _headers(raw: Any) -> list[tuple[str, bytes]]:
    items = raw.items() if isinstance(raw, dict) else (raw or [])
    out: list[tuple[str, bytes]] = []
    for name, value in items:
        data = b"" if value is None else value
        out.append((str(name), data.encode() if isinstance(data, str) else bytes(data)))
    return out


def _names(partitions: Any) -> list[str]:
    return [f"{tp.topic}[{tp.partition}]" for tp in partitions]


def _describe(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else None
    if isinstance(arg, KafkaError):
        return f"{arg.name()}: {arg.str()}"
    return str(exc) or type(exc).__name__
