"""Install the tables with the shipped Alembic revisions (``outbox db ...``).

The only module of the package that imports Alembic. The revisions live in the top-level
``migrations/`` folder of the source tree and in ``outbox/_migrations`` inside the wheel.
They carry the branch label ``outbox`` so that they can also run from your own Alembic
project (add :func:`versions_dir` to ``version_locations``, after your own folder, then
``alembic upgrade outbox@head``); :func:`process_revision_directives` in your env.py keeps your
own new revisions off that branch and out of the installed package.
"""

from __future__ import annotations

import io
import pathlib
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.operations.ops import MigrationScript
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError, coerce_resource_to_filename

from outbox.config import parse_db_url
from outbox.exceptions import ConfigurationError, translate_db_errors
from outbox.schema import DEFAULT_INBOX_TABLE, DEFAULT_TABLE, validate_identifier

#: The version table that ``outbox db upgrade`` keeps (in the outbox's schema).
VERSION_TABLE = "outbox_alembic_version"

#: The branch label of the shipped revisions.
BRANCH = "outbox"

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


def process_revision_directives(
    context: MigrationContext, revision: object, directives: list[MigrationScript]
) -> None:
    """Keep your own new revisions off the ``outbox`` branch and out of the installed package.

    Pass it to ``context.configure(process_revision_directives=...)`` in your env.py (or call it
    from your own hook), and set ``revision_environment = true`` in alembic.ini so that Alembic
    runs env.py for a plain ``alembic revision`` too, not only for ``--autogenerate``.

    Without ``--head``, Alembic bases a new revision on the only head there is, which in a
    project without revisions of its own is the outbox's, and writes the file next to that
    head's file: into the installed package, where reinstalling or upgrading the package loses
    it, and where it would make ``outbox@head`` your revision. This hook refuses such a
    revision (``alembic revision`` fails, and writes nothing), and any revision based on the
    ``outbox`` branch or written into the package's folder. Base yours on a branch of your own:
    ``--head app@head``. For the first one, ``--head base --branch-label app`` starts the
    branch, in the first folder of ``version_locations`` that is not the package's (Alembic
    itself would ask for ``--version-path``).
    """
    script = context.script
    if script is None:
        if context.config is None:
            return
        script = ScriptDirectory.from_config(context.config)
    package = versions_dir().resolve()
    for directive in directives:
        where = directive.version_path
        if where is not None and pathlib.Path(where).resolve() == package:
            raise CommandError(
                f"{where} holds the outbox package's own revisions, and a revision of yours "
                f"there is lost when the package is reinstalled: {_ADVICE}"
            )
        try:
            heads = [h for h in script.get_revisions(directive.head or "head") if h is not None]
        except CommandError:
            continue  # several heads, an unknown revision: Alembic says so itself
        for head in heads:
            folder = pathlib.Path(head.path).resolve().parent
            if BRANCH in head.branch_labels or folder == package:
                written = (
                    f", and written next to it, into the installed package ({folder}) where "
                    "reinstalling the package loses it"
                    if where is None
                    else ""
                )
                raise CommandError(
                    f"the new revision would be based on {head.revision}, on the {BRANCH!r} "
                    f"branch of the outbox package{written}: {_ADVICE}"
                )
        if not heads and where is None:
            # A new branch (--head base): in your first folder, not the package's.
            for location in script.version_locations or ():
                path = pathlib.Path(coerce_resource_to_filename(location)).resolve()
                if path != package:
                    directive.version_path = str(path)
                    break


_ADVICE = (
    "base it on a branch of your own, alembic revision --head app@head ... (the first one: "
    "--head base --branch-label app)"
)


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
