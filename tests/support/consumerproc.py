"""Run the real ``outbox consume`` command as a subprocess (see :mod:`tests.support.relayproc`
for the log-reading machinery it shares), and read its summary line."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from tests.support.relayproc import RelayProcess, relay_env

#: The repository root, so that ``tests.acceptance.handlers:...`` imports in the subprocess.
ROOT = Path(__file__).resolve().parents[2]

#: The consumer's last line on a clean exit.
SUMMARY = r"^processed (\d+), duplicates (\d+), dead-lettered (\d+)$"
#: Debug line for each redelivered message the inbox skipped.
DUPLICATE = r"outbox\.consumer: duplicate skipped"


def consume_command() -> list[str]:
    """``outbox consume`` of the running interpreter's environment (the installed script)."""
    beside = Path(sys.executable).with_name("outbox")
    if beside.exists():
        return [str(beside), "consume"]
    found = shutil.which("outbox")
    if found is None:
        raise RuntimeError("the outbox command is not installed in this environment")
    return [found, "consume"]


def consumer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = relay_env(extra)
    env["PYTHONPATH"] = str(ROOT)
    return env


@dataclasses.dataclass(frozen=True)
class Summary:
    processed: int
    duplicates: int
    dead_lettered: int


class ConsumerProcess(RelayProcess):
    """One ``outbox consume ARGS`` subprocess; its stderr (the log) is read as it comes."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        name: str = "consumer",
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(args, name=name, log_path=log_path, env=env)

    def start(self) -> ConsumerProcess:
        self.proc = subprocess.Popen(
            [*consume_command(), *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=consumer_env(self.env),
            cwd=ROOT,
        )
        self._reader = threading.Thread(
            target=self._read, args=(self.proc.stdout,), name=f"{self.name}-log", daemon=True
        )
        self._reader.start()
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
