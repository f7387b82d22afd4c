"""The relays' leader epoch: a one-row table only relay roles may read or change.

Revision ID: outbox_0005
Revises: outbox_0004
Create Date: 2026-12-01

Advisory locks are not privileges: any role could take the relays' leader lock first (its id
was derived from the table's name alone) and stall every relay. The lock id now also depends
on this table's epoch, which only roles granted SELECT on the table can read; a relay that
finds the lock of the current epoch held by a role without UPDATE here (not a relay) moves
every relay to a new epoch. A relay of an earlier release uses the old lock: stop those before
starting this release's relays (the header columns of ``outbox_0004`` already require it).

The statements are spelled out here, not read from ``outbox.schema`` (history stays fixed);
``tests/migration`` checks that the two agree (the same table, seeded with one row).
"""

import sqlalchemy as sa
from alembic import op

from outbox.migrate import names_from_config

revision = "outbox_0005"
down_revision = "outbox_0004"
branch_labels = None
depends_on = None

#: A random 63-bit epoch, from the server (PostgreSQL 13+: no extension needed).
NEW_EPOCH = "(('x' || substr(md5(gen_random_uuid()::text), 1, 16))::bit(64)::bigint >> 1)"


def upgrade() -> None:
    table, schema = names_from_config(op.get_context().config)
    name = f"{table}_leader"
    op.create_table(
        name,
        sa.Column("one", sa.Boolean, nullable=False, server_default=sa.text("true")),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("one", name=f"pk_{name}"),
        sa.CheckConstraint("one", name=f"ck_{name}_one"),
        schema=schema,
    )
    preparer = op.get_context().dialect.identifier_preparer
    qualified = preparer.format_table(sa.table(name, schema=schema))
    op.execute(f"INSERT INTO {qualified} (epoch) VALUES ({NEW_EPOCH})")


def downgrade() -> None:
    table, schema = names_from_config(op.get_context().config)
    op.drop_table(f"{table}_leader", schema=schema)
