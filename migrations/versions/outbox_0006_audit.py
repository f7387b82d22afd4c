"""Operating dead messages: an audit table, and when sending a message first and last failed.

Revision ID: outbox_0006
Revises: outbox_0005
Create Date: 2026-12-15

``<table>_audit`` records what operators did to messages (``outbox dead replay``, ``outbox
dead discard``, ``outbox dlq replay``): one row per action, with the rows concerned, the
database role (``current_user`` by default), the OS user and host of the command, and a JSON
detail. Administrators need INSERT on it (and SELECT to read it); the relay nothing.

``first_failed_at`` and ``last_failed_at`` on the outbox table are set by the relay's failure
statement only (the path that marks messages sent is unchanged). Both are nullable with no
default: adding them rewrites nothing, and rows parked before this revision keep NULL. A relay
of an earlier release keeps working on the upgraded table (it leaves them NULL); the relay of
this release needs them (it says so at start).

The statements are spelled out here, not read from ``outbox.schema`` (history stays fixed);
``tests/migration`` checks that the two agree.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from outbox.migrate import names_from_config

revision = "outbox_0006"
down_revision = "outbox_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    context = op.get_context()
    table, schema = names_from_config(context.config)
    qualified = context.dialect.identifier_preparer.format_table(sa.table(table, schema=schema))
    op.execute(
        f"ALTER TABLE {qualified} "
        "ADD COLUMN first_failed_at timestamptz, ADD COLUMN last_failed_at timestamptz"
    )
    name = f"{table}_audit"
    op.create_table(
        name,
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")
        ),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column(
            "message_ids",
            postgresql.ARRAY(sa.BigInteger),
            nullable=False,
            server_default=sa.text("'{}'::bigint[]"),
        ),
        sa.Column("db_user", sa.Text, nullable=False, server_default=sa.text("CURRENT_USER")),
        sa.Column("os_user", sa.Text, nullable=True),
        sa.Column("host", sa.Text, nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name=f"pk_{name}"),
        schema=schema,
    )


def downgrade() -> None:
    context = op.get_context()
    table, schema = names_from_config(context.config)
    op.drop_table(f"{table}_audit", schema=schema)
    qualified = context.dialect.identifier_preparer.format_table(sa.table(table, schema=schema))
    op.execute(f"ALTER TABLE {qualified} DROP COLUMN first_failed_at, DROP COLUMN last_failed_at")
