"""Autovacuum settings for the outbox table and the inbox (queue tables).

Revision ID: outbox_0003
Revises: outbox_0002
Create Date: 2026-12-01

Every outbox row is inserted, then deleted (or updated to ``sent``) within seconds: with the
server's defaults, autovacuum waits until 20 % of the table is dead, and the relay's claim walks
through the dead index entries meanwhile (measured with autovacuum off: 0.1 ms per claim at the
start, 261 ms after 481k events). Vacuum (and analyze) after a fixed number of rows instead;
the inbox, which is large and purged in bursts, at 1 % of its rows. Storage parameters only: no
rewrite, and ``ALTER TABLE ... SET`` takes a lock that neither readers nor writers wait for.
The values are spelled out here (history stays fixed); ``outbox.schema`` declares the same ones
and ``tests/migration`` checks that the two agree. The downgrade resets them to the server's
defaults.
"""

import sqlalchemy as sa
from alembic import op

from outbox.migrate import inbox_name_from_config, names_from_config

revision = "outbox_0003"
down_revision = "outbox_0002"
branch_labels = None
depends_on = None

MESSAGES = (
    ("autovacuum_vacuum_scale_factor", "0"),
    ("autovacuum_vacuum_threshold", "1000"),
    ("autovacuum_vacuum_insert_scale_factor", "0"),
    ("autovacuum_vacuum_insert_threshold", "1000"),
    ("autovacuum_analyze_scale_factor", "0"),
    ("autovacuum_analyze_threshold", "1000"),
)
INBOX = (
    ("autovacuum_vacuum_scale_factor", "0.01"),
    ("autovacuum_vacuum_threshold", "1000"),
    ("autovacuum_vacuum_insert_scale_factor", "0.01"),
    ("autovacuum_vacuum_insert_threshold", "1000"),
)


def _tables() -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """(qualified table name, its parameters) for the outbox table and the inbox."""
    context = op.get_context()
    table, schema = names_from_config(context.config)
    inbox = inbox_name_from_config(context.config)
    preparer = context.dialect.identifier_preparer
    return [
        (preparer.format_table(sa.table(table, schema=schema)), MESSAGES),
        (preparer.format_table(sa.table(inbox, schema=schema)), INBOX),
    ]


def upgrade() -> None:
    for name, params in _tables():
        settings = ", ".join(f"{key} = {value}" for key, value in params)
        op.execute(f"ALTER TABLE {name} SET ({settings})")


def downgrade() -> None:
    for name, params in _tables():
        op.execute(f"ALTER TABLE {name} RESET ({', '.join(key for key, _ in params)})")
