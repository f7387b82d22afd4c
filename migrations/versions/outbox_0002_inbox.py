"""Inbox table: idempotency keys processed per consumer, and stored command outcomes.

Revision ID: outbox_0002
Revises: outbox_0001
Create Date: 2026-11-27

The name comes from ``outbox db --inbox-table`` or ``outbox_inbox_table`` in your alembic.ini
(default ``outbox_inbox``), in the same schema as the outbox table.
"""

import sqlalchemy as sa
from alembic import op

from outbox.migrate import inbox_name_from_config, names_from_config

revision = "outbox_0002"
down_revision = "outbox_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    config = op.get_context().config
    _, schema = names_from_config(config)
    table = inbox_name_from_config(config)
    op.create_table(
        table,
        sa.Column("consumer", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=True),
        sa.Column("response_status", sa.Integer, nullable=True),
        sa.Column("response_body", sa.LargeBinary, nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "key", name=f"pk_{table}"),
        sa.CheckConstraint("length(consumer) > 0 AND length(key) > 0", name=f"ck_{table}_names"),
        schema=schema,
    )
    op.create_index(
        f"ix_{table}_expires_at", table, ["expires_at"], schema=schema, postgresql_using="brin"
    )


def downgrade() -> None:
    config = op.get_context().config
    _, schema = names_from_config(config)
    op.drop_table(inbox_name_from_config(config), schema=schema)
