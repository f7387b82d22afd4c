"""Operating commands: ``outbox status``, ``outbox dead list|show|replay|discard``, ``outbox dlq
replay`` and ``outbox purge``; :func:`register` adds them to the ``outbox`` group
(``outbox.cli``). A thin layer over :mod:`outbox.admin`, as ``outbox.cli`` is over the rest.

Exit status as for every command: 0 done, 1 failed (``status``: a check failed), 2 usage
error (nothing was done).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import re
import sys
from collections.abc import Generator, Iterator
from typing import Any, NoReturn

import click
import sqlalchemy as sa

from outbox import admin, deadletter, logs
from outbox.cli_options import (
    db_options,
    errors,
    fail,
    inbox_option,
    kafka_options,
    log_options,
    options,
    parse_settings,
)
from outbox.config import parse_db_url
from outbox.exceptions import ConfigurationError, PayloadError, translate_db_errors
from outbox.message import parse_time
from outbox.schema import DEAD, PENDING, RETRY, SENT, define_tables
from outbox.transport.base import IncomingMessage

# -- durations and times ------------------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d|w)?\s*")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number of seconds, or a number and a unit: ``ms``, ``s``, ``m``,
    ``h``, ``d``, ``w`` (``90s``, ``15m``, ``2h``, ``7d``). Raises ValueError."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration: use seconds or e.g. 90s, 15m, 2h, 7d")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not 0 < seconds < math.inf:
        raise ValueError(f"{text!r}: a duration must be positive")
    return seconds


class Duration(click.ParamType[float]):
    """A positive duration (see :func:`parse_duration`), as seconds."""

    name = "DURATION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class Since(click.ParamType[datetime.datetime]):
    """A point in time: ISO 8601 (UTC unless it names a zone), or a duration ago (``2h``)."""

    name = "TIME|DURATION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime.datetime:
        if isinstance(value, datetime.datetime):
            return value
        text = str(value)
        now = datetime.datetime.now(datetime.timezone.utc)
        with contextlib.suppress(ValueError):
            return now - datetime.timedelta(seconds=parse_duration(text))
        try:
            when = parse_time(text)
        except ValueError:
            self.fail(
                f"{text!r} is neither a time (2026-12-01T10:00:00Z) nor a duration (2h, 7d)",
                param,
                ctx,
            )
        return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


#: The relay's ``--purge-sent-after`` (``outbox.cli``).
purge_sent_option = click.option(
    "--purge-sent-after",
    type=Duration(),
    default=None,
    envvar="OUTBOX_PURGE_SENT_AFTER",
    help="With --retain-sent: the leader deletes sent rows older than this (e.g. 7d), in small "
    "batches while idle, at most every 5 minutes [OUTBOX_PURGE_SENT_AFTER]",
)


# -- shared pieces ------------------------------------------------------------------------------


@contextlib.contextmanager
def _connect(db_url: str) -> Iterator[sa.Connection]:
    engine = sa.create_engine(parse_db_url(db_url), poolclass=sa.pool.NullPool)
    try:
        with translate_db_errors("database"), engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


@contextlib.contextmanager
def _logging(level: str, fmt: str) -> Iterator[None]:
    """The library's log lines (the audit lines of ``outbox.admin`` among them) on stderr for
    the duration of a command, without touching the root logger (the command may run inside
    another program, e.g. a test's click runner)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.JsonFormatter() if fmt == "json" else logs.TextFormatter())
    lib = logging.getLogger("outbox")
    saved = (lib.level, lib.propagate)
    lib.addHandler(handler)
    lib.setLevel(level.upper())
    lib.propagate = False
    try:
        yield
    finally:
        lib.removeHandler(handler)
        lib.setLevel(saved[0])
        lib.propagate = saved[1]


@contextlib.contextmanager
def _closing(messages: Generator[Any, None, None]) -> Iterator[None]:
    """Close a generator (and the client it reads with) even when not read to its end."""
    try:
        yield
    finally:
        messages.close()


def _usage(message: str) -> NoReturn:
    fail(ConfigurationError(message))
    raise SystemExit(2)  # fail() exits; this tells the type checker


def _json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _duration(seconds: float) -> str:
    """``seconds`` as the shortest duration that says it exactly: ``7d``, ``36h``, ``90s``."""
    for unit in ("d", "h", "m", "s"):
        n = seconds / _UNITS[unit]
        if n == int(n) and n >= 1:
            return f"{int(n)}{unit}"
    return f"{seconds:g}s"


def _shown(value: bytes | None) -> str:
    """Bytes for a terminal: the text when UTF-8 (repr'd if it holds control characters),
    else ``hex:`` and the hex digits."""
    if value is None:
        return "(none)"
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return "hex:" + value.hex()
    return text if text.isprintable() else repr(text)


def _ids_text(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:20])) + (f", ... ({len(ids)} in all)" if len(ids) > 20 else "")


