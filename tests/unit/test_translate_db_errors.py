"""translate_db_errors: a connection that cannot be made or was lost is DatabaseUnavailableError,
whether SQLAlchemy wrapped psycopg's error or not; other failures keep their classes."""

from __future__ import annotations

import psycopg
import psycopg.errors
import pytest
import sqlalchemy.exc

from outbox.exceptions import (
    ConfigurationError,
    DatabaseAccessError,
    DatabaseError,
    DatabaseUnavailableError,
    MissingTablesError,
    OutboxError,
    TransactionConflict,
    TransientDatabaseError,
    translate_db_errors,
)


def _translate(exc: BaseException) -> OutboxError:
    with pytest.raises(OutboxError) as info, translate_db_errors("publish"):
        raise exc
    assert info.value.__cause__ is exc
    return info.value


def _wrapped(orig: BaseException, *, invalidated: bool = False) -> sqlalchemy.exc.DBAPIError:
    """What SQLAlchemy raises for ``orig`` (e.g. from ``Session.connection()``)."""
    cls: type[sqlalchemy.exc.DBAPIError] = sqlalchemy.exc.OperationalError
    if isinstance(orig, psycopg.errors.UndefinedTable):
        cls = sqlalchemy.exc.ProgrammingError
    elif isinstance(orig, psycopg.InterfaceError):
        cls = sqlalchemy.exc.InterfaceError
    return cls("INSERT ...", {}, orig, connection_invalidated=invalidated)


REFUSED = 'connection failed: connection to server at "127.0.0.1", port 1 failed: refused'


@pytest.mark.parametrize(
    "exc",
    [
        # Connecting failed (no SQLSTATE): an engine pointing at a closed port.
        _wrapped(psycopg.OperationalError(REFUSED)),
        psycopg.OperationalError(REFUSED),
        # The server ended the session (57P01) or the connection broke (class 08).
        _wrapped(psycopg.errors.AdminShutdown("terminating connection")),
        psycopg.errors.AdminShutdown("terminating connection"),
        _wrapped(psycopg.errors.ConnectionFailure("connection failure")),
        # SQLAlchemy saw the connection go (whatever the class).
        _wrapped(psycopg.InterfaceError("the connection is closed"), invalidated=True),
    ],
    ids=[
        "sa-connect-refused",
        "psycopg-connect-refused",
        "sa-admin-shutdown",
        "psycopg-admin-shutdown",
        "sa-class-08",
        "sa-invalidated",
    ],
)
def test_lost_or_impossible_connection_is_unavailable(exc: BaseException) -> None:
    err = _translate(exc)
    assert type(err) is DatabaseUnavailableError
    assert str(err).startswith("cannot reach the database (")
    assert "check the URL and that the server is up" in str(err)


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (_wrapped(psycopg.errors.SerializationFailure("could not serialize")), TransactionConflict),
        (psycopg.errors.DeadlockDetected("deadlock"), TransactionConflict),
        (_wrapped(psycopg.errors.UndefinedTable("no table")), MissingTablesError),
        (_wrapped(psycopg.errors.QueryCanceled("statement timeout")), TransientDatabaseError),
        (psycopg.errors.LockNotAvailable("lock timeout"), TransientDatabaseError),
        (_wrapped(psycopg.errors.DiskFull("disk full")), TransientDatabaseError),
        (psycopg.errors.ReadOnlySqlTransaction("read-only"), DatabaseUnavailableError),
        (psycopg.errors.IdleInTransactionSessionTimeout("idle"), DatabaseUnavailableError),
        (psycopg.errors.InsufficientPrivilege("permission denied"), DatabaseAccessError),
        (psycopg.errors.InvalidPassword("bad password"), DatabaseAccessError),
        (psycopg.errors.UniqueViolation("duplicate key"), DatabaseError),
        (_wrapped(psycopg.InterfaceError("cursor closed")), DatabaseError),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else type(v).__name__,
)
def test_each_failure_gets_its_class(exc: BaseException, cls: type[OutboxError]) -> None:
    assert type(_translate(exc)) is cls


def test_an_invalid_url_does_not_quote_it() -> None:
    err = _translate(sqlalchemy.exc.ArgumentError("Could not parse postgresql://u:hunter2@x"))
    assert isinstance(err, ConfigurationError)
    assert "hunter2" not in str(err) and str(err).startswith("invalid database URL")


@pytest.mark.parametrize(
    "text",
    [
        'connection failed: ... failed: FATAL:  database "nope" does not exist',
        'connection failed: ... failed: FATAL:  role "nope" does not exist',
        'connection failed: ... FATAL:  password authentication failed for user "x"',
        "connection failed: ... FATAL:  no pg_hba.conf entry for host",
        "connection failed: ... fe_sendauth: no password supplied",
    ],
)
def test_a_connection_refused_for_good_is_an_access_error(text: str) -> None:
    err = _translate(psycopg.OperationalError(text))
    assert isinstance(err, DatabaseAccessError) and isinstance(err, ConfigurationError)
    assert "fix the URL, the role or its grants" in str(err)


@pytest.mark.parametrize(
    "text",
    [
        "connection failed: ... FATAL:  the database system is starting up",
        "connection failed: ... FATAL:  sorry, too many clients already",
        "connection failed: ... Connection refused",
    ],
)
def test_a_connection_refused_for_now_is_unavailable(text: str) -> None:
    assert type(_translate(psycopg.OperationalError(text))) is DatabaseUnavailableError
