"""The operating commands on the real database: ``outbox status`` (text, ``--json``, the checks
for cron and probes), ``outbox dead list|show|replay|discard`` (with their audit trace: a row
in ``outbox_messages_audit`` and a log line) and ``outbox purge``; the relay's
``--purge-sent-after``. Dead letters replayed from Kafka: tests/integration/test_dlq_replay.py.
"""

from __future__ import annotations

import getpass
import json
import socket
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session

from outbox import Message, Outbox, admin, cli
from outbox.transport.memory import MemoryTransport
from tests.support.cli import run_cli
from tests.support.relay import Running, by_key, count_rows, make_relay
from tests.support.waits import wait_until

# -- helpers ------------------------------------------------------------------------------------


def outbox_cmd(*args: str) -> tuple[int, str, str]:
    result = run_cli("outbox", args, in_process=True)
    return result.returncode, result.stdout, result.stderr


def error_line(stderr: str) -> str:
    """The one line that says what went wrong (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.lower().startswith("error")]
    assert len(lines) == 1, stderr
    return lines[0]


def publish(
    engine: sa.Engine,
    topic: str,
    values: list[str],
    *,
    key: str | None = "k",
    headers: dict[str, str | bytes] | None = None,
) -> list[int]:
    """Publish ``values`` (bytes payloads) in order; returns their row ids."""
    ids = []
    with Session(engine) as session, session.begin():
        message_ids = Outbox().publish_many(
            session,
            [Message(topic, v.encode(), key=key, headers=headers) for v in values],
        )
        for m in message_ids:
            ids.append(
                session.execute(
                    sa.text("SELECT id FROM outbox_messages WHERE message_id = :m"), {"m": m}
                ).scalar_one()
            )
    return ids


def set_rows(engine: sa.Engine, ids: list[int], sql: str, **params: Any) -> None:
    """``UPDATE outbox_messages SET <sql> WHERE id = ANY(ids)``."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"UPDATE outbox_messages SET {sql} WHERE id = ANY(:ids)"),
            {"ids": ids, **params},
        )


def park(engine: sa.Engine, ids: list[int], error: str = "broker said no") -> None:
    """Park rows as the relay's failure statement does (status, attempts, error, times)."""
    set_rows(
        engine,
        ids,
        "status = 'dead', attempts = 10, last_error = :e, "
        "first_failed_at = now() - interval '1 hour', last_failed_at = now()",
        e=error,
    )


