"""The database and Kafka options shared by the commands (``_db_options``, ``_kafka_options``):
one ``-X`` is one setting (spaces and ``=`` in the value kept), ``OUTBOX_KAFKA_SETTINGS`` holds
one per line, ``--kafka-config FILE`` is overridden by ``-X``, and the URL comes from exactly one
of ``--db-url`` / ``--db-url-file``, checked before the command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from outbox import cli, cli_options

URL = "postgresql+psycopg://app@db:5432/app"
SECRET = "hunter2"


@pytest.fixture
def seen() -> dict[str, Any]:
    return {}


def _command(seen: dict[str, Any]) -> click.Command:
    """A command declared like ``outbox consume``: it records what it was called with."""

    @click.command()
    @cli_options.db_options
    @cli_options.kafka_options
    @click.option("--other", default="x")
    def command(**kwargs: Any) -> None:
        seen.update(kwargs)
        seen["settings"] = cli_options.parse_settings(kwargs["kafka_settings"])

    return command


def _run(seen: dict[str, Any], *args: str, env: dict[str, str] | None = None) -> Result:
    base = ["--db-url", URL, "--bootstrap-servers", "b:9092"]
    if any(a.startswith("--db-url") for a in args) or "OUTBOX_DB_URL_FILE" in (env or {}):
        base = ["--bootstrap-servers", "b:9092"]
    clean = {"OUTBOX_KAFKA_SETTINGS": None, "OUTBOX_KAFKA_CONFIG": None, "OUTBOX_DB_URL": None}
    return CliRunner().invoke(_command(seen), [*base, *args], env={**clean, **(env or {})})


def _only_error_line(result: Result) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr and SECRET not in result.stderr
    return errors[0]


def test_one_x_is_one_setting_with_spaces_and_equal_signs(seen: dict[str, Any]) -> None:
    result = _run(
        seen,
        "-X",
        "client.id=a b",
        "-X",
        "sasl.oauthbearer.config=principal=admin scope=write",
        "-X",
        "sasl.password= lead and trail ",
        "-X",
        "linger.ms=5",
    )
    assert result.exit_code == 0, result.output
    assert seen["settings"] == {
        "client.id": "a b",
        "sasl.oauthbearer.config": "principal=admin scope=write",
        "sasl.password": " lead and trail ",
        "linger.ms": "5",
    }


def test_env_settings_are_one_per_line(seen: dict[str, Any]) -> None:
    env = {"OUTBOX_KAFKA_SETTINGS": "client.id=a b\n\nsasl.password=x = y z\r\nlinger.ms=5\n"}
    result = _run(seen, env=env)
    assert result.exit_code == 0, result.output
    assert seen["settings"] == {"client.id": "a b", "sasl.password": "x = y z", "linger.ms": "5"}


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["-X", f"security.protocol=SASL_SSL sasl.password={SECRET}"], None),
        ([], {"OUTBOX_KAFKA_SETTINGS": f"security.protocol=SASL_SSL sasl.password={SECRET}"}),
    ],
    ids=["-X", "env"],
)
def test_several_settings_in_one_value_are_refused_without_echoing_it(
    seen: dict[str, Any], args: list[str], env: dict[str, str] | None
) -> None:
    # The old space-separated format: read as one value, librdkafka would refuse it and quote
    # it (sasl.password included) in its error message.
    line = _only_error_line(_run(seen, *args, env=env))
    assert "security.protocol looks like several settings" in line
    assert "one per line in OUTBOX_KAFKA_SETTINGS" in line
    assert not seen


@pytest.mark.parametrize("item", [SECRET, "=x", " =x"])
def test_malformed_setting_is_refused_without_echoing_it(seen: dict[str, Any], item: str) -> None:
    line = _only_error_line(_run(seen, "-X", item))
    assert "expected NAME=VALUE" in line
    assert not seen


def test_kafka_config_file_and_x_overrides(seen: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_text("# secrets\nsasl.username=KEY\nsasl.password=with space\nclient.id=from file\n")
    result = _run(seen, "--kafka-config", str(path), "-X", "client.id=from x")
    assert result.exit_code == 0, result.output
    assert seen["settings"] == {
        "sasl.username": "KEY",
        "sasl.password": "with space",
        "client.id": "from x",
    }
    assert "kafka_config" not in seen  # the command gets the merged settings only


def test_kafka_config_from_env(seen: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_text("sasl.password=p w\n")
    result = _run(seen, env={"OUTBOX_KAFKA_CONFIG": str(path)})
    assert result.exit_code == 0, result.output
    assert seen["settings"] == {"sasl.password": "p w"}


def test_bad_kafka_config_is_one_line(seen: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_text(f"linger.ms=5\n{SECRET}\n")
    line = _only_error_line(_run(seen, "--kafka-config", str(path)))
    assert line == f"error: --kafka-config {path}, line 2: expected name=value"
    assert not seen


def test_db_url_file(seen: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "db-url"
    path.write_text(f"{URL}\n")
    result = _run(seen, "--db-url-file", str(path))
    assert result.exit_code == 0, result.output
    assert seen["db_url"] == URL and "db_url_file" not in seen
    seen.clear()
    result = _run(seen, env={"OUTBOX_DB_URL_FILE": str(path)})
    assert result.exit_code == 0, result.output
    assert seen["db_url"] == URL


def test_db_url_and_db_url_file_together_are_refused(seen: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "db-url"
    path.write_text(URL)
    line = _only_error_line(_run(seen, "--db-url", URL, "--db-url-file", str(path)))
    assert "either --db-url or --db-url-file, not both" in line
    assert not seen


def test_no_db_url_is_one_line(seen: dict[str, Any]) -> None:
    result = CliRunner().invoke(
        _command(seen), ["--bootstrap-servers", "b"], env={"OUTBOX_DB_URL": None}
    )
    assert "no database URL" in _only_error_line(result)


def test_bad_db_url_is_refused_before_the_command_runs(seen: dict[str, Any]) -> None:
    line = _only_error_line(_run(seen, "--db-url", f"postgresql+psycopg://u:{SECRET}@x@h/db"))
    assert line.startswith("error: invalid database URL")
    assert not seen


@pytest.mark.parametrize(
    "argv",
    [
        ["relay"],
        ["consume"],
        ["db", "upgrade"],
        ["db", "downgrade"],
        ["status"],
        ["inbox", "purge"],
    ],
    ids=" ".join,
)
def test_every_database_command_has_the_secret_options(argv: list[str]) -> None:
    text = CliRunner().invoke(cli.main, [*argv, "--help"], terminal_width=200).output
    assert "--db-url-file FILE" in text
    if argv[0] in ("relay", "consume"):
        assert "--kafka-config FILE" in text and "-X NAME=VALUE" in text


def test_outbox_relay_has_the_secret_options() -> None:
    text = CliRunner().invoke(cli.relay_main, ["--help"], terminal_width=200).output
    assert "--db-url-file FILE" in text and "--kafka-config FILE" in text
