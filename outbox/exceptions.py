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


class TransientDatabaseError(DatabaseError):
    """The database could not do it now (a timeout, a lock wait, a conflict, no resources);
    the same statement may succeed later: back off and retry."""


class DatabaseAccessError(ConfigurationError, DatabaseError):
    """The database refused this role or database (authentication, a role or database that
    does not exist, a missing privilege); fix the URL, the role or its grants.

    A :class:`ConfigurationError`: the CLI exits with status 2, and retrying cannot help.
    """


class TransactionConflict(TransientDatabaseError):
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


class DownstreamUnavailable(OutboxError):
    """Raised by a handler when what it calls (a payment provider, another service) is down or
    overloaded: not this message's fault. It counts no attempt and dead-letters nothing; the
    consumer's circuit breaker retries, then pauses consumption until the dependency answers
    (see :mod:`outbox.breaker`). ``Consumer(transient=...)`` treats other types the same way."""


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


#: Sessions that must be replaced: read-only after a failover (reconnect to find the
#: primary), and sessions the server ended for idling in a transaction.
_RECONNECT = {"25006", "25P03"}
#: Statements that may succeed later: statement and lock timeouts, an object in use.
_TRANSIENT = {"57014", "55P03", "55006"}
#: A refused connection has no SQLSTATE in libpq; these server messages mean retrying
#: cannot help (English server messages; others are retried as unreachable).
_REFUSED_FOR_GOOD = (
    "does not exist",
    "password authentication failed",
    "no password supplied",
    "no pg_hba.conf entry",
    "authentication failed",
    "permission denied",
)


def _translate(err: BaseException, what: str, *, invalidated: bool = False) -> OutboxError:
    """The library's exception for a driver error ``err`` during ``what``."""
    state = _sqlstate(err)
    text = first_line(err)
    if state == "42P01":
        return MissingTablesError()
    if (
        state.startswith(("28", "3D"))
        or state == "42501"
        or (
            not state
            and isinstance(err, psycopg.OperationalError)
            and any(marker in text for marker in _REFUSED_FOR_GOOD)
        )
    ):
        return DatabaseAccessError(f"{what}: {text}; fix the URL, the role or its grants")
    if (
        invalidated
        or state in _RECONNECT
        or (isinstance(err, psycopg.OperationalError) and _is_connection_lost(err))
    ):
        return DatabaseUnavailableError(
            f"cannot reach the database ({text}); check the URL and that the server is up"
        )
    if state.startswith("40"):
        return TransactionConflict(f"{what}: {text}; retry it")
    if state in _TRANSIENT or state.startswith(("53", "58")):
        return TransientDatabaseError(f"{what}: {text}; retry it")
    return DatabaseError(f"{what} failed: {text}")


def classify_db_error(exc: BaseException) -> OutboxError | None:
    """The library's exception for ``exc`` if it is a database error (translated as
    :func:`translate_db_errors` would), else None: for callers that must decide between
    waiting for the database, retrying, and counting a failure."""
    if isinstance(exc, OutboxError):
        return exc
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        err = exc.orig if exc.orig is not None else exc
        return _translate(err, "database operation", invalidated=exc.connection_invalidated)
    if isinstance(exc, psycopg.Error):
        return _translate(exc, "database operation")
    return None


@contextlib.contextmanager
def translate_db_errors(what: str = "database operation") -> Iterator[None]:
    """Translate SQLAlchemy and psycopg errors into :class:`OutboxError` subclasses.

    * a connection that cannot be made or was lost (SQLAlchemy's ``connection_invalidated``,
      psycopg's ``OperationalError`` without a SQLSTATE or of class 08 or 57P), a read-only
      session (after a failover) or one ended for idling in a transaction:
      :class:`DatabaseUnavailableError` -- reconnect;
    * authentication, a missing role or database, a missing privilege:
      :class:`DatabaseAccessError` (a :class:`ConfigurationError`) -- retrying cannot help;
    * a conflict (class 40): :class:`TransactionConflict`; a statement or lock timeout, an
      object in use, no resources (classes 53, 58): :class:`TransientDatabaseError` -- retry;
    * missing tables: :class:`MissingTablesError`; anything else: :class:`DatabaseError`;
    * an invalid URL: a :class:`ConfigurationError` that does not quote it (it may hold a
      password).
    """
    try:
        yield
    except OutboxError:
        raise
    except sqlalchemy.exc.ArgumentError as exc:
        raise ConfigurationError(
            "invalid database URL: expected postgresql+psycopg://USER@HOST:PORT/DBNAME"
        ) from exc
    except sqlalchemy.exc.DBAPIError as exc:
        raise _translate(
            exc.orig if exc.orig is not None else exc, what, invalidated=exc.connection_invalidated
        ) from exc
    except psycopg.Error as exc:
        raise _translate(exc, what) from exc


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (or its type's name): for one-line messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
