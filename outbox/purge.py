"""Deleting the sent messages that ``--retain-sent`` keeps: ``outbox purge`` and the relay's
``--purge-sent-after``.

A pass walks the table along its primary key from the lowest id, ``batch_size`` rows per
statement (:func:`outbox.statements.purge_sent`), deleting the sent rows older than the cutoff
among them. Each batch is one short statement that locks only the rows it deletes (``SKIP
LOCKED``), so writers and the relay never wait on it for long, and its cost does not grow with
the table: the pass ends at the first batch whose rows are all newer than the cutoff (ids grow
with creation time), not by scanning the rest.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

from outbox.config import RelayConfig

#: Rows looked at per statement: a few milliseconds each.
BATCH_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class Batch:
    """What one statement did: rows ``deleted``, the ``last`` id looked at, how many rows it
    ``seen`` and whether they were all ``newer`` than the cutoff."""

    deleted: int
    last: int | None
    seen: int
    newer: bool


class SentPurge:
    """Where a pass is (the last id looked at) and when the next one is due.

    ``outbox purge`` runs one pass to its end; the relay runs a few batches at a time while it
    is idle, a new pass at most every ``interval`` seconds (the first at once).
    """

    def __init__(
        self,
        older_than: float,
        *,
        batch_size: int = BATCH_SIZE,
        interval: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not older_than > 0 or batch_size < 1 or not interval > 0:
            raise ValueError("older_than, batch_size and interval must be positive")
        self.older_than = older_than
        self.batch_size = batch_size
        self.interval = interval
        self._clock = clock
        self._after = 0
        self._running = False
        self._next = clock()
        #: Rows deleted by the pass under way (or the last one).
        self.deleted = 0

    @property
    def running(self) -> bool:
        """A pass is under way (it goes on at the next :meth:`step`)."""
        return self._running

    def due(self) -> bool:
        return self._running or self._clock() >= self._next

    def step(self, run: Callable[[Mapping[str, Any]], Any]) -> Batch:
        """Run one batch: ``run(params)`` executes the statement and returns its row. A pass
        that ends (or fails) schedules the next one ``interval`` seconds after it began."""
        if not self._running:
            self._running, self._after, self.deleted = True, 0, 0
            self._next = self._clock() + self.interval
        try:
            row = run({"after": self._after, "limit": self.batch_size, "age": self.older_than})
        except BaseException:
            self._running = False
            raise
        batch = Batch(int(row[0]), None if row[1] is None else int(row[1]), int(row[2]), row[3])
        self.deleted += batch.deleted
        if batch.last is not None:
            self._after = batch.last
        if batch.seen < self.batch_size or batch.newer:
            self._running = False
        return batch

    def run_pass(self, run: Callable[[Mapping[str, Any]], Any]) -> int:
        """A whole pass, now; returns how many rows it deleted."""
        self._running = False
        while True:
            self.step(run)
            if not self._running:
                return self.deleted


def for_relay(config: RelayConfig) -> SentPurge | None:
    """The relay's purge (``--purge-sent-after``), or None when it purges nothing."""
    if config.purge_sent_after is None:
        return None
    return SentPurge(config.purge_sent_after, interval=config.purge_interval)
