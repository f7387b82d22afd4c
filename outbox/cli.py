"""Command line: ``outbox`` (db, status, relay, consume, inbox) and ``outbox-relay``.

A thin layer: parse options (each also read from an ``OUTBOX_*`` variable), build the config,
call public functions (the shared options are in ``outbox.cli_options``). Exit status:
0 done, 1 failed, 2 usage or configuration error.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Callable
from typing import Any

import click
import sqlalchemy as sa

from outbox import cli_admin, logs, metrics, migrate
from outbox.breaker import BreakerPolicy
from outbox.cli_options import (
    Stopper,
    backoff_options,
    breaker_options,
    db_options,
    errors,
    fail,
    first_client,
    inbox_option,
    kafka_options,
    log_options,
    metrics_options,
    options,
    parse_settings,
    serve_metrics,
)
from outbox.config import RelayConfig, parse_db_url
from outbox.consumer import (
    EXIT_HANDLER_HUNG,
    Consumer,
    ConsumerConfig,
    load_exception,
    load_handler,
    message_id_key,
)
from outbox.exceptions import (
    ConfigurationError,
    DatabaseUnavailableError,
    OutboxError,
    translate_db_errors,
)
from outbox.health import (
    ConsumerHealth,
    HealthServer,
    RelayHealth,
    consumer_stale_after,
    health_routes,
    relay_stale_after,
)
from outbox.inbox import Inbox
from outbox.outbox import Outbox
from outbox.relay import Relay
from outbox.schema import DEFAULT_TABLE
from outbox.transport.kafka import KafkaSource, KafkaTransport, topic_retention

logger = logging.getLogger(__name__)


@click.group()
@click.version_option(package_name="sqlalchemy-outbox")
def main() -> None:
    """Transactional outbox for SQLAlchemy: install tables, inspect, relay to Kafka."""


@main.group()
def db() -> None:
    """Install and inspect the outbox tables."""


@db.command()
@db_options
@inbox_option
@click.option("--revision", default="head", show_default=True)
@errors
def upgrade(db_url: str, table: str, schema: str | None, inbox_table: str, revision: str) -> None:
    """Create or update the tables (safe to run again)."""
    migrate.upgrade(db_url, table=table, schema=schema, revision=revision, inbox_table=inbox_table)
    click.echo(f"outbox tables at revision {migrate.current(db_url, schema=schema)}")


@db.command()
@db_options
@inbox_option
@click.option("--revision", required=True, help="Target revision; 'base' drops the tables.")
@errors
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
@inbox_option
@click.option("--revision", default="head", show_default=True)
@errors
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


_RELAY = RelayConfig(db_url="postgresql://x/y")
_CONSUMER = ConsumerConfig(db_url="postgresql://x/y", name="x")


_relay_options = options(
    db_options,
    kafka_options,
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
    backoff_options(
        "retry", "OUTBOX_RETRY_BACKOFF", _RELAY.retry_backoff_base, _RELAY.retry_backoff_max
    ),
    backoff_options(
        "broker", "OUTBOX_BROKER_BACKOFF", _RELAY.broker_backoff_base, _RELAY.broker_backoff_max
    ),
    backoff_options("db", "OUTBOX_DB_BACKOFF", _RELAY.db_backoff_base, _RELAY.db_backoff_max),
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
    cli_admin.purge_sent_option,
    metrics_options,
    log_options,
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
    purge_sent_after: float | None,
    metrics_port: int | None,
    metrics_host: str,
    log_level: str,
    log_format: str,
) -> None:
    logs.setup(log_level, log_format)
    stopper = Stopper()
    overrides = parse_settings(kafka_settings)
    overrides.setdefault("message.timeout.ms", str(int(delivery_timeout * 1000)))
    server: HealthServer | None = None
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
            purge_sent_after=purge_sent_after,
        )
        health = RelayHealth(relay_stale_after(config))
        routes = health_routes(health.health)
        observers: list[Any] = [health]
        if metrics_port is not None:
            observers += _metrics(
                routes, lambda: metrics.RelayMetrics(metrics.relay_table_gauges(config))
            )
        server = serve_metrics(metrics_host, metrics_port, routes)
        factory = first_client(lambda: KafkaTransport(bootstrap_servers, overrides))
        relay = Relay(config, factory, observers=observers if server else [])
        stopper.attach(relay.stop)
        if once:
            relay.check()
            stats = relay.run_once()
        else:
            try:
                relay.check()
            except DatabaseUnavailableError as exc:
                # Starting with the database (a restart, a failover in progress): a
                # long-running relay waits for it like for any outage.
                logger.warning(
                    "database unreachable at start, will keep trying",
                    extra={"event": "relay.database_unreachable_at_start", "error": str(exc)},
                )
            stats = relay.run()
    except OutboxError as exc:
        fail(exc)
    finally:
        if server is not None:
            server.close()
    click.echo(
        f"sent {stats.sent}, failed attempts {stats.failed_attempts}, parked {stats.parked}",
        err=True,
    )


def _metrics(routes: dict[str, Any], make: Callable[[], Any]) -> list[Any]:
    """Add ``/metrics`` to ``routes``: the observers to pass (none without prometheus-client,
    then ``/metrics`` answers 501 and a warning says what to install)."""
    if not metrics.available():
        logger.warning(
            "prometheus-client is not installed: /metrics answers 501",
            extra={"event": "metrics.unavailable", "install": "sqlalchemy-outbox[metrics]"},
        )
        routes["/metrics"] = metrics.missing
        return []
    observer = make()
    routes["/metrics"] = observer.render
    return [observer]


_relay_help = """Publish committed outbox rows to Kafka, at least once and in order per key.

