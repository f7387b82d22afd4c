"""Console-script entry points. They install SIGTERM/SIGINT handlers before anything heavy
is imported (SQLAlchemy, psycopg, librdkafka take a few hundred milliseconds): a signal that
arrives while the command starts is remembered and stops it cleanly (exit 0) instead of
killing it with status -15. ``outbox/__init__.py`` imports lazily so that this runs first."""

from __future__ import annotations

import signal
import types

#: Signals received before the command installed its own handlers.
received: list[int] = []


def _remember(signum: int, _frame: types.FrameType | None) -> None:
    received.append(signum)


def _catch_early() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _remember)


def main() -> None:
    """``outbox``."""
    _catch_early()
    from outbox.cli import main as command

    command()


def relay_main() -> None:
    """``outbox-relay``."""
    _catch_early()
    from outbox.cli import relay_main as command

    command()
