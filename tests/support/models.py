"""ORM entities that record domain events (:class:`outbox.EventSource`), for the tests of
``collect_events`` in either publish mode. Create their tables with
``Base.metadata.create_all(engine)`` and ``DataBase.metadata.create_all(engine)``."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, MappedAsDataclass, mapped_column

from outbox import EventSource


class Base(DeclarativeBase):
    pass


class Order(EventSource, Base):
    __tablename__ = "de_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(default="new")

    def cancel(self) -> None:
        self.status = "cancelled"
        self.record_event("orders", {"type": "OrderCancelled", "id": self.id}, key=str(self.id))


class Invoice(EventSource, Base):
    """Records an event from a mapper event, that is during the flush."""

    __tablename__ = "de_invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(default="open")


@sa.event.listens_for(Invoice, "before_update")
def _invoice_updated(mapper: Any, connection: Any, invoice: Invoice) -> None:
    invoice.record_event("invoices", {"status": invoice.status})


class DataBase(MappedAsDataclass, DeclarativeBase):
    pass


class Shipment(EventSource, DataBase):
    """Dataclass-mapped: defines __eq__, so its instances are not hashable."""

    __tablename__ = "de_shipments"
    id: Mapped[int] = mapped_column(primary_key=True)
