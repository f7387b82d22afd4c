"""Alembic environment used by ``outbox db upgrade|downgrade|sql``.

When the revisions run from your own Alembic project, your env.py is used instead; the
revisions only need ``op``.
"""

from alembic import context

from outbox.migrate import VERSION_TABLE, names_from_config

config = context.config
_, schema = names_from_config(config)
options = {"version_table": VERSION_TABLE, "version_table_schema": schema}

if context.is_offline_mode():
    context.configure(dialect_name="postgresql", literal_binds=True, **options)
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes["connection"]
    context.configure(connection=connection, **options)
    with context.begin_transaction():
        context.run_migrations()
