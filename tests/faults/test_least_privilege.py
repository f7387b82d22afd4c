"""The least-privilege roles exactly as the how-to documents them ("Least-privilege roles" in
docs/howto.md): both SQL blocks are read from the page and run as written (role and database
names made unique), then each role does its job -- and nothing more.

Runs against a fresh database on the shared server. Roles are cluster-wide: they get unique
names and are dropped at teardown (with ``DROP OWNED BY``, which also drops their tables).
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from confluent_kafka import Producer
from sqlalchemy.orm import Session

from outbox import Outbox
from tests.conftest import PG_HOST, PG_PORT, PG_USER
from tests.support.broker import Broker
from tests.support.cli import ROOT, run_cli
from tests.support.consumerproc import ConsumerProcess

HOWTO = ROOT / "docs" / "howto.md"
MARKER = "-- outbox: least-privilege roles, part {} of 2"
#: The role names the how-to uses.
ROLES = ("outbox_owner", "app_writer", "outbox_relay", "app_consumer", "outbox_admin")
KAFKA = ("-X", "session.timeout.ms=6000", "-X", "heartbeat.interval.ms=1000")


def documented_sql(part: int) -> str:
    """The ```sql block of the how-to that starts with part ``part``'s marker comment."""
    blocks = re.findall(r"```sql\n(.*?)```", HOWTO.read_text(), flags=re.DOTALL)
    found = [b for b in blocks if b.startswith(MARKER.format(part))]
    assert len(found) == 1, f"docs/howto.md: no single SQL block marked {MARKER.format(part)!r}"
    return str(found[0])


@dataclasses.dataclass
class Roles:
    dbname: str
    names: dict[str, str]

    def substitute(self, sql: str) -> str:
        """The how-to's SQL for this database and these roles' unique names."""
        sql = re.sub(r"\bON DATABASE app\b", f'ON DATABASE "{self.dbname}"', sql)
        for doc_name, name in self.names.items():
            sql = re.sub(rf"\b{doc_name}\b", name, sql)
        return sql

    def url(self, role: str) -> str:
        return f"postgresql+psycopg://{self.names[role]}@{PG_HOST}:{PG_PORT}/{self.dbname}"

    def connect(self, role: str | None = None) -> psycopg.Connection[tuple[Any, ...]]:
        user = PG_USER if role is None else self.names[role]
        return psycopg.connect(
            f"host={PG_HOST} port={PG_PORT} dbname={self.dbname} user={user}", autocommit=True
        )

    def run(self, sql: str, role: str | None = None) -> None:
        """Run ``sql`` (several statements) as ``role`` (default: the administrator)."""
        with self.connect(role) as conn:
            conn.execute(sql.encode())


@pytest.fixture
def roles(empty_db_url: str) -> Iterator[Roles]:
    """The how-to's part 1 run by the administrator, ``outbox db upgrade`` by the owner, and
    part 2 by the owner: a database set up exactly as documented."""
    suffix = uuid.uuid4().hex[:8]
    made = Roles(
        sa.make_url(empty_db_url).database or "",
        {name: f"{name}_{suffix}" for name in ROLES},
    )
    try:
        made.run(made.substitute(documented_sql(1)))
        upgraded = run_cli("outbox", ["db", "upgrade", "--db-url", made.url("outbox_owner")])
        assert upgraded.returncode == 0, upgraded.stderr
        made.run(made.substitute(documented_sql(2)), role="outbox_owner")
        yield made
    finally:
        names = ", ".join(made.names.values())
        with made.connect() as conn:
            existing = conn.execute(
                "SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s)",
                [list(made.names.values())],
            ).fetchone()
            if existing and existing[0]:
                conn.execute(f"DROP OWNED BY {names}".encode())
                conn.execute(f"DROP ROLE IF EXISTS {names}".encode())


def publish(roles: Roles, topic: str, payloads: list[object], *, at_commit: bool) -> None:
    engine = sa.create_engine(roles.url("app_writer"))
    try:
        with Session(engine) as session, session.begin():
            outbox = Outbox(at_commit=at_commit)
            for i, payload in enumerate(payloads):
                outbox.publish(session, topic, payload, key=f"k{i % 3}")
    finally:
        engine.dispose()


def relay_once(roles: Roles, broker: Broker, *extra: str) -> tuple[int, str]:
    done = run_cli(
        "outbox-relay",
        ["--db-url", roles.url("outbox_relay"), "--bootstrap-servers", broker.bootstrap,
         "--once", *extra],
    )  # fmt: skip
    return done.returncode, done.stderr


def denied(roles: Roles, role: str, sql: str) -> bool:
    try:
        roles.run(sql, role=role)
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


@pytest.mark.slow
def test_the_documented_roles_publish_relay_and_consume(
    roles: Roles, broker: Broker, tmp_path: Path
) -> None:
    # The owner owns the tables.
    with roles.connect() as conn:
        owners = conn.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE tablename LIKE 'outbox%'"
        ).fetchall()
    assert owners == [(roles.names["outbox_owner"],)]

    # The application publishes, in both modes, and can do nothing else to the table.
    topic = broker.create_topic(partitions=3)
    dlq = broker.create_topic(f"{topic}.dlq", partitions=1)
    publish(roles, topic, [{"n": n} for n in range(1, 5)], at_commit=False)
    publish(roles, topic, [{"n": n} for n in range(5, 9)] + [b"not json"], at_commit=True)
    for sql in (
        "UPDATE outbox_messages SET attempts = 1",
        "DELETE FROM outbox_messages",
        "SELECT payload FROM outbox_messages",
        "TRUNCATE outbox_messages",
        "INSERT INTO outbox_inbox (consumer, key, expires_at) VALUES ('c', 'k', now())",
    ):
        assert denied(roles, "app_writer", sql), sql

    # The relay sends them.
    status, stderr = relay_once(roles, broker)
    assert status == 0, stderr
    assert len(broker.read_all(topic, expect=9)) == 9

    # The consumer runs its handler (its own table, granted as any application table would
    # be) and dead-letters the message that is not JSON: both through its own grants.
    with roles.connect() as conn:
        conn.execute(
            "CREATE TABLE effects (seq bigserial PRIMARY KEY, message_id text NOT NULL, "
            "n int NOT NULL, pid int NOT NULL, at timestamptz NOT NULL DEFAULT now())"
        )
        consumer = roles.names["app_consumer"]
        conn.execute(f"GRANT INSERT ON effects TO {consumer}".encode())
        conn.execute(f"GRANT USAGE ON SEQUENCE effects_seq_seq TO {consumer}".encode())
    proc = ConsumerProcess(
        [
            *("--db-url", roles.url("app_consumer")),
            *("--bootstrap-servers", broker.bootstrap),
            *("--group", f"g-{uuid.uuid4().hex[:8]}", "--topic", topic),
            *("--handler", "tests.support.handlers:record_effect"),
            *("--max-messages", "9"),
            *KAFKA,
        ],
        log_path=tmp_path / "consumer.log",
    ).start()
    try:
        assert proc.wait(90) == 0, proc.tail()
    finally:
        proc.stop()
    summary = proc.summary()
    assert (summary.processed, summary.dead_lettered) == (8, 1), summary
    with roles.connect() as conn:
        assert conn.execute("SELECT count(*) FROM effects").fetchone() == (8,)
        inbox = conn.execute("SELECT count(*) FROM outbox_inbox").fetchone()
    assert inbox == (9,)
    assert denied(roles, "app_consumer", "DELETE FROM outbox_messages")
    assert denied(roles, "app_consumer", "UPDATE outbox_messages SET attempts = 1")

    # The relay sends the dead letter.
    status, stderr = relay_once(roles, broker)
    assert status == 0, stderr
    [letter] = broker.read_all(dlq, expect=1)
    assert letter.value == b"not json"
    assert letter.headers["dlq-original-topic"] == topic.encode()


@pytest.mark.slow
@pytest.mark.parametrize("privilege", ["UPDATE", "DELETE"])
def test_the_relay_names_a_revoked_privilege(privilege: str, roles: Roles, broker: Broker) -> None:
    topic = broker.create_topic(partitions=1)
    publish(roles, topic, [{"n": 1}], at_commit=False)
    relay = roles.names["outbox_relay"]
    roles.run(f"REVOKE {privilege} ON outbox_messages FROM {relay}", role="outbox_owner")
    status, stderr = relay_once(roles, broker)
    assert status == 2, stderr
    [line] = stderr.strip().splitlines()
    assert f"lacks {privilege}" in line and "GRANT SELECT, UPDATE, DELETE" in line, line
    assert broker.read_all(topic, idle=0.5) == []  # nothing was sent
    if privilege == "DELETE":
        # Retaining sent rows needs no DELETE.
        status, stderr = relay_once(roles, broker, "--retain-sent")
        assert status == 0, stderr
        assert len(broker.read_all(topic, expect=1)) == 1


@pytest.mark.slow
def test_the_relay_names_a_revoked_select(roles: Roles, broker: Broker) -> None:
    relay = roles.names["outbox_relay"]
    roles.run(f"REVOKE SELECT ON outbox_messages FROM {relay}", role="outbox_owner")
    status, stderr = relay_once(roles, broker)
    assert status == 2, stderr
    assert "lacks SELECT" in stderr and "GRANT SELECT, UPDATE, DELETE" in stderr, stderr


@pytest.mark.slow
def test_a_consumer_that_cannot_read_the_outbox_starts(roles: Roles, broker: Broker) -> None:
    consumer = roles.names["app_consumer"]
    roles.run(f"REVOKE SELECT ON outbox_messages FROM {consumer}", role="outbox_owner")
    topic = broker.create_topic(partitions=1)
    done = run_cli(
        "outbox",
        [
            "consume",
            *("--db-url", roles.url("app_consumer")),
            *("--bootstrap-servers", broker.bootstrap),
            *("--group", f"g-{uuid.uuid4().hex[:8]}", "--topic", topic),
            *("--handler", "tests.support.handlers:record_effect"),
            *("--idle-timeout", "0.5"),
            *KAFKA,
        ],
        import_tests=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_the_extra_grants_the_howto_lists(roles: Roles) -> None:
    """``outbox status`` with SELECT; ``outbox inbox purge`` with SELECT, UPDATE, DELETE on the
    inbox (and not without UPDATE: it locks the rows it deletes)."""
    relay = roles.names["outbox_relay"]
    status = run_cli("outbox", ["status", "--db-url", roles.url("outbox_relay")], in_process=True)
    assert status.returncode == 0, status.stderr
    roles.run(f"GRANT SELECT, DELETE ON outbox_inbox TO {relay}", role="outbox_owner")
    roles.run(
        "INSERT INTO outbox_inbox (consumer, key, expires_at) VALUES ('c', 'k', now() - "
        "interval '1 day')",
        role="outbox_owner",
    )
    args = ["inbox", "purge", "--db-url", roles.url("outbox_relay")]
    purge = run_cli("outbox", args, in_process=True)
    assert purge.returncode == 2 and "permission denied" in purge.stderr, purge.stderr
    roles.run(f"GRANT UPDATE ON outbox_inbox TO {relay}", role="outbox_owner")
    purge = run_cli("outbox", args, in_process=True)
    assert purge.returncode == 0 and "purged 1" in purge.stdout, purge.stderr


@pytest.mark.slow
def test_the_admin_role_inspects_and_repairs(roles: Roles, broker: Broker) -> None:
    """``outbox_admin`` with the documented grants runs every operating command, and leaves
    an audit trail it cannot change; the other roles cannot read it."""
    admin_role = roles.names["outbox_admin"]
    roles.run(
        "INSERT INTO outbox_messages (message_id, topic, key, status, attempts, sent_at) "
        "VALUES (gen_random_uuid(), 't', 'a', 'dead', 10, NULL), "
        "(gen_random_uuid(), 't', 'b', 'dead', 10, NULL), "
        "(gen_random_uuid(), 't', 'b', 'pending', 0, NULL), "
        "(gen_random_uuid(), 't', 'c', 'sent', 0, now() - interval '8 days')",
        role="outbox_owner",
    )
    url = roles.url("outbox_admin")

    def admin(*args: str) -> tuple[int, str, str]:
        done = run_cli("outbox", [*args, "--db-url", url], in_process=True)
        return done.returncode, done.stdout, done.stderr

    code, out, err = admin("status", "--json", "--fail-on-dead")
    assert code == 1, err
    assert json.loads(out)["statuses"]["dead"]["count"] == 2
    assert json.loads(out)["inbox"]["rows"] == 0  # counted: the role may read the inbox
    code, out, err = admin("dead", "list", "--json")
    assert code == 0, err
    first, second = (m["id"] for m in json.loads(out)["messages"])
    assert admin("dead", "show", str(first))[0] == 0
    assert admin("dead", "replay", str(first))[0] == 0
    code, out, err = admin("dead", "discard", str(second), "--yes")
    assert code == 0, err
    assert "1 messages held back behind them can be sent now" in out
    code, out, err = admin("purge", "--sent-older-than", "7d")
    assert (code, out) == (0, "purged 1 sent messages sent more than 7d ago\n"), err

    # A dead letter of the consumer, replayed through the outbox.
    dlq = broker.create_topic(partitions=1)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    producer.produce(
        dlq,
        key=b"k",
        value=b"{}",
        headers=[("message-id", b"letter-1"), ("dlq-original-topic", b"t")],
    )
    producer.flush(10)
    code, out, err = admin("dlq", "replay", "--topic", dlq, "--bootstrap-servers", broker.bootstrap)
    assert code == 0, err
    assert out.startswith("replayed 1, skipped 0")

    with roles.connect() as conn:
        audit = conn.execute(
            "SELECT action, db_user FROM outbox_messages_audit ORDER BY id"
        ).fetchall()
    assert audit == [
        ("replay", admin_role),
        ("discard", admin_role),
        ("dlq-replay", admin_role),
    ]
    for sql in (
        "UPDATE outbox_messages_audit SET action = 'nothing'",
        "DELETE FROM outbox_messages_audit",
        "TRUNCATE outbox_messages_audit",
    ):
        assert denied(roles, "outbox_admin", sql), sql
    for role in ("app_writer", "outbox_relay", "app_consumer"):
        assert denied(roles, role, "SELECT * FROM outbox_messages_audit"), role
