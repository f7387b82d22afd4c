"""Inbox.command when the first request commits between the duplicate's snapshot and its
lock: the row exists but is not visible yet; the statement must run again, not answer 422."""

from __future__ import annotations

from typing import Any

import pytest

from outbox import CommandInProgress, Inbox


class FakeResult:
    def __init__(self, row: tuple[Any, ...]) -> None:
        self.row = row

    def one(self) -> tuple[Any, ...]:
        return self.row


class FakeSession:
    """Answers the command statement with scripted rows."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows
        self.calls = 0

    def execute(self, stmt: Any, params: Any) -> FakeResult:
        self.calls += 1
        return FakeResult(self.rows.pop(0))


INVISIBLE = (True, False, False, None, None, None)  # locked, not fresh, row not visible
STORED = (True, False, True, "fp", 201, b"{}")


def test_a_row_committed_after_the_snapshot_is_read_again() -> None:
    session = FakeSession([INVISIBLE, STORED])
    command = Inbox().command(session, "POST /orders", "k", "fp")  # type: ignore[arg-type]
    assert session.calls == 2
    assert command.replay and command.status == 201


def test_it_gives_up_as_in_progress_when_the_row_stays_invisible() -> None:
    session = FakeSession([INVISIBLE] * 3)
    with pytest.raises(CommandInProgress):
        Inbox().command(session, "POST /orders", "k", "fp")  # type: ignore[arg-type]
    assert session.calls == 3
