"""The relay's libpq connection string: several hosts, in both forms SQLAlchemy's psycopg
dialect accepts, reach libpq as its lists (they used to be dropped, and the relay connected to
the default host); SQLAlchemy's own engine gets the same hosts and ports."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict

from outbox.config import RelayConfig, relay_conninfo
from outbox.exceptions import ConfigurationError

BASE = "postgresql+psycopg://relay@/app"


def conninfo(url: str) -> Mapping[str, object]:
    return conninfo_to_dict(relay_conninfo(RelayConfig(db_url=url)))


def engine_params(url: str) -> dict[str, object]:
    """What SQLAlchemy's psycopg dialect hands to psycopg.connect for ``url``."""
    engine = sa.create_engine(url)
    try:
        _, params = engine.dialect.create_connect_args(engine.url)
    finally:
        engine.dispose()
    return dict(params)


@pytest.mark.parametrize(
    ("query", "host", "port"),
    [
        # The form ../shared/FAULTS.md and SQLAlchemy's docs give: each host with its port.
        ("host=10.0.0.1:5432&host=10.0.0.2:5433", "10.0.0.1,10.0.0.2", "5432,5433"),
        # libpq's own lists.
        ("host=db1,db2&port=5432,5433", "db1,db2", "5432,5433"),
        # Repeated hosts without ports: libpq's default port.
        ("host=db1&host=db2", "db1,db2", None),
        # One host with its port.
        ("host=db1:6000", "db1", "6000"),
        # A port missing for one host: libpq's default port for that one.
        ("host=db1&host=db2:6001", "db1,db2", ",6001"),
        # A socket directory is not split.
        ("host=/var/run/postgresql", "/var/run/postgresql", None),
    ],
)
def test_several_hosts_become_libpq_lists(query: str, host: str, port: str | None) -> None:
    url = f"{BASE}?{query}&target_session_attrs=read-write"
    params = conninfo(url)
    assert params["host"] == host
    assert params.get("port") == port
    assert params["target_session_attrs"] == "read-write"
    assert params["dbname"] == "app" and params["user"] == "relay"
    # The relay connects where the application's engine does.
    engine = engine_params(url)
    assert engine["host"] == host
    if port is not None and port.strip(","):
        assert str(engine["port"]) == port


def test_the_urls_own_host_and_port_are_kept() -> None:
    params = conninfo("postgresql+psycopg://relay@db1:6000/app?sslmode=disable")
    assert (params["host"], params["port"], params["sslmode"]) == ("db1", "6000", "disable")


def test_the_urls_port_fills_hosts_given_without_one() -> None:
    # parse_db_url wants a host in the URL or in ?host=; a URL host with ?host= lists: the
    # query wins (as in SQLAlchemy), and the URL's port serves hosts without their own.
    params = conninfo("postgresql+psycopg://relay@db0:6000/app?host=db1&host=db2:6001")
    assert (params["host"], params["port"]) == ("db1,db2", "6000,6001")


def test_the_relays_own_settings_stay() -> None:
    params = conninfo(f"{BASE}?host=db1:1&host=db2:2&application_name=mine")
    assert params["application_name"] == "mine"
    assert params["keepalives"] == "1"
    assert "synchronous_commit=off" in str(params["options"])


@pytest.mark.parametrize(
    ("query", "expect"),
    [
        # SQLAlchemy refuses these two as well ("Can't mix 'multihost' formats").
        ("host=db1:1&host=db2:2&port=3", "either with each host"),
        ("host=db1&host=db2&port=6000", "either with each host"),
        ("host=db1,db2&port=1,2,3", "3 items in port= for 2 hosts"),
        ("host=db1,db2,db3&port=1&port=2", "2 items in port= for 3 hosts"),
        ("host=db1&sslmode=require&sslmode=disable", "'sslmode' is given more than once"),
    ],
)
def test_contradictions_are_configuration_errors(query: str, expect: str) -> None:
    with pytest.raises(ConfigurationError, match=expect) as info:
        relay_conninfo(RelayConfig(db_url=f"postgresql+psycopg://relay:s3cr3t@/app?{query}"))
    assert "s3cr3t" not in str(info.value)


def test_pgoptions_are_kept_in_front_of_the_relays_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # The relay passes `options`, which makes libpq ignore PGOPTIONS: it merges them.
    monkeypatch.setenv("PGOPTIONS", "-c work_mem=5MB -c search_path=app")
    config = RelayConfig(db_url="postgresql+psycopg://u@h:5432/db?options=-c%20jit%3Doff")
    options = conninfo_to_dict(relay_conninfo(config))["options"]
    assert str(options).startswith("-c work_mem=5MB -c search_path=app -c jit=off ")
    assert "-c synchronous_commit=off" in str(options)
