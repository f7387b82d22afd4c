"""The real ``outbox-relay`` command as a long-running subprocess (see
:class:`tests.support.cli.CliProcess`); for a run to completion, use
``run_cli("outbox-relay", ARGS)``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tests.support.cli import CliProcess


class RelayProcess(CliProcess):
    """One ``outbox-relay ARGS`` subprocess; its log is read as it comes."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        name: str = "relay",
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__("outbox-relay", args, name=name, log_path=log_path, env=env)

    def start(self) -> RelayProcess:
        super().start()
        return self
