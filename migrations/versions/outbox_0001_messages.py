"""Outbox messages table.

Revision ID: outbox_0001
Revises:
Create Date: 2026-11-27

Table and schema names come from ``outbox db --table/--schema`` or from ``outbox_table`` /
``outbox_schema`` in your alembic.ini. The DDL is spelled out here (not generated from
``outbox.schema``) so that history stays fixed; ``tests/migration`` checks the two agree.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from outbox.migrate import names_from_config

revision = "outbox_0001"
down_revision = None
branch_labels = ("outbox",)
depends_on = None


def upgrade() -> None:
    table, schema = names_from_config(op.get_context().config)
    if schema is not None:
        op.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
    op.create_table(
        table,
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=True),
        sa.Column("payload", sa.LargeBinary, nullable=True),
        sa.Column(
            "headers", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")
        ),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'pending'")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=f"pk_{table}"),
        sa.UniqueConstraint("message_id", name=f"uq_{table}_message_id"),
        sa.CheckConstraint("length(topic) > 0", name=f"ck_{table}_topic"),
        sa.CheckConstraint(
            "status IN ('pending', 'retry', 'dead', 'sent')", name=f"ck_{table}_status"
        ),
        schema=schema,
    )
    op.create_index(
        f"ix_{table}_unsent",
        table,
        ["id"],
        schema=schema,
        postgresql_where=sa.text("status IN ('pending', 'retry')"),
    )
    op.create_index(
        f"ix_{table}_held",
        table,
        ["topic", "key", "id"],
        schema=schema,
        postgresql_where=sa.text("status IN ('retry', 'dead')"),
    )


def downgrade() -> None:
    table, schema = names_from_config(op.get_context().config)
    op.drop_table(table, schema=schema)
