"""The inbox: effects that happen once, inside the handler's own transaction.

Two uses of one table, keyed by (consumer, key):

* **Events** — :meth:`Inbox.claim`: record that ``consumer`` processed the message ``key``
  (the ``message-id`` header) in the same transaction as the handler's writes. A redelivery
  finds the key and is skipped; a concurrent duplicate waits for the first transaction and is
  skipped if it committed, run if it rolled back.
* **Commands** — :meth:`Inbox.command`: the Idempotency-Key pattern. The first request with a
  key runs and stores its outcome in its own transaction; a retry gets the stored outcome; a
  concurrent duplicate gets :class:`CommandInProgress` (HTTP 409); the same key with another
  request gets :class:`IdempotencyKeyReused` (HTTP 422). A transaction that rolls back stores
  nothing, so a failure that should be retried can be.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import statements
from outbox.exceptions import (
    CommandInProgress,
    ConfigurationError,
    IdempotencyKeyReused,
    OutboxError,
    PayloadError,
    translate_db_errors,
)
from outbox.outbox import Outbox, run_first

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

SyncTarget: TypeAlias = "Session | sa.Connection"
AsyncTarget: TypeAlias = "AsyncSession | AsyncConnection"

_MAX_KEY = 512


@dataclasses.dataclass
class Command:
    """An idempotent command, as begun by :meth:`Inbox.command`.

    ``replay`` true: the command completed before; ``status`` and ``body`` are what
    :meth:`complete` stored then (``None`` if it stored nothing). Otherwise run the command
    and call :meth:`complete` (or :meth:`acomplete`) before committing.
    """

    scope: str
    key: str
    replay: bool
    status: int | None = None
    body: bytes | None = None
    _inbox: Inbox | None = dataclasses.field(default=None, repr=False)

    def _params(self, status: int, body: bytes | None) -> dict[str, Any]:
        if self.replay:
            raise OutboxError("this command was replayed; it has nothing to complete")
        self.status, self.body = status, body
        return {"consumer": self.scope, "key": self.key, "status": status, "body": body}

    def complete(self, session: SyncTarget, status: int, body: bytes | None = None) -> None:
        """Store the outcome in the command's transaction, for retries to replay."""
        assert self._inbox is not None
        params = self._params(status, body)
        with translate_db_errors("complete command"):
            session.execute(statements.command_complete(self._inbox.tables), params)

    async def acomplete(self, session: AsyncTarget, status: int, body: bytes | None = None) -> None:
        assert self._inbox is not None
        params = self._params(status, body)
        with translate_db_errors("complete command"):
            await session.execute(statements.command_complete(self._inbox.tables), params)


