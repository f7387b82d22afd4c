"""The consumer's handler time limit: a thread that notices a handler stuck outside the
database, dead-letters its message and ends the process (see :class:`Watchdog`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from outbox import statements
from outbox.observe import message_fields
from outbox.transport.base import IncomingMessage

if TYPE_CHECKING:
    from outbox.consumer import Consumer

logger = logging.getLogger("outbox.consumer")

#: Exit status of ``outbox consume`` after a handler hung past its time limit (its message
#: was dead-lettered first): restart the process.
EXIT_HANDLER_HUNG = 3


class Watchdog:
    """Notices a handler attempt that outlives its time limit. Its database statements are
    cancelled by ``statement_timeout`` at the limit; past the limit and a grace period the
    handler is stuck outside the database, where Python cannot stop it. Then the watchdog
    ends the handler's session (rolling back its claim), dead-letters the message, commits
    its offset and exits the process (:data:`EXIT_HANDLER_HUNG`) for the supervisor to start a
    fresh one -- which skips the message, so a message that always hangs does not crash-loop.

    In a batch each handler call has its own limit, so the hung message is the one running.
    Its offset is stored only if no message before it in its partition waits uncommitted in
    the batch's transaction (rolled back with it); otherwise the redelivery finds its dead
    letter's key and skips it. A batch handler's limit is per call: a batch handler that
    hangs gets every fresh message of its call dead-lettered (the watchdog cannot tell which).
    """

    #: Replaced in tests.
    exit: Callable[[int], None] = staticmethod(os._exit)

    def __init__(self, consumer: Consumer, limit: float | None) -> None:
        self._consumer = consumer
        self._limit = limit
        self._cond = threading.Condition()
        #: What to dead-letter, which offsets to store then, attempts, backend pid, deadline.
        self._current: _Watched | None = None
        self._idle = False
        self._thread: threading.Thread | None = None

    @property
    def on(self) -> bool:
        return self._limit is not None

    @contextlib.contextmanager
    def watching(
        self,
        message: IncomingMessage,
        key: str,
        attempts: int,
        pid: int | None,
        store: bool = True,
    ) -> Iterator[None]:
        """Around one handler call. ``store``: the message's offset may be stored if it hangs."""
        with self._watching(([(message, key)], [message] if store else [], attempts, pid)):
            yield

    @contextlib.contextmanager
    def watching_all(
        self,
        letters: list[tuple[IncomingMessage, str]],
        offsets: list[IncomingMessage],
        pid: int | None,
    ) -> Iterator[None]:
        """Around one batch handler call: ``letters`` are dead-lettered if it hangs, then the
        ``offsets`` stored."""
        with self._watching((letters, offsets, 1, pid)):
            yield

    @contextlib.contextmanager
    def _watching(
        self, what: tuple[list[tuple[IncomingMessage, str]], list[IncomingMessage], int, int | None]
    ) -> Iterator[None]:
        if self._limit is None:
            yield
            return
        grace = min(5.0, 0.5 + self._limit / 4)
        with self._cond:
            self._current = (*what, time.monotonic() + self._limit + grace)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="outbox-handler-watchdog", daemon=True
                )
                self._thread.start()
            # A watchdog waiting for an earlier deadline wakes by itself and reads the new one:
            # waking it only when it waits for nothing saves two thread switches per message.
            if self._idle:
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._current = None

    def _watch(self) -> None:
        while True:
            with self._cond:
                while self._current is None:
                    self._idle = True
                    self._cond.wait()
                self._idle = False
                letters, offsets, attempts, pid, deadline = self._current
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self._current = None
            self._hung(letters, offsets, attempts, pid)

    def _hung(
        self,
        letters: list[tuple[IncomingMessage, str]],
        offsets: list[IncomingMessage],
        attempts: int,
        pid: int | None,
    ) -> None:
        consumer = self._consumer
        reason = f"the handler ran longer than its time limit ({self._limit} s)"
        if consumer.batch_handler is not None and len(letters) > 1:
            reason = (
                f"the batch handler ran longer than its time limit ({self._limit} s) on a "
                f"batch of {len(letters)} messages, this one among them"
            )
        message, key = letters[0]
        logger.error(
            "handler hung, dead-lettering and exiting",
            extra={
                "event": "consumer.handler_hung",
                "key": key,
                "limit_s": self._limit,
                "messages": len(letters),
                **message_fields(message),
            },
        )
        try:
            if pid is not None:
                with consumer._engine.connect() as conn:
                    conn.execute(statements.terminate_backend(), {"pid": pid})
                    conn.commit()
            if all(
                consumer._dead_letter(m, k, reason, attempts, kind="hung") is not None
                for m, k in letters
            ):
                for done in offsets:
                    consumer._source.processed(done)
                consumer._source.commit()
        except Exception:
            # Exiting anyway: the message is redelivered and the watchdog tries again.
            logger.exception(
                "could not dead-letter the hung message",
                extra={"event": "consumer.hang_unrecorded"},
            )
        sys.stderr.flush()
        self.exit(EXIT_HANDLER_HUNG)


_Watched = tuple[list[tuple[IncomingMessage, str]], list[IncomingMessage], int, "int | None", float]
