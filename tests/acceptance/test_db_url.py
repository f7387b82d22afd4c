"""A malformed database URL stops every command before it does anything: one ``error: ...`` line
on stderr, exit status 2, no traceback, and no part of the password in the message."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli import run_cli

pytestmark = pytest.mark.slow

#: The password of every URL below; no fragment of it may be printed.
PASSWORD = "Zk9wqJ"
FRAGMENTS = ("Zk9", "k9w", "wqJ", "qJ@", "@qJ")

URLS = {
    # The port runs on: "5432:1" is no port.
    "two-ports": f"postgresql+psycopg://u:{PASSWORD}@host:5432:1/db",
    "port-not-a-number": f"postgresql+psycopg://u:{PASSWORD}@host:abc/db",
    "port-out-of-range": f"postgresql+psycopg://u:{PASSWORD}@host:70000/db",
    # An unencoded '@' in the password: SQLAlchemy reads "qJ@host" as the host.
    "at-in-password": "postgresql+psycopg://u:Zk9w@qJ@host/db",
    "at-in-password-bad-port": "postgresql+psycopg://u:Zk9w@qJ@host:abc/db",
    "no-host": f"postgresql+psycopg://u:{PASSWORD}@/db",
}

COMMANDS = {
    "outbox-relay": ("outbox-relay", ["--bootstrap-servers", "127.0.0.1:9"]),
    "db-upgrade": ("outbox", ["db", "upgrade"]),
    "status": ("outbox", ["status"]),
}


def _assert_one_error_line(stderr: str, stdout: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: invalid database URL: "), stderr
    assert stdout == ""
    for fragment in FRAGMENTS:
        assert fragment not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("url", URLS.values(), ids=URLS.keys())
@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_malformed_url_is_one_line_and_exit_2(command: tuple[str, list[str]], url: str) -> None:
    program, args = command
    result = run_cli(program, [*args, "--db-url", url], timeout=30)
    assert result.returncode == 2, result.stderr
    _assert_one_error_line(result.stderr, result.stdout)


def test_the_at_sign_is_named_as_the_problem() -> None:
    result = run_cli("outbox", ["status", "--db-url", URLS["at-in-password"]])
    line = _assert_one_error_line(result.stderr, result.stdout)
    assert "more than one '@'" in line and "%40" in line


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_malformed_url_from_env_or_file(command: tuple[str, list[str]], tmp_path: Path) -> None:
    program, args = command
    result = run_cli(program, args, env={"OUTBOX_DB_URL": URLS["at-in-password-bad-port"]})
    assert result.returncode == 2, result.stderr
    _assert_one_error_line(result.stderr, result.stdout)

    path = tmp_path / "db-url"
    path.write_text(URLS["two-ports"] + "\n")
    result = run_cli(program, [*args, "--db-url-file", str(path)])
    assert result.returncode == 2, result.stderr
    _assert_one_error_line(result.stderr, result.stdout)
