"""The README's Python code runs as written (against a real database)."""

from __future__ import annotations

import re
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

README = Path(__file__).resolve().parents[2] / "README.md"


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "readme_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_publish_snippet_commits_one_event(engine: sa.Engine) -> None:
    blocks = python_blocks()
    assert blocks, "README has no python block"
    Base.metadata.create_all(engine)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"engine": engine, "order": Order(customer_id=7)})
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT topic, key, payload FROM outbox_messages")).all()
    assert [(r.topic, r.key) for r in rows] == [("orders", b"7")]
    assert b'"OrderPlaced"' in rows[0].payload
