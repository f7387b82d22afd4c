"""Command line: ``outbox`` (db, status, relay) and ``outbox-relay``.

A thin layer: parse options (each also read from an ``OUTBOX_*`` variable), build the config,
call public functions. Exit status: 0 done, 1 failed, 2 usage or configuration error.
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import re
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click
import sqlalchemy as sa

from outbox import logs, migrate
from outbox.admin import counts
from outbox.config import RelayConfig, parse_db_url, read_db_url, read_kafka_properties
from outbox.consumer import Consumer, ConsumerConfig, load_handler, message_id_key
from outbox.exceptions import (
    ConfigurationError,
    OutboxError,
    TransportUnavailable,
    translate_db_errors,
)
from outbox.inbox import Inbox
from outbox.outbox import Outbox
from outbox.relay import Relay
from outbox.schema import DEFAULT_INBOX_TABLE, DEFAULT_TABLE
from outbox.transport.kafka import KafkaSource, KafkaTransport, topic_retention

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _fail(exc: OutboxError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2 if isinstance(exc, ConfigurationError) else 1)


def _errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OutboxError as exc:
            _fail(exc)

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
            _fail(exc)
        return fn(*args, **kwargs)

    if params is not None:
        wrapper.__dict__["__click_params__"] = params
    return cast(F, wrapper)


def _read_db_url(kwargs: dict[str, Any]) -> None:
    kwargs["db_url"] = read_db_url(kwargs["db_url"], kwargs.pop("db_url_file"))


def _db_options(fn: F) -> F:
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


def _parse_settings(values: tuple[str, ...]) -> dict[str, str]:
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


@click.group()
@click.version_option(package_name="sqlalchemy-outbox")
def main() -> None:
    """Transactional outbox for SQLAlchemy: install tables, inspect, relay to Kafka."""


@main.group()
def db() -> None:
    """Install and inspect the outbox tables."""


_inbox_option = click.option(
    "--inbox-table",
    envvar="OUTBOX_INBOX_TABLE",
    default=DEFAULT_INBOX_TABLE,
    show_default=True,
    help="Inbox table name [OUTBOX_INBOX_TABLE]",
)


@db.command()
@_db_options
@_inbox_option
@click.option("--revision", default="head", show_default=True)
@_errors
def upgrade(db_url: str, table: str, schema: str | None, inbox_table: str, revision: str) -> None:
    """Create or update the tables (safe to run again)."""
    migrate.upgrade(db_url, table=table, schema=schema, revision=revision, inbox_table=inbox_table)
    click.echo(f"outbox tables at revision {migrate.current(db_url, schema=schema)}")


@db.command()
@_db_options
@_inbox_option
@click.option("--revision", required=True, help="Target revision; 'base' drops the tables.")
@_errors
def downgrade(db_url: str, table: str, schema: str | None, inbox_table: str, revision: str) -> None:
    """Revert the tables to a revision ('base' removes them and their rows)."""
    migrate.downgrade(
        db_url, table=table, schema=schema, revision=revision, inbox_table=inbox_table
    )
    current = migrate.current(db_url, schema=schema)
    click.echo(f"outbox tables at revision {current}" if current else "outbox tables removed")


@db.command("sql")
@click.option("--table", envvar="OUTBOX_TABLE", default=DEFAULT_TABLE, show_default=True)
@click.option("--schema", envvar="OUTBOX_SCHEMA", default=None)
@_inbox_option
@click.option("--revision", default="head", show_default=True)
@_errors
def sql_(table: str, schema: str | None, inbox_table: str, revision: str) -> None:
    """Print the DDL instead of running it (for other migration tools)."""
    click.echo(
        migrate.sql(table=table, schema=schema, revision=revision, inbox_table=inbox_table),
        nl=False,
    )


@db.command()
def versions_dir() -> None:
    """Print the folder to add to version_locations in your own alembic.ini."""
    click.echo(str(migrate.versions_dir()))


def _options(*options: Callable[[F], F]) -> Callable[[F], F]:
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


def _kafka_options(fn: F) -> F:
    """``--bootstrap-servers``, ``--kafka-config FILE`` and ``-X NAME=VALUE``, declared once
    for the relay and the consumer, so that the same option means the same there. The command
    gets ``kafka_settings``: the file's settings, then the ``-X`` ones (which override them)."""
    return _options(
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


_log_options = _options(
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


def _backoff_options(what: str, env: str, base: float, cap: float) -> Callable[[F], F]:
    """``--{what}-backoff`` and ``--{what}-backoff-max``, read from ``{env}`` too."""
    return _options(
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


def _first_client(make: Callable[[], T]) -> Callable[[], T]:
    """Build one client now, so that a bad -X setting fails before anything starts, and hand
    it out first; later calls (after a client was discarded) make new ones."""
    first = [make()]
    return lambda: first.pop() if first else make()


_RELAY = RelayConfig(db_url="postgresql://x/y")
_CONSUMER = ConsumerConfig(db_url="postgresql://x/y", name="x")


_relay_options = _options(
    _db_options,
    _kafka_options,
    click.option("--once", is_flag=True, help="Send what is due now, then exit."),
    click.option(
        "--batch-size",
        type=click.IntRange(1, 100_000),
        default=_RELAY.batch_size,
        show_default=True,
        envvar="OUTBOX_BATCH_SIZE",
        help="Rows claimed per round trip [OUTBOX_BATCH_SIZE]",
    ),
    click.option(
        "--max-attempts",
        type=click.IntRange(1),
        default=_RELAY.max_attempts,
        show_default=True,
        envvar="OUTBOX_MAX_ATTEMPTS",
        help="Failed sends before a message is parked [OUTBOX_MAX_ATTEMPTS]",
    ),
    _backoff_options(
        "retry", "OUTBOX_RETRY_BACKOFF", _RELAY.retry_backoff_base, _RELAY.retry_backoff_max
    ),
    _backoff_options(
        "broker", "OUTBOX_BROKER_BACKOFF", _RELAY.broker_backoff_base, _RELAY.broker_backoff_max
    ),
    _backoff_options("db", "OUTBOX_DB_BACKOFF", _RELAY.db_backoff_base, _RELAY.db_backoff_max),
    click.option(
        "--poll-interval",
        type=click.FloatRange(min=0.01),
        default=_RELAY.poll_interval,
        show_default=True,
        envvar="OUTBOX_POLL_INTERVAL",
        help="Fallback poll, seconds (commits wake the relay at once) [OUTBOX_POLL_INTERVAL]",
    ),
    click.option(
        "--leader-retry-interval",
        type=click.FloatRange(min=0.01),
        default=_RELAY.leader_retry_interval,
        show_default=True,
        envvar="OUTBOX_LEADER_RETRY_INTERVAL",
        help="A standby waits for the leader lock in slices of this many seconds; it takes "
        "over as soon as the leader's session ends [OUTBOX_LEADER_RETRY_INTERVAL]",
    ),
    click.option(
        "--delivery-timeout",
        type=click.FloatRange(min=0.1),
        default=_RELAY.delivery_timeout,
        show_default=True,
        envvar="OUTBOX_DELIVERY_TIMEOUT",
        help="Seconds a message may wait for the broker's acknowledgement "
        "[OUTBOX_DELIVERY_TIMEOUT]",
    ),
    click.option(
        "--retain-sent",
        is_flag=True,
        envvar="OUTBOX_RETAIN_SENT",
        help="Keep sent rows (status 'sent') instead of deleting them [OUTBOX_RETAIN_SENT]",
    ),
    _log_options,
)


def _relay(
    db_url: str,
    table: str,
    schema: str | None,
    bootstrap_servers: str,
    kafka_settings: tuple[str, ...],
    once: bool,
    batch_size: int,
    max_attempts: int,
    retry_backoff: float,
    retry_backoff_max: float,
    broker_backoff: float,
    broker_backoff_max: float,
    db_backoff: float,
    db_backoff_max: float,
    poll_interval: float,
    leader_retry_interval: float,
    delivery_timeout: float,
    retain_sent: bool,
    log_level: str,
    log_format: str,
) -> None:
    logs.setup(log_level, log_format)
    overrides = _parse_settings(kafka_settings)
    overrides.setdefault("message.timeout.ms", str(int(delivery_timeout * 1000)))
    try:
        config = RelayConfig(
            db_url=db_url,
            table=table,
            schema=schema,
            batch_size=batch_size,
            max_attempts=max_attempts,
            retry_backoff_base=retry_backoff,
            retry_backoff_max=max(retry_backoff, retry_backoff_max),
            broker_backoff_base=broker_backoff,
            broker_backoff_max=max(broker_backoff, broker_backoff_max),
            db_backoff_base=db_backoff,
            db_backoff_max=max(db_backoff, db_backoff_max),
            poll_interval=poll_interval,
            leader_retry_interval=leader_retry_interval,
            delivery_timeout=delivery_timeout,
            retain_sent=retain_sent,
        )
        factory = _first_client(lambda: KafkaTransport(bootstrap_servers, overrides))
        relay = Relay(config, factory)
        relay.check()
        if once:
            stats = relay.run_once()
        else:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: relay.stop())
            try:
                factory().check(5.0)  # the same client: the relay's first call gets it back
            except TransportUnavailable as exc:
                logger.warning(
                    "broker unreachable at start, will keep trying",
                    extra={"event": "relay.broker_unreachable_at_start", "error": str(exc)},
                )
            stats = relay.run()
    except OutboxError as exc:
        _fail(exc)
    click.echo(
        f"sent {stats.sent}, failed attempts {stats.failed_attempts}, parked {stats.parked}",
        err=True,
    )


_relay_help = """Publish committed outbox rows to Kafka, at least once and in order per key.

Runs until SIGTERM/SIGINT (in-flight messages are finished, then it exits 0), or with --once
until nothing is due. Several relays may run: one is the leader, the others wait."""

main.command("relay", help=_relay_help)(_relay_options(_relay))
relay_main = click.command("outbox-relay", help=_relay_help)(_relay_options(_relay))


@main.command()
@_db_options
@_errors
def status(db_url: str, table: str, schema: str | None) -> None:
    """Count messages by status (pending, retry, dead, sent)."""
    for name, (n, oldest) in sorted(counts(db_url, table=table, schema=schema).items()):
        click.echo(f"{name:8} {n:>10}  oldest {oldest.isoformat() if oldest else '-'}")


@main.group()
def inbox() -> None:
    """Maintain the inbox table."""


@inbox.command()
@_db_options
@_inbox_option
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=1000,
    show_default=True,
    help="Rows deleted per short transaction",
)
@_errors
def purge(db_url: str, table: str, schema: str | None, inbox_table: str, batch_size: int) -> None:
    """Delete expired inbox keys (processed events past their retention, expired commands)."""
    engine = sa.create_engine(parse_db_url(db_url), poolclass=sa.pool.NullPool)
    try:
        with translate_db_errors("inbox purge"), engine.connect() as conn:
            outbox = Outbox(table=table, schema=schema, inbox_table=inbox_table)
            deleted = Inbox(outbox).purge(conn, batch_size=batch_size)
    finally:
        engine.dispose()
    click.echo(f"purged {deleted} expired inbox keys")


@main.command()
@_options(
    _db_options,
    _inbox_option,
    _kafka_options,
    click.option("--group", envvar="OUTBOX_GROUP", required=True, help="Kafka consumer group"),
    click.option(
        "--topic",
        "topics",
        multiple=True,
        required=True,
        envvar="OUTBOX_TOPICS",
        help="Topic to consume, repeatable [OUTBOX_TOPICS, space-separated]",
    ),
    click.option(
        "--handler",
        envvar="OUTBOX_HANDLER",
        required=True,
        help="package.module:function called as handler(session, message) [OUTBOX_HANDLER]",
    ),
    click.option(
        "--key-extractor",
        envvar="OUTBOX_KEY_EXTRACTOR",
        default=None,
        help="package.module:function(message) -> str | None giving the idempotency key "
        "(default: the message-id header), for messages from other producers "
        "[OUTBOX_KEY_EXTRACTOR]",
    ),
    click.option(
        "--consumer-name",
        envvar="OUTBOX_CONSUMER_NAME",
        default=None,
        help="Inbox consumer name (default: the group) [OUTBOX_CONSUMER_NAME]",
    ),
    click.option(
        "--dead-letter-topic",
        envvar="OUTBOX_DEAD_LETTER_TOPIC",
        default=None,
        help="Where poison messages go (default: <topic>.dlq), through the outbox "
        "[OUTBOX_DEAD_LETTER_TOPIC]",
    ),
    click.option(
        "--max-attempts",
        type=click.IntRange(1),
        default=_CONSUMER.max_attempts,
        show_default=True,
        envvar="OUTBOX_CONSUMER_MAX_ATTEMPTS",
        help="Handler attempts at one message before it is dead-lettered "
        "[OUTBOX_CONSUMER_MAX_ATTEMPTS]",
    ),
    _backoff_options(
        "retry",
        "OUTBOX_CONSUMER_RETRY_BACKOFF",
        _CONSUMER.retry_backoff_base,
        _CONSUMER.retry_backoff_max,
    ),
    _backoff_options(
        "db", "OUTBOX_DB_BACKOFF", _CONSUMER.db_backoff_base, _CONSUMER.db_backoff_max
    ),
    click.option(
        "--retention-days",
        type=click.FloatRange(min=0.001),
        default=_CONSUMER.retention.total_seconds() / 86400,
        show_default=True,
        envvar="OUTBOX_INBOX_RETENTION_DAYS",
        help="How long processed keys are remembered; must cover how long a message can be "
        "redelivered [OUTBOX_INBOX_RETENTION_DAYS]",
    ),
    click.option(
        "--redelivery-horizon-days",
        type=click.FloatRange(min=0.0),
        default=None,
        envvar="OUTBOX_REDELIVERY_HORIZON_DAYS",
        help="How long a message can come back (default: the topics' retention.ms, when the "
        "broker tells); a longer horizon than --retention-days is warned about "
        "[OUTBOX_REDELIVERY_HORIZON_DAYS]",
    ),
    click.option(
        "--max-messages", type=click.IntRange(1), default=None, help="Stop after this many messages"
    ),
    click.option(
        "--idle-timeout",
        type=click.FloatRange(min=0.1),
        default=None,
        help="Stop after this many seconds without a message (counted once the group is joined)",
    ),
    _log_options,
)
def consume(
    db_url: str,
    table: str,
    schema: str | None,
    inbox_table: str,
    bootstrap_servers: str,
    kafka_settings: tuple[str, ...],
    group: str,
    topics: tuple[str, ...],
    handler: str,
    key_extractor: str | None,
    consumer_name: str | None,
    dead_letter_topic: str | None,
    max_attempts: int,
    retry_backoff: float,
    retry_backoff_max: float,
    db_backoff: float,
    db_backoff_max: float,
    retention_days: float,
    redelivery_horizon_days: float | None,
    max_messages: int | None,
    idle_timeout: float | None,
    log_level: str,
    log_format: str,
) -> None:
    """Consume topics through the inbox: each message's effects happen once."""
    logs.setup(log_level, log_format)
    overrides = _parse_settings(kafka_settings)
    topic_list = [t for item in topics for t in item.split()]
    try:
        fn = load_handler(handler)
        key: Any = load_handler(key_extractor) if key_extractor else message_id_key
        source = _first_client(lambda: KafkaSource(bootstrap_servers, group, topic_list, overrides))
        if redelivery_horizon_days is None:
            horizon_s = topic_retention(bootstrap_servers, topic_list, overrides)
        else:
            horizon_s = redelivery_horizon_days * 86400
        config = ConsumerConfig(
            db_url=db_url,
            name=consumer_name or group,
            dead_letter_topic=dead_letter_topic,
            max_attempts=max_attempts,
            retry_backoff_base=retry_backoff,
            retry_backoff_max=max(retry_backoff, retry_backoff_max),
            db_backoff_base=db_backoff,
            db_backoff_max=max(db_backoff, db_backoff_max),
            table=table,
            schema=schema,
            inbox_table=inbox_table,
            retention=datetime.timedelta(days=retention_days),
            redelivery_horizon=None
            if horizon_s is None or math.isinf(horizon_s)
            else datetime.timedelta(seconds=horizon_s),
        )
        consumer = Consumer(config, fn, source, key=key)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: consumer.stop())
        stats = consumer.run(max_messages=max_messages, idle_timeout=idle_timeout)
    except OutboxError as exc:
        _fail(exc)
    click.echo(
        f"processed {stats.processed}, duplicates {stats.duplicates}, "
        f"dead-lettered {stats.dead_lettered}",
        err=True,
    )


if __name__ == "__main__":
    main()
