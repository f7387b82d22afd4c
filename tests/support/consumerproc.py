"""The real ``outbox consume`` command as a long-running subprocess (see
:class:`tests.support.cli.CliProcess`), and its summary line."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

from tests.support.cli import ROOT, CliProcess
from tests.support.events import event

#: The consumer's last line on a clean exit.
SUMMARY = r"^processed (\d+), duplicates (\d+), dead-lettered (\d+)$"
#: Debug line for each redelivered message the inbox skipped.
DUPLICATE = event("consumer.duplicate")


@dataclasses.dataclass(frozen=True)
class Summary:
    processed: int
    duplicates: int
    dead_lettered: int


class ConsumerProcess(CliProcess):
    """One ``outbox consume ARGS`` subprocess; its log is read as it comes. It can import
    ``tests.support.handlers:...``."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        name: str = "consumer",
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            "outbox",
            ["consume", *args],
            name=name,
            log_path=log_path,
            env=env,
            import_tests=True,
            cwd=ROOT,
        )

    def start(self) -> ConsumerProcess:
        super().start()
        return self

    def summary(self) -> Summary:
        """The ``processed N, duplicates M, dead-lettered K`` line (after a clean exit)."""
        lines = self.matches(SUMMARY)
        assert len(lines) == 1, f"{self.name}: no summary line\n{self.tail()}"
        match = re.match(SUMMARY, lines[0])
        assert match is not None
        return Summary(*(int(g) for g in match.groups()))

    def duplicates_logged(self) -> int:
        """Redeliveries the inbox skipped, from the debug log (also after a SIGKILL)."""
        return self.count(DUPLICATE)
