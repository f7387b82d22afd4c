"""Exceptions raised by the library.

Every exception the library raises derives from :class:`OutboxError`. A class's docstring is
its default message. Database driver errors are translated here, in :func:`translate_db_errors`;
Kafka client errors are translated in ``outbox.transport.kafka`` (the only module that imports
``confluent_kafka``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
import sqlalchemy.exc


class OutboxError(Exception):
    """An outbox operation failed."""

    def __init__(self, message: str | None = None) -> None:
        # The docstring is the default message, on one line.
        super().__init__(message or " ".join((self.__doc__ or "").split("\n\n")[0].split()))


class ConfigurationError(OutboxError):
    """The configuration is invalid; fix the option named in the message and retry.

    The CLI exits with status 2 on this error: it is a usage error, nothing was done.
    """


class PayloadError(OutboxError):
    """The message cannot be stored: its topic, key, headers or payload are invalid."""


class DatabaseError(OutboxError):
    """The database failed; check that it is reachable and retry."""


class DatabaseUnavailableError(DatabaseError):
    """Cannot connect to the database; check the URL, that the server is up, and retry."""


class TransactionConflict(DatabaseError):
    """The transaction conflicted with a concurrent one (serialization failure or deadlock);
    roll back and retry it."""


class MissingTablesError(ConfigurationError):
    """The outbox tables do not exist; run `outbox db upgrade --db-url URL` (or
    `alembic upgrade outbox@head`) first."""


class TransportError(OutboxError):
    """The message broker failed."""


class MessageRejected(TransportError):
    """The transport refused the message before sending it; nothing was queued."""


class TransportUnavailable(TransportError):
    """The transport cannot take messages now; nothing was queued."""


class PoisonMessage(OutboxError):
    """The message can never be processed (e.g. it cannot be decoded): it is dead-lettered at
    once, without retries."""


class HandlerUndidItsWork(OutboxError):
    """The handler rolled back or closed its session, undoing its writes: the message is not
    done. Counted as a failed attempt; raise an exception instead."""


class CommandInProgress(OutboxError):
    """A request with this idempotency key is being processed now; retry later (HTTP 409)."""


class IdempotencyKeyReused(OutboxError):
    """This idempotency key was used for a different request (HTTP 422)."""


def _sqlstate(exc: BaseException | None) -> str:
    return str(getattr(exc, "sqlstate", None) or "")


def _is_connection_lost(exc: BaseException) -> bool:
    # psycopg raises OperationalError for lost connections (no SQLSTATE, class 08, admin
    # shutdown 57P0x) but also for serialization failures and deadlocks (class 40).
    state = _sqlstate(exc)
    return not state or state.startswith(("08", "57P"))


def _is_undefined_table(exc: BaseException) -> bool:
    # psycopg's UndefinedTable carries SQLSTATE 42P01; checked by code so that this module
    # does not depend on the driver's class hierarchy.
    return getattr(exc, "sqlstate", None) == "42P01"


@contextlib.contextmanager
def translate_db_errors(what: str = "database operation") -> Iterator[None]:
    """Translate SQLAlchemy and psycopg errors into :class:`OutboxError` subclasses.

    A connection that cannot be made or was lost (SQLAlchemy's ``OperationalError`` or
    ``connection_invalidated``, psycopg's ``OperationalError`` without a SQLSTATE or with one
    of class 08 or 57P) is a :class:`DatabaseUnavailableError`; an invalid URL a
    :class:`ConfigurationError` whose message does not quote the URL (it may hold a password).
    """

    def unavailable(exc: BaseException) -> DatabaseUnavailableError:
        return DatabaseUnavailableError(
            f"cannot reach the database ({first_line(exc)}); check the URL and that the "
            "server is up"
        )

    try:
        yield
    except OutboxError:
        raise
    except sqlalchemy.exc.ArgumentError as exc:
        raise ConfigurationError(
            "invalid database URL: expected postgresql+psycopg://USER@HOST:PORT/DBNAME"
        ) from exc
    except sqlalchemy.exc.DBAPIError as exc:
        orig = exc.orig
        if orig is not None and _is_undefined_table(orig):
            raise MissingTablesError() from exc
        if exc.connection_invalidated or (
            isinstance(exc, sqlalchemy.exc.OperationalError)
            and isinstance(orig, psycopg.OperationalError)
            and _is_connection_lost(orig)
        ):
            raise unavailable(orig or exc) from exc
        if _sqlstate(orig).startswith("40"):
            raise TransactionConflict(f"{what}: {first_line(orig or exc)}; retry it") from exc
        raise DatabaseError(f"{what} failed: {first_line(orig or exc)}") from exc
    except psycopg.errors.UndefinedTable as exc:
        raise MissingTablesError() from exc
    except psycopg.Error as exc:
        if _sqlstate(exc).startswith("40"):
            raise TransactionConflict(f"{what}: {first_line(exc)}; retry it") from exc
        if isinstance(exc, psycopg.OperationalError) and _is_connection_lost(exc):
            raise unavailable(exc) from exc
        raise DatabaseError(f"{what} failed: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (or its type's name): for one-line messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
