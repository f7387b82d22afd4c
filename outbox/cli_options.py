"""The command line's shared pieces: options declared once for every command that takes them
(database, Kafka, logging, backoff), reading secrets from files, and turning library errors
into one line and an exit status (0 done, 1 failed, 2 usage or configuration error)."""

from __future__ import annotations

import errno
import functools
import re
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import click

from outbox import logs
from outbox.config import read_db_url, read_kafka_properties
from outbox.exceptions import ConfigurationError, OutboxError
from outbox.health import HealthServer, Route
from outbox.schema import DEFAULT_INBOX_TABLE, DEFAULT_TABLE

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def fail(exc: OutboxError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2 if isinstance(exc, ConfigurationError) else 1)


def errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OutboxError as exc:
            fail(exc)

    return wrapper  # type: ignore[return-value]


def _rewrite_arguments(fn: F, rewrite: Callable[[dict[str, Any]], None]) -> F:
    """``fn`` called with its keyword arguments changed by ``rewrite`` first, before anything
    else runs; a :class:`ConfigurationError` from ``rewrite`` is printed (exit 2). The click
    options already declared on ``fn`` move to the wrapper."""
    params = fn.__dict__.pop("__click_params__", None)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            rewrite(kwargs)
        except ConfigurationError as exc:
            fail(exc)
        return fn(*args, **kwargs)

    if params is not None:
        wrapper.__dict__["__click_params__"] = params
    return cast(F, wrapper)


def _read_db_url(kwargs: dict[str, Any]) -> None:
    kwargs["db_url"] = read_db_url(kwargs["db_url"], kwargs.pop("db_url_file"))


def db_options(fn: F) -> F:
    """``--db-url`` or ``--db-url-file`` (exactly one), ``--table``, ``--schema``. The command
    gets ``db_url``: the URL (read from the file when given), checked before anything runs."""
    fn = _rewrite_arguments(fn, _read_db_url)
    for option in reversed(
        [
            click.option(
                "--db-url",
                envvar="OUTBOX_DB_URL",
                default=None,
                help="postgresql+psycopg://USER@HOST:PORT/DBNAME; leave the password out "
                "(libpq reads PGPASSWORD, ~/.pgpass, PGPASSFILE) or use --db-url-file "
                "[OUTBOX_DB_URL]",
            ),
            click.option(
                "--db-url-file",
                envvar="OUTBOX_DB_URL_FILE",
                default=None,
                metavar="FILE",
                help="Read the database URL from FILE (e.g. a mounted secret) instead of "
                "--db-url [OUTBOX_DB_URL_FILE]",
            ),
            click.option(
                "--table",
                envvar="OUTBOX_TABLE",
                default=DEFAULT_TABLE,
                show_default=True,
                help="Outbox table name [OUTBOX_TABLE]",
            ),
            click.option(
                "--schema",
                envvar="OUTBOX_SCHEMA",
                default=None,
                help="Schema of the outbox table (default: search_path) [OUTBOX_SCHEMA]",
            ),
        ]
    ):
        fn = option(fn)
    return fn


# A NAME=VALUE whose value goes on with a space and another dotted NAME=: several settings in
# one -X, as earlier versions took them (split at spaces). Refused rather than sent to
# librdkafka as one value (which it could echo in an error message, secrets included).
_SETTINGS_IN_ONE = re.compile(r"\s[A-Za-z][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)+=")
_SETTING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class _KafkaSetting(click.types.StringParamType):
    """One ``NAME=VALUE`` (the value may hold spaces and ``=``). From the environment variable:
    one per line. Error messages name the setting, never its value."""

    name = "NAME=VALUE"

    def split_envvar_value(self, rv: str) -> list[str]:
        return [line for line in (rv or "").splitlines() if line.strip()]

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = super().convert(value, param, ctx)
        name, sep, rest = text.partition("=")
        name = name.strip()
        if not sep or not name:
            self.fail("expected NAME=VALUE, e.g. -X security.protocol=SASL_SSL", param, ctx)
        shown = name if _SETTING_NAME.fullmatch(name) else "a setting"
        if _SETTINGS_IN_ONE.search(rest):
            self.fail(
                f"the value of {shown} looks like several settings: pass one NAME=VALUE per "
                "-X (one per line in OUTBOX_KAFKA_SETTINGS), or use --kafka-config FILE",
                param,
                ctx,
            )
        return text


def parse_settings(values: tuple[str, ...]) -> dict[str, str]:
    """``NAME=VALUE`` items (each one setting, split at the first ``=``) as a dict; a later
    item overrides an earlier one."""
    settings: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(
                "expected NAME=VALUE, e.g. -X security.protocol=SASL_SSL", param_hint="'-X'"
            )
        settings[name.strip()] = value
    return settings


