"""Bad setup makes ``outbox-relay`` fail fast: one error line that says what to do, exit status
2 for usage/configuration and 1 for a failure, and nothing sent or marked."""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from tests.support.broker import Broker, free_port
from tests.support.cli import run_cli

pytestmark = pytest.mark.slow

USAGE, FAILURE = 2, 1


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if re.match(r"(?i)^error:", line)]
    assert len(errors) == 1, f"expected exactly one error line:\n{stderr}"
    return errors[0]


def _seed_rows(engine: sa.Engine, topic: str) -> None:
    with Session(engine) as session, session.begin():
        for i in range(3):
            Outbox().publish(session, topic, {"i": i}, key=f"k{i}")


def _untouched(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, attempts FROM outbox_messages")).all()
    assert [tuple(r) for r in rows] == [("pending", 0)] * 3


@pytest.mark.parametrize(
    ("db_url", "expect"),
    [
        ("::not a url::", r"invalid database URL: expected postgresql\+psycopg://"),
        ("mysql://root@localhost/app", r"unsupported database URL scheme 'mysql': use postgres"),
        ("postgresql+psycopg://postgres@127.0.0.1:5432", r"names no database: add /DBNAME"),
    ],
    ids=["unparseable", "unsupported", "no-database"],
)
def test_bad_database_url_is_a_usage_error(db_url: str, expect: str, broker: Broker) -> None:
    result = run_cli("outbox-relay", ["--db-url", db_url, "--bootstrap-servers", broker.bootstrap])
    assert result.returncode == USAGE, result.stderr
    assert re.search(expect, _error_line(result.stderr)), result.stderr


def test_unreachable_database_fails_once_with_status_1(broker: Broker) -> None:
    # --once keeps its bounded wait; a long-running relay waits for the database instead
    # (tests/acceptance/test_start.py).
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/app"
    result = run_cli(
        "outbox-relay",
        ["--db-url", url, "--bootstrap-servers", broker.bootstrap, "--once"],
        timeout=30,
    )
    assert result.returncode == FAILURE, result.stderr
    line = _error_line(result.stderr)
    assert "cannot reach the database" in line and "check the URL" in line, line


def test_missing_tables_tell_to_run_the_migration(empty_db_url: str, broker: Broker) -> None:
    result = run_cli(
        "outbox-relay", ["--db-url", empty_db_url, "--bootstrap-servers", broker.bootstrap]
    )
    assert result.returncode == USAGE, result.stderr
    assert "outbox db upgrade" in _error_line(result.stderr)
    with sa.create_engine(empty_db_url).connect() as conn:  # the relay created nothing
        assert not sa.inspect(conn).get_table_names()


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--no-such-option"], r"No such option:? '?--no-such-option"),
        (["--batch-size", "0"], r"Invalid value for '--batch-size'"),
        (["-X", "acks"], r"expected NAME=VALUE, e\.g\. -X security\.protocol=SASL_SSL"),
        (["-X", "no.such.property=1"], r"invalid Kafka setting: .*no\.such\.property"),
        (["-X", "acks=1"], r"acks=1 is not allowed: the relay needs acks=all"),
        (["-X", "enable.idempotence=false"], r"needs enable\.idempotence=true"),
    ],
    ids=["unknown-option", "bad-batch-size", "bad-X-format", "unknown-X", "acks=1", "no-idem"],
)
def test_bad_option_is_a_usage_error_and_touches_nothing(
    args: list[str],
    expect: str,
    engine: sa.Engine,
    db_url: str,
    broker: Broker,
    topic: str,
) -> None:
    _seed_rows(engine, topic)
    result = run_cli(
        "outbox-relay", ["--db-url", db_url, "--bootstrap-servers", broker.bootstrap, *args]
    )
    assert result.returncode == USAGE, result.stderr
    assert re.search(expect, _error_line(result.stderr)), result.stderr
    _untouched(engine)
    assert broker.read_all(topic, idle=0.5) == []