def statuses(engine: sa.Engine) -> dict[int, tuple[str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, status, attempts FROM outbox_messages"))
        return {r.id: (r.status, r.attempts) for r in rows}


def audit_rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT * FROM outbox_messages_audit ORDER BY id")))


def log_records(stderr: str) -> list[dict[str, Any]]:
    """The JSON log lines (``--log-format json``) among ``stderr``'s lines."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


# -- outbox status ------------------------------------------------------------------------------


def test_status_of_an_empty_table(db_url: str) -> None:
    code, out, _ = outbox_cmd("status", "--db-url", db_url)
    assert code == 0
    assert out.splitlines() == [
        "outbox_messages is empty: nothing pending, retrying, dead or kept as sent",
        "inbox outbox_inbox: 0 keys",
    ]
    code, out, _ = outbox_cmd("status", "--db-url", db_url, "--json")
    assert code == 0
    data = json.loads(out)
    assert data == {
        "table": "outbox_messages",
        "statuses": {
            s: {"count": 0, "oldest_age_s": None} for s in ("pending", "retry", "dead", "sent")
        },
        "topics": {},
        "lag_s": None,
        "inbox": {"table": "outbox_inbox", "rows": 0},
        "ok": True,
        "problems": [],
    }
    # The checks pass on an empty table.
    code, _, err = outbox_cmd("status", "--db-url", db_url, "--fail-on-dead", "--max-lag", "1")
    assert (code, err) == (0, "")


def test_status_per_status_and_topic_with_ages(engine: sa.Engine, db_url: str) -> None:
    orders = publish(engine, "orders", ["o1", "o2", "o3", "o4"])
    payments = publish(engine, "payments", ["p1", "p2"], key="p")
    set_rows(engine, orders[:1], "created_at = now() - interval '90 seconds'")
    set_rows(engine, orders[1:2], "status = 'retry', next_attempt_at = now() + interval '1 h'")
    park(engine, orders[2:3])
    set_rows(
        engine,
        payments,
        "status = 'sent', sent_at = now(), created_at = now() - interval '2 hours'",
    )
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_inbox (consumer, key, expires_at) "
                "SELECT 'c', 'k' || g, now() + interval '1 day' FROM generate_series(1, 3) g"
            )
        )
    code, out, _ = outbox_cmd("status", "--db-url", db_url, "--json")
    assert code == 0
    data = json.loads(out)
    counts = {s: c["count"] for s, c in data["statuses"].items()}
    assert counts == {"pending": 2, "retry": 1, "dead": 1, "sent": 2}
    assert 90 <= data["statuses"]["pending"]["oldest_age_s"] < 150
    assert 7200 <= data["statuses"]["sent"]["oldest_age_s"] < 7300
    assert data["statuses"]["dead"]["oldest_age_s"] < 60
    assert 90 <= data["lag_s"] < 150
    by_topic = {
        t: {s: c["count"] for s, c in statuses.items()} for t, statuses in data["topics"].items()
    }
    assert by_topic == {
        "orders": {"pending": 2, "retry": 1, "dead": 1},
        "payments": {"sent": 2},
    }
    assert data["inbox"] == {"table": "outbox_inbox", "rows": 3}

    code, out, _ = outbox_cmd("status", "--db-url", db_url)
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines[:4]] == [
        ["pending", "2"],
        ["retry", "1"],
        ["dead", "1"],
        ["sent", "2"],
    ]
    assert "by topic:" in lines
    assert any(line.startswith("  orders: pending 2 (oldest 9") for line in lines), out
    assert lines[-1] == "inbox outbox_inbox: 3 keys"


def test_status_checks_exit_1_with_one_line(engine: sa.Engine, db_url: str) -> None:
    ids = publish(engine, "orders", ["a", "b"])
    set_rows(engine, ids[:1], "created_at = now() - interval '2 minutes'")
    code, _, err = outbox_cmd("status", "--db-url", db_url, "--fail-on-dead")
    assert (code, err) == (0, "")
    code, out, err = outbox_cmd("status", "--db-url", db_url, "--max-lag", "60")
    assert code == 1
    assert "oldest unsent message is 120 s old (--max-lag 60)" in error_line(err)
    assert out.startswith("pending")  # the status is printed all the same
    code, _, err = outbox_cmd("status", "--db-url", db_url, "--max-lag", "5m")
    assert (code, err) == (0, "")

    park(engine, ids[1:])
    code, out, err = outbox_cmd("status", "--db-url", db_url, "--fail-on-dead", "--max-lag", "1m")
    assert code == 1
    line = error_line(err)
    assert "1 dead messages" in line and "--max-lag 60" in line
    code, out, err = outbox_cmd("status", "--db-url", db_url, "--json", "--fail-on-dead")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False and data["problems"][0].startswith("1 dead messages")
    # Only unsent rows count as lag: a dead row, however old, does not.
    set_rows(engine, ids[:1], "created_at = now()")
    set_rows(engine, ids[1:], "created_at = now() - interval '1 day'")
    code, _, _ = outbox_cmd("status", "--db-url", db_url, "--max-lag", "60")
    assert code == 0


@pytest.mark.parametrize("bad", ["abc", "-5", "0", "5 parsecs"])
def test_status_bad_max_lag_is_a_usage_error(db_url: str, bad: str) -> None:
    code, _, err = outbox_cmd("status", "--db-url", db_url, "--max-lag", bad)
    assert code == 2
    assert "--max-lag" in error_line(err)


def test_status_estimates_a_large_table(
    engine: sa.Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``EXACT_BYTES`` sent rows and inbox keys are estimated from the catalog, the oldest
    sent row found along the primary key; unsent rows are still counted exactly."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_messages (message_id, topic, status, sent_at, created_at) "
                "SELECT gen_random_uuid(), 'old', 'sent', now(), now() - interval '1 day' "
                "FROM generate_series(1, 2000)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO outbox_inbox (consumer, key, expires_at) "
                "SELECT 'c', 'k' || g, now() + interval '1 day' FROM generate_series(1, 500) g"
            )
        )
    publish(engine, "orders", ["a"])
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            sa.text("ANALYZE outbox_messages, outbox_inbox")
        )
    monkeypatch.setattr(admin, "EXACT_BYTES", 0)
    code, out, _ = outbox_cmd("status", "--db-url", db_url, "--json")
    assert code == 0
    data = json.loads(out)
    sent = data["statuses"]["sent"]
    assert sent["estimated"] is True
    assert 1500 <= sent["count"] <= 2500
    assert 86400 <= sent["oldest_age_s"] < 86500
    assert data["statuses"]["pending"] == {"count": 1, "oldest_age_s": pytest.approx(0, abs=30)}
    assert data["topics"] == {"orders": {"pending": data["statuses"]["pending"]}}
    assert data["inbox"]["estimated"] is True and 400 <= data["inbox"]["rows"] <= 600
    code, out, _ = outbox_cmd("status", "--db-url", db_url)
    assert "sent" in out and "~" in out


# -- outbox dead list / show --------------------------------------------------------------------


def test_the_relay_records_when_sending_first_and_last_failed(
    engine: sa.Engine, db_url: str
) -> None:
    [row] = publish(engine, "orders", ["bad"])
    transport = MemoryTransport(
        reject=lambda m: "too large" if m.value == b"bad" else None,
    )
    relay = make_relay(db_url, transport, max_attempts=2)
    with Running(relay):
        wait_until(lambda: statuses(engine)[row][0] == "dead", 10, "the message parked")
    code, out, _ = outbox_cmd("dead", "show", str(row), "--db-url", db_url, "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert (shown["status"], shown["attempts"], shown["last_error"]) == ("dead", 2, "too large")
    assert shown["first_failed_at"] is not None
    assert shown["first_failed_at"] < shown["last_failed_at"]


def test_dead_list_filters_and_limits(engine: sa.Engine, db_url: str) -> None:
    a = publish(engine, "orders", ["a1", "a2", "a3"], key="A")
    b = publish(engine, "orders", ["b1"], key="B")
    c = publish(engine, "payments", ["c1"], key=None)
    park(engine, [a[0], a[1], b[0], c[0]], error="line one\nline two")
    set_rows(engine, [a[0]], "last_failed_at = now() - interval '3 days'")

    def listed(*args: str) -> dict[str, Any]:
        code, out, err = outbox_cmd("dead", "list", "--db-url", db_url, "--json", *args)
        assert code == 0, err
        data: dict[str, Any] = json.loads(out)
        return data

    everything = listed()
    assert everything["total"] == 4
    assert [m["id"] for m in everything["messages"]] == [a[0], a[1], b[0], c[0]]
    first = everything["messages"][0]
    assert (first["topic"], first["key"], first["key_hex"]) == ("orders", "A", "41")
    assert first["last_error"] == "line one\nline two"
    assert everything["messages"][3]["key"] is None
    assert [m["id"] for m in listed("--topic", "payments")["messages"]] == [c[0]]
    assert [m["id"] for m in listed("--key", "A")["messages"]] == [a[0], a[1]]
    assert [m["id"] for m in listed("--since", "2d")["messages"]] == [a[1], b[0], c[0]]
    limited = listed("--limit", "2")
    assert (limited["total"], len(limited["messages"])) == (4, 2)
    assert listed("--topic", "nothing") == {"total": 0, "messages": []}
    with engine.connect() as conn:
        recent = conn.execute(sa.text("SELECT now() - interval '1 day'")).scalar_one()
    assert len(listed("--since", recent.isoformat())["messages"]) == 3
    assert len(listed("--since", "2000-01-01T00:00:00")["messages"]) == 4

    code, out, _ = outbox_cmd("dead", "list", "--db-url", db_url, "--limit", "2")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 4 and lines[-1] == "2 of 4 dead messages (--limit 2)"
    assert "orders / A / line one line two" in lines[1]

    code, _, err = outbox_cmd("dead", "list", "--db-url", db_url, "--since", "yesterday")
    assert code == 2 and "--since" in error_line(err)


def test_dead_show_headers_and_payload_preview(engine: sa.Engine, db_url: str) -> None:
    [text_row] = publish(engine, "orders", ["é" * 600], headers={"trace": "t-1", "bin": b"\xff"})
    [binary_row] = publish(engine, "orders", ["x"])
    set_rows(engine, [binary_row], "payload = '\\x00ff10'::bytea, key = '\\xfe'::bytea")
    park(engine, [text_row, binary_row])
    code, out, err = outbox_cmd("dead", "show", str(text_row), "--db-url", db_url, "--json")
    assert code == 0, err
    shown = json.loads(out)
    # 1200 bytes of UTF-8: the first 1024 are shown, without the character the limit cuts.
    assert shown["payload_size"] == 1200
    assert shown["payload_preview"] == {"encoding": "utf-8", "text": "é" * 512}
    assert shown["headers"][1:] == [
        {"name": "trace", "value": "t-1", "value_hex": "742d31"},
        {"name": "bin", "value": None, "value_hex": "ff"},
    ]
    assert shown["headers"][0]["name"] == "content-type"
    assert shown["first_failed_at"] and shown["last_failed_at"] and shown["attempts"] == 10

    code, out, _ = outbox_cmd("dead", "show", str(binary_row), "--db-url", db_url)
    assert code == 0
    assert "key           hex:fe" in out
    assert "payload       3 bytes (not UTF-8, hex):\n00ff10" in out
    code, out, _ = outbox_cmd("dead", "show", str(text_row), "--db-url", db_url)
    assert "payload       1200 bytes (first 1024 bytes, text):" in out
    assert "              bin: hex:ff" in out

    code, _, err = outbox_cmd("dead", "show", "999999", "--db-url", db_url)
    assert code == 2 and "no message with id 999999" in error_line(err)
    code, _, err = outbox_cmd("dead", "show", "abc", "--db-url", db_url)
    assert code == 2 and error_line(err)


# -- outbox dead replay -------------------------------------------------------------------------


def test_replay_by_id_keeps_key_order_and_leaves_an_audit_trace(
    engine: sa.Engine, db_url: str
) -> None:
    k = publish(engine, "orders", ["k1", "k2", "k3"], key="k")
    other = publish(engine, "orders", ["o1"], key="o")
    park(engine, [k[0], other[0]])
    transport = MemoryTransport()
    make_relay(db_url, transport).run_once()
    assert transport.sent == []  # k2 and k3 wait behind k1; o1 is parked
    code, out, err = outbox_cmd(
        "dead", "replay", str(k[0]), "--db-url", db_url, "--log-format", "json"
    )
    assert code == 0, err
    assert out == f"replayed 1 dead messages (ids {k[0]})\n"
    assert statuses(engine)[k[0]] == ("pending", 0)
    assert statuses(engine)[other[0]] == ("dead", 10)
    [record] = [r for r in log_records(err) if r.get("event") == "admin.replayed"]
    assert record["ids"] == [k[0]] and record["count"] == 1
    assert record["db_user"] == "postgres"
    assert record["os_user"] == getpass.getuser() and record["host"] == socket.gethostname()
    [audit] = audit_rows(engine)
    assert (audit.action, audit.message_ids, audit.db_user) == ("replay", [k[0]], "postgres")
    assert (audit.os_user, audit.host) == (getpass.getuser(), socket.gethostname())
    assert json.loads(audit.detail) == {"ids": "listed", "command": "outbox dead replay"}
    assert record["audit_id"] == audit.id

    make_relay(db_url, transport).run_once()
    assert by_key(transport.sent) == {"k": ["k1", "k2", "k3"]}


def test_replay_all_and_by_topic(engine: sa.Engine, db_url: str) -> None:
    a = publish(engine, "orders", ["a"], key="a")
    b = publish(engine, "payments", ["b"], key="b")
    c = publish(engine, "payments", ["c"], key="c")
    park(engine, a + b + c)
    code, out, _ = outbox_cmd("dead", "replay", "--topic", "payments", "--db-url", db_url)
    assert (code, out) == (0, f"replayed 2 dead messages (ids {b[0]}, {c[0]})\n")
    assert statuses(engine)[a[0]][0] == "dead"
    code, out, _ = outbox_cmd("dead", "replay", "--all", "--db-url", db_url)
    assert (code, out) == (0, f"replayed 1 dead messages (ids {a[0]})\n")
    code, out, _ = outbox_cmd("dead", "replay", "--all", "--db-url", db_url)
    assert (code, out) == (0, "no dead messages to replay\n")
    assert [(r.action, r.message_ids) for r in audit_rows(engine)] == [
        ("replay", [b[0], c[0]]),
        ("replay", [a[0]]),
    ]
    assert json.loads(audit_rows(engine)[0].detail)["topic"] == "payments"


def test_replay_usage_errors_change_nothing(engine: sa.Engine, db_url: str) -> None:
    dead, alive = publish(engine, "orders", ["d", "p"], key=None)
    park(engine, [dead])
    for args in (
        [],
        ["--all", str(dead)],
        ["--all", "--topic", "orders"],
        [str(dead), str(alive)],  # alive is pending, not dead
        [str(dead), "424242"],
    ):
        code, out, err = outbox_cmd("dead", "replay", *args, "--db-url", db_url)
        assert code == 2, (args, out, err)
        line = error_line(err)
        assert "ids" in line or "no dead message" in line, line
    assert statuses(engine)[dead] == ("dead", 10)
    assert audit_rows(engine) == []
    code, _, err = outbox_cmd("dead", "replay", str(dead), str(alive), "--db-url", db_url)
    assert f"no dead message with id {alive}" in error_line(err)


# -- outbox dead discard ------------------------------------------------------------------------


def test_discard_releases_the_held_key(engine: sa.Engine, db_url: str) -> None:
    first, second, third = publish(engine, "orders", ["k1", "k2", "k3"], key="k")
    park(engine, [first])
    code, out, err = outbox_cmd(
        "dead", "discard", str(first), "--yes", "--db-url", db_url, "--log-format", "json"
    )
    assert code == 0, err
    assert out == (
        f"discarded 1 dead messages (ids {first}); 2 messages held back behind them can be "
        "sent now\n"
    )
    assert set(statuses(engine)) == {second, third}
    [record] = [r for r in log_records(err) if r.get("event") == "admin.discarded"]
    assert record["ids"] == [first] and record["db_user"] == "postgres"
    [audit] = audit_rows(engine)
    assert (audit.action, audit.message_ids) == ("discard", [first])
    [gone] = json.loads(audit.detail)["messages"]
    assert (gone["id"], gone["topic"], gone["key"]) == (first, "orders", "k")
    uuid.UUID(gone["message_id"])
    transport = MemoryTransport()
    make_relay(db_url, transport).run_once()
    assert by_key(transport.sent) == {"k": ["k2", "k3"]}


def test_discard_asks_first(engine: sa.Engine, db_url: str) -> None:
    first, _ = publish(engine, "orders", ["k1", "k2"], key="k")
    park(engine, [first])
    runner = CliRunner()
    args = ["dead", "discard", str(first), "--db-url", db_url]
    declined = runner.invoke(cli.main, args, input="n\n")
    assert declined.exit_code == 1
    assert "1 later messages of their keys are waiting behind them" in declined.stderr
    assert "nothing discarded" in declined.stderr
    assert first in statuses(engine) and audit_rows(engine) == []
    # No answer at all (stdin closed, as in a script without --yes): nothing either.
    closed = run_cli("outbox", args)
    assert closed.returncode == 1 and "--yes" in closed.stderr
    assert first in statuses(engine)
    accepted = runner.invoke(cli.main, args, input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert first not in statuses(engine)


def test_discard_only_dead_messages(engine: sa.Engine, db_url: str) -> None:
    dead, alive = publish(engine, "orders", ["d", "p"])
    park(engine, [dead])
    code, _, err = outbox_cmd("dead", "discard", str(dead), str(alive), "--yes", "--db-url", db_url)
    assert code == 2 and f"no dead message with id {alive}" in error_line(err)
    code, _, err = outbox_cmd("dead", "discard", "--yes", "--db-url", db_url)
    assert code == 2 and error_line(err)
    assert set(statuses(engine)) == {dead, alive}


# -- outbox purge and the relay's --purge-sent-after ---------------------------------------------


def kept_rows(engine: sa.Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT convert_from(payload, 'UTF8') AS v, status FROM outbox_messages ORDER BY id"
            )
        )
        return [(r.v, r.status) for r in rows]


def old_and_new_rows(engine: sa.Engine) -> None:
    """Seven sent rows two days old, two sent just now, and old rows that are not sent."""
    old = publish(engine, "orders", [f"old{i}" for i in range(7)])
    new = publish(engine, "orders", ["new0", "new1"])
    unsent = publish(engine, "orders", ["pending", "dead"])
    set_rows(engine, old, "status = 'sent', sent_at = now() - interval '2 days'")
    set_rows(engine, new, "status = 'sent', sent_at = now()")
    set_rows(engine, unsent, "created_at = now() - interval '3 days'")
    park(engine, unsent[1:])
    set_rows(engine, old + unsent, "created_at = now() - interval '3 days'")


def test_purge_deletes_old_sent_rows_in_batches(engine: sa.Engine, db_url: str) -> None:
    old_and_new_rows(engine)
    code, out, err = outbox_cmd(
        "purge", "--sent-older-than", "1d", "--batch-size", "2", "--db-url", db_url
    )
    assert code == 0, err
    assert out == "purged 7 sent messages sent more than 1d ago\n"
    assert kept_rows(engine) == [
        ("new0", "sent"),
        ("new1", "sent"),
        ("pending", "pending"),
        ("dead", "dead"),
    ]
    code, out, _ = outbox_cmd("purge", "--sent-older-than", "1d", "--db-url", db_url)
    assert (code, out) == (0, "purged 0 sent messages sent more than 1d ago\n")


@pytest.mark.parametrize(
    "args", [[], ["--sent-older-than", "soon"], ["--sent-older-than", "0s"]], ids=str
)
def test_purge_usage_errors(db_url: str, args: list[str]) -> None:
    code, _, err = outbox_cmd("purge", *args, "--db-url", db_url)
    assert code == 2
    assert "--sent-older-than" in error_line(err)


def test_the_relay_purges_sent_rows_when_idle(engine: sa.Engine, db_url: str) -> None:
    old_and_new_rows(engine)
    transport = MemoryTransport()
    relay = make_relay(db_url, transport, retain_sent=True, purge_sent_after=86400.0)
    with Running(relay):
        wait_until(lambda: count_rows(engine) == 4, 10, "the old sent rows purged")
        publish(engine, "orders", ["later"], key="other")  # "k" waits behind the dead one
        wait_until(lambda: ("later", "sent") in kept_rows(engine), 10, "a new message sent")
    # The old pending row was sent (and is new as a sent row); the dead one stays.
    assert kept_rows(engine) == [
        ("new0", "sent"),
        ("new1", "sent"),
        ("pending", "sent"),
        ("dead", "dead"),
        ("later", "sent"),
    ]


def test_purge_sent_after_needs_retain_sent() -> None:
    result = run_cli(
        "outbox-relay",
        [
            *("--db-url", "postgresql+psycopg://u@127.0.0.1:1/d"),
            *("--bootstrap-servers", "127.0.0.1:1"),
            *("--purge-sent-after", "7d"),
        ],
    )
    assert result.returncode == 2, result.stderr
    line = error_line(result.stderr)
    assert "--purge-sent-after" in line and "--retain-sent" in line
    bad = run_cli(
        "outbox-relay",
        [
            *("--db-url", "postgresql+psycopg://u@127.0.0.1:1/d"),
            *("--bootstrap-servers", "127.0.0.1:1"),
            *("--retain-sent", "--purge-sent-after", "a week"),
        ],
    )
    assert bad.returncode == 2 and "--purge-sent-after" in error_line(bad.stderr)


@pytest.mark.parametrize(
    "command", [["dead", "list"], ["dead", "show", "1"], ["dead", "replay", "1"]]
)
def test_dead_commands_on_tables_older_than_0006_say_to_upgrade(
    empty_db_url: str, command: list[str]
) -> None:
    from outbox import migrate

    migrate.upgrade(empty_db_url, revision="outbox_0005")
    code, _, stderr = outbox_cmd(*command, "--db-url", empty_db_url)
    assert code == 2, stderr
    line = error_line(stderr)
    assert "older than this version" in line and "outbox db upgrade" in line
