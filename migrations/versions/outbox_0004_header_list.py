"""Kafka headers as an ordered list: ``header_names text[]`` and ``header_values bytea[]``.

Revision ID: outbox_0004
Revises: outbox_0003
Create Date: 2026-12-08

Kafka headers are an ordered list of (name, bytes) pairs, in which a name may repeat. The
``headers jsonb`` column could hold none of that: ``jsonb`` keeps one value per key, sorts the
keys (shortest first), and holds text only. Two parallel arrays replace it: the names as
``text[]`` (queryable: ``'traceparent' = ANY(header_names)``), the values as ``bytea[]``, one
value per name in sending order.

Upgrade: each row's object becomes the two arrays, in the object's own key order (the order
written at publish was already lost), its values UTF-8 encoded (a JSON string as its text; any
other JSON value, which only a hand-written row can hold, as its JSON text). The new
columns have constant defaults (no rewrite to add them); the UPDATE rewrites the rows that have
headers. Stop the relay and the writers of an older version while it runs: they use the old
column.

Downgrade, where possible: the arrays become one ``jsonb`` object again. What cannot be
expressed there is lost: the order (``jsonb`` sorts the keys), repeated names (the last value
wins), and values that are not UTF-8 text or that contain a NUL byte (``jsonb`` holds neither:
such headers are dropped). The statements are spelled out here, not read from
``outbox.schema`` (history stays fixed); ``tests/migration`` checks that the two agree.
"""

import sqlalchemy as sa
from alembic import op

from outbox.migrate import names_from_config

revision = "outbox_0004"
down_revision = "outbox_0003"
branch_labels = None
depends_on = None

CHECK = (
    "cardinality(header_names) = cardinality(header_values) "
    "AND array_position(header_names, NULL) IS NULL "
    "AND array_position(header_values, NULL) IS NULL"
)


def _names() -> tuple[str, str]:
    """The outbox table's quoted name, and the name of its header check constraint."""
    context = op.get_context()
    table, schema = names_from_config(context.config)
    preparer = context.dialect.identifier_preparer
    return preparer.format_table(sa.table(table, schema=schema)), f"ck_{table}_headers"


def upgrade() -> None:
    name, check = _names()
    op.execute(
        f"ALTER TABLE {name} "
        "ADD COLUMN header_names text[] DEFAULT '{}'::text[] NOT NULL, "
        "ADD COLUMN header_values bytea[] DEFAULT '{}'::bytea[] NOT NULL"
    )
    op.execute(
        f"""
UPDATE {name} AS o
SET (header_names, header_values) = (
    SELECT array_agg(e.key ORDER BY e.ord),
           array_agg(
               CASE jsonb_typeof(e.value)
                   WHEN 'string' THEN convert_to(e.value #>> '{{}}', 'UTF8')
                   ELSE convert_to(e.value::text, 'UTF8')
               END
               ORDER BY e.ord)
    FROM jsonb_each(o.headers) WITH ORDINALITY AS e(key, value, ord)
)
WHERE o.headers <> '{{}}'::jsonb AND jsonb_typeof(o.headers) = 'object'
"""
    )
    op.execute(f"ALTER TABLE {name} DROP COLUMN headers")
    op.execute(f"ALTER TABLE {name} ADD CONSTRAINT {check} CHECK ({CHECK})")


def downgrade() -> None:
    name, check = _names()
    op.execute(f"ALTER TABLE {name} DROP CONSTRAINT {check}")
    op.execute(f"ALTER TABLE {name} ADD COLUMN headers jsonb DEFAULT '{{}}'::jsonb NOT NULL")
    # convert_from() raises on bytes that are not UTF-8 (and text cannot hold NUL): a
    # function of this session only, which says NULL instead, tells which values can go back.
    op.execute(
        """
CREATE FUNCTION pg_temp.outbox_utf8_or_null(value bytea) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    RETURN convert_from(value, 'UTF8');
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$
"""
    )
    op.execute(
        f"""
UPDATE {name} AS o
SET headers = (
    SELECT coalesce(jsonb_object_agg(h.name, h.text ORDER BY h.ord), '{{}}'::jsonb)
    FROM (
        SELECT n.name, n.ord, pg_temp.outbox_utf8_or_null(o.header_values[n.ord]) AS text
        FROM unnest(o.header_names) WITH ORDINALITY AS n(name, ord)
    ) AS h
    WHERE h.text IS NOT NULL
)
WHERE cardinality(o.header_names) > 0
"""
    )
    op.execute("DROP FUNCTION pg_temp.outbox_utf8_or_null(bytea)")
    op.execute(f"ALTER TABLE {name} DROP COLUMN header_names, DROP COLUMN header_values")
