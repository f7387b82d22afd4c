"""sqlalchemy-outbox: transactional outbox for SQLAlchemy, relayed to Kafka.

Write events in your business transaction::

    from outbox import Outbox

    outbox = Outbox()
    with Session(engine) as session, session.begin():
        session.add(order)
        outbox.publish(session, "orders", {"id": order.id}, key=str(order.id))

then run ``outbox-relay --db-url ... --bootstrap-servers ...``. See ``docs/``.
"""

from outbox.config import RelayConfig
from outbox.events import EventSource, collect_events
from outbox.exceptions import (
    CommandInProgress,
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailableError,
    IdempotencyKeyReused,
    MissingTablesError,
    OutboxError,
    PayloadError,
    PoisonMessage,
    TransactionConflict,
    TransportError,
)
from outbox.inbox import Command, Inbox
from outbox.message import HEADER_CONTENT_TYPE, HEADER_MESSAGE_ID, Message, uuid7
from outbox.observe import BatchOutcome, ConsumerObserver, RelayObserver
from outbox.outbox import Outbox
from outbox.relay import Relay, RelayStats
from outbox.schema import OutboxTables, define_tables

__all__ = [
    "HEADER_CONTENT_TYPE",
    "HEADER_MESSAGE_ID",
    "BatchOutcome",
    "Command",
    "CommandInProgress",
    "ConfigurationError",
    "ConsumerObserver",
    "DatabaseError",
    "DatabaseUnavailableError",
    "EventSource",
    "IdempotencyKeyReused",
    "Inbox",
    "Message",
    "MissingTablesError",
    "Outbox",
    "OutboxError",
    "OutboxTables",
    "PayloadError",
    "PoisonMessage",
    "Relay",
    "RelayConfig",
    "RelayObserver",
    "RelayStats",
    "TransactionConflict",
    "TransportError",
    "collect_events",
    "define_tables",
    "uuid7",
]
