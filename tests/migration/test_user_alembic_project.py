"""The outbox revisions run from the user's own Alembic project: ``version_locations`` lists
the project's versions folder and :func:`outbox.migrate.versions_dir`; the outbox branch is
recorded in the project's own ``alembic_version`` table; ``outbox_table`` / ``outbox_schema``
in the ``[alembic]`` section choose the names.

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
from outbox.schema import DEFAULT_TABLE
from tests.migration.support import scalars, tables_in, user_project

ALEMBIC = Path(sys.executable).with_name("alembic")


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
    assert tables_in(url) == {f"public.{DEFAULT_TABLE}", "public.alembic_version"}
    assert _versions(url) == {"outbox_0001"}

    # Everything: the user's branch joins; the outbox's own version table is never made.
    command.upgrade(cfg, "heads")
    assert tables_in(url) == {f"public.{DEFAULT_TABLE}", "public.alembic_version", "public.users"}
    assert _versions(url) == {"outbox_0001", "app_0001"}
    assert migrate.current(url) is None  # `outbox db` keeps its own, separate version table

    # The user's metadata declares the outbox table with define_tables(): `alembic check` sees
    # no difference between it and what the revisions built.
    command.check(cfg)

    # The outbox branch comes off on its own.
    command.downgrade(cfg, "outbox@base")
    assert tables_in(url) == {"public.alembic_version", "public.users"}
    assert _versions(url) == {"app_0001"}

    # And back, through the `alembic` command line.
    proc = _alembic(ini, "upgrade", "heads")
    assert proc.returncode == 0, proc.stderr
    assert _versions(url) == {"outbox_0001", "app_0001"}
    proc = _alembic(ini, "heads")
    assert proc.returncode == 0, proc.stderr
    assert "outbox_0001 (outbox) (head)" in proc.stdout
    assert "app_0001 (app) (head)" in proc.stdout


def test_names_from_alembic_ini(tmp_path: Path, empty_db_url: str) -> None:
    url = empty_db_url
    ini = user_project(
        tmp_path,
        url,
        version_locations=f"%(here)s/migrations/versions {migrate.versions_dir()}",
        extra="outbox_table = events_out\noutbox_schema = messaging\n",
    )
    proc = _alembic(ini, "upgrade", "heads")
    assert proc.returncode == 0, proc.stderr
    # The schema is made by the revision; the version table stays the project's own.
    assert tables_in(url) == {"messaging.events_out", "public.alembic_version", "public.users"}
    assert _versions(url) == {"outbox_0001", "app_0001"}
    command.check(Config(str(ini)))

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
    assert _versions(empty_db_url) == {"outbox_0001"}


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
