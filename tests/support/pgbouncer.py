"""Debian's PgBouncer in front of the shared PostgreSQL, for the pooler tests.

Each :class:`PgBouncer` runs as the ``postgres`` OS user (PgBouncer refuses root) with an ini
of its own in a temporary folder, on a free loopback port, ``auth_type = trust``, every
database name passed through to the server (``* = host=... port=...``). It is one process
this test started, stopped by its pid. :func:`unavailable` says why it cannot run here, for a
skip (``scripts/test`` installs the package when it can).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import psycopg

from tests.support.broker import free_port
from tests.support.waits import wait_until

#: Where Debian's package puts the program (not on a non-root user's PATH).
DEBIAN_BINARY = "/usr/sbin/pgbouncer"


def binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found is None and os.access(DEBIAN_BINARY, os.X_OK):
        found = DEBIAN_BINARY
    return found


def unavailable() -> str | None:
    """Why PgBouncer cannot be run here (None: it can)."""
    if binary() is None:
        return "not installed (apt-get install pgbouncer; scripts/test does it as root)"
    if os.geteuid() != 0:
        return "needs root (PgBouncer runs as the postgres OS user, and refuses root)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres OS user"
    return None


class PgBouncer:
    """One PgBouncer in ``pool_mode`` in front of ``upstream`` (host, port) for ``user``.

    ``ignore_options``: accept (and drop) the ``options`` startup parameter, which the relay
    and ``outbox consume`` send; without it PgBouncer refuses their connections. ``settings``
    are more ``[pgbouncer]`` lines (``server_round_robin``, ``default_pool_size``, ...)."""

    def __init__(
        self,
        pool_mode: str,
        upstream: tuple[str, int],
        user: str,
        *,
        ignore_options: bool = True,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.pool_mode = pool_mode
        self.upstream = upstream
        self.user = user
        self.ignore_options = ignore_options
        self.settings = dict(settings or {})
        self.port = free_port()
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, dbname: str) -> str:
        """A SQLAlchemy URL of ``dbname`` through this pool."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> PgBouncer:
        program = binary()
        assert program is not None, unavailable()
        owner = pwd.getpwnam("postgres")
        self.dir = Path(tempfile.mkdtemp(prefix=f"outbox-pgbouncer-{self.pool_mode}-"))
        host, port = self.upstream
        lines = [
            "[databases]",
            f"* = host={host} port={port}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {self.dir / 'userlist.txt'}",
            f"pool_mode = {self.pool_mode}",
            f"logfile = {self.dir / 'pgbouncer.log'}",
            f"admin_users = {self.user}",
        ]
        if self.ignore_options:
            lines.append("ignore_startup_parameters = options")
        lines += [f"{name} = {value}" for name, value in self.settings.items()]
        (self.dir / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        (self.dir / "userlist.txt").write_text(f'"{self.user}" ""\n')
        for path in (self.dir, *self.dir.iterdir()):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        self.proc = subprocess.Popen(
            [program, str(self.dir / "pgbouncer.ini")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=owner.pw_uid,
            group=owner.pw_gid,
            extra_groups=[],
            cwd=self.dir,
        )
        wait_until(self._accepts, 15, f"pgbouncer ({self.pool_mode}) on port {self.port}")
        return self

    def _accepts(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, f"pgbouncer exited\n{self.log_tail()}"
        try:
            # The admin console answers without a server connection.
            with psycopg.connect(
                f"host=127.0.0.1 port={self.port} dbname=pgbouncer user={self.user}",
                autocommit=True,
                connect_timeout=2,
            ):
                return True
        except psycopg.Error:
            return False

    def stop(self) -> None:
        """SIGTERM (PgBouncer 1.18: immediate shutdown), then SIGKILL; the folder goes too."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 30) -> str:
        if self.dir is None:
            return ""
        try:
            lines = (self.dir / "pgbouncer.log").read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        return "\n".join(f"  [pgbouncer] {line}" for line in lines)
