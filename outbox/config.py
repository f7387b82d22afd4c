"""Relay configuration: a dataclass validated at construction; the database URL's checks; the
readers of the files that keep secrets off the command line (``--db-url-file``,
``--kafka-config``). No globals, no env reading here (the CLI maps ``OUTBOX_*`` variables onto
it)."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

import psycopg.conninfo
import psycopg.pq
import sqlalchemy as sa
import sqlalchemy.exc

from outbox.backoff import Backoff
from outbox.exceptions import ConfigurationError
from outbox.schema import DEFAULT_TABLE, validate_identifier

_DRIVERS = ("postgresql", "postgresql+psycopg")
_EXPECTED = "expected postgresql+psycopg://USER@HOST:PORT/DBNAME"
_ENCODE = "percent-encode '@', ':' and '/' in the user name or password (%40, %3A, %2F)"
# The scheme and what follows "://" up to the first "/", "?" or "#": the user name, password,
# host and port, when the password holds none of those characters.
_HEAD = re.compile(r"([A-Za-z][A-Za-z0-9+._-]*)://([^/?#]*)")
# A host name, an IPv4 address, or an IPv6 address (SQLAlchemy strips its brackets).
_HOST = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(%[\w.-]+)?")


def _bad_url(problem: str) -> ConfigurationError:
    return ConfigurationError(f"invalid database URL: {problem}")


def _check_port(text: str) -> None:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise _bad_url(f"the port must be a number from 1 to 65535; {_EXPECTED}")


def parse_db_url(url: str) -> sa.URL:
    """Parse and check a SQLAlchemy URL for PostgreSQL with psycopg 3: scheme, host, port
    (a number from 1 to 65535), database name and query parameters (libpq's keywords).

    Raises :class:`ConfigurationError` with a one-line message that never repeats any part of
    the URL but its scheme: a mistyped URL may hold a password in the wrong place (an
    unencoded ``@`` in it makes SQLAlchemy read the rest of the password as the host).
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError(
            "no database URL: pass --db-url or --db-url-file (or OUTBOX_DB_URL, OUTBOX_DB_URL_FILE)"
        )
    url = url.strip()
    head = _HEAD.match(url)
    if head is None:
        raise _bad_url(_EXPECTED)
    if head.group(1) not in _DRIVERS:
        raise ConfigurationError(
            f"unsupported database URL scheme {head.group(1)!r}: "
            "use postgresql+psycopg://USER@HOST:PORT/DBNAME"
        )
    # Raised outside the except clauses: the original error (which may quote the URL) is
    # neither chained nor kept as the context.
    parsed: sa.URL | None = None
    try:
        parsed = sa.make_url(url)
    except ValueError:  # int() of the port: "HOST:PORT" where an '@' went on, or a typo
        if head.group(2).count("@") > 1:
            problem = f"more than one '@' before the host; {_ENCODE}"
        else:
            problem = f"the port must be a number from 1 to 65535; {_EXPECTED}"
    except sqlalchemy.exc.ArgumentError:
        problem = _EXPECTED
    if parsed is None:
        raise _bad_url(problem)
    if parsed.drivername not in _DRIVERS:
        raise _bad_url(_EXPECTED)
    # SQLAlchemy ends the password at its first '@' (a user name may hold '@': "u@x:pw@host"
    # parses as intended), so the rest of a password with an unencoded '@' lands in the host,
    # or, after a '/', in the database name.
    raw_database = f"/{parsed.database}" in url.split("?", 1)[0]
    if "@" in (parsed.host or "") or (raw_database and "@" in (parsed.database or "")):
        raise _bad_url(f"more than one '@' before the host; {_ENCODE}")
    if parsed.host:
        if not _HOST.fullmatch(parsed.host):
            raise _bad_url(f"the host is not a host name or an IP address; {_ENCODE}")
    elif not {"host", "hostaddr", "service"} & set(parsed.query):
        raise _bad_url(
            "no host: use postgresql+psycopg://USER@HOST:PORT/DBNAME (for a Unix-domain "
            "socket: postgresql+psycopg://USER@/DBNAME?host=/var/run/postgresql)"
        )
    if parsed.port is not None:
        _check_port(str(parsed.port))
    for name, value in parsed.query.items():
        for item in (value,) if isinstance(value, str) else value:
            if name == "port":
                for port in item.split(","):
                    _check_port(port.strip())
            elif name == "host" and not item.startswith("/") and item.count(":") == 1:
                _check_port(item.partition(":")[2])  # ?host=HOST:PORT&host=HOST:PORT
    unknown = sorted(set(parsed.query) - _libpq_keywords())
    if unknown:
        raise _bad_url(
            f"unknown connection parameter {unknown[0]!r} in the query string (libpq's "
            "parameters are accepted: sslmode, connect_timeout, application_name, ...)"
        )
    if not parsed.database:
        raise ConfigurationError("the database URL names no database: add /DBNAME")
    if _SQLALCHEMY_2_0 and "%" in parsed.database:
        # SQLAlchemy 2.1 decodes a percent-encoded database name, 2.0 passes it on as is
        # (d%40b would be a database of that name): decode it the same way on both.
        parsed = parsed.set(database=urllib.parse.unquote(parsed.database))
    return parsed.set(drivername="postgresql+psycopg")


_SQLALCHEMY_2_0 = sa.__version__.startswith("2.0.")


@functools.cache
def _libpq_keywords() -> frozenset[str]:
    return frozenset(
        opt.keyword.decode() for opt in psycopg.pq.Conninfo.get_defaults() if opt.keyword
    )


def read_db_url(db_url: str | None, db_url_file: str | None) -> str:
    """The database URL given by exactly one of ``--db-url`` and ``--db-url-file`` (a file
    holding the URL, e.g. a mounted secret), checked by :func:`parse_db_url`."""
    if db_url and db_url_file:
        raise ConfigurationError(
            "pass either --db-url or --db-url-file, not both (check OUTBOX_DB_URL and "
            "OUTBOX_DB_URL_FILE)"
        )
    if db_url_file:
        db_url = _read_text(db_url_file, "--db-url-file").strip()
        if not db_url:
            raise ConfigurationError(f"--db-url-file {db_url_file} is empty")
        if "\n" in db_url:
            raise ConfigurationError(
                f"--db-url-file {db_url_file} must hold the URL alone, on one line"
            )
    parse_db_url(db_url or "")
    return (db_url or "").strip()


def read_kafka_properties(path: str) -> dict[str, str]:
    """librdkafka settings from a properties file (``--kafka-config``), as Java clients and
    ``kcat -F`` read them: one ``name=value`` per line, split at the first ``=``, blanks
    around the name and the value ignored; blank lines and lines starting with ``#`` or ``!``
    are skipped. Lines are taken as they are: no escapes, no continuation lines. A later line
    overrides an earlier one. Error messages give line numbers, never a line's text."""
    settings: dict[str, str] = {}
    for number, line in enumerate(_read_text(path, "--kafka-config").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith(("#", "!")):
            continue
        name, sep, value = text.partition("=")
        if not sep or not name.strip():
            raise ConfigurationError(f"--kafka-config {path}, line {number}: expected name=value")
        settings[name.strip()] = value.strip()
    return settings


def _read_text(path: str, option: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise ConfigurationError(f"{option} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read {option} {path}: {exc.strerror or exc}") from None


@dataclasses.dataclass(frozen=True)
class RelayConfig:
    """Everything the relay needs; every field has a CLI option and an ``OUTBOX_*`` variable."""

    db_url: str
    table: str = DEFAULT_TABLE
    schema: str | None = None
    #: Rows claimed per round trip.
    batch_size: int = 1000
    #: Batches sent but not yet acknowledged. 2 overlaps the database work for one batch with
    #: the broker's acknowledgement of the previous; a crash re-sends at most
    #: ``batch_size * max_inflight_batches`` messages.
    max_inflight_batches: int = 2
    #: Failed sends of one message before it is parked (status ``dead``).
    max_attempts: int = 10
    #: Per-message retry backoff: full jitter over ``min(max, base * 2**attempts)`` seconds.
    retry_backoff_base: float = 1.0
    retry_backoff_max: float = 300.0
    #: Relay-wide backoff while the broker is unreachable (same formula).
    broker_backoff_base: float = 0.5
    broker_backoff_max: float = 30.0
    #: Backoff between reconnects while the database is unreachable (same formula).
    db_backoff_base: float = 0.5
    db_backoff_max: float = 30.0
    #: Fallback poll when no notification arrives (notifications wake it at once).
    poll_interval: float = 10.0
    #: A standby waits for the leader lock in slices of this many seconds (one statement
    #: each); it takes over as soon as the leader's session ends, whatever the slice.
    leader_retry_interval: float = 1.0
    #: How long one message may wait for the broker's acknowledgement.
    delivery_timeout: float = 30.0
    #: On SIGTERM: how long to wait for in-flight acknowledgements before giving up on them.
    shutdown_timeout: float = 10.0
    #: Keep sent rows (status ``sent``, ``sent_at``) instead of deleting them.
    retain_sent: bool = False
    #: With ``retain_sent``: the leader deletes sent rows older than this many seconds, in
    #: small batches while it is idle, at most every ``purge_interval`` seconds. None: never.
    purge_sent_after: float | None = None
    purge_interval: float = 300.0
    application_name: str = "outbox-relay"
    db_connect_timeout: float = 10.0
    extra_db_options: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_db_url(self.db_url)
        validate_identifier(self.table, "table name")
        if self.schema is not None:
            validate_identifier(self.schema, "schema name")
        for name in ("batch_size", "max_inflight_batches", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1")
        for name in (
            "retry_backoff_base",
            "retry_backoff_max",
            "broker_backoff_base",
            "broker_backoff_max",
            "db_backoff_base",
            "db_backoff_max",
            "poll_interval",
            "leader_retry_interval",
            "delivery_timeout",
            "db_connect_timeout",
            "purge_interval",
        ):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be positive")
        if self.shutdown_timeout < 0:
            raise ConfigurationError("shutdown_timeout must not be negative")
        if self.purge_sent_after is not None:
            if not self.purge_sent_after > 0:
                raise ConfigurationError("purge_sent_after must be positive")
            if not self.retain_sent:
                raise ConfigurationError(
                    "--purge-sent-after needs --retain-sent (purge_sent_after needs "
                    "retain_sent): without it, sent rows are deleted at once"
                )

    @property
    def retry_backoff(self) -> Backoff:
        return Backoff(self.retry_backoff_base, self.retry_backoff_max)

    @property
    def broker_backoff(self) -> Backoff:
        return Backoff(self.broker_backoff_base, self.broker_backoff_max)

    @property
    def db_backoff(self) -> Backoff:
        return Backoff(self.db_backoff_base, self.db_backoff_max)


def session_options(url_options: object, *ours: str) -> str:
    """libpq's ``options`` with ``ours`` added. libpq reads PGOPTIONS only when no ``options``
    is given: keep the operator's session settings (PGOPTIONS, then the URL's) in front."""
    parts = [os.environ.get("PGOPTIONS", ""), str(url_options or ""), *ours]
    return " ".join(part for part in parts if part)


def relay_conninfo(config: RelayConfig) -> str:
    """The libpq connection string of the relay's sessions: the URL's parameters, plus
    keepalives and session settings that its guarantees rest on.

    Several hosts are taken in both forms that SQLAlchemy's psycopg dialect accepts, so the
    relay connects where the application's engine does: ``?host=H1:P1&host=H2:P2`` (the
    parameter repeated, each with its port; SQLAlchemy hands them over as a tuple) and
    ``?host=H1,H2&port=P1,P2`` (libpq's own lists). Both become libpq's ``host=H1,H2
    port=P1,P2``: libpq tries the hosts in order, and ``target_session_attrs=read-write``
    makes it skip a standby, so the relay follows a failover. A single ``?host=H:P`` is split
    the same way. Any other parameter given twice is refused: libpq has no list for it (it
    used to be dropped, and with it every host, so the relay connected to the default one).
    """
    url = parse_db_url(config.db_url)
    params: dict[str, Any] = dict(
        url.translate_connect_args(username="user", database="dbname").items()
    )
    per_host = ("host", "hostaddr", "port")  # libpq's comma-separated lists
    for name, value in url.query.items():
        if isinstance(value, str):
            params[name] = value
        elif name in per_host:
            params[name] = ",".join(value)
        else:
            raise _bad_url(f"the query parameter {name!r} is given more than once")
    hosts = url.query.get("host")
    items = (hosts,) if isinstance(hosts, str) else tuple(hosts or ())

    def with_port(item: str) -> bool:
        # An IPv6 address has more than one ':', a socket directory starts with '/'.
        return not item.startswith("/") and item.count(":") == 1

    # "?host=H1:P1&host=H2:P2", or one "?host=H:P"; a list "?host=H1,H2" has its ports in ?port=.
    if isinstance(hosts, tuple) or (len(items) == 1 and with_port(items[0])):
        if "port" in url.query:  # as SQLAlchemy: one form or the other
            raise _bad_url(
                "give the ports either with each host (?host=H1:P1&host=H2:P2) or in ?port= "
                "(?host=H1,H2&port=P1,P2), not both"
            )
        params["host"] = ",".join(
            item.partition(":")[0] if with_port(item) else item for item in items
        )
        ports = [item.partition(":")[2] if with_port(item) else "" for item in items]
        if any(ports):
            # An empty item is libpq's default port; the URL's own port, if any, fills it.
            default = "" if url.port is None else str(url.port)
            params["port"] = ",".join(p or default for p in ports)
    # libpq's rule, checked now rather than at every reconnect: one item per host (or one port
    # for all of them).
    counts = {name: str(params[name]).count(",") + 1 for name in per_host if name in params}
    hosts_n = counts.get("host", counts.get("hostaddr", 1))
    for name, n in counts.items():
        if n != hosts_n and not (name == "port" and n == 1):
            raise _bad_url(f"{n} items in {name}= for {hosts_n} hosts")
    params.setdefault("application_name", config.application_name)
    params.setdefault("connect_timeout", max(1, int(config.db_connect_timeout)))
    # Client side: notice a dead server or network in about 25 s instead of hanging on TCP,
    # and stop sending (see Relay._lost_database).
    params.setdefault("keepalives", 1)
    params.setdefault("keepalives_idle", 10)
    params.setdefault("keepalives_interval", 5)
    params.setdefault("keepalives_count", 3)
    server_options = [
        # Server side: end the session of a relay that vanished from the network (releasing
        # leadership) after about 60 s -- later than the relay itself gives up (25 s), so a
        # new leader never sends while the old one still could.
        "-c tcp_keepalives_idle=30",
        "-c tcp_keepalives_interval=10",
        "-c tcp_keepalives_count=3",
        # Marking rows sent need not wait for the WAL flush: if the database crashes before
        # it, those rows are sent again (duplicates, which at-least-once allows), never lost.
        "-c synchronous_commit=off",
    ]
    params["options"] = session_options(params.get("options"), *server_options)
    params.update(config.extra_db_options)
    return psycopg.conninfo.make_conninfo(**params)
