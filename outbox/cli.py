"""Command line: ``outbox`` (db, status, relay) and ``outbox-relay``.

A thin layer: parse options (each also read from an ``OUTBOX_*`` variable), build the config,
call public functions. Exit status: 0 done, 1 failed, 2 usage or configuration error.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import sqlalchemy as sa

from outbox import migrate
from outbox.admin import counts
from outbox.config import RelayConfig, parse_db_url
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
from outbox.transport.kafka import KafkaSource, KafkaTransport

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        return f"{base} {fields}" if fields else base


class JsonFormatter(logging.Formatter):
    """One JSON object per line, extras as top-level fields."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


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


def _db_options(fn: F) -> F:
    for option in reversed(
        [
            click.option(
                "--db-url",
                envvar="OUTBOX_DB_URL",
                required=True,
                help="postgresql+psycopg://USER:PASSWORD@HOST:PORT/DBNAME [OUTBOX_DB_URL]",
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


def _parse_settings(values: tuple[str, ...]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for item in values:
        for part in item.split():
            name, sep, value = part.partition("=")
            if not sep or not name:
                raise click.BadParameter(
                    f"{part!r}: expected NAME=VALUE, e.g. -X security.protocol=SASL_SSL",
                    param_hint="'-X'",
                )
            settings[name] = value
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


def _relay_options(fn: F) -> F:
    defaults = RelayConfig(db_url="postgresql://x/y")
    options = [
        click.option(
            "--bootstrap-servers",
            envvar="OUTBOX_BOOTSTRAP_SERVERS",
            required=True,
            help="Kafka bootstrap servers, host:port[,host:port] [OUTBOX_BOOTSTRAP_SERVERS]",
        ),
        click.option(
            "-X",
            "kafka_settings",
            multiple=True,
            envvar="OUTBOX_KAFKA_SETTINGS",
            metavar="NAME=VALUE",
            help="Any librdkafka producer setting, repeatable "
            "[OUTBOX_KAFKA_SETTINGS, space-separated]",
        ),
        click.option("--once", is_flag=True, help="Send what is due now, then exit."),
        click.option(
            "--batch-size",
            type=click.IntRange(1, 100_000),
            default=defaults.batch_size,
            show_default=True,
            envvar="OUTBOX_BATCH_SIZE",
        ),
        click.option(
            "--max-attempts",
            type=click.IntRange(1),
            default=defaults.max_attempts,
            show_default=True,
            envvar="OUTBOX_MAX_ATTEMPTS",
            help="Failed sends before a message is parked [OUTBOX_MAX_ATTEMPTS]",
        ),
        click.option(
            "--retry-backoff",
            type=click.FloatRange(min=0.001),
            default=defaults.retry_backoff_base,
            show_default=True,
            envvar="OUTBOX_RETRY_BACKOFF",
            help="Base of the per-message exponential backoff, seconds",
        ),
        click.option(
            "--retry-backoff-max",
            type=click.FloatRange(min=0.001),
            default=defaults.retry_backoff_max,
            show_default=True,
            envvar="OUTBOX_RETRY_BACKOFF_MAX",
        ),
        click.option(
            "--poll-interval",
            type=click.FloatRange(min=0.01),
            default=defaults.poll_interval,
            show_default=True,
            envvar="OUTBOX_POLL_INTERVAL",
            help="Fallback poll, seconds (commits wake the relay at once)",
        ),
        click.option(
            "--leader-retry-interval",
            type=click.FloatRange(min=0.01),
            default=defaults.leader_retry_interval,
            show_default=True,
            envvar="OUTBOX_LEADER_RETRY_INTERVAL",
            help="How often a standby relay tries to take over, seconds",
        ),
        click.option(
            "--delivery-timeout",
            type=click.FloatRange(min=0.1),
            default=defaults.delivery_timeout,
            show_default=True,
            envvar="OUTBOX_DELIVERY_TIMEOUT",
            help="Seconds a message may wait for the broker's acknowledgement",
        ),
        click.option(
            "--retain-sent",
            is_flag=True,
            envvar="OUTBOX_RETAIN_SENT",
            help="Keep sent rows (status 'sent') instead of deleting them",
        ),
        click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
            default="info",
            show_default=True,
            envvar="OUTBOX_LOG_LEVEL",
        ),
        click.option(
            "--log-format",
            type=click.Choice(["text", "json"]),
            default="text",
            show_default=True,
            envvar="OUTBOX_LOG_FORMAT",
        ),
    ]
    fn = _db_options(fn)
    for option in reversed(options):
        fn = option(fn)
    return fn


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
    poll_interval: float,
    leader_retry_interval: float,
    delivery_timeout: float,
    retain_sent: bool,
    log_level: str,
    log_format: str,
) -> None:
    _setup_logging(log_level, log_format)
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
            poll_interval=poll_interval,
            leader_retry_interval=leader_retry_interval,
            delivery_timeout=delivery_timeout,
            retain_sent=retain_sent,
        )
        # Build one client now so that a bad -X setting fails before anything starts.
        first: list[KafkaTransport] = [KafkaTransport(bootstrap_servers, overrides)]

        def factory() -> KafkaTransport:
            return first.pop() if first else KafkaTransport(bootstrap_servers, overrides)

        relay = Relay(config, factory)
        relay.check()
        if once:
            stats = relay.run_once()
        else:
            try:
                first[0].check(5.0)
            except TransportUnavailable as exc:
                logger.warning(
                    "broker unreachable at start, will keep trying", extra={"error": str(exc)}
                )
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: relay.stop())
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
@_db_options
@_inbox_option
@click.option("--bootstrap-servers", envvar="OUTBOX_BOOTSTRAP_SERVERS", required=True)
@click.option("--group", envvar="OUTBOX_GROUP", required=True, help="Kafka consumer group")
@click.option(
    "--topic",
    "topics",
    multiple=True,
    required=True,
    envvar="OUTBOX_TOPICS",
    help="Topic to consume, repeatable [OUTBOX_TOPICS, space-separated]",
)
@click.option(
    "--handler",
    envvar="OUTBOX_HANDLER",
    required=True,
    help="package.module:function called as handler(session, message) [OUTBOX_HANDLER]",
)
@click.option(
    "--key-extractor",
    envvar="OUTBOX_KEY_EXTRACTOR",
    default=None,
    help="package.module:function(message) -> str | None giving the idempotency key "
    "(default: the message-id header), for messages from other producers",
)
@click.option(
    "--consumer-name",
    envvar="OUTBOX_CONSUMER_NAME",
    default=None,
    help="Inbox consumer name (default: the group)",
)
@click.option(
    "--dead-letter-topic",
    envvar="OUTBOX_DEAD_LETTER_TOPIC",
    default=None,
    help="Where poison messages go (default: <topic>.dlq), through the outbox",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(1),
    default=5,
    show_default=True,
    envvar="OUTBOX_MAX_ATTEMPTS",
)
@click.option(
    "--max-messages", type=click.IntRange(1), default=None, help="Stop after this many messages"
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0.1),
    default=None,
    help="Stop after this many seconds without a message (counted once the group is joined)",
)
@click.option(
    "-X",
    "kafka_settings",
    multiple=True,
    envvar="OUTBOX_KAFKA_SETTINGS",
    metavar="NAME=VALUE",
    help="Any librdkafka consumer setting, repeatable",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    envvar="OUTBOX_LOG_LEVEL",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="OUTBOX_LOG_FORMAT",
)
def consume(
    db_url: str,
    table: str,
    schema: str | None,
    inbox_table: str,
    bootstrap_servers: str,
    group: str,
    topics: tuple[str, ...],
    handler: str,
    key_extractor: str | None,
    consumer_name: str | None,
    dead_letter_topic: str | None,
    max_attempts: int,
    max_messages: int | None,
    idle_timeout: float | None,
    kafka_settings: tuple[str, ...],
    log_level: str,
    log_format: str,
) -> None:
    """Consume topics through the inbox: each message's effects happen once."""
    _setup_logging(log_level, log_format)
    overrides = _parse_settings(kafka_settings)
    topic_list = [t for item in topics for t in item.split()]
    try:
        fn = load_handler(handler)
        config = ConsumerConfig(
            db_url=db_url,
            name=consumer_name or group,
            dead_letter_topic=dead_letter_topic,
            max_attempts=max_attempts,
            table=table,
            schema=schema,
            inbox_table=inbox_table,
        )
        key: Any = load_handler(key_extractor) if key_extractor else message_id_key
        consumer = Consumer(
            config,
            fn,
            lambda: KafkaSource(bootstrap_servers, group, topic_list, overrides),
            key=key,
        )
        # Fail fast on a database without the tables or a bad -X setting.
        consumer.check()
        KafkaSource(bootstrap_servers, group, topic_list, overrides).close()
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
