"""The relay's per-key hold-back: which claims must not send a key yet.

A message that failed, or was claimed but not sent, is recorded in the table only when its
batch is finished. Until then, and for any claim that ran before that record (a claim runs
ahead of the marks, see ``outbox.claims``), the later messages of its key would look
sendable and overtake it. The gate remembers such keys in memory:

* :meth:`hold` a key when one of its messages fails or is left unsent: from now on no claim
  sends it (``until`` is infinite);
* :meth:`release` a batch's keys once the batch is recorded and no other in-flight batch holds
  them: claims numbered from the *next* one on see the record in the table and may send;
* :meth:`blocks` tells whether claim ``n`` must skip a key (skipped rows stay pending and are
  claimed again).

Claims are numbered in the order they are *sent* to the database, so a claim sent before a
release never sends a key that the release would have unblocked only for later claims.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

Key = tuple[str, bytes]


class KeyGate:
    __slots__ = ("claims", "held")

    def __init__(self) -> None:
        #: Held keys, mapped to the number of the first claim sure to see their record.
        self.held: dict[Key, float] = {}
        #: Claims numbered so far (from 1).
        self.claims = 0

    def next_claim(self) -> int:
        """Number a claim as it is sent to the database."""
        self.claims += 1
        return self.claims

    def hold(self, key: Key, owner: set[Key]) -> None:
        """No claim sends ``key`` until ``owner`` (a batch's keys) is released."""
        self.held[key] = math.inf
        owner.add(key)

    def blocks(self, key: Key, claim: int) -> bool:
        """Whether claim number ``claim`` must not send ``key`` (forgets keys it passes)."""
        until = self.held.get(key)
        if until is None:
            return False
        if claim < until:
            return True
        del self.held[key]
        return False

    def release(self, owner: set[Key], in_flight: Iterable[set[Key]]) -> None:
        """``owner``'s batch is recorded: its keys pass from the next claim on, except those
        another in-flight batch (``in_flight``: their key sets) still holds."""
        others = list(in_flight)
        after = self.claims + 1
        for key in owner:
            if not any(key in other for other in others):
                self.held[key] = after

    def clear(self) -> None:
        """Forget everything: nothing is in flight (the database session was lost)."""
        self.held.clear()