inbox_option = click.option(
    "--inbox-table",
    envvar="OUTBOX_INBOX_TABLE",
    default=DEFAULT_INBOX_TABLE,
    show_default=True,
    help="Inbox table name [OUTBOX_INBOX_TABLE]",
)


def options(*options: Callable[[F], F]) -> Callable[[F], F]:
    """Apply click options in the order they are listed (as --help shows them)."""

    def apply(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


def _read_kafka_config(kwargs: dict[str, Any]) -> None:
    path = kwargs.pop("kafka_config")
    from_file = read_kafka_properties(path) if path else {}
    kwargs["kafka_settings"] = (
        *(f"{name}={value}" for name, value in from_file.items()),
        *kwargs["kafka_settings"],
    )


def kafka_options(fn: F) -> F:
    """``--bootstrap-servers``, ``--kafka-config FILE`` and ``-X NAME=VALUE``, declared once
    for the relay and the consumer, so that the same option means the same there. The command
    gets ``kafka_settings``: the file's settings, then the ``-X`` ones (which override them)."""
    return options(
        click.option(
            "--bootstrap-servers",
            envvar="OUTBOX_BOOTSTRAP_SERVERS",
            required=True,
            help="Kafka bootstrap servers, host:port[,host:port] [OUTBOX_BOOTSTRAP_SERVERS]",
        ),
        click.option(
            "--kafka-config",
            envvar="OUTBOX_KAFKA_CONFIG",
            default=None,
            metavar="FILE",
            help="librdkafka settings from a properties file: name=value lines, # comments; "
            "-X overrides them. Keeps secrets (sasl.password) off the command line "
            "[OUTBOX_KAFKA_CONFIG]",
        ),
        click.option(
            "-X",
            "kafka_settings",
            multiple=True,
            type=_KafkaSetting(),
            envvar="OUTBOX_KAFKA_SETTINGS",
            metavar="NAME=VALUE",
            help="Any librdkafka setting, one per -X (the value may hold spaces), repeatable "
            "[OUTBOX_KAFKA_SETTINGS, one NAME=VALUE per line]",
        ),
    )(_rewrite_arguments(fn, _read_kafka_config))


log_options = options(
    click.option(
        "--log-level",
        type=click.Choice(logs.LEVELS, case_sensitive=False),
        default="info",
        show_default=True,
        envvar="OUTBOX_LOG_LEVEL",
        help="[OUTBOX_LOG_LEVEL]",
    ),
    click.option(
        "--log-format",
        type=click.Choice(["text", "json"], case_sensitive=False),
        default="text",
        show_default=True,
        envvar="OUTBOX_LOG_FORMAT",
        help="[OUTBOX_LOG_FORMAT]",
    ),
)


def backoff_options(what: str, env: str, base: float, cap: float) -> Callable[[F], F]:
    """``--{what}-backoff`` and ``--{what}-backoff-max``, read from ``{env}`` too."""
    return options(
        click.option(
            f"--{what}-backoff",
            f"{what.replace('-', '_')}_backoff",
            type=click.FloatRange(min=0.001),
            default=base,
            show_default=True,
            envvar=env,
            help=f"Base of the {what} backoff (full jitter), seconds [{env}]",
        ),
        click.option(
            f"--{what}-backoff-max",
            f"{what.replace('-', '_')}_backoff_max",
            type=click.FloatRange(min=0.001),
            default=cap,
            show_default=True,
            envvar=f"{env}_MAX",
            help=f"Cap of the {what} backoff, seconds [{env}_MAX]",
        ),
    )


def breaker_options(default: Any) -> Callable[[F], F]:
    """The consumer's circuit breaker, retry budget and deadline options; ``default``: a
    :class:`~outbox.breaker.BreakerPolicy` with the defaults to show."""
    return options(
        click.option(
            "--transient",
            "transient",
            multiple=True,
            envvar="OUTBOX_TRANSIENT",
            help="Exception type (package.module.Class) meaning the handler's dependency is "
            "down, not the message: no attempt counted, the breaker decides; repeatable "
            "(outbox.DownstreamUnavailable always is) [OUTBOX_TRANSIENT, space-separated]",
        ),
        click.option(
            "--breaker-failures",
            type=click.IntRange(1),
            default=default.failures,
            show_default=True,
            envvar="OUTBOX_BREAKER_FAILURES",
            help="Transient failures in a row that open the circuit breaker "
            "[OUTBOX_BREAKER_FAILURES]",
        ),
        click.option(
            "--breaker-failure-rate",
            type=click.FloatRange(0, 1, min_open=True),
            default=default.failure_rate,
            show_default=True,
            envvar="OUTBOX_BREAKER_FAILURE_RATE",
            help="...or the fraction of the window's attempts failing transiently "
            "[OUTBOX_BREAKER_FAILURE_RATE]",
        ),
        click.option(
            "--breaker-window",
            type=click.FloatRange(min=1),
            default=default.window,
            show_default=True,
            envvar="OUTBOX_BREAKER_WINDOW",
            help="Seconds of the sliding window for the failure rate and the retry budget "
            "[OUTBOX_BREAKER_WINDOW]",
        ),
        click.option(
            "--breaker-open",
            type=click.FloatRange(min=0.01),
            default=default.open_base,
            show_default=True,
            envvar="OUTBOX_BREAKER_OPEN",
            help="First open period of the breaker, seconds (full jitter, doubling on each "
            "failed probe) [OUTBOX_BREAKER_OPEN]",
        ),
        click.option(
            "--breaker-open-max",
            type=click.FloatRange(min=0.01),
            default=default.open_max,
            show_default=True,
            envvar="OUTBOX_BREAKER_OPEN_MAX",
            help="Longest open period, seconds [OUTBOX_BREAKER_OPEN_MAX]",
        ),
        click.option(
            "--retry-budget",
            type=click.FloatRange(0, 1),
            default=default.retry_budget,
            show_default=True,
            envvar="OUTBOX_RETRY_BUDGET",
            help="Retries of unclassified failures allowed, as a fraction of the window's "
            "attempts; past it failures count as an outage [OUTBOX_RETRY_BUDGET]",
        ),
        click.option(
            "--clock-skew",
            type=click.FloatRange(0, 86400, max_open=True),
            default=1.0,
            show_default=True,
            envvar="OUTBOX_CLOCK_SKEW",
            help="Seconds past a message's deadline before it counts as expired "
            "[OUTBOX_CLOCK_SKEW]",
        ),
        click.option(
            "--on-expired",
            envvar="OUTBOX_ON_EXPIRED",
            default=None,
            help="package.module:function(session, message) run instead of the handler for a "
            "message past its deadline (default: dead-letter it, reason expired) "
            "[OUTBOX_ON_EXPIRED]",
        ),
    )


metrics_options = options(
    click.option(
        "--metrics-port",
        type=click.IntRange(1, 65535),
        default=None,
        envvar="OUTBOX_METRICS_PORT",
        metavar="PORT",
        help="Serve /healthz (liveness) and /readyz (readiness) over HTTP on this port "
        "(default: no server) [OUTBOX_METRICS_PORT]",
    ),
    click.option(
        "--metrics-host",
        default="0.0.0.0",  # noqa: S104 -- probes come from outside the container
        show_default=True,
        envvar="OUTBOX_METRICS_HOST",
        help="Address the --metrics-port server listens on [OUTBOX_METRICS_HOST]",
    ),
)


def serve_metrics(host: str, port: int | None, routes: Mapping[str, Route]) -> HealthServer | None:
    """Start the ``--metrics-port`` server (None without a port). An address it cannot listen
    on is a :class:`ConfigurationError` naming the option, e.g. ``--metrics-port 9000:
    address in use``."""
    if port is None:
        return None
    try:
        return HealthServer(routes, host, port).start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            why = f"--metrics-port {port}: address in use"
        elif exc.errno == errno.EACCES:
            why = f"--metrics-port {port}: permission denied"
        elif isinstance(exc, socket.gaierror):
            why = f"--metrics-host {host}: unknown host"
        elif exc.errno == errno.EADDRNOTAVAIL:
            why = f"--metrics-host {host}: not an address of this machine"
        else:
            why = f"--metrics-host {host} --metrics-port {port}: {exc.strerror or exc}"
        raise ConfigurationError(why) from exc


class Stopper:
    """Routes SIGTERM/SIGINT to whatever must stop (the relay, the consumer) once it exists;
    a signal received earlier, even before the heavy imports (``outbox._entry``), stops it as
    soon as it is attached."""

    def __init__(self) -> None:
        from outbox import _entry

        self._requested = bool(_entry.received)
        self._stop: Callable[[], None] | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    @property
    def requested(self) -> bool:
        return self._requested

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self._requested = True
        if self._stop is not None:
            self._stop()

    def attach(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        if self._requested:
            stop()


def first_client(make: Callable[[], T]) -> Callable[[], T]:
    """Build one client now, so that a bad -X setting fails before anything starts, and hand
    it out first; later calls (after a client was discarded) make new ones."""
    first = [make()]
    return lambda: first.pop() if first else make()
