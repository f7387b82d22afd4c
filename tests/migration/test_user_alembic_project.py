"""The outbox revisions run from the user's own Alembic project: ``version_locations`` lists
the project's versions folder and :func:`outbox.migrate.versions_dir`; the outbox branch is
recorded in the project's own ``alembic_version`` table (both revisions, ``outbox_0001`` the
outbox table and ``outbox_0002`` the inbox, are on it); ``outbox_table`` / ``outbox_schema`` /
``outbox_inbox_table`` in the ``[alembic]`` section choose the names.

(The ``outbox:_migrations/versions`` package-resource form only resolves in an installed
wheel: see ``test_wheel.py``.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.util import CommandError

from outbox import migrate
from outbox.schema import DEFAULT_INBOX_TABLE, DEFAULT_TABLE
from tests.migration.support import scalars, tables_in, user_project

ALEMBIC = Path(sys.executable).with_name("alembic")
FIRST = "outbox_0001"
HEAD = "outbox_0002"
OUTBOX = {f"public.{DEFAULT_TABLE}", f"public.{DEFAULT_INBOX_TABLE}"}


def _versions(url: str) -> set[str]:
    return set(scalars(url, "SELECT version_num FROM public.alembic_version"))


def _alembic(ini: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ALEMBIC), "-c", str(ini), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ini.parent,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )


def test_outbox_branch_in_user_project(tmp_path: Path, empty_db_url: str) -> None:
    url = empty_db_url
    ini = user_project(
        tmp_path,
        url,
        version_locations=f"%(here)s/migrations/versions {migrate.versions_dir()}",
    )
    cfg = Config(str(ini))

    # Only the outbox's branch.
    command.upgrade(cfg, "outbox@head")
    assert tables_in(url) == {*OUTBOX, "public.alembic_version"}
    assert _versions(url) == {HEAD}

    # Everything: the user's branch joins; the outbox's own version table is never made.
    command.upgrade(cfg, "heads")
    assert tables_in(url) == {*OUTBOX, "public.alembic_version", "public.users"}
    assert _versions(url) == {HEAD, "app_0001"}
    assert migrate.current(url) is None  # `outbox db` keeps its own, separate version table

    # The user's metadata declares the outbox tables with define_tables(): `alembic check` sees
    # no difference between them and what the revisions built.
    command.check(cfg)

    # One step down the outbox branch removes only the inbox.
    command.downgrade(cfg, "outbox@-1")
    assert tables_in(url) == {f"public.{DEFAULT_TABLE}", "public.alembic_version", "public.users"}
    assert _versions(url) == {FIRST, "app_0001"}

    # The outbox branch comes off on its own.
    command.downgrade(cfg, "outbox@base")
    assert tables_in(url) == {"public.alembic_version", "public.users"}
    assert _versions(url) == {"app_0001"}

    # And back, through the `alembic` command line.
    proc = _alembic(ini, "upgrade", "heads")
    assert proc.returncode == 0, proc.stderr
    assert _versions(url) == {HEAD, "app_0001"}
    assert tables_in(url) == {*OUTBOX, "public.alembic_version", "public.users"}
    proc = _alembic(ini, "heads")
    assert proc.returncode == 0, proc.stderr
    assert f"{HEAD} (outbox) (head)" in proc.stdout
    assert "app_0001 (app) (head)" in proc.stdout
    proc = _alembic(ini, "history")
    assert proc.returncode == 0, proc.stderr
    assert f"{FIRST} -> {HEAD} (outbox) (head)" in proc.stdout
    assert f"<base> -> {FIRST} (outbox)," in proc.stdout


def test_outbox_installed_before_the_inbox(tmp_path: Path, empty_db_url: str) -> None:
    """A project that applied ``outbox_0001`` before the inbox existed gets the inbox from
    ``outbox@head``, and ``alembic check`` is clean again."""
    url = empty_db_url
    ini = user_project(
        tmp_path,
        url,
        version_locations=f"%(here)s/migrations/versions {migrate.versions_dir()}",
    )
    cfg = Config(str(ini))
    command.upgrade(cfg, "app@head")
    command.upgrade(cfg, FIRST)
    assert tables_in(url) == {f"public.{DEFAULT_TABLE}", "public.alembic_version", "public.users"}
    assert _versions(url) == {FIRST, "app_0001"}
    # The outbox branch has a revision to apply: `alembic check` says so.
    proc = _alembic(ini, "check")
    assert proc.returncode != 0
    assert "not up to date" in proc.stdout + proc.stderr

    command.upgrade(cfg, "outbox@head")
    assert tables_in(url) == {*OUTBOX, "public.alembic_version", "public.users"}
    assert _versions(url) == {HEAD, "app_0001"}
    command.check(cfg)


def test_names_from_alembic_ini(tmp_path: Path, empty_db_url: str) -> None:
    url = empty_db_url
    ini = user_project(
        tmp_path,
        url,
        version_locations=f"%(here)s/migrations/versions {migrate.versions_dir()}",
        extra=(
            "outbox_table = events_out\noutbox_schema = messaging\noutbox_inbox_table = events_in\n"
        ),
    )
    proc = _alembic(ini, "upgrade", "heads")
    assert proc.returncode == 0, proc.stderr
    # The schema is made by the revision; the version table stays the project's own.
    assert tables_in(url) == {
        "messaging.events_out",
        "messaging.events_in",
        "public.alembic_version",
        "public.users",
    }
    assert _versions(url) == {HEAD, "app_0001"}
    command.check(Config(str(ini)))

    command.downgrade(Config(str(ini)), "outbox@-1")
    assert tables_in(url) == {"messaging.events_out", "public.alembic_version", "public.users"}
    command.downgrade(Config(str(ini)), "outbox@base")
    assert tables_in(url) == {"public.alembic_version", "public.users"}


def test_os_path_separator_with_absolute_paths(tmp_path: Path, empty_db_url: str) -> None:
    """``path_separator = os`` (':' here) works with absolute paths."""
    ini = user_project(
        tmp_path,
        empty_db_url,
        version_locations=f"%(here)s/migrations/versions:{migrate.versions_dir()}",
        path_separator="os",
    )
    command.upgrade(Config(str(ini)), "outbox@head")
    assert _versions(empty_db_url) == {HEAD}


def test_missing_location_is_silently_skipped(tmp_path: Path, empty_db_url: str) -> None:
    """Alembic ignores a version location that does not exist: the outbox branch is then
    simply unknown. In a source checkout (editable install) the package-resource form points
    at ``outbox/_migrations``, which only the wheel has."""
    ini = user_project(
        tmp_path,
        empty_db_url,
        version_locations="%(here)s/migrations/versions outbox:_migrations/versions",
    )
    if (Path(migrate.__file__).parent / "_migrations").is_dir():
        pytest.skip("outbox is installed from a wheel here")
    cfg = Config(str(ini))
    with pytest.raises(CommandError, match="outbox"):
        command.upgrade(cfg, "outbox@head")
    command.upgrade(cfg, "heads")
    assert _versions(empty_db_url) == {"app_0001"}
    assert tables_in(empty_db_url) == {"public.alembic_version", "public.users"}