Runs until SIGTERM/SIGINT (in-flight messages are finished, then it exits 0), or with --once
until nothing is due. Several relays may run: one is the leader, the others wait."""

main.command("relay", help=_relay_help)(_relay_options(_relay))
relay_main = click.command("outbox-relay", help=_relay_help)(_relay_options(_relay))


@main.group()
def inbox() -> None:
    """Maintain the inbox table."""


@inbox.command()
@db_options
@inbox_option
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=1000,
    show_default=True,
    help="Rows deleted per short transaction",
)
@errors
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
@options(
    db_options,
    inbox_option,
    kafka_options,
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
        default=None,
        help="package.module:function called as handler(session, message); an async def one "
        "is awaited with an AsyncSession [OUTBOX_HANDLER]",
    ),
    click.option(
        "--batch-handler",
        envvar="OUTBOX_BATCH_HANDLER",
        default=None,
        help="package.module:function called as function(session, messages) once per batch, "
        "with the messages not seen before (or awaited, if async def); instead of --handler "
        "[OUTBOX_BATCH_HANDLER]",
    ),
    click.option(
        "--batch-size",
        type=click.IntRange(1, 100_000),
        default=_CONSUMER.batch_size,
        show_default=True,
        envvar="OUTBOX_CONSUMER_BATCH_SIZE",
        help="Messages handled in one database transaction (1: one transaction per message) "
        "[OUTBOX_CONSUMER_BATCH_SIZE]",
    ),
    click.option(
        "--batch-max-wait",
        type=click.FloatRange(0, 60),
        default=_CONSUMER.batch_max_wait,
        show_default=True,
        envvar="OUTBOX_CONSUMER_BATCH_MAX_WAIT",
        help="Seconds a batch may wait to fill once it has a message (0: what is fetched "
        "already) [OUTBOX_CONSUMER_BATCH_MAX_WAIT]",
    ),
    click.option(
        "--app-dir",
        envvar="OUTBOX_APP_DIR",
        default=None,
        help="Folder to import --handler and --key-extractor from, before the installed "
        "packages (default: the working directory) [OUTBOX_APP_DIR]",
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
    backoff_options(
        "retry",
        "OUTBOX_CONSUMER_RETRY_BACKOFF",
        _CONSUMER.retry_backoff_base,
        _CONSUMER.retry_backoff_max,
    ),
    backoff_options("db", "OUTBOX_DB_BACKOFF", _CONSUMER.db_backoff_base, _CONSUMER.db_backoff_max),
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
        "--handler-timeout",
        type=click.FloatRange(min=0),
        default=_CONSUMER.handler_timeout,
        show_default=True,
        envvar="OUTBOX_HANDLER_TIMEOUT",
        help="Seconds one handler attempt may take (0: no limit): its statements are cancelled "
        "past it; a handler stuck outside the database gets its message dead-lettered and "
        f"the process exits {EXIT_HANDLER_HUNG} to be restarted [OUTBOX_HANDLER_TIMEOUT]",
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
    breaker_options(_CONSUMER.breaker),
    metrics_options,
    log_options,
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
    handler: str | None,
    batch_handler: str | None,
    batch_size: int,
    batch_max_wait: float,
    app_dir: str | None,
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
    handler_timeout: float,
    max_messages: int | None,
    idle_timeout: float | None,
    transient: tuple[str, ...],
    breaker_failures: int,
    breaker_failure_rate: float,
    breaker_window: float,
    breaker_open: float,
    breaker_open_max: float,
    retry_budget: float,
    clock_skew: float,
    on_expired: str | None,
    metrics_port: int | None,
    metrics_host: str,
    log_level: str,
    log_format: str,
) -> None:
    """Consume topics through the inbox: each message's effects happen once."""
    logs.setup(log_level, log_format)
    stopper = Stopper()
    overrides = parse_settings(kafka_settings)
    topic_list = [t for item in topics for t in item.split()]
    server: HealthServer | None = None
    try:
        health = ConsumerHealth(consumer_stale_after(handler_timeout or None))
        routes = health_routes(health.health)
        observers: list[Any] = [health]
        if metrics_port is not None:
            observers += _metrics(routes, metrics.ConsumerMetrics)
            # Consumer lag comes from librdkafka's statistics.
            overrides.setdefault("statistics.interval.ms", "5000")
        server = serve_metrics(metrics_host, metrics_port, routes)
        if (handler is None) == (batch_handler is None):
            raise ConfigurationError("pass exactly one of --handler and --batch-handler")
        fn = load_handler(handler, app_dir) if handler else None
        batch_fn: Any = (
            load_handler(batch_handler, app_dir, "--batch-handler") if batch_handler else None
        )
        expired_fn = load_handler(on_expired, app_dir, "--on-expired") if on_expired else None
        transient_types = [load_exception(t, app_dir) for item in transient for t in item.split()]
        key: Any = load_handler(key_extractor, app_dir) if key_extractor else message_id_key
        source = first_client(lambda: KafkaSource(bootstrap_servers, group, topic_list, overrides))
        if redelivery_horizon_days is None:
            horizon_s = topic_retention(bootstrap_servers, topic_list, overrides)
        else:
            horizon_s = redelivery_horizon_days * 86400
        poll_interval = float(overrides.get("max.poll.interval.ms", "300000")) / 1000
        if handler_timeout and handler_timeout * 1.25 + 5 >= poll_interval:
            raise ConfigurationError(
                f"--handler-timeout {handler_timeout:g} s is too close to Kafka's "
                f"max.poll.interval.ms ({poll_interval:g} s): the group would evict the "
                "consumer first; lower it, or raise max.poll.interval.ms with -X"
            )
        config = ConsumerConfig(
            db_url=db_url,
            name=consumer_name or group,
            handler_timeout=handler_timeout or None,
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
            breaker=BreakerPolicy(
                failures=breaker_failures,
                failure_rate=breaker_failure_rate,
                window=breaker_window,
                open_base=breaker_open,
                open_max=max(breaker_open, breaker_open_max),
                retry_budget=retry_budget,
            ),
            clock_skew=clock_skew,
            batch_size=batch_size,
            batch_max_wait=batch_max_wait,
        )
        consumer = Consumer(
            config,
            fn,
            source,
            batch_handler=batch_fn,
            key=key,
            transient=transient_types,
            on_expired=expired_fn,
            observers=observers if server else [],
        )
        for observer in observers:
            if isinstance(observer, metrics.ConsumerMetrics):
                observer.watch(consumer)
        stopper.attach(consumer.stop)
        stats = consumer.run(max_messages=max_messages, idle_timeout=idle_timeout)
    except OutboxError as exc:
        fail(exc)
    finally:
        if server is not None:
            server.close()
    click.echo(
        f"processed {stats.processed}, duplicates {stats.duplicates}, "
        f"dead-lettered {stats.dead_lettered}",
        err=True,
    )


# The operating commands (status, dead, dlq, purge) are in their own module.
cli_admin.register(main)

if __name__ == "__main__":
    main()
