"""The database URL's checks (one-line errors that never repeat the password) and the readers of
the files that keep secrets off the command line (``--db-url-file``, ``--kafka-config``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from outbox.config import parse_db_url, read_db_url, read_kafka_properties
from outbox.exceptions import ConfigurationError

#: Every test URL's password holds this: no error message may contain any part of it.
SECRET = "s3cr3tPW"


def _error(url: str) -> str:
    with pytest.raises(ConfigurationError) as info:
        parse_db_url(url)
    message = str(info.value)
    assert "\n" not in message
    # Nothing quoting the URL is chained or kept as the context either.
    assert info.value.__cause__ is None and info.value.__context__ is None
    return message


@pytest.mark.parametrize(
    ("url", "expect"),
    [
        ("", "no database URL: pass --db-url or --db-url-file"),
        ("   ", "no database URL"),
        (f"{SECRET}", "invalid database URL: expected postgresql+psycopg://USER@HOST:PORT/DBNAME"),
        (f"u:{SECRET}@host/db", "invalid database URL: expected"),
        (f"mysql://u:{SECRET}@host/db", "unsupported database URL scheme 'mysql'"),
        (f"postgresql+psycopg://u:{SECRET}@host:5432:1/db", "the port must be a number"),
        (f"postgresql+psycopg://u:{SECRET}@host:abc/db", "the port must be a number"),
        (f"postgresql+psycopg://u:{SECRET}@host:0/db", "from 1 to 65535"),
        (f"postgresql+psycopg://u:{SECRET}@host:65536/db", "from 1 to 65535"),
        (f"postgresql+psycopg://u:{SECRET}@host:-1/db", "from 1 to 65535"),
        (f"postgresql+psycopg://u:{SECRET}@/db", "no host"),
        (f"postgresql+psycopg://u:{SECRET}@:5432/db", "no host"),
        (f"postgresql+psycopg://u:{SECRET}@ho st/db", "not a host name"),
        (f"postgresql+psycopg://u:{SECRET}@host/", "names no database: add /DBNAME"),
        (f"postgresql+psycopg://u:{SECRET}@host", "names no database"),
        (f"postgresql+psycopg://u:{SECRET}@host/db?port=99999", "from 1 to 65535"),
        (f"postgresql+psycopg://u:{SECRET}@host/db?host=a:1&host=b:x", "the port must be"),
        (f"postgresql+psycopg://u:{SECRET}@host/db?no_such_thing=1", "'no_such_thing'"),
    ],
)
def test_invalid_urls_are_one_line_configuration_errors(url: str, expect: str) -> None:
    message = _error(url)
    assert expect in message
    assert SECRET not in message and "s3cr" not in message


@pytest.mark.parametrize(
    "url",
    [
        # An unencoded '@' in the password: SQLAlchemy would take the rest of the password as
        # the host (and psycopg would echo it in "failed to resolve host ...").
        "postgresql+psycopg://u:s3cr@3tPW@host/db",
        "postgresql+psycopg://u:s3cr@3tPW@host:5432/db",
        "postgresql+psycopg://u:s3cr@3tPW@host:abc/db",
        "postgresql+psycopg://u:s3@cr@3tPW@host/db",
        # ... with a '/' before it, which hides it from a look at the authority alone.
        "postgresql+psycopg://u:s3/cr@3tPW@host/db",
        "postgresql+psycopg://u:s3cr@3t:PW@host:5432/db",
        # ... or lands in the database name, after a '/'.
        "postgresql+psycopg://u:s3cr@3t/PW@host/db",
    ],
)
def test_an_unencoded_at_sign_is_refused_without_echoing_the_password(url: str) -> None:
    message = _error(url)
    assert "'@'" in message and "%40" in message
    for fragment in ("s3", "cr", "3t", "PW"):
        assert fragment not in message, message


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("postgresql+psycopg://app@db:5432/app", "db", 5432),
        ("postgresql://app@db.example.com/app", "db.example.com", None),
        ("postgresql+psycopg://u:p%40ss%3Aw%2Fd@10.0.0.1:6432/app", "10.0.0.1", 6432),
        ("postgresql+psycopg://u@[::1]:5432/app", "::1", 5432),
        ("postgresql+psycopg://u@[fe80::1]/app", "fe80::1", None),
        (
            "postgresql+psycopg://u@my_host/app?sslmode=verify-full&connect_timeout=5",
            "my_host",
            None,
        ),
        ("  postgresql+psycopg://u@db/app\n", "db", None),
    ],
)
def test_valid_urls(url: str, host: str, port: int | None) -> None:
    parsed = parse_db_url(url)
    assert parsed.drivername == "postgresql+psycopg"
    assert (parsed.host, parsed.port) == (host, port)


def test_an_at_sign_in_the_user_name_or_an_encoded_one_in_the_database_is_fine() -> None:
    # SQLAlchemy ends the password, not the user name, at the first '@' (Azure's user@server).
    parsed = parse_db_url("postgresql+psycopg://user@server:pw@host/db")
    assert (parsed.username, parsed.password, parsed.host) == ("user@server", "pw", "host")
    assert parse_db_url("postgresql+psycopg://u@host/d%40b").database == "d@b"


def test_a_password_with_reserved_characters_percent_encoded_is_decoded() -> None:
    assert parse_db_url("postgresql+psycopg://u:p%40ss%3Aw%2Fd@h/app").password == "p@ss:w/d"


@pytest.mark.parametrize(
    "url",
    [
        # A Unix-domain socket, a service file entry, several hosts: the host is in the query.
        "postgresql+psycopg://u@/app?host=/var/run/postgresql",
        "postgresql+psycopg:///app?service=billing",
        "postgresql+psycopg://u@/app?host=a:5432&host=b:5433&target_session_attrs=read-write",
        "postgresql+psycopg://u@/app?hostaddr=10.0.0.1&port=5432",
    ],
)
def test_the_host_may_be_given_in_the_query(url: str) -> None:
    assert parse_db_url(url).database == "app"


def test_a_url_without_password_keeps_none() -> None:
    # libpq then reads PGPASSWORD, PGPASSFILE or ~/.pgpass.
    assert parse_db_url("postgresql+psycopg://app@db/app").password is None


# -- --db-url / --db-url-file ------------------------------------------------------------------

URL = "postgresql+psycopg://app:pw@db:5432/app"


def test_read_db_url_from_the_option() -> None:
    assert read_db_url(URL, None) == URL


def test_read_db_url_from_a_file_strips_the_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "url"
    path.write_text(f"{URL}\n")
    assert read_db_url(None, str(path)) == URL


def test_exactly_one_of_url_and_file(tmp_path: Path) -> None:
    path = tmp_path / "url"
    path.write_text(URL)
    with pytest.raises(ConfigurationError, match="either --db-url or --db-url-file, not both"):
        read_db_url(URL, str(path))
    with pytest.raises(ConfigurationError, match="no database URL"):
        read_db_url(None, None)


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ("", "is empty"),
        ("\n  \n", "is empty"),
        (f"{URL}\n{URL}\n", "must hold the URL alone, on one line"),
        ("postgresql+psycopg://u:s3cr@3tPW@db/app\n", "'@'"),
    ],
)
def test_bad_url_files(tmp_path: Path, content: str, expect: str) -> None:
    path = tmp_path / "url"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=expect) as info:
        read_db_url(None, str(path))
    assert "s3cr" not in str(info.value) and "3tPW" not in str(info.value)


def test_missing_url_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"cannot read --db-url-file .*nope: No such"):
        read_db_url(None, str(tmp_path / "nope"))


# -- --kafka-config ----------------------------------------------------------------------------


def test_kafka_properties(tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_text(
        "# Confluent Cloud\n"
        "! also a comment\n"
        "\n"
        "security.protocol=SASL_SSL\n"
        "  sasl.mechanisms = PLAIN  \n"
        "sasl.username=KEY\n"
        "sasl.password=a secret with spaces and = signs\r\n"
        "client.id=first\n"
        "client.id=second\n"
        "empty.value=\n"
    )
    assert read_kafka_properties(str(path)) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanisms": "PLAIN",
        "sasl.username": "KEY",
        "sasl.password": "a secret with spaces and = signs",
        "client.id": "second",
        "empty.value": "",
    }


@pytest.mark.parametrize("line", ["hunter2", "=hunter2", "  = x"])
def test_bad_kafka_properties_line_is_named_by_number_only(tmp_path: Path, line: str) -> None:
    path = tmp_path / "client.properties"
    path.write_text(f"linger.ms=5\n{line}\n")
    with pytest.raises(
        ConfigurationError, match=r"client\.properties, line 2: expected name=value"
    ):
        read_kafka_properties(str(path))
    with pytest.raises(ConfigurationError) as info:
        read_kafka_properties(str(path))
    assert "hunter2" not in str(info.value)


def test_unreadable_kafka_properties(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read --kafka-config"):
        read_kafka_properties(str(tmp_path / "nope"))
    (tmp_path / "bin").write_bytes(b"\xff\xfe=\x00")
    with pytest.raises(ConfigurationError, match="is not UTF-8 text"):
        read_kafka_properties(str(tmp_path / "bin"))
