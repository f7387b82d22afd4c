"""Helpers for the migration tests: catalog inspection, drift detection, a user's Alembic
project written to a temporary folder."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Any

import alembic
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from outbox import migrate
from outbox.schema import OutboxTables


def engine(db_url: str) -> sa.Engine:
    return sa.create_engine(db_url, poolclass=sa.pool.NullPool)


def qualified(table: str, schema: str | None) -> str:
    return f"{schema}.{table}" if schema else table


def tables_in(db_url: str) -> set[str]:
    """``schema.table`` of every ordinary table outside the system schemas."""
    eng = engine(db_url)
    try:
        with eng.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT schemaname || '.' || tablename FROM pg_tables "
                    "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
                )
            ).scalars()
            return set(rows)
    finally:
        eng.dispose()


def schemas_in(db_url: str) -> set[str]:
    eng = engine(db_url)
    try:
        with eng.connect() as conn:
            return set(conn.execute(sa.text("SELECT nspname FROM pg_namespace")).scalars())
    finally:
        eng.dispose()


def scalars(db_url: str, query: str) -> list[Any]:
    eng = engine(db_url)
    try:
        with eng.connect() as conn:
            return list(conn.execute(sa.text(query)).scalars())
    finally:
        eng.dispose()


# --- drift --------------------------------------------------------------------------------


def autogenerate_diff(conn: sa.Connection, tables: OutboxTables) -> list[Any]:
    """What ``alembic check`` would report between the database and ``tables.metadata``,
    limited to the outbox's schema and ignoring the version table."""
    schema = tables.messages.schema

    def include_name(name: str | None, type_: str, parent: Any) -> bool:
        if type_ == "schema":
            return name == schema
        if type_ == "table":
            return name != migrate.VERSION_TABLE
        return True

    ctx = MigrationContext.configure(
        conn,
        opts={
            "include_schemas": schema is not None,
            "include_name": include_name,
            "compare_type": True,
            "compare_server_default": True,
        },
    )
    return list(compare_metadata(ctx, tables.metadata))


_CATALOG = {
    "table": """
        SELECT c.relkind::text, c.relpersistence::text, coalesce(c.reloptions::text, '')
        FROM pg_class c WHERE c.oid = to_regclass(:rel)""",
    # The position among live columns, not attnum: a column dropped by a revision
    # (outbox_0004's headers) leaves a hole in attnum that create_all's table has not.
    "columns": """
        SELECT row_number() OVER (ORDER BY a.attnum), a.attname,
               format_type(a.atttypid, a.atttypmod), a.attnotnull,
               coalesce(pg_get_expr(d.adbin, d.adrelid), ''), a.attidentity::text,
               a.attgenerated::text, coalesce(a.attcollation::regcollation::text, '')
        FROM pg_attribute a
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = to_regclass(:rel) AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum""",
    # Identity sequences of any column (the inbox has none), found through their dependency.
    "identity": """
        SELECT a.attname, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmax,
               s.seqmin, s.seqcache, s.seqcycle
        FROM pg_sequence s
        JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid
             AND d.refclassid = 'pg_class'::regclass AND d.deptype = 'i'
        JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
        WHERE d.refobjid = to_regclass(:rel)
        ORDER BY a.attname""",
    "constraints": """
        SELECT conname, contype::text, pg_get_constraintdef(oid, true), condeferrable,
               condeferred
        FROM pg_constraint WHERE conrelid = to_regclass(:rel) ORDER BY conname""",
    "indexes": """
        SELECT c.relname, pg_get_indexdef(i.indexrelid)
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = to_regclass(:rel) ORDER BY c.relname""",
}


def catalog(
    conn: sa.Connection, table: str, schema: str | None
) -> dict[str, list[tuple[Any, ...]]]:
    """Everything PostgreSQL knows about the table that matters to the outbox: columns (type,
    nullability, default, identity), the identity sequence, constraints with their definitions,
    indexes with their full definitions (including partial-index predicates)."""
    rel = qualified(table, schema)
    snap = {
        name: [tuple(r) for r in conn.execute(sa.text(q), {"rel": rel})]
        for name, q in _CATALOG.items()
    }
    assert snap["columns"], f"table {rel} does not exist"
    return snap


def leader_rows(conn: sa.Connection, leader: sa.Table) -> list[tuple[Any, ...]]:
    """The leader table's rows as ``(one, epoch is not null)``: its epoch is random, so only
    the shape of the seeded row compares (``[(True, True)]``: exactly one, with an epoch)."""
    rel = qualified(leader.name, leader.schema)
    return [tuple(r) for r in conn.execute(sa.text(f"SELECT one, epoch IS NOT NULL FROM {rel}"))]


#: What revision ``outbox_0005`` and ``define_tables`` both leave in the leader table.
SEEDED = [(True, True)]