# -- outbox status ------------------------------------------------------------------------------


@click.command()
@db_options
@inbox_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts)")
@click.option("--fail-on-dead", is_flag=True, help="Exit 1 if any message is dead (parked)")
@click.option(
    "--max-lag",
    type=Duration(),
    default=None,
    metavar="SECONDS",
    help="Exit 1 if the oldest pending or retry message is older than this (seconds, or e.g. 5m)",
)
@errors
def status(
    db_url: str,
    table: str,
    schema: str | None,
    inbox_table: str,
    as_json: bool,
    fail_on_dead: bool,
    max_lag: float | None,
) -> None:
    """Messages per status and per topic, with the age of the oldest; the inbox's size.
    With --fail-on-dead or --max-lag, exit 1 (the reason on stderr) when the check fails: for
    cron, CI or a probe."""
    tables = define_tables(table=table, schema=schema, inbox_table=inbox_table)
    with _connect(db_url) as conn:
        found = admin.status(conn, tables)
    problems: list[str] = []
    if fail_on_dead and found.dead:
        oldest = found.statuses[DEAD].oldest_age_s
        problems.append(f"{found.dead} dead messages (oldest {_age(oldest)} old)")
    lag = found.lag_s
    if max_lag is not None and lag is not None and lag > max_lag:
        problems.append(f"oldest unsent message is {lag:.0f} s old (--max-lag {max_lag:g})")
    if as_json:
        _json({**found.as_dict(), "ok": not problems, "problems": problems})
    else:
        _print_status(found)
    if problems:
        click.echo(f"error: {'; '.join(problems)}", err=True)
        sys.exit(1)


def _print_status(found: admin.Status) -> None:
    if found.empty:
        click.echo(f"{found.table} is empty: nothing pending, retrying, dead or kept as sent")
    for name in (PENDING, RETRY, DEAD, SENT):
        count = found.statuses[name]
        if count.count == 0:
            continue
        n = "?" if count.count is None else f"{'~' if count.estimated else ''}{count.count}"
        click.echo(f"{name:8} {n:>10}  oldest {_age(count.oldest_age_s)}")
    if found.topics and not found.empty:
        click.echo("by topic:")
        for topic, by in sorted(found.topics.items()):
            parts = [
                f"{name} {by[name].count} (oldest {_age(by[name].oldest_age_s)})"
                for name in (PENDING, RETRY, DEAD, SENT)
                if name in by
            ]
            click.echo(f"  {topic}: {', '.join(parts)}")
    rows = found.inbox.count
    if rows is None:
        what = "not installed" if not found.inbox.estimated else "size not known yet"
        click.echo(f"inbox {found.inbox_table}: {what}")
    else:
        click.echo(f"inbox {found.inbox_table}: {'~' if found.inbox.estimated else ''}{rows} keys")


# -- outbox dead ----------------------------------------------------------------------------------


@click.group()
def dead() -> None:
    """Inspect, replay and discard dead (parked) messages."""


@dead.command("list")
@db_options
@click.option("--topic", default=None, help="Only this topic")
@click.option("--key", default=None, help="Only this key (its UTF-8 text)")
@click.option(
    "--since",
    type=Since(),
    default=None,
    help="Only those parked at or after this time: ISO 8601 (UTC unless a zone is given) "
    "or a duration ago (2h, 7d)",
)
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts)")
@errors
def dead_list(
    db_url: str,
    table: str,
    schema: str | None,
    topic: str | None,
    key: str | None,
    since: datetime.datetime | None,
    limit: int,
    as_json: bool,
) -> None:
    """List dead messages, oldest first."""
    tables = define_tables(table=table, schema=schema)
    with _connect(db_url) as conn:
        found, total = admin.dead_messages(
            conn,
            tables,
            topic=topic,
            key=None if key is None else key.encode(),
            since=since,
            limit=limit,
        )
    if as_json:
        _json({"total": total, "messages": [m.as_dict() for m in found]})
        return
    if not found:
        click.echo("no dead messages")
        return
    click.echo(f"{'id':>10}  {'parked':20}  {'attempts':>8}  topic / key / last error")
    for m in found:
        parked = m.last_failed_at or m.created_at
        error = " ".join((m.last_error or "").split())
        click.echo(
            f"{m.id:>10}  {parked:%Y-%m-%d %H:%M:%S}  {m.attempts:>8}  {m.topic} / "
            f"{_shown(m.key)} / {error[:100]}"
        )
    more = f" (--limit {limit})" if total > len(found) else ""
    click.echo(f"{len(found)} of {total} dead messages{more}")


