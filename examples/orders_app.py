"""An orders service that records an ``OrderPlaced`` event in the same transaction as the order.

Run on its own: ``python examples/orders_app.py --db-url URL --orders 100``.
"""

from __future__ import annotations

import argparse
import decimal
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox import Outbox


class Base(DeclarativeBase):
    pass


# The outbox table lives on the application's own MetaData, so `alembic check` and
# `Base.metadata.create_all` know about it. It is installed by `outbox db upgrade`.
outbox = Outbox(metadata=Base.metadata)


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    customer: Mapped[str]
    amount: Mapped[decimal.Decimal] = mapped_column(sa.Numeric(12, 2))
    status: Mapped[str] = mapped_column(default="placed")


def place_order(
    session: Session, customer: str, amount: decimal.Decimal, topic: str = "orders"
) -> Order:
    """Insert the order and its event; both commit or neither does."""
    order = Order(customer=customer, amount=amount)
    session.add(order)
    session.flush()  # assigns nothing here (client-side uuid), but surfaces constraint errors
    outbox.publish(
        session,
        topic,
        {"type": "OrderPlaced", "order_id": order.id, "customer": customer, "amount": amount},
        key=customer,  # all events of one customer stay in order
        headers={"event-type": "OrderPlaced"},
    )
    return order


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db-url", required=True)
    parser.add_argument("--orders", type=int, default=100)
    parser.add_argument("--customers", type=int, default=10)
    args = parser.parse_args()
    engine = sa.create_engine(args.db_url)
    Order.__table__.create(engine, checkfirst=True)  # type: ignore[attr-defined]
    for i in range(args.orders):
        with Session(engine) as session, session.begin():
            place_order(session, f"customer-{i % args.customers}", decimal.Decimal(i) + 1)
    # A failed business transaction publishes nothing.
    try:
        with Session(engine) as session, session.begin():
            place_order(session, "customer-0", decimal.Decimal("5.00"))
            raise RuntimeError("payment declined")
    except RuntimeError:
        pass
    print(f"placed {args.orders} orders")


if __name__ == "__main__":
    main()