def drift(conn: sa.Connection, tables: OutboxTables) -> list[str]:
    """Differences between the tables in the database (as the migrations built them) and
    ``tables`` (the outbox table, the inbox, the leader table and the audit table): what
    Alembic's autogenerate
    sees, plus a comparison of each table's catalog with the one that ``metadata.create_all``
    produces (which also covers index predicates and check constraints, which autogenerate
    does not compare), plus the leader table's seeded row (exactly one, with an epoch, on
    both sides). Leaves the database as it was."""
    problems = [f"autogenerate: {d}" for d in autogenerate_diff(conn, tables)]
    compared = []
    for t in (tables.messages, tables.inbox, tables.leader, tables.audit):
        rel = qualified(t.name, t.schema)
        if conn.execute(sa.text("SELECT to_regclass(:rel)"), {"rel": rel}).scalar() is None:
            problems.append(f"missing table {rel}")
        else:
            compared.append(t)
    seeded = tables.leader in compared
    migrated = {t.name: catalog(conn, t.name, t.schema) for t in compared}
    migrated_rows = leader_rows(conn, tables.leader) if seeded else []
    with conn.begin_nested() as sp:
        for t in compared:
            conn.execute(sa.text(f"DROP TABLE {qualified(t.name, t.schema)}"))
        tables.metadata.create_all(conn, tables=compared)
        declared = {t.name: catalog(conn, t.name, t.schema) for t in compared}
        declared_rows = leader_rows(conn, tables.leader) if seeded else []
        sp.rollback()
    for t in compared:
        for part in _CATALOG:
            if migrated[t.name][part] != declared[t.name][part]:
                problems.append(
                    f"catalog {part} of {t.name}:\n"
                    f"  migrations: {migrated[t.name][part]}\n"
                    f"  declared:   {declared[t.name][part]}"
                )
    if seeded and not migrated_rows == declared_rows == SEEDED:
        problems.append(
            f"rows of {tables.leader.name} (one, epoch is not null), {SEEDED} expected:\n"
            f"  migrations: {migrated_rows}\n"
            f"  declared:   {declared_rows}"
        )
    return problems


# --- a user's own Alembic project -----------------------------------------------------------

USER_ENV_PY = """
import sqlalchemy as sa
from alembic import context

from outbox.migrate import inbox_name_from_config, names_from_config
from outbox.schema import define_tables

config = context.config

# The application's own models, with the outbox tables (outbox, inbox, leader epoch) declared
# on the same metadata so that `alembic check` covers them too.
target_metadata = sa.MetaData()
sa.Table(
    "users",
    target_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
)
outbox_table, outbox_schema = names_from_config(config)
define_tables(
    target_metadata,
    table=outbox_table,
    schema=outbox_schema,
    inbox_table=inbox_name_from_config(config),
)


def include_name(name, type_, parent):
    if type_ == "schema":
        return name in (None, outbox_schema)
    return True


engine = sa.create_engine(config.get_main_option("sqlalchemy.url"), poolclass=sa.pool.NullPool)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_schemas=outbox_schema is not None,
        include_name=include_name,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""

USER_REVISION = '''
"""The application's first revision (its own branch, independent of the outbox's)."""
import sqlalchemy as sa
from alembic import op

revision = "app_0001"
down_revision = None
branch_labels = ("app",)
depends_on = None


def upgrade():
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
    )


def downgrade():
    op.drop_table("users")
'''


def user_project(
    root: Path,
    db_url: str,
    *,
    version_locations: str,
    path_separator: str | None = "space",
    extra: str = "",
) -> Path:
    """Write an Alembic project (``alembic.ini``, ``migrations/env.py``, one revision) under
    ``root``; return the path of its alembic.ini. ``version_locations`` is written as given
    (``%(here)s`` is the project folder)."""
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    (root / "migrations" / "env.py").write_text(USER_ENV_PY)
    (versions / "app_0001_users.py").write_text(USER_REVISION)
    lines = [
        "[alembic]",
        "script_location = %(here)s/migrations",
        f"version_locations = {version_locations}",
        f"sqlalchemy.url = {db_url}",
    ]
    if path_separator is not None:
        lines.append(f"path_separator = {path_separator}")
    ini = root / "alembic.ini"
    ini.write_text("\n".join(lines) + "\n" + textwrap.dedent(extra))
    return ini


# --- a user's project that makes revisions of its own ---------------------------------------

#: The set-up of the how-to: the user's folder first, then the package's; env.py runs for every
#: `alembic revision` (so that the outbox's hook sees plain ones too); the models are imported
#: from the project folder.
APP_INI = """\
[alembic]
script_location = %(here)s/migrations
prepend_sys_path = .
path_separator = space
version_locations = %(here)s/migrations/versions {package}
revision_environment = true
sqlalchemy.url = {url}
"""

APP_ENV_PY = """\
import sqlalchemy as sa
from alembic import context

from app_models import metadata
from outbox.migrate import process_revision_directives

config = context.config
engine = sa.create_engine(config.get_main_option("sqlalchemy.url"), poolclass=sa.pool.NullPool)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        process_revision_directives=process_revision_directives,
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""

APP_MODELS = """\
import sqlalchemy as sa

from outbox.schema import define_tables

metadata = sa.MetaData()
sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("customer", sa.Text, nullable=False),
)
# The outbox's tables, declared so that autogenerate neither drops nor re-creates them.
define_tables(metadata)
"""

CUSTOMERS = """
sa.Table("customers", metadata, sa.Column("id", sa.Integer, primary_key=True))
"""


def app_project(root: Path, url: str, *, package_location: str | None = None) -> Path:
    """A user's Alembic project as ``alembic init`` and the how-to make it (models in
    ``app_models.py``: ``APP_MODELS``), with no revision of its own yet; returns its
    alembic.ini. ``package_location`` is the outbox's entry in ``version_locations`` (default:
    the absolute :func:`outbox.migrate.versions_dir`)."""
    (root / "migrations" / "versions").mkdir(parents=True)
    template = Path(alembic.__file__).parent / "templates" / "generic" / "script.py.mako"
    shutil.copy(template, root / "migrations" / "script.py.mako")
    (root / "migrations" / "env.py").write_text(APP_ENV_PY)
    (root / "app_models.py").write_text(APP_MODELS)
    ini = root / "alembic.ini"
    package = package_location or str(migrate.versions_dir())
    ini.write_text(APP_INI.format(package=package, url=url))
    return ini