@dead.command("show")
@db_options
@click.argument("message_id", metavar="ID", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts)")
@errors
def dead_show(db_url: str, table: str, schema: str | None, message_id: int, as_json: bool) -> None:
    """Show one message: headers, the first KB of its payload, attempts, errors, times."""
    tables = define_tables(table=table, schema=schema)
    with _connect(db_url) as conn:
        m = admin.message(conn, tables, message_id)
    if m is None:
        _usage(f"no message with id {message_id}")
    if as_json:
        _json(m.as_dict(detail=True))
        return
    lines = [
        ("id", str(m.id)),
        ("message-id", m.message_id),
        ("topic", m.topic),
        ("key", _shown(m.key)),
        ("status", m.status),
        ("attempts", str(m.attempts)),
        ("last error", m.last_error or "-"),
        ("created at", m.created_at.isoformat()),
        ("first failed", m.first_failed_at.isoformat() if m.first_failed_at else "-"),
        ("last failed", m.last_failed_at.isoformat() if m.last_failed_at else "-"),
    ]
    if m.next_attempt_at is not None:
        lines.append(("next attempt", m.next_attempt_at.isoformat()))
    for label, text in lines:
        click.echo(f"{label:13} {text}")
    if m.headers:
        for i, (name, value) in enumerate(m.headers):
            click.echo(f"{'headers' if i == 0 else '':13} {name}: {_shown(value)}")
    else:
        click.echo(f"{'headers':13} (none)")
    if m.payload_head is None:
        click.echo(f"{'payload':13} (none)")
        return
    size = m.payload_size or 0
    encoding, text = admin.preview(m.payload_head, size)
    shown = f"first {len(m.payload_head)} bytes, " if size > len(m.payload_head) else ""
    kind = "text" if encoding == "utf-8" else "not UTF-8, hex"
    click.echo(f"{'payload':13} {size} bytes ({shown}{kind}):")
    click.echo(text)


_select_options = options(
    click.argument("ids", metavar="[ID]...", nargs=-1, type=int),
    click.option("--all", "all_", is_flag=True, help="Every dead message"),
    click.option("--topic", default=None, help="Every dead message of this topic"),
)


