"""Install the tables with the shipped Alembic revisions (``outbox db ...``).

The only module of the package that imports Alembic. The revisions live in the top-level
``migrations/`` folder of the source tree and in ``outbox/_migrations`` inside the wheel.
They carry the branch label ``outbox`` so that they can also run from your own Alembic
project (add :func:`versions_dir` to ``version_locations``, then ``alembic upgrade outbox@head``).
"""

from __future__ import annotations

import io
import pathlib
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from outbox.config import parse_db_url
from outbox.exceptions import ConfigurationError, translate_db_errors
from outbox.schema import DEFAULT_INBOX_TABLE, DEFAULT_TABLE, validate_identifier

#: The version table that ``outbox db upgrade`` keeps (in the outbox's schema).
VERSION_TABLE = "outbox_alembic_version"

#: The revision that creates the inbox table.
_INBOX_REVISION = "outbox_0002"

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def script_dir() -> pathlib.Path:
    """Where the revisions are: inside the installed wheel, or in the source checkout."""
    for candidate in (_PACKAGE_DIR / "_migrations", _PACKAGE_DIR.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigurationError("the outbox migrations are missing from this installation; reinstall")


def versions_dir() -> pathlib.Path:
    """Add this to ``version_locations`` in your own ``alembic.ini``."""
    return script_dir() / "versions"


def names_from_config(config: Any) -> tuple[str, str | None]:
    """Table and schema for the revisions: from ``outbox db`` (``config.attributes``), or from
    ``outbox_table`` / ``outbox_schema`` in the ``[alembic]`` section of your own alembic.ini."""
    table: str = DEFAULT_TABLE
    schema: str | None = None
    if config is not None:
        attrs = getattr(config, "attributes", {})
        table = attrs.get("outbox_table") or config.get_main_option("outbox_table") or table
        schema = attrs.get("outbox_schema") or config.get_main_option("outbox_schema") or None
    validate_identifier(table, "table name")
    if schema is not None:
        validate_identifier(schema, "schema name")
    return table, schema


def inbox_name_from_config(config: Any) -> str:
    """The inbox table's name: ``outbox db --inbox-table`` or ``outbox_inbox_table`` in your
    alembic.ini."""
    name: str = DEFAULT_INBOX_TABLE
    if config is not None:
        attrs = getattr(config, "attributes", {})
        name = (
            attrs.get("outbox_inbox_table") or config.get_main_option("outbox_inbox_table") or name
        )
    return validate_identifier(name, "inbox table name")


def _config(table: str, schema: str | None, **attributes: Any) -> Config:
    validate_identifier(table, "table name")
    if schema is not None:
        validate_identifier(schema, "schema name")
    inbox_table = attributes.get("outbox_inbox_table", DEFAULT_INBOX_TABLE)
    validate_identifier(inbox_table, "inbox table")
    if inbox_table == table:
        raise ConfigurationError("the inbox table needs a name of its own")
    cfg = Config(output_buffer=attributes.pop("output_buffer", None))
    cfg.set_main_option("script_location", str(script_dir()))
    cfg.attributes.update(outbox_table=table, outbox_schema=schema, **attributes)
    return cfg


def _engine(db_url: str) -> sa.Engine:
    return sa.create_engine(parse_db_url(db_url), poolclass=sa.pool.NullPool)


def upgrade(
    db_url: str,
    *,
    table: str = DEFAULT_TABLE,
    schema: str | None = None,
    revision: str = "head",
    inbox_table: str = DEFAULT_INBOX_TABLE,
) -> None:
    """Create or update the outbox and inbox tables (idempotent)."""
    _run(db_url, table, schema, command.upgrade, revision, inbox_table)


def downgrade(
    db_url: str,
    *,
    table: str = DEFAULT_TABLE,
    schema: str | None = None,
    revision: str = "base",
    inbox_table: str = DEFAULT_INBOX_TABLE,
) -> None:
    """Revert the tables to ``revision`` (``base`` drops them, with their rows)."""
    _run(db_url, table, schema, command.downgrade, revision, inbox_table)


def current(db_url: str, *, schema: str | None = None) -> str | None:
    """The installed revision, or ``None`` when nothing is installed."""
    engine = _engine(db_url)
    try:
        with translate_db_errors("read migration version"), engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE, "version_table_schema": schema}
            )
            return ctx.get_current_revision()
    finally:
        engine.dispose()


def sql(
    *,
    table: str = DEFAULT_TABLE,
    schema: str | None = None,
    revision: str = "head",
    inbox_table: str = DEFAULT_INBOX_TABLE,
) -> str:
    """The DDL of the revisions, for teams that apply migrations with their own tools."""
    buf = io.StringIO()
    cfg = _config(table, schema, output_buffer=buf, outbox_inbox_table=inbox_table)
    command.upgrade(cfg, revision, sql=True)
    return buf.getvalue()


def _run(
    db_url: str, table: str, schema: str | None, fn: Any, revision: str, inbox_table: str
) -> None:
    # Validates the names before connecting.
    cfg = _config(table, schema, outbox_inbox_table=inbox_table)
    engine = _engine(db_url)
    try:
        with translate_db_errors("migrate"), engine.begin() as conn:
            cfg.attributes["connection"] = conn
            fn(cfg, revision)
            if fn is command.upgrade:
                _check_installed(conn, cfg, table, schema, inbox_table)
    finally:
        engine.dispose()


def _check_installed(
    conn: sa.Connection, cfg: Config, table: str, schema: str | None, inbox_table: str
) -> None:
    """Fail (rolling the upgrade back) when the version table records a revision but a table
    it implies is missing. The version table is per schema, not per table: a second outbox
    table in a schema that already has one (or the inbox under another name than it was
    installed with) would otherwise be reported as installed without existing."""
    ctx = MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE, "version_table_schema": schema}
    )
    rev = ctx.get_current_revision()
    if rev is None:
        return
    where = f"schema {schema!r}" if schema else "the default schema"
    inspector = sa.inspect(conn)
    if not inspector.has_table(table, schema=schema):
        raise ConfigurationError(
            f"{VERSION_TABLE} in {where} records revision {rev}, but table {table!r} does not "
            "exist: the version table belongs to another outbox table (install this one in its "
            "own schema with --schema), or the table was dropped by hand"
        )
    applied = {r.revision for r in ScriptDirectory.from_config(cfg).iterate_revisions(rev, "base")}
    if _INBOX_REVISION in applied and not inspector.has_table(inbox_table, schema=schema):
        raise ConfigurationError(
            f"{VERSION_TABLE} in {where} records revision {rev}, but inbox table "
            f"{inbox_table!r} does not exist: the inbox of this schema was installed under "
            "another name (pass the same --inbox-table), or the table was dropped by hand"
        )
