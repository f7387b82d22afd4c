"""Waiting on conditions instead of sleeping a fixed time: the one polling helper."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Watched(Protocol):
    """A process to give up on if it exits first (:class:`tests.support.cli.CliProcess`)."""

    name: str

    @property
    def running(self) -> bool: ...

    def tail(self, n: int = ...) -> str: ...


def wait_until(
    condition: Callable[[], T | None],
    timeout: float = 15.0,
    what: str = "condition",
    *,
    interval: float = 0.01,
    processes: Iterable[Watched] = (),
) -> T:
    """Poll ``condition`` every ``interval`` seconds until it returns something truthy (which
    is returned), or fail after ``timeout`` seconds naming ``what`` was awaited. Fails at once,
    with their log, when one of ``processes`` exits first."""
    procs = list(processes)
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for proc in procs:
            assert proc.running, f"{proc.name} exited while waiting for {what}\n{proc.tail()}"
        if time.monotonic() > deadline:
            tails = "".join(f"\n{proc.tail(15)}" for proc in procs)
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{tails}")
        time.sleep(interval)
