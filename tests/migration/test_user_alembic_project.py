"""The outbox revisions run from the user's own Alembic project: ``version_locations`` lists
the project's versions folder and :func:`outbox.migrate.versions_dir`; the outbox branch is
recorded in the project's own ``alembic_version`` table (all its revisions, ``outbox_0001`` the
outbox table, ``outbox_0002`` the inbox, ``outbox_0003`` their autovacuum settings,
``outbox_0004`` the ordered header arrays, ``outbox_0005`` the relays' leader epoch table,
``outbox_0006`` the audit table and the failure times, are
on it);
``outbox_table`` / ``outbox_schema`` / ``outbox_inbox_table`` in the ``[alembic]`` section choose
the names.

The user's own revisions (``alembic revision --autogenerate``) go to the user's folder and
branch, never into the package: the set-up of the how-to, with
:func:`outbox.migrate.process_revision_directives` in env.py.

(The ``outbox:_migrations/versions`` package-resource form only resolves in an installed
wheel: see ``test_wheel.py``.)
"""

from __future__ import annotations

import re
import runpy
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.util import CommandError

from outbox import migrate
from outbox.schema import DEFAULT_INBOX_TABLE, DEFAULT_TABLE
from tests.support.cli import run_cli
from tests.support.migration import (
    APP_MODELS,
    CUSTOMERS,
    app_project,
    scalars,
    tables_in,
    user_project,
)

FIRST = "outbox_0001"
INBOX = "outbox_0002"
AUTOVACUUM = "outbox_0003"
HEADERS = "outbox_0004"
LEADER = "outbox_0005"
HEAD = "outbox_0006"
OUTBOX = {
    f"public.{DEFAULT_TABLE}",
    f"public.{DEFAULT_INBOX_TABLE}",
    f"public.{DEFAULT_TABLE}_leader",
    f"public.{DEFAULT_TABLE}_audit",
}
#: The outbox's tables before revision outbox_0006.
OUTBOX_WITHOUT_AUDIT = OUTBOX - {f"public.{DEFAULT_TABLE}_audit"}
#: The outbox's tables before revision outbox_0005.
OUTBOX_WITHOUT_LEADER = {f"public.{DEFAULT_TABLE}", f"public.{DEFAULT_INBOX_TABLE}"}


def _versions(url: str) -> set[str]:
    return set(scalars(url, "SELECT version_num FROM public.alembic_version"))


def _alembic(ini: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("alembic", ["-c", str(ini), *args], cwd=ini.parent)


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
    assert scalars(url, f"SELECT count(epoch) FROM {DEFAULT_TABLE}_leader") == [1]

    # Everything: the user's branch joins; the outbox's own version table is never made.
    command.upgrade(cfg, "heads")
    assert tables_in(url) == {*OUTBOX, "public.alembic_version", "public.users"}
    assert _versions(url) == {HEAD, "app_0001"}
    assert migrate.current(url) is None  # `outbox db` keeps its own, separate version table

    # The user's metadata declares the outbox tables with define_tables(): `alembic check` sees
    # no difference between them and what the revisions built.
    command.check(cfg)

    # One step down the outbox branch removes the audit table and the failure times, the next
    # the leader table, the next turns the header arrays back into jsonb, the next resets the
    # autovacuum settings; the next removes only the inbox.
    command.downgrade(cfg, "outbox@-1")
    assert tables_in(url) == {*OUTBOX_WITHOUT_AUDIT, "public.alembic_version", "public.users"}
    assert _versions(url) == {LEADER, "app_0001"}
    command.downgrade(cfg, "outbox@-1")
    assert tables_in(url) == {*OUTBOX_WITHOUT_LEADER, "public.alembic_version", "public.users"}
    assert _versions(url) == {HEADERS, "app_0001"}
    command.downgrade(cfg, "outbox@-1")
    assert _versions(url) == {AUTOVACUUM, "app_0001"}
    command.downgrade(cfg, "outbox@-1")
    assert tables_in(url) == {*OUTBOX_WITHOUT_LEADER, "public.alembic_version", "public.users"}
    assert _versions(url) == {INBOX, "app_0001"}
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
    assert f"{LEADER} -> {HEAD} (outbox) (head)" in proc.stdout
    assert f"{HEADERS} -> {LEADER} (outbox)," in proc.stdout
    assert f"{AUTOVACUUM} -> {HEADERS} (outbox)," in proc.stdout
    assert f"{INBOX} -> {AUTOVACUUM} (outbox)," in proc.stdout
    assert f"{FIRST} -> {INBOX} (outbox)," in proc.stdout
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
        "messaging.events_out_leader",
        "messaging.events_out_audit",
        "public.alembic_version",
        "public.users",
    }
    assert _versions(url) == {HEAD, "app_0001"}
    command.check(Config(str(ini)))

    command.downgrade(Config(str(ini)), "outbox@-2")
    assert tables_in(url) == {
        "messaging.events_out",
        "messaging.events_in",
        "public.alembic_version",
        "public.users",
    }
    command.downgrade(Config(str(ini)), "outbox@-3")
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


# --- the user's own revisions -----------------------------------------------------------------


@pytest.fixture
def package_untouched() -> Iterator[None]:
    """The package's versions folder has the same revisions after the test (one that a failing
    test writes there is removed, and fails the test)."""
    folder = migrate.versions_dir()
    before = set(folder.glob("*.py"))
    yield
    added = set(folder.glob("*.py")) - before
    for path in added:
        path.unlink()
    assert not added, f"written into the package's versions folder: {sorted(added)}"


