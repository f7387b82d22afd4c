"""Throwaway PostgreSQL clusters for fault tests: restart, pause, a streaming replica to fail
over to, settings of their own. Never the shared server.

``initdb`` and ``pg_ctl`` refuse root, so they run as the ``postgres`` OS user (see
``../shared/FAULTS.md``); :func:`unavailable` says why that cannot be done here, for a skip.
Each cluster lives in a temporary folder (data, socket, log) on a free port, listens on
127.0.0.1 with trust authentication, and is stopped and removed by :meth:`PgCluster.destroy`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg

from tests.support.broker import free_port
from tests.support.waits import wait_until

#: Settings every throwaway cluster gets: quick to start and to stop, nothing fsynced (the
#: machine does not crash in these tests; the server does, and its WAL is in the page cache).
BASE_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "60",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] %a '",
}


def bindir() -> Path | None:
    """The newest installed PostgreSQL's ``bin`` folder, if any."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def unavailable() -> str | None:
    """Why a throwaway cluster cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (to run initdb and pg_ctl as the postgres user)"
    if bindir() is None:
        return "no PostgreSQL server binaries under /usr/lib/postgresql"
    if shutil.which("runuser") is None:
        return "no runuser"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres OS user"
    return None


class PgCluster:
    """One throwaway cluster (a primary, or a streaming standby made by :meth:`standby`)."""

    def __init__(self, base: Path, name: str, port: int | None = None) -> None:
        found = bindir()
        assert found is not None, unavailable()
        self.bin = found
        self.base = base
        self.name = name
        self.data = base / name
        self.log = base / f"{name}.log"
        self.port = port or free_port()
        self.paused: list[int] = []

    # -- running pg_ctl and friends as postgres --------------------------------------------------

    def _run(self, *args: str, timeout: float = 60.0) -> str:
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                f"\n{self.log_tail()}"
            )
        return done.stdout

    def pg_ctl(self, *args: str, timeout: float = 60.0) -> str:
        return self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), *args,
            timeout=timeout,
        )  # fmt: skip

    def configure(self, settings: Mapping[str, str]) -> None:
        """Append ``name = value`` lines to postgresql.conf (values as SQL literals); a later
        line overrides an earlier one. Read at the next start (or reload)."""
        with open(self.data / "postgresql.conf", "a") as conf:
            for name, value in settings.items():
                conf.write(f"{name} = {value}\n")

    # -- life cycle ------------------------------------------------------------------------------

    def init(self, settings: Mapping[str, str] | None = None) -> PgCluster:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "--no-sync", "--no-instructions",
        )  # fmt: skip
        self.configure(
            {
                **BASE_SETTINGS,
                "port": str(self.port),
                "unix_socket_directories": f"'{self.base}'",
                **(settings or {}),
            }
        )
        return self

    def start(self) -> PgCluster:
        self.pg_ctl("-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self.resume()
        self.pg_ctl("-w", "-t", "60", "-m", mode, "stop")

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m MODE``: ``fast`` ends every session and checkpoints;
        ``immediate`` kills the server, which recovers from its WAL at the start."""
        self.pg_ctl("-w", "-t", "60", "-m", mode, "restart")

    def promote(self) -> None:
        self.pg_ctl("-w", "-t", "60", "promote")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists() and self._postmaster_alive()

    def _postmaster_alive(self) -> bool:
        try:
            os.kill(self.postmaster_pid(), 0)
        except (OSError, ValueError):
            return False
        return True

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def processes(self) -> list[int]:
        """The postmaster's children (backends and auxiliary processes)."""
        parent = self.postmaster_pid()
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue  # it exited meanwhile
            # Field 4 (after the command name, which may hold spaces) is the parent's pid.
            if int(text[text.rindex(")") + 2 :].split()[1]) == parent:
                found.append(int(stat.parent.name))
        return found

    def pause(self) -> None:
        """SIGSTOP the postmaster (first: it forks no new backend then), then its children."""
        postmaster = self.postmaster_pid()
        os.kill(postmaster, signal.SIGSTOP)
        self.paused = [postmaster]
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                self.paused.append(pid)

    def resume(self) -> None:
        """SIGCONT what :meth:`pause` stopped, children first."""
        for pid in reversed(self.paused):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.paused = []

    def standby(self, name: str, settings: Mapping[str, str] | None = None) -> PgCluster:
        """A streaming replica of this (running) cluster, started: ``pg_basebackup -R``."""
        replica = PgCluster(self.base, name)
        self._run(
            str(self.bin / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.port),
            "-U", "postgres", "-D", str(replica.data), "-R", "-c", "fast", "--no-sync",
            "-X", "stream",
        )  # fmt: skip
        replica.configure(
            {
                "port": str(replica.port),
                "unix_socket_directories": f"'{self.base}'",
                **(settings or {}),
            }
        )
        return replica.start()

    def destroy(self) -> None:
        """Stop it however it is (paused, crashed, stopped); leave its log for the report."""
        self.resume()
        if self.running:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self.pg_ctl("-w", "-t", "30", "-m", "immediate", "stop")
        shutil.rmtree(self.data, ignore_errors=True)

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        return "\n".join(f"  [{self.name} log] {line}" for line in lines)

    # -- connecting ------------------------------------------------------------------------------

    def url(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{dbname}"

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user} connect_timeout=5"

    def connect(self, dbname: str = "postgres", user: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(dbname, user), autocommit=True)

    def execute(self, sql: str, dbname: str = "postgres", user: str = "postgres") -> list[Any]:
        with self.connect(dbname, user) as conn:
            cur = conn.execute(sql.encode())
            return cur.fetchall() if cur.description is not None else []

    def accepts(self) -> bool:
        try:
            self.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def wait_accepting(self, timeout: float = 30.0) -> None:
        wait_until(
            self.accepts, timeout, f"cluster {self.name} to accept connections", interval=0.05
        )


@contextlib.contextmanager
def clusters(prefix: str = "outbox-faults-") -> Iterator[Path]:
    """A temporary folder the postgres user may write in; removed (with every cluster's data
    in it) at the end. Destroy the clusters first."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    owner = pwd.getpwnam("postgres")
    os.chown(base, owner.pw_uid, owner.pw_gid)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def wait_synchronous(primary: PgCluster, timeout: float = 30.0) -> None:
    """Until a standby streams to ``primary`` as its synchronous standby."""

    def sync() -> bool:
        rows = primary.execute("SELECT sync_state FROM pg_stat_replication")
        return any(r[0] == "sync" for r in rows)

    wait_until(sync, timeout, "a synchronous standby", interval=0.05)