@dead.command("replay")
@db_options
@_select_options
@log_options
@errors
def dead_replay(
    db_url: str,
    table: str,
    schema: str | None,
    ids: tuple[int, ...],
    all_: bool,
    topic: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Give dead messages a fresh set of attempts (IDs, --all, or --topic). They keep their
    place: each key's messages are sent in their order again."""
    if sum((bool(ids), all_, topic is not None)) != 1:
        _usage("give the ids of dead messages, --all or --topic (one of them)")
    with _logging(log_level, log_format), _connect(db_url) as conn:
        try:
            replayed = admin.replay_dead(
                conn,
                ids=list(ids) if ids else None,
                topic=topic,
                table=table,
                schema=schema,
                detail={"command": "outbox dead replay"},
            )
        except admin.NotDead as exc:
            conn.rollback()
            _usage(str(exc))
        conn.commit()
    if replayed:
        click.echo(f"replayed {len(replayed)} dead messages (ids {_ids_text(replayed)})")
    else:
        click.echo("no dead messages to replay")


@dead.command("discard")
@db_options
@click.argument("ids", metavar="ID...", nargs=-1, type=int, required=True)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation")
@log_options
@errors
def dead_discard(
    db_url: str,
    table: str,
    schema: str | None,
    ids: tuple[int, ...],
    yes: bool,
    log_level: str,
    log_format: str,
) -> None:
    """Delete dead messages for good. The later messages of their keys, held back behind
    them, are then sent: their consumers never see the discarded ones."""
    tables = define_tables(table=table, schema=schema)
    wanted = sorted(set(ids))
    with _logging(log_level, log_format), _connect(db_url) as conn:
        found = [admin.message(conn, tables, i) for i in wanted]
        missing = [i for i, m in zip(wanted, found, strict=True) if m is None or m.status != DEAD]
        if missing:
            _usage(str(admin.NotDead(missing)))
        behind = admin.held_behind(conn, tables, wanted)
        conn.rollback()  # nothing held open while a person reads the question
        if not yes:
            for m in found:
                assert m is not None
                click.echo(f"{m.id}: {m.topic} / {_shown(m.key)} / {m.attempts} attempts", err=True)
            after = (
                f"; {behind} later messages of their keys are waiting behind them and will be "
                "sent without them"
                if behind
                else ""
            )
            question = f"Discard {len(wanted)} dead messages for good{after}?"
            try:
                confirmed = click.confirm(question, default=False, err=True)
            except click.Abort:
                confirmed = False
            if not confirmed:
                click.echo(
                    "error: not confirmed (--yes skips the question); nothing discarded", err=True
                )
                sys.exit(1)
        try:
            gone = admin.discard_dead(conn, wanted, table=table, schema=schema)
        except admin.NotDead as exc:
            conn.rollback()
            _usage(str(exc))
        conn.commit()
    ids_done = [d.id for d in gone]
    released = f"; {behind} messages held back behind them can be sent now" if behind else ""
    click.echo(f"discarded {len(gone)} dead messages (ids {_ids_text(ids_done)}){released}")


# -- outbox purge ---------------------------------------------------------------------------------


@click.command("purge")
@db_options
@click.option(
    "--sent-older-than",
    type=Duration(),
    required=True,
    help="Delete sent messages (--retain-sent) sent longer ago than this (e.g. 7d)",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=1000,
    show_default=True,
    help="Rows looked at per short statement",
)
@errors
def purge(
    db_url: str, table: str, schema: str | None, sent_older_than: float, batch_size: int
) -> None:
    """Delete the sent messages that --retain-sent keeps, in short batches."""
    tables = define_tables(table=table, schema=schema)
    older_than = datetime.timedelta(seconds=sent_older_than)
    with _connect(db_url) as conn:
        deleted = admin.purge_sent(conn, tables, older_than, batch_size=batch_size)
    click.echo(f"purged {deleted} sent messages sent more than {_duration(sent_older_than)} ago")


# -- outbox dlq -----------------------------------------------------------------------------------


@click.group()
def dlq() -> None:
    """Dead letters of the consumer (outbox consume), on their Kafka topic."""


@dlq.command("replay")
@options(
    db_options,
    inbox_option,
    kafka_options,
    click.option("--topic", required=True, help="The dead-letter topic, e.g. orders.dlq"),
    click.option("--dry-run", is_flag=True, help="Only count what would be replayed"),
    click.option("--limit", type=click.IntRange(1), default=None, help="Replay at most this many"),
    click.option(
        "--retention-days",
        type=click.FloatRange(min=0.001),
        default=None,
        help="How long the inbox remembers a replayed dead letter (default: the topic's "
        "retention.ms, when the broker tells; else 365 days)",
    ),
    log_options,
)
@errors
def dlq_replay(
    db_url: str,
    table: str,
    schema: str | None,
    inbox_table: str,
    bootstrap_servers: str,
    kafka_settings: tuple[str, ...],
    topic: str,
    dry_run: bool,
    limit: int | None,
    retention_days: float | None,
    log_level: str,
    log_format: str,
) -> None:
    """Publish the consumer's dead letters on TOPIC again to their original topics, through
    the outbox (a relay sends them), once each however often this runs."""
    from outbox.transport.kafka import read_topic, topic_retention

    overrides = parse_settings(kafka_settings)
    tables = define_tables(table=table, schema=schema, inbox_table=inbox_table)
    unreadable = 0

    def letters(messages: Iterator[IncomingMessage]) -> Iterator[deadletter.Replay]:
        nonlocal unreadable
        for message in messages:
            try:
                yield deadletter.replay(message)
            except PayloadError as exc:
                unreadable += 1
                click.echo(
                    f"skipped {message.topic}[{message.partition}]@{message.offset}: {exc}",
                    err=True,
                )

    with _logging(log_level, log_format):
        if retention_days is not None:
            retention = datetime.timedelta(days=retention_days)
        else:
            kept = topic_retention(bootstrap_servers, [topic], overrides)
            days = 365.0 if kept is None else min(kept / 86400, 36500.0)
            retention = datetime.timedelta(days=max(days, 1.0))
        messages = read_topic(bootstrap_servers, topic, overrides)
        with _closing(messages), _connect(db_url) as conn:
            summary = admin.replay_dead_letters(
                conn,
                tables,
                letters(messages),
                retention=retention,
                dry_run=dry_run,
                limit=limit,
                detail={"command": "outbox dlq replay", "dlq_topic": topic},
            )
    to = ", ".join(f"{t} {n}" for t, n in sorted(summary.topics.items()))
    verb, skip = ("would replay", "would skip") if dry_run else ("replayed", "skipped")
    click.echo(
        f"{verb} {summary.replayed}, {skip} {summary.skipped} already replayed, "
        f"{unreadable} unreadable" + (f" (to {to})" if to else "")
    )


def register(main: click.Group) -> None:
    """Add the commands of this module to ``main`` (``outbox``)."""
    for command in (status, dead, dlq, purge):
        main.add_command(command)
