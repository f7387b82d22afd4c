"""``outbox db upgrade|downgrade|sql|versions-dir`` and ``outbox status``: the outbox table
(revision ``outbox_0001``), the inbox (``outbox_0002``), their autovacuum settings
(``outbox_0003``), the ordered header arrays (``outbox_0004``), the relays' leader epoch
table (``outbox_0005``) and the audit table with the failure times (``outbox_0006``)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from outbox import migrate
from outbox.schema import DEFAULT_INBOX_TABLE, DEFAULT_TABLE, define_tables
from tests.support.cli import run_cli
from tests.support.migration import drift, engine, scalars, tables_in

FIRST = "outbox_0001"
INBOX = "outbox_0002"
AUTOVACUUM = "outbox_0003"
HEADERS = "outbox_0004"
LEADER = "outbox_0005"
HEAD = "outbox_0006"
LEADER_TABLE = f"{DEFAULT_TABLE}_leader"
AUDIT_TABLE = f"{DEFAULT_TABLE}_audit"


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = run_cli("outbox", args, env=env, in_process=True)
    return result.returncode, result.stdout, result.stderr


def _insert(url: str, n: int, table: str = DEFAULT_TABLE, status: str = "pending") -> None:
    eng = engine(url)
    try:
        with eng.begin() as conn:
            for _ in range(n):
                conn.execute(
                    sa.text(
                        f"INSERT INTO {table} (message_id, topic, status) VALUES (:m, 't', :s)"
                    ),
                    {"m": uuid.uuid4(), "s": status},
                )
    finally:
        eng.dispose()


def test_upgrade_downgrade_status(empty_db_url: str) -> None:
    url = empty_db_url

    code, _, err = _run("status", "--db-url", url)
    assert code == 2
    assert "outbox db upgrade" in err

    code, out, _ = _run("db", "upgrade", "--db-url", url)
    assert (code, out) == (0, f"outbox tables at revision {HEAD}\n")
    assert tables_in(url) == {
        f"public.{DEFAULT_TABLE}",
        f"public.{DEFAULT_INBOX_TABLE}",
        f"public.{LEADER_TABLE}",
        f"public.{AUDIT_TABLE}",
        f"public.{migrate.VERSION_TABLE}",
    }
    code, out, _ = _run("db", "upgrade", "--db-url", url)
    assert (code, out) == (0, f"outbox tables at revision {HEAD}\n")

    code, out, _ = _run("status", "--db-url", url)
    assert code == 0
    assert out.splitlines()[0].startswith(f"{DEFAULT_TABLE} is empty")
    _insert(url, 2)
    _insert(url, 1, status="dead")
    code, out, _ = _run("status", "--db-url", url)
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["pending", "2"], ["dead", "1"]]

    # --revision is required: no accidental drops.
    code, _, err = _run("db", "downgrade", "--db-url", url)
    assert code == 2
    assert "--revision" in err
    assert {
        f"public.{DEFAULT_TABLE}",
        f"public.{DEFAULT_INBOX_TABLE}",
        f"public.{LEADER_TABLE}",
        f"public.{AUDIT_TABLE}",
    } <= tables_in(url)

    code, out, _ = _run("db", "downgrade", "--db-url", url, "--revision", "base")
    assert code == 0
    assert out == "outbox tables removed\n"
    assert tables_in(url) == {f"public.{migrate.VERSION_TABLE}"}
    assert migrate.current(url) is None


def test_custom_names_from_environment(empty_db_url: str) -> None:
    env = {
        "OUTBOX_DB_URL": empty_db_url,
        "OUTBOX_TABLE": "events_out",
        "OUTBOX_SCHEMA": "msg",
        "OUTBOX_INBOX_TABLE": "events_in",
    }
    code, out, _ = _run("db", "upgrade", env=env)
    assert (code, out) == (0, f"outbox tables at revision {HEAD}\n")
    assert tables_in(empty_db_url) == {
        "msg.events_out",
        "msg.events_in",
        "msg.events_out_leader",
        "msg.events_out_audit",
        f"msg.{migrate.VERSION_TABLE}",
    }
    assert scalars(empty_db_url, "SELECT count(epoch) FROM msg.events_out_leader") == [1]

    _insert(empty_db_url, 3, table="msg.events_out", status="retry")
    code, out, _ = _run("status", env=env)
    assert code == 0
    assert out.split()[:2] == ["retry", "3"]
    assert "inbox msg.events_in: 0 keys" in out

    code, out, _ = _run("db", "downgrade", "--revision", "base", env=env)
    assert code == 0
    assert tables_in(empty_db_url) == {f"msg.{migrate.VERSION_TABLE}"}


def test_inbox_table_option(empty_db_url: str) -> None:
    """``--inbox-table`` names the inbox; ``--revision`` steps through the revisions."""
    url = empty_db_url
    code, out, _ = _run("db", "upgrade", "--db-url", url, "--revision", FIRST)
    assert (code, out) == (0, f"outbox tables at revision {FIRST}\n")
    assert tables_in(url) == {f"public.{DEFAULT_TABLE}", f"public.{migrate.VERSION_TABLE}"}

    code, out, _ = _run("db", "upgrade", "--db-url", url, "--inbox-table", "dedup")
    assert (code, out) == (0, f"outbox tables at revision {HEAD}\n")
    assert tables_in(url) == {
        f"public.{DEFAULT_TABLE}",
        "public.dedup",
        f"public.{LEADER_TABLE}",
        f"public.{AUDIT_TABLE}",
        f"public.{migrate.VERSION_TABLE}",
    }
    eng = engine(url)
    try:
        with eng.connect() as conn:
            assert drift(conn, define_tables(inbox_table="dedup")) == []
    finally:
        eng.dispose()

    # The inbox was installed as `dedup`: naming another one is refused, nothing changes.
    code, out, err = _run("db", "upgrade", "--db-url", url)
    assert (code, out) == (2, "")
    assert "--inbox-table" in err and f"{DEFAULT_INBOX_TABLE!r}" in err
    assert "public.dedup" in tables_in(url)

    code, _, err = _run("db", "upgrade", "--db-url", url, "--inbox-table", "Dedup")
    assert code == 2
    assert "invalid inbox table" in err
    code, _, err = _run("db", "upgrade", "--db-url", url, "--inbox-table", DEFAULT_TABLE)
    assert code == 2
    assert "name of its own" in err

    # -1 from head only removes the audit table and the failure times, -1 again only the
    # leader table, -1 again only turns the header arrays back into jsonb, -1 again only
    # resets the autovacuum settings; -1 again removes only the inbox.
    code, out, _ = _run(
        "db", "downgrade", "--db-url", url, "--inbox-table", "dedup", "--revision", "-1"
    )
    assert (code, out) == (0, f"outbox tables at revision {LEADER}\n")
    assert tables_in(url) == {
        f"public.{DEFAULT_TABLE}",
        "public.dedup",
        f"public.{LEADER_TABLE}",
        f"public.{migrate.VERSION_TABLE}",
    }
    code, out, _ = _run(
        "db", "downgrade", "--db-url", url, "--inbox-table", "dedup", "--revision", "-1"
    )
    assert (code, out) == (0, f"outbox tables at revision {HEADERS}\n")
    assert tables_in(url) == {
        f"public.{DEFAULT_TABLE}",
        "public.dedup",
        f"public.{migrate.VERSION_TABLE}",
    }
    code, out, _ = _run(
        "db", "downgrade", "--db-url", url, "--inbox-table", "dedup", "--revision", "-1"
    )
    assert (code, out) == (0, f"outbox tables at revision {AUTOVACUUM}\n")
    code, out, _ = _run(
        "db", "downgrade", "--db-url", url, "--inbox-table", "dedup", "--revision", "-1"
    )
    assert (code, out) == (0, f"outbox tables at revision {INBOX}\n")
    assert "public.dedup" in tables_in(url)
    code, out, _ = _run(
        "db", "downgrade", "--db-url", url, "--inbox-table", "dedup", "--revision", "-1"
    )
    assert (code, out) == (0, f"outbox tables at revision {FIRST}\n")
    assert tables_in(url) == {f"public.{DEFAULT_TABLE}", f"public.{migrate.VERSION_TABLE}"}

    code, out, _ = _run("db", "upgrade", "--db-url", url, "--inbox-table", "dedup")
    assert (code, out) == (0, f"outbox tables at revision {HEAD}\n")
    code, out, _ = _run(
        "db", "downgrade", "--db-url", url, "--inbox-table", "dedup", "--revision", "base"
    )
    assert (code, out) == (0, "outbox tables removed\n")
    assert tables_in(url) == {f"public.{migrate.VERSION_TABLE}"}


#: What revision outbox_0003 sets (``pg_class.reloptions``): vacuum and analyze the outbox table
#: after 1000 dead (or new, or changed) rows whatever its size; the inbox at 1 % of its rows.
MESSAGES_RELOPTIONS = [
    "autovacuum_vacuum_scale_factor=0",
    "autovacuum_vacuum_threshold=1000",
    "autovacuum_vacuum_insert_scale_factor=0",
    "autovacuum_vacuum_insert_threshold=1000",
    "autovacuum_analyze_scale_factor=0",
    "autovacuum_analyze_threshold=1000",
]
INBOX_RELOPTIONS = [
    "autovacuum_vacuum_scale_factor=0.01",
    "autovacuum_vacuum_threshold=1000",
    "autovacuum_vacuum_insert_scale_factor=0.01",
    "autovacuum_vacuum_insert_threshold=1000",
]


def _reloptions(url: str, rel: str) -> list[str]:
    (options,) = scalars(
        url, f"SELECT coalesce(reloptions, '{{}}') FROM pg_class WHERE oid = '{rel}'::regclass"
    )
    assert isinstance(options, list)
    return options


@pytest.mark.parametrize(
    ("names", "messages", "inbox"),
    [
        pytest.param((), DEFAULT_TABLE, DEFAULT_INBOX_TABLE, id="default"),
        pytest.param(
            ("--table", "events_out", "--schema", "msg", "--inbox-table", "events_in"),
            "msg.events_out",
            "msg.events_in",
            id="custom",
        ),
    ],
)
def test_autovacuum_settings(
    empty_db_url: str, names: tuple[str, ...], messages: str, inbox: str
) -> None:
    """``outbox db upgrade`` gives both tables their autovacuum settings; a downgrade to
    ``outbox_0002`` resets them, and only them (an operator's own parameter stays)."""
    url = empty_db_url
    code, out, _ = _run("db", "upgrade", "--db-url", url, *names)
    assert (code, out) == (0, f"outbox tables at revision {HEAD}\n")
    assert _reloptions(url, messages) == MESSAGES_RELOPTIONS
    assert _reloptions(url, inbox) == INBOX_RELOPTIONS
    assert _reloptions(url, f"{messages}_leader") == []  # one row: nothing to vacuum
    assert _reloptions(url, f"{messages}_audit") == []  # a few rows, never deleted

    eng = engine(url)
    try:
        with eng.begin() as conn:
            conn.execute(sa.text(f"ALTER TABLE {messages} SET (fillfactor = 90)"))
    finally:
        eng.dispose()
    code, out, _ = _run("db", "downgrade", "--db-url", url, "--revision", INBOX, *names)
    assert (code, out) == (0, f"outbox tables at revision {INBOX}\n")
    assert _reloptions(url, messages) == ["fillfactor=90"]
    assert _reloptions(url, inbox) == []

    code, out, _ = _run("db", "upgrade", "--db-url", url, *names)
    assert (code, out) == (0, f"outbox tables at revision {HEAD}\n")
    assert _reloptions(url, messages) == ["fillfactor=90", *MESSAGES_RELOPTIONS]
    assert _reloptions(url, inbox) == INBOX_RELOPTIONS


def test_second_table_in_same_schema_fails_cleanly(db_url: str) -> None:
    code, out, err = _run("db", "upgrade", "--db-url", db_url, "--table", "events_out")
    assert code == 2
    assert out == ""
    assert "--schema" in err
    assert "public.events_out" not in tables_in(db_url)


def test_usage_and_connection_errors() -> None:
    code, _, err = _run("db", "upgrade", "--db-url", "mysql://u@h/d")
    assert code == 2
    assert "unsupported database URL" in err
    code, _, err = _run("db", "upgrade", "--db-url", "postgresql+psycopg://u@127.0.0.1:1/d")
    assert code == 1
    assert err.startswith("error:")
    # Names are checked before connecting: a usage error, not a connection failure.
    code, _, err = _run(
        "db", "upgrade", "--db-url", "postgresql+psycopg://u@127.0.0.1:1/d", "--table", "Bad-Name"
    )
    assert code == 2
    assert "invalid table name" in err


def test_sql_prints_ddl() -> None:
    code, out, _ = _run("db", "sql")
    assert code == 0
    assert f"CREATE TABLE {DEFAULT_TABLE} (" in out
    assert f"CREATE TABLE {migrate.VERSION_TABLE} (" in out
    assert (
        f"CREATE INDEX ix_{DEFAULT_TABLE}_unsent ON {DEFAULT_TABLE} (id) "
        "WHERE status IN ('pending', 'retry');" in out
    )
    assert (
        f"CREATE INDEX ix_{DEFAULT_TABLE}_held ON {DEFAULT_TABLE} (topic, key, id) "
        "WHERE status IN ('retry', 'dead');" in out
    )
    assert f"CONSTRAINT ck_{DEFAULT_TABLE}_status CHECK" in out
    assert f"CREATE TABLE {DEFAULT_INBOX_TABLE} (" in out
    assert f"CONSTRAINT pk_{DEFAULT_INBOX_TABLE} PRIMARY KEY (consumer, key)" in out
    assert (
        f"CREATE INDEX ix_{DEFAULT_INBOX_TABLE}_expires_at ON {DEFAULT_INBOX_TABLE} "
        "USING brin (expires_at);" in out
    )
    # The autovacuum settings of both tables, in full.
    messages_settings = (
        f"ALTER TABLE {DEFAULT_TABLE} SET (autovacuum_vacuum_scale_factor = 0, "
        "autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_insert_scale_factor = 0, "
        "autovacuum_vacuum_insert_threshold = 1000, autovacuum_analyze_scale_factor = 0, "
        "autovacuum_analyze_threshold = 1000);"
    )
    inbox_settings = (
        f"ALTER TABLE {DEFAULT_INBOX_TABLE} SET (autovacuum_vacuum_scale_factor = 0.01, "
        "autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_insert_scale_factor = 0.01, "
        "autovacuum_vacuum_insert_threshold = 1000);"
    )
    assert messages_settings in out
    assert inbox_settings in out
    # The leader table, and its one row with an epoch the server draws.
    leader_table = f"CREATE TABLE {LEADER_TABLE} ("
    leader_row = f"INSERT INTO {LEADER_TABLE} (epoch) VALUES ("
    assert leader_table in out
    assert "one BOOLEAN DEFAULT true NOT NULL" in out
    assert "epoch BIGINT NOT NULL" in out
    assert f"CONSTRAINT pk_{LEADER_TABLE} PRIMARY KEY (one)" in out
    assert f"CONSTRAINT ck_{LEADER_TABLE}_one CHECK (one)" in out
    assert out.count(leader_row) == 1
    assert "gen_random_uuid()" in out.partition(leader_row)[2].partition(";")[0]
    # The failure times and the audit table.
    failure_times = (
        f"ALTER TABLE {DEFAULT_TABLE} ADD COLUMN first_failed_at timestamptz, "
        "ADD COLUMN last_failed_at timestamptz;"
    )
    audit_table = f"CREATE TABLE {AUDIT_TABLE} ("
    assert failure_times in out
    assert audit_table in out
    assert "db_user TEXT DEFAULT CURRENT_USER NOT NULL" in out
    assert "message_ids BIGINT[] DEFAULT '{}'::bigint[] NOT NULL" in out
    assert f"CONSTRAINT pk_{AUDIT_TABLE} PRIMARY KEY (id)" in out
    # In revision order: the outbox table, the inbox, the settings, the header arrays, the
    # leader table, the audit table, each recorded as it is made.
    assert (
        out.index(f"CREATE TABLE {DEFAULT_TABLE} (")
        < out.index(f"VALUES ('{FIRST}')")
        < out.index(f"CREATE TABLE {DEFAULT_INBOX_TABLE} (")
        < out.index(f"SET version_num='{INBOX}'")
        < out.index(messages_settings)
        < out.index(inbox_settings)
        < out.index(f"SET version_num='{AUTOVACUUM}'")
        < out.index(f"ALTER TABLE {DEFAULT_TABLE} ADD COLUMN header_names text[]")
        < out.index(f"ALTER TABLE {DEFAULT_TABLE} DROP COLUMN headers;")
        < out.index(f"SET version_num='{HEADERS}'")
        < out.index(leader_table)
        < out.index(leader_row)
        < out.index(f"SET version_num='{LEADER}'")
        < out.index(failure_times)
        < out.index(audit_table)
        < out.index(f"SET version_num='{HEAD}'")
    )
    assert out.startswith("BEGIN;")
    assert out.rstrip().endswith("COMMIT;")
    assert "CREATE SCHEMA" not in out

    code, out, _ = _run(
        "db", "sql", "--table", "events_out", "--schema", "msg", "--inbox-table", "events_in"
    )
    assert code == 0
    assert "CREATE TABLE msg.events_out (" in out
    assert "CREATE INDEX ix_events_out_unsent ON msg.events_out (id)" in out
    assert "CREATE TABLE msg.events_in (" in out
    assert "CREATE INDEX ix_events_in_expires_at ON msg.events_in USING brin (expires_at);" in out
    assert "ALTER TABLE msg.events_out SET (autovacuum_vacuum_scale_factor = 0," in out
    assert "ALTER TABLE msg.events_in SET (autovacuum_vacuum_scale_factor = 0.01," in out
    assert "CREATE TABLE msg.events_out_leader (" in out
    assert "CONSTRAINT pk_events_out_leader PRIMARY KEY (one)" in out
    assert "INSERT INTO msg.events_out_leader (epoch) VALUES (" in out
    assert "CREATE TABLE msg.events_out_audit (" in out
    assert "CONSTRAINT pk_events_out_audit PRIMARY KEY (id)" in out
    assert DEFAULT_INBOX_TABLE not in out
    assert LEADER_TABLE not in out
    assert AUDIT_TABLE not in out
    # The schema comes first: the version table lives in it.
    assert out.index("CREATE SCHEMA IF NOT EXISTS msg;") < out.index(
        f"CREATE TABLE msg.{migrate.VERSION_TABLE}"
    )

    # Only the later revisions, for an outbox installed before the inbox existed.
    code, out, _ = _run("db", "sql", "--revision", f"{FIRST}:{HEAD}")
    assert code == 0
    assert f"CREATE TABLE {DEFAULT_INBOX_TABLE} (" in out
    assert messages_settings in out
    assert leader_table in out and leader_row in out
    assert f"CREATE TABLE {DEFAULT_TABLE} (" not in out
    assert f"CREATE TABLE {migrate.VERSION_TABLE}" not in out
    assert f"SET version_num='{HEAD}'" in out

    # The settings, the header arrays and the leader table, for tables installed at the
    # inbox's revision.
    code, out, _ = _run("db", "sql", "--revision", f"{INBOX}:{HEAD}")
    assert code == 0
    assert messages_settings in out and inbox_settings in out
    assert f"ALTER TABLE {DEFAULT_TABLE} ADD COLUMN header_names text[]" in out
    assert out.count("CREATE TABLE") == 2
    assert leader_table in out and leader_row in out and audit_table in out

    # Only the leader table and the audit table, for tables at the header arrays' revision.
    code, out, _ = _run("db", "sql", "--revision", f"{HEADERS}:{HEAD}")
    assert code == 0
    assert out.count("CREATE TABLE") == 2
    assert leader_table in out and leader_row in out and audit_table in out
    assert out.count("ALTER TABLE") == 1 and failure_times in out
    assert f"SET version_num='{HEAD}'" in out

    # Only the audit table and the failure times, for tables at the leader table's revision.
    code, out, _ = _run("db", "sql", "--revision", f"{LEADER}:{HEAD}")
    assert code == 0
    assert out.count("CREATE TABLE") == 1 and audit_table in out
    assert out.count("ALTER TABLE") == 1 and failure_times in out
    assert leader_table not in out


def test_sql_output_installs_the_same_table(empty_db_url: str) -> None:
    """Teams that apply DDL with their own tools get the same result as `outbox db upgrade`,
    and `outbox db upgrade` afterwards knows it is installed."""
    names = ("--table", "events_out", "--schema", "msg", "--inbox-table", "events_in")
    code, ddl, _ = _run("db", "sql", *names)
    assert code == 0
    eng = engine(empty_db_url)
    try:
        with eng.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(ddl)
        with eng.connect() as conn:
            declared = define_tables(table="events_out", schema="msg", inbox_table="events_in")
            assert drift(conn, declared) == []
    finally:
        eng.dispose()
    assert migrate.current(empty_db_url, schema="msg") == HEAD
    code, out, _ = _run("db", "upgrade", "--db-url", empty_db_url, *names)
    assert (code, out) == (0, f"outbox tables at revision {HEAD}\n")


def test_versions_dir() -> None:
    code, out, _ = _run("db", "versions-dir")
    assert code == 0
    path = Path(out.strip())
    assert path == migrate.versions_dir()
    assert path.is_absolute()
    assert (path / "outbox_0001_messages.py").is_file()
    assert (path / "outbox_0002_inbox.py").is_file()
    assert (path / "outbox_0003_autovacuum.py").is_file()
    assert (path / "outbox_0004_header_list.py").is_file()
    assert (path / "outbox_0005_leader_epoch.py").is_file()
    assert (path / "outbox_0006_audit.py").is_file()
    assert (path.parent / "env.py").is_file()


def test_console_script(empty_db_url: str) -> None:
    """The installed ``outbox`` entry point (a real process, not in-process)."""
    proc = run_cli("outbox", ["db", "upgrade", "--db-url", empty_db_url])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"outbox tables at revision {HEAD}\n"
    assert scalars(empty_db_url, f"SELECT count(*) FROM {DEFAULT_TABLE}") == [0]
    assert scalars(empty_db_url, f"SELECT count(*) FROM {DEFAULT_INBOX_TABLE}") == [0]
    assert scalars(empty_db_url, f"SELECT count(epoch) FROM {LEADER_TABLE}") == [1]
    assert scalars(empty_db_url, f"SELECT count(*) FROM {AUDIT_TABLE}") == [0]
