"""Secrets stay off the command line and out of the logs, in the documented deployment: the
database URL from a file (``--db-url-file``) or libpq's own ``PGPASSWORD`` / ``PGPASSFILE``,
the Kafka settings from a properties file (``--kafka-config``); and one ``-X`` is one setting,
spaces included.

The shared PostgreSQL trusts every local connection, so passwords are not checked there: the
password tests run against a throwaway cluster with SCRAM authentication (see
``../shared/FAULTS.md``), which needs root (to run ``initdb`` as ``postgres``).
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from tests.support.broker import Broker, free_port
from tests.support.cli import CliProcess, run_cli
from tests.support.handlers import create_effects_table
from tests.support.relayproc import RelayProcess

pytestmark = pytest.mark.slow

#: The application role's password: characters a URL must percent-encode, and a space.
DB_PASSWORD = "Db7 p@ss:w/rd%x"
#: A Kafka secret (unused by the PLAINTEXT broker, but handed to librdkafka all the same).
KAFKA_SECRET = "Kf9-sasl-secret-value"
SECRETS = (
    DB_PASSWORD,
    urllib.parse.quote(DB_PASSWORD, safe=""),
    "Db7",
    "w/rd",
    KAFKA_SECRET,
    "Kf9",
)
#: No password anywhere: libpq must not find one on its own.
NO_PASSWORD = {"PGPASSWORD": "", "PGPASSFILE": "/nonexistent"}


@dataclasses.dataclass(frozen=True)
class ScramServer:
    port: int

    def url(self, *, password: str | None = None, dbname: str = "app") -> str:
        auth = "app" if password is None else f"app:{urllib.parse.quote(password, safe='')}"
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{dbname}"


def _as_postgres(*args: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def scram_server() -> Iterator[ScramServer]:
    """A throwaway cluster on its own port that checks passwords (scram-sha-256), with a role
    ``app`` (password :data:`DB_PASSWORD`) owning a database ``app`` with the outbox tables."""
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if os.geteuid() != 0 or not bindirs or shutil.which("runuser") is None:
        pytest.skip("needs root, runuser and PostgreSQL's initdb for a throwaway cluster")
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres user to run initdb as")
    bindir = bindirs[-1].parent
    base = Path(tempfile.mkdtemp(prefix="outbox-scram-"))
    data = base / "data"
    admin_password = "admin-pw"
    (base / "pw").write_text(admin_password)
    for path in (base, base / "pw"):
        os.chown(path, owner.pw_uid, owner.pw_gid)
    port = free_port()
    _as_postgres(
        str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "scram-sha-256",
        f"--pwfile={base / 'pw'}", "--no-sync",
    )  # fmt: skip
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            f"listen_addresses = '127.0.0.1'\nport = {port}\n"
            f"unix_socket_directories = '{base}'\nfsync = off\n"
        )
    _as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "start")
    try:
        admin = f"host=127.0.0.1 port={port} user=postgres password={admin_password}"
        with psycopg.connect(f"{admin} dbname=postgres", autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("CREATE ROLE app LOGIN PASSWORD {}").format(DB_PASSWORD))
            conn.execute("CREATE DATABASE app OWNER app")
        server = ScramServer(port)
        result = run_cli("outbox", ["db", "upgrade", "--db-url", server.url(password=DB_PASSWORD)])
        assert result.returncode == 0, result.stderr
        yield server
    finally:
        _as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def _publish(server: ScramServer, topic: str, n: int) -> None:
    engine = sa.create_engine(server.url(password=DB_PASSWORD))
    try:
        with Session(engine) as session, session.begin():
            Outbox().publish(session, topic, {"n": n}, key=f"k{n}")
    finally:
        engine.dispose()


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} found in {where}:\n{text}"


# -- libpq's own password sources ----------------------------------------------------------------


def test_the_server_checks_passwords(scram_server: ScramServer) -> None:
    # A refused password is a configuration error (exit 2): retrying cannot help.
    result = run_cli("outbox", ["status", "--db-url", scram_server.url()], env=NO_PASSWORD)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and "password" in line, line
    result = run_cli(
        "outbox", ["status", "--db-url", scram_server.url(password="wrong")], env=NO_PASSWORD
    )
    assert result.returncode == 2 and "password authentication failed" in result.stderr


def test_pgpassword_and_pgpassfile_are_honoured(
    scram_server: ScramServer, broker: Broker, tmp_path: Path
) -> None:
    url = scram_server.url()  # no password in it
    env = {**NO_PASSWORD, "PGPASSWORD": DB_PASSWORD}
    for args in (["db", "upgrade"], ["status"], ["inbox", "purge"]):
        result = run_cli("outbox", [*args, "--db-url", url], env=env)
        assert result.returncode == 0, (args, result.stderr)

    # ~/.pgpass format: ':' and '\' in a field are escaped with '\'; the file must be 0600.
    passfile = tmp_path / "pgpass"
    escaped = DB_PASSWORD.replace("\\", "\\\\").replace(":", "\\:")
    passfile.write_text(f"127.0.0.1:{scram_server.port}:app:app:{escaped}\n")
    passfile.chmod(0o600)
    result = run_cli(
        "outbox", ["status", "--db-url", url], env={"PGPASSWORD": "", "PGPASSFILE": str(passfile)}
    )
    assert result.returncode == 0, result.stderr

    # The relay connects with psycopg from the URL's parameters (no password): libpq adds it.
    topic = broker.create_topic(partitions=1)
    _publish(scram_server, topic, 1)
    result = run_cli(
        "outbox-relay",
        ["--db-url", url, "--bootstrap-servers", broker.bootstrap, "--once"],
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "sent 1," in result.stderr
    assert len(broker.read_all(topic, expect=1)) == 1


# -- the documented deployment: secrets in files ---------------------------------------------------


@pytest.fixture
def secret_files(scram_server: ScramServer, tmp_path: Path) -> tuple[Path, Path]:
    """The database URL (with the password) and the Kafka properties, as mounted secrets."""
    db_url = tmp_path / "db-url"
    db_url.write_text(scram_server.url(password=DB_PASSWORD) + "\n")
    kafka = tmp_path / "kafka.properties"
    kafka.write_text(
        "# as a secret mount\n"
        "client.id=from the file\n"
        # sasl.* without sasl.mechanism: librdkafka warns (CONFWARN) naming the client, which
        # shows the file's settings reached it; the secret is not used on PLAINTEXT.
        "sasl.username=svc-outbox\n"
        f"sasl.password={KAFKA_SECRET}\n"
    )
    for path in (db_url, kafka):
        path.chmod(0o600)
    return db_url, kafka


def test_relay_with_secrets_in_files(
    scram_server: ScramServer, broker: Broker, secret_files: tuple[Path, Path], tmp_path: Path
) -> None:
    db_url_file, kafka_config = secret_files
    topic = broker.create_topic(partitions=1)
    relay = RelayProcess(
        [
            "--db-url-file",
            str(db_url_file),
            "--bootstrap-servers",
            broker.bootstrap,
            "--kafka-config",
            str(kafka_config),
            "-X",
            "client.id=relay with spaces = and more",  # one -X, one setting; overrides the file
            "--log-level",
            "debug",
            "--poll-interval",
            "0.2",
        ],
        log_path=tmp_path / "relay.log",
        env=NO_PASSWORD,
    ).start()
    try:
        cmdline = _cmdline(relay.pid)
        relay.wait_for(r"outbox\.relay: relay is the leader")
        _publish(scram_server, topic, 1)
        assert len(broker.read_all(topic, expect=1)) == 1
        relay.wait_for(r"\[relay with spaces = and more#producer-\d+\]")
        assert relay.stop() == 0
    finally:
        relay.stop()
    assert "--db-url-file" in cmdline and "--kafka-config" in cmdline
    _assert_no_secret(cmdline, "the command line")
    _assert_no_secret("\n".join(relay.lines), "the log")
    assert not relay.matches("from the file#")  # -X won over the file


def test_consumer_with_secrets_in_files_and_env(
    scram_server: ScramServer, broker: Broker, secret_files: tuple[Path, Path], tmp_path: Path
) -> None:
    db_url_file, kafka_config = secret_files
    engine = sa.create_engine(scram_server.url(password=DB_PASSWORD))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS effects"))
        create_effects_table(engine)
    finally:
        engine.dispose()
    topic = broker.create_topic(partitions=1)
    _publish(scram_server, topic, 7)
    result = run_cli(
        "outbox-relay", ["--db-url-file", str(db_url_file), "--bootstrap-servers",
                         broker.bootstrap, "--once"],
        env=NO_PASSWORD,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Everything from the environment, as a Kubernetes pod spec would set it.
    consumer = CliProcess(
        "outbox",
        ["consume", "--handler", "tests.support.handlers:record_effect", "--max-messages", "1"],
        name="consumer",
        log_path=tmp_path / "consumer.log",
        env={
            **NO_PASSWORD,
            "OUTBOX_DB_URL_FILE": str(db_url_file),
            "OUTBOX_KAFKA_CONFIG": str(kafka_config),
            "OUTBOX_KAFKA_SETTINGS": "client.id=consumer a b\nsession.timeout.ms=6000\n",
            "OUTBOX_BOOTSTRAP_SERVERS": broker.bootstrap,
            "OUTBOX_GROUP": f"g-{topic}",
            "OUTBOX_TOPICS": topic,
            "OUTBOX_LOG_LEVEL": "debug",
        },
        import_tests=True,
        cwd=Path(__file__).resolve().parents[2],
    ).start()
    try:
        cmdline = _cmdline(consumer.pid)
        assert consumer.wait(90) == 0, consumer.tail()
    finally:
        consumer.stop()
    assert consumer.matches(r"^processed 1, duplicates 0, dead-lettered 0$")
    assert consumer.matches(r"\[consumer a b#consumer-\d+\]")
    _assert_no_secret(cmdline, "the command line")
    _assert_no_secret("\n".join(consumer.lines), "the log")