def _new_files(folder: Path, known: set[Path]) -> list[Path]:
    return sorted(p for p in folder.glob("*.py") if p not in known)


def _ops(source: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(operation, table) of every ``op.`` call in upgrade() and in downgrade()."""
    upgrade, _, downgrade = source.partition("def downgrade(")
    call = re.compile(r"op\.(\w+)\(\s*['\"](\w+)['\"]")
    return call.findall(upgrade.partition("def upgrade(")[2]), call.findall(downgrade)


@pytest.mark.usefixtures("package_untouched")
def test_autogenerate_writes_to_the_users_branch(tmp_path: Path, empty_db_url: str) -> None:
    """``alembic revision --autogenerate -m orders`` in a project set up as the how-to says: the
    revision is the user's (folder, branch), holds only the user's table, and ``alembic upgrade
    heads`` applies it with the outbox's revisions."""
    url = empty_db_url
    ini = app_project(tmp_path, url)
    mine = tmp_path / "migrations" / "versions"
    package = migrate.versions_dir()
    shipped = set(package.glob("*.py"))

    proc = _alembic(ini, "upgrade", "heads")
    assert proc.returncode == 0, proc.stderr
    assert _versions(url) == {HEAD}

    # The command of the issue. The only head is the outbox's: Alembic would base the revision
    # on it and write it next to it, into the package. The outbox's hook refuses, and says what
    # to do; nothing is written anywhere. Same for a plain (not autogenerated) revision.
    for args in (["--autogenerate", "-m", "orders"], ["-m", "orders"]):
        proc = _alembic(ini, "revision", *args)
        assert proc.returncode != 0, args
        said = " ".join((proc.stdout + proc.stderr).split())  # as Alembic prints it: FAILED: ...
        assert f"based on {HEAD}, on the 'outbox' branch" in said, said
        assert str(package) in said
        assert "--head base --branch-label app" in said
        assert _new_files(mine, set()) == []
        assert set(package.glob("*.py")) == shipped

    # The user's first revision starts the user's branch, in the user's folder (the first of
    # version_locations), and holds only the user's table: the declared outbox tables are
    # neither dropped nor re-created.
    proc = _alembic(
        ini, "revision", "--autogenerate", "-m", "orders", "--head", "base", "--branch-label", "app"
    )
    assert proc.returncode == 0, proc.stderr
    (orders,) = _new_files(mine, set())
    assert set(package.glob("*.py")) == shipped
    first = runpy.run_path(str(orders))
    assert first["down_revision"] is None
    assert first["branch_labels"] == ("app",)
    assert _ops(orders.read_text()) == ([("create_table", "orders")], [("drop_table", "orders")])

    # Both branches apply.
    proc = _alembic(ini, "upgrade", "heads")
    assert proc.returncode == 0, proc.stderr
    assert _versions(url) == {HEAD, first["revision"]}
    assert tables_in(url) == {*OUTBOX, "public.alembic_version", "public.orders"}

    # The next revisions go on the user's branch (`--head app@head`: with two heads, Alembic
    # wants to be told which), in the user's folder.
    (tmp_path / "app_models.py").write_text(APP_MODELS + CUSTOMERS)
    proc = _alembic(ini, "revision", "--autogenerate", "-m", "customers", "--head", "app@head")
    assert proc.returncode == 0, proc.stderr
    (customers,) = _new_files(mine, {orders})
    assert set(package.glob("*.py")) == shipped
    second = runpy.run_path(str(customers))
    assert second["down_revision"] == first["revision"]
    assert second["branch_labels"] is None
    assert _ops(customers.read_text()) == (
        [("create_table", "customers")],
        [("drop_table", "customers")],
    )

    proc = _alembic(ini, "upgrade", "heads")
    assert proc.returncode == 0, proc.stderr
    assert _versions(url) == {HEAD, second["revision"]}
    assert tables_in(url) == {
        *OUTBOX,
        "public.alembic_version",
        "public.orders",
        "public.customers",
    }
    proc = _alembic(ini, "check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.usefixtures("package_untouched")
@pytest.mark.parametrize(
    ("head", "splice", "branch_label", "folder", "message"),
    [
        # Based on the outbox's branch, even when written into the user's folder.
        ("outbox@head", False, None, "user", f"based on {HEAD}, on the 'outbox' branch"),
        (INBOX, True, None, "user", f"based on {INBOX}, on the 'outbox' branch"),
        # Written into the package's folder, even as a branch of its own.
        ("base", False, "mine", "package", "lost when the package is reinstalled"),
    ],
    ids=["outbox-head", "outbox-revision", "package-folder"],
)
def test_revision_guard_refuses(
    tmp_path: Path,
    empty_db_url: str,
    head: str,
    splice: bool,
    branch_label: str | None,
    folder: str,
    message: str,
) -> None:
    """Any revision based on the outbox's branch, or written into the package, is refused."""
    ini = user_project(
        tmp_path,
        empty_db_url,
        version_locations=f"%(here)s/migrations/versions {migrate.versions_dir()}",
        extra="revision_environment = true\n",
    )
    mine = tmp_path / "migrations" / "versions"
    before = set(mine.iterdir())
    with pytest.raises(CommandError, match=message):
        command.revision(
            Config(str(ini)),
            message="mine",
            head=head,
            splice=splice,
            branch_label=branch_label,
            version_path=str(mine if folder == "user" else migrate.versions_dir()),
            process_revision_directives=migrate.process_revision_directives,
        )
    assert set(mine.iterdir()) == before
