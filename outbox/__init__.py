"""sqlalchemy-outbox: transactional outbox for SQLAlchemy, relayed to Kafka.

Write events in your business transaction::

    from outbox import Outbox

    outbox = Outbox()
    with Session(engine) as session, session.begin():
        session.add(order)
        outbox.publish(session, "orders", {"id": order.id}, key=str(order.id))

then run ``outbox-relay --db-url ... --bootstrap-servers ...``. See ``docs/``.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names, for type checkers and IDEs
    from outbox.config import RelayConfig
    from outbox.events import EventSource, collect_events
    from outbox.exceptions import (
        CommandInProgress,
        ConfigurationError,
        DatabaseAccessError,
        DatabaseError,
        DatabaseUnavailableError,
        DownstreamUnavailable,
        IdempotencyKeyReused,
        MissingTablesError,
        OutboxError,
        PayloadError,
        PoisonMessage,
        TransactionConflict,
        TransientDatabaseError,
        TransportError,
    )
    from outbox.inbox import Command, Inbox
    from outbox.message import HEADER_CONTENT_TYPE, HEADER_MESSAGE_ID, Message, uuid7
    from outbox.observe import BatchOutcome, ConsumerObserver, MessageRef, RelayObserver
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
    "DatabaseAccessError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "DownstreamUnavailable",
    "EventSource",
    "IdempotencyKeyReused",
    "Inbox",
    "Message",
    "MessageRef",
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
    "TransientDatabaseError",
    "TransportError",
    "collect_events",
    "define_tables",
    "uuid7",
]

# Imported on first use (PEP 562): the console scripts install their signal handlers before
# SQLAlchemy, psycopg and librdkafka are loaded (see outbox._entry).
_MODULES = {
    "BatchOutcome": "outbox.observe",
    "Command": "outbox.inbox",
    "CommandInProgress": "outbox.exceptions",
    "ConfigurationError": "outbox.exceptions",
    "ConsumerObserver": "outbox.observe",
    "DatabaseAccessError": "outbox.exceptions",
    "DatabaseError": "outbox.exceptions",
    "DatabaseUnavailableError": "outbox.exceptions",
    "DownstreamUnavailable": "outbox.exceptions",
    "EventSource": "outbox.events",
    "HEADER_CONTENT_TYPE": "outbox.message",
    "HEADER_MESSAGE_ID": "outbox.message",
    "IdempotencyKeyReused": "outbox.exceptions",
    "Inbox": "outbox.inbox",
    "Message": "outbox.message",
    "MessageRef": "outbox.observe",
    "MissingTablesError": "outbox.exceptions",
    "Outbox": "outbox.outbox",
    "OutboxError": "outbox.exceptions",
    "OutboxTables": "outbox.schema",
    "PayloadError": "outbox.exceptions",
    "PoisonMessage": "outbox.exceptions",
    "Relay": "outbox.relay",
    "RelayConfig": "outbox.config",
    "RelayObserver": "outbox.observe",
    "RelayStats": "outbox.relay",
    "TransactionConflict": "outbox.exceptions",
    "TransientDatabaseError": "outbox.exceptions",
    "TransportError": "outbox.exceptions",
    "collect_events": "outbox.events",
    "define_tables": "outbox.schema",
    "uuid7": "outbox.message",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'outbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
