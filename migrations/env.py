"""Alembic environment used by ``outbox db upgrade|downgrade|sql``.

When the revisions run from your own Alembic project, your env.py is used instead; the
revisions only need ``op``.
"""

import sqlalchemy as sa
from alembic import context

from outbox.migrate import VERSION_TABLE, names_from_config

config = context.config
_, schema = names_from_config(config)
options = {"version_table": VERSION_TABLE, "version_table_schema": schema}

if context.is_offline_mode():
    context.configure(dialect_name="postgresql", literal_binds=True, **options)
else:
    context.configure(connection=config.attributes["connection"], **options)

with context.begin_transaction():
    if schema is not None:
        # The version table lives in the outbox's schema, and Alembic creates it before the
        # first revision runs: the schema must exist by then.
        context.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
    context.run_migrations()
