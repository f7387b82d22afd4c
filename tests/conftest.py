"""Shared fixtures: a fresh PostgreSQL database per test (cloned from a migrated template),
and one Kafka-protocol broker per session.

Environment:
  OUTBOX_TEST_PG     host:port of PostgreSQL (user postgres, trust auth); default 127.0.0.1:5432
  OUTBOX_TEST_KAFKA  bootstrap servers of an external Kafka; default: start Tansu
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from pytest_postgresql import factories
from sqlalchemy.orm import Session

from outbox import migrate
from tests.support.broker import Broker, broker_from_env

PG_HOST, _, PG_PORT = os.environ.get("OUTBOX_TEST_PG", "127.0.0.1:5432").partition(":")
PG_PORT = PG_PORT or "5432"
PG_USER = os.environ.get("OUTBOX_TEST_PG_USER", "postgres")
# Unique per run, so that two runs (say, two Python versions) can share the server.
RUN = f"{os.getpid()}"


def pg_url(dbname: str) -> str:
    return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"


def _install_tables(**kwargs: Any) -> None:
    migrate.upgrade(pg_url(kwargs["dbname"]))


postgresql_migrated_proc = factories.postgresql_noproc(
    host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=f"outbox_t{RUN}", load=[_install_tables]
)
postgresql_empty_proc = factories.postgresql_noproc(
    host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=f"outbox_e{RUN}"
)
postgresql = factories.postgresql("postgresql_migrated_proc")
postgresql_empty = factories.postgresql("postgresql_empty_proc")


@pytest.fixture
def db_url(postgresql: psycopg.Connection[Any]) -> str:
    """A fresh database with the outbox tables installed."""
    return pg_url(postgresql.info.dbname)


@pytest.fixture
def empty_db_url(postgresql_empty: psycopg.Connection[Any]) -> str:
    """A fresh database with no tables."""
    return pg_url(postgresql_empty.info.dbname)


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = broker_from_env()
    if not b.external:
        b.log = Path(tmp_path_factory.mktemp("broker")) / "tansu.log"
    b.start()
    yield b
    b.stop()


@pytest.fixture
def topic(broker: Broker) -> str:
    return broker.create_topic(partitions=3)


@pytest.fixture
def session_a(engine: sa.Engine) -> Iterator[Session]:
    """A session with a transaction open (rolled back at the end unless the test ended it)."""
    with Session(engine) as session:
        session.begin()
        yield session
        if session.in_transaction():
            session.rollback()