class Inbox:
    """Deduplication of incoming events and idempotent commands.

    ``Inbox(outbox)`` uses the tables of that :class:`~outbox.Outbox` (default names when
    omitted). ``retention``: how long a processed event's key is remembered; it must cover
    the longest time a message can be redelivered (e.g. the topic's retention).
    """

    def __init__(
        self,
        outbox: Outbox | None = None,
        *,
        retention: datetime.timedelta = datetime.timedelta(days=7),
    ) -> None:
        if retention.total_seconds() <= 0:
            raise ConfigurationError("retention must be positive")
        self.tables = (outbox or Outbox()).tables
        self.retention = retention

    # -- events ---------------------------------------------------------------------------------

    def claim(
        self,
        session: SyncTarget,
        consumer: str,
        key: str,
        *,
        statement_timeout: float | None = None,
    ) -> bool:
        """True the first time ``consumer`` sees ``key`` (run the handler), False after.

        ``statement_timeout`` (seconds): also limit every later statement of the transaction
        (``SET LOCAL``, in the same round trip; it works through a transaction-mode pool)."""
        params = self._claim_params(consumer, key)
        stmt = statements.inbox_claim(self.tables)
        if statement_timeout is not None:
            stmt = statements.inbox_claim_limited(self.tables)
            params["timeout"] = str(max(1, int(statement_timeout * 1000)))
        with translate_db_errors("inbox claim"):
            return run_first(session, stmt, params) is not None

    def claim_batch(
        self,
        session: SyncTarget,
        consumer: str,
        keys: Sequence[str],
        *,
        statement_timeout: float | None = None,
    ) -> set[str]:
        """:meth:`claim` for several keys in one statement (one round trip): the keys claimed
        now, i.e. seen for the first time (a key given twice counts once)."""
        _check("consumer", consumer)
        for key in keys:
            _check("key", key)
        params: dict[str, Any] = {
            "consumer": consumer,
            "keys": list(keys),
            "retention": self.retention.total_seconds(),
        }
        stmt = statements.inbox_claim_batch(self.tables, statement_timeout is not None)
        if statement_timeout is not None:
            params["timeout"] = str(max(1, int(statement_timeout * 1000)))
        if not keys:
            return set()
        with translate_db_errors("inbox claim"):
            return {row[0] for row in session.execute(stmt, params)}

    def unclaim(self, session: SyncTarget, consumer: str, keys: Sequence[str]) -> None:
        """Take back claims made earlier in the same transaction (a batch cut short: its
        remaining messages are handled later, each claimed again)."""
        with translate_db_errors("inbox unclaim"):
            session.execute(
                statements.inbox_unclaim(self.tables), {"consumer": consumer, "keys": list(keys)}
            )

    async def aclaim(self, session: AsyncTarget, consumer: str, key: str) -> bool:
        """:meth:`claim` for an ``AsyncSession`` or ``AsyncConnection``."""
        with translate_db_errors("inbox claim"):
            result = await session.execute(
                statements.inbox_claim(self.tables), self._claim_params(consumer, key)
            )
        return result.first() is not None

    def _claim_params(self, consumer: str, key: str) -> dict[str, Any]:
        _check("consumer", consumer)
        _check("key", key)
        return {"consumer": consumer, "key": key, "retention": self.retention.total_seconds()}

    # -- commands -------------------------------------------------------------------------------

    def command(
        self,
        session: SyncTarget,
        scope: str,
        key: str,
        fingerprint: str,
        *,
        ttl: datetime.timedelta = datetime.timedelta(hours=24),
    ) -> Command:
        """Begin the command ``key`` (unique within ``scope``, e.g. an API route) in the
        session's transaction. ``fingerprint``: a digest of the request (method, path, body)
        so that reuse of a key for another request is caught. After ``ttl`` the key may run
        again."""
        stmt, params = self._command(scope, key, fingerprint, ttl)
        for _ in range(3):
            with translate_db_errors("begin command"):
                row = session.execute(stmt, params).one()
            outcome = self._outcome(scope, key, fingerprint, row)
            if outcome is not None:
                return outcome
        raise CommandInProgress()

    async def acommand(
        self,
        session: AsyncTarget,
        scope: str,
        key: str,
        fingerprint: str,
        *,
        ttl: datetime.timedelta = datetime.timedelta(hours=24),
    ) -> Command:
        """:meth:`command` for an ``AsyncSession`` or ``AsyncConnection``."""
        stmt, params = self._command(scope, key, fingerprint, ttl)
        for _ in range(3):
            with translate_db_errors("begin command"):
                row = (await session.execute(stmt, params)).one()
            outcome = self._outcome(scope, key, fingerprint, row)
            if outcome is not None:
                return outcome
        raise CommandInProgress()

    def _command(
        self, scope: str, key: str, fingerprint: str, ttl: datetime.timedelta
    ) -> tuple[sa.TextClause, dict[str, Any]]:
        _check("scope", scope)
        _check("key", key)
        if not isinstance(fingerprint, str):
            raise PayloadError("fingerprint must be a str (e.g. a hex digest of the request)")
        if ttl.total_seconds() <= 0:
            raise PayloadError("ttl must be positive")
        return statements.command_begin(self.tables), {
            "lock_id": self.tables.lock_id(b"inbox", scope.encode(), key.encode()),
            "consumer": scope,
            "key": key,
            "fingerprint": fingerprint,
            "ttl": ttl.total_seconds(),
        }

    def _outcome(self, scope: str, key: str, fingerprint: str, row: Any) -> Command | None:
        locked, fresh, found, stored_fingerprint, status, body = row
        if not locked:
            raise CommandInProgress()
        if fresh:
            return Command(scope, key, replay=False, _inbox=self)
        if not found:
            # The other request committed between this statement's snapshot and its lock:
            # the row exists but was not visible. Ask again (None), with a new snapshot.
            return None
        if stored_fingerprint != fingerprint:
            raise IdempotencyKeyReused()
        return Command(scope, key, replay=True, status=status, body=body, _inbox=self)

    # -- retention ------------------------------------------------------------------------------

    def purge(self, connection: sa.Connection, *, batch_size: int = 1000) -> int:
        """Delete expired keys in short transactions of ``batch_size`` rows (committing each),
        so writers are never blocked for long. Returns how many were deleted."""
        if batch_size < 1:
            # LIMIT 0 deletes nothing, and "fewer than batch_size" would never end the loop.
            raise PayloadError("batch_size must be positive")
        total = 0
        while True:
            with translate_db_errors("inbox purge"):
                deleted = connection.execute(
                    statements.inbox_purge(self.tables), {"limit": batch_size}
                ).rowcount
                connection.commit()
            total += deleted
            if deleted < batch_size:
                return total


def _check(what: str, value: str) -> None:
    if not isinstance(value, str) or not value or len(value) > _MAX_KEY:
        raise PayloadError(f"{what} must be a non-empty str of at most {_MAX_KEY} characters")
