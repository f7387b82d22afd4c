"""Run commands the way a user does: :func:`run_cli` for one that runs to completion,
:class:`CliProcess` for a long-running one whose log is read as it comes (start it, wait for a
line, send it signals, measure its CPU time).

Every command gets the same environment (:func:`cli_env`): the test's own without any
``OUTBOX_*`` setting (only the arguments count, unless the test passes some), without
``PYTHONPATH`` (the installed scripts must work on their own; ``import_tests`` adds the
repository root, for ``--handler tests.support.handlers:...``), unbuffered.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from click.testing import CliRunner

#: The repository root.
ROOT = Path(__file__).resolve().parents[2]


def command(program: str) -> list[str]:
    """``program`` as the start of an argv: a path is used as it is; a name is the console
    script installed beside the running interpreter (``outbox``, ``outbox-relay``,
    ``alembic``), or else found on ``PATH``."""
    if os.sep in program:
        return [program]
    beside = Path(sys.executable).with_name(program)
    if beside.exists():
        return [str(beside)]
    found = shutil.which(program)
    if found is None:
        raise RuntimeError(f"{program} is not installed in this environment")
    return [found]


def cli_env(extra: dict[str, str] | None = None, *, import_tests: bool = False) -> dict[str, str]:
    """The environment of every command the tests run (see the module's docstring)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OUTBOX_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    if import_tests:
        env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


def run_cli(
    program: str,
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    cwd: Path | None = None,
    import_tests: bool = False,
    in_process: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``program ARGS`` to completion and return its status and output (text); a non-zero
    status is not an error. ``env`` is added to :func:`cli_env`.

    ``in_process`` runs the console script's click command in this process (click's
    ``CliRunner``) instead: much faster, for the quick commands that neither set up logging nor
    install signal handlers (``outbox db ...``, ``outbox status``, ``outbox inbox purge``).
    """
    if in_process:
        if cwd is not None or import_tests:
            raise ValueError("cwd and import_tests need a subprocess")
        return _invoke(program, args, env)
    return subprocess.run(
        [*command(program), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(env, import_tests=import_tests),
        cwd=cwd,
        check=False,
    )


def _invoke(
    program: str, args: Sequence[str], env: dict[str, str] | None
) -> subprocess.CompletedProcess[str]:
    # The console scripts (outbox._entry) wrap these click commands.
    from outbox import cli as commands

    cli = {"outbox": commands.main, "outbox-relay": commands.relay_main}[program]
    # As in cli_env: no OUTBOX_* setting of the test's own environment, then the test's.
    overrides: dict[str, str | None] = {k: None for k in os.environ if k.startswith("OUTBOX_")}
    overrides.update(env or {})
    result = CliRunner().invoke(cli, list(args), env=overrides, catch_exceptions=False)
    return subprocess.CompletedProcess(
        [program, *args], result.exit_code, result.stdout, result.stderr
    )


class CliProcess:
    """One long-running ``program ARGS`` subprocess. Its output (stdout and stderr: the log) is
    collected line by line; every line is also appended to ``log_path`` when given."""

    _CLK_TCK = os.sysconf("SC_CLK_TCK")

    def __init__(
        self,
        program: str,
        args: Sequence[str],
        *,
        name: str,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        import_tests: bool = False,
        cwd: Path | None = None,
    ) -> None:
        self.program = program
        self.args = list(args)
        self.name = name
        self.log_path = log_path
        self.env = env
        self.import_tests = import_tests
        self.cwd = cwd
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> CliProcess:
        self.proc = subprocess.Popen(
            [*command(self.program), *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=cli_env(self.env, import_tests=self.import_tests),
            cwd=self.cwd,
        )
        assert self.proc.stdout is not None
        self._reader = threading.Thread(
            target=self._read, args=(self.proc.stdout,), name=f"{self.name}-log", daemon=True
        )
        self._reader.start()
        return self

    def _read(self, stream: IO[str]) -> None:
        log = open(self.log_path, "a") if self.log_path else None  # noqa: SIM115
        try:
            for raw in stream:
                line = raw.rstrip("\n")
                if log is not None:
                    log.write(f"[{self.name}] {line}\n")
                    log.flush()
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        finally:
            if log is not None:
                log.close()
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> int:
        """SIGKILL and reap it; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.wait(10)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and its log to be read to the end."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s\n{self.tail()}"
            ) from None
        if self._reader is not None:
            self._reader.join(10)
        return rc

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time. For teardown."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.wait(10)

    # -- log ------------------------------------------------------------------------------------

    def mark(self) -> int:
        """The number of lines seen so far: pass it as ``after`` to look only at newer ones."""
        with self._cond:
            return len(self.lines)

    def matches(self, pattern: str, *, after: int = 0) -> list[str]:
        rx = re.compile(pattern)
        with self._cond:
            return [line for line in self.lines[after:] if rx.search(line)]

    def count(self, pattern: str, *, after: int = 0) -> int:
        return len(self.matches(pattern, after=after))

    def wait_for(self, pattern: str, *, timeout: float = 30.0, after: int = 0) -> int:
        """Wait for a log line matching ``pattern`` (a regex) among the lines from ``after``
        on; return the index just past it. Fails early when the process exits."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        pos = after
        with self._cond:
            while True:
                while pos < len(self.lines):
                    pos += 1
                    if rx.search(self.lines[pos - 1]):
                        return pos
                if self._closed:
                    raise AssertionError(
                        f"{self.name} exited (status {self.proc and self.proc.poll()}) before "
                        f"logging {pattern!r}\n{self._tail_locked()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.name} did not log {pattern!r} within {timeout}s\n"
                        f"{self._tail_locked()}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return self._tail_locked(n)

    def _tail_locked(self, n: int = 40) -> str:
        return "\n".join(f"  [{self.name}] {line}" for line in self.lines[-n:])

    # -- resources ------------------------------------------------------------------------------

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (from /proc/PID/stat)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        # The command name (field 2) may contain spaces; fields after it are space-separated.
        fields = stat[stat.rindex(")") + 2 :].split()
        utime, stime = int(fields[11]), int(fields[12])
        return (utime + stime) / self._CLK_TCK
