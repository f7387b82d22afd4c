"""The built wheel ships the revisions and installs the tables from a clean environment.

The wheel is built from the checkout (``python -m build --wheel``, isolated build environment;
``--no-isolation`` as a fallback when hatchling is importable), installed with ``--no-deps``
into a fresh venv that sees the project venv's dependencies through a ``.pth`` file (so the
``outbox`` it imports is the wheel's copy, not the checkout), then used from that venv.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.migration import app_project, scalars, tables_in, user_project

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HEAD = "outbox_0006"
REVISIONS = (
    "outbox_0001_messages.py",
    "outbox_0002_inbox.py",
    "outbox_0003_autovacuum.py",
    "outbox_0004_header_list.py",
    "outbox_0005_leader_epoch.py",
    "outbox_0006_audit.py",
)
CUSTOM = ("--table", "events_out", "--schema", "msg", "--inbox-table", "events_in")
OUTBOX_TABLES = {
    "public.outbox_messages",
    "public.outbox_inbox",
    "public.outbox_messages_leader",
    "public.outbox_messages_audit",
}


def _artifacts() -> set[Path]:
    return {p for name in ("build", "dist", "*.egg-info") for p in REPO.glob(name)}


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``args[0]`` (a path) with the other arguments; without PYTHONPATH, VIRTUAL_ENV or the
    user's site-packages (see tests.support.cli)."""
    return run_cli(args[0], args[1:], cwd=cwd, timeout=timeout)


@dataclass(frozen=True)
class WheelVenv:
    wheel: Path
    root: Path

    @property
    def python(self) -> str:
        return str(self.root / "bin" / "python")

    @property
    def outbox(self) -> str:
        return str(self.root / "bin" / "outbox")


def _build_wheel(outdir: Path, cwd: Path) -> Path:
    cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", str(outdir), str(REPO)]
    proc = _run(cmd, cwd, timeout=300)
    if proc.returncode != 0 and importlib.util.find_spec("hatchling") is not None:
        proc = _run([*cmd, "--no-isolation"], cwd, timeout=300)
    assert proc.returncode == 0, f"wheel build failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(outdir.glob("sqlalchemy_outbox-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WheelVenv]:
    tmp = tmp_path_factory.mktemp("wheel")
    before = _artifacts()
    wheel = _build_wheel(tmp / "dist", tmp)
    assert _artifacts() <= before, "the build left artifacts in the repository"

    root = tmp / "venv"
    proc = _run([sys.executable, "-m", "venv", "--without-pip", str(root)], tmp)
    assert proc.returncode == 0, proc.stderr
    venv = WheelVenv(wheel=wheel, root=root)
    proc = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            venv.python,
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(wheel),
        ],
        tmp,
    )
    assert proc.returncode == 0, proc.stderr
    # The dependencies (SQLAlchemy, Alembic, psycopg, click, ...) from the project venv, after
    # the new venv's own site-packages: `outbox` still comes from the wheel.
    purelib = _run(
        [venv.python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp
    ).stdout.strip()
    Path(purelib, "_project_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    yield venv


def test_wheel_contents(wheel_venv: WheelVenv) -> None:
    with zipfile.ZipFile(wheel_venv.wheel) as zf:
        names = set(zf.namelist())
        for src in sorted((REPO / "migrations").rglob("*")):
            if src.is_file() and "__pycache__" not in src.parts:
                packaged = "outbox/_migrations/" + src.relative_to(REPO / "migrations").as_posix()
                assert packaged in names, f"{packaged} missing from the wheel"
                assert zf.read(packaged) == src.read_bytes(), f"{packaged} differs from source"
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = zf.read(entry_points).decode()
    assert "outbox/_migrations/env.py" in names
    for revision in REVISIONS:
        assert f"outbox/_migrations/versions/{revision}" in names
    assert "outbox/py.typed" in names
    assert not any(n.startswith(("migrations/", "tests/")) for n in names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert "outbox = outbox._entry:main" in scripts
    assert "outbox-relay = outbox._entry:relay_main" in scripts


def test_wheel_installs_tables(wheel_venv: WheelVenv, empty_db_url: str, tmp_path: Path) -> None:
    site = wheel_venv.root.resolve()
    probe = textwrap.dedent(
        """
        import outbox, outbox.migrate
        print(outbox.__file__)
        print(outbox.migrate.script_dir())
        print(outbox.migrate.versions_dir())
        """
    )
    proc = _run([wheel_venv.python, "-c", probe], tmp_path)
    assert proc.returncode == 0, proc.stderr
    module, script_dir, versions_dir = (Path(line) for line in proc.stdout.split())
    assert module.is_relative_to(site), module
    assert script_dir.is_relative_to(site), script_dir
    assert script_dir.name == "_migrations"
    for revision in REVISIONS:
        assert (versions_dir / revision).is_file()

    proc = _run([wheel_venv.outbox, "db", "versions-dir"], tmp_path)
    assert (proc.returncode, proc.stdout.strip()) == (0, str(versions_dir))

    proc = _run([wheel_venv.outbox, "db", "upgrade", "--db-url", empty_db_url], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"outbox tables at revision {HEAD}\n"
    assert tables_in(empty_db_url) == {
        "public.outbox_messages",
        "public.outbox_inbox",
        "public.outbox_messages_leader",
        "public.outbox_messages_audit",
        "public.outbox_alembic_version",
    }
    assert scalars(empty_db_url, "SELECT count(epoch) FROM outbox_messages_leader") == [1]

    proc = _run(
        [wheel_venv.outbox, "db", "upgrade", "--db-url", empty_db_url, *CUSTOM],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert {
        "msg.events_out",
        "msg.events_in",
        "msg.events_out_leader",
        "msg.events_out_audit",
        "msg.outbox_alembic_version",
    } <= tables_in(empty_db_url)

    proc = _run([wheel_venv.outbox, "status", "--db-url", empty_db_url], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("outbox_messages is empty")

    proc = _run([wheel_venv.outbox, "db", "sql"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "CREATE TABLE outbox_messages (" in proc.stdout
    assert "CREATE TABLE outbox_inbox (" in proc.stdout
    assert "CREATE TABLE outbox_messages_leader (" in proc.stdout
    assert "INSERT INTO outbox_messages_leader (epoch) VALUES (" in proc.stdout


# How a user's alembic.ini can point at the wheel's revisions. The package-resource form
# `outbox:_migrations/versions` is resolved by Alembic through importlib.resources, but the
# ':' in it collides with `path_separator = os` on POSIX (the list is split first).
PACKAGE_FORM = "outbox:_migrations/versions"
LOCATION_CASES = {
    "space": ("space", f"%(here)s/migrations/versions {PACKAGE_FORM}", True),
    "newline": ("newline", f"\n    %(here)s/migrations/versions\n    {PACKAGE_FORM}", True),
    "legacy (no path_separator)": (None, f"%(here)s/migrations/versions {PACKAGE_FORM}", True),
    "os": ("os", f"%(here)s/migrations/versions:{PACKAGE_FORM}", False),
}


def _alembic(venv: WheelVenv, project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _run([venv.python, "-m", "alembic", *args], project)


def test_version_locations_forms(wheel_venv: WheelVenv, empty_db_url: str, tmp_path: Path) -> None:
    url = empty_db_url
    for name, (separator, locations, works) in LOCATION_CASES.items():
        project = tmp_path / name.split()[0]
        user_project(project, url, version_locations=locations, path_separator=separator)
        proc = _alembic(wheel_venv, project, "upgrade", "outbox@head")
        if works:
            assert proc.returncode == 0, (name, proc.stderr)
            assert tables_in(url) >= OUTBOX_TABLES, name
            assert scalars(url, "SELECT version_num FROM alembic_version") == [HEAD]
            proc = _alembic(wheel_venv, project, "downgrade", "outbox@base")
            assert proc.returncode == 0, (name, proc.stderr)
            assert not OUTBOX_TABLES & tables_in(url), name
        else:
            assert proc.returncode != 0, name
            assert "Can't locate revision identified by 'outbox'" in proc.stdout + proc.stderr
            assert "public.outbox_messages" not in tables_in(url), name

    # [tool.alembic] in pyproject.toml takes a list: no separator, the package form works.
    project = tmp_path / "pyproject"
    ini = user_project(project, url, version_locations="unused")
    ini.write_text(f"[alembic]\nsqlalchemy.url = {url}\n")
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [tool.alembic]
            script_location = "%(here)s/migrations"
            version_locations = ["%(here)s/migrations/versions", "{PACKAGE_FORM}"]
            """
        )
    )
    proc = _alembic(wheel_venv, project, "upgrade", "heads")
    assert proc.returncode == 0, proc.stderr
    assert set(scalars(url, "SELECT version_num FROM alembic_version")) == {HEAD, "app_0001"}
    assert {*OUTBOX_TABLES, "public.users"} <= tables_in(url)


def test_user_revisions_stay_out_of_the_installed_package(
    wheel_venv: WheelVenv, empty_db_url: str, tmp_path: Path
) -> None:
    """The case of the issue, with the package installed from the wheel and its revisions named
    as the how-to says (``outbox:_migrations/versions``): a bare ``alembic revision
    --autogenerate`` would write into site-packages; the hook refuses it, and the user's first
    revision (``--head base --branch-label app``) goes to the user's folder."""
    url = empty_db_url
    project = tmp_path / "app"
    app_project(project, url, package_location=PACKAGE_FORM)
    proc = _run(
        [wheel_venv.python, "-c", "import outbox.migrate as m; print(m.versions_dir())"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    installed = Path(proc.stdout.strip())
    assert installed.is_relative_to(wheel_venv.root.resolve())
    shipped = set(installed.glob("*.py"))
    assert {p.name for p in shipped} == set(REVISIONS)

    proc = _alembic(wheel_venv, project, "upgrade", "heads")
    assert proc.returncode == 0, proc.stderr
    proc = _alembic(wheel_venv, project, "revision", "--autogenerate", "-m", "orders")
    assert proc.returncode != 0
    said = " ".join((proc.stdout + proc.stderr).split())
    assert f"based on {HEAD}, on the 'outbox' branch" in said, said
    assert str(installed) in said
    assert set(installed.glob("*.py")) == shipped

    proc = _alembic(
        wheel_venv,
        project,
        *("revision", "--autogenerate", "-m", "orders", "--head", "base", "--branch-label", "app"),
    )
    assert proc.returncode == 0, proc.stderr
    assert set(installed.glob("*.py")) == shipped
    (orders,) = (project / "migrations" / "versions").glob("*_orders.py")
    proc = _alembic(wheel_venv, project, "upgrade", "heads")
    assert proc.returncode == 0, proc.stderr
    assert set(scalars(url, "SELECT version_num FROM alembic_version")) == {
        HEAD,
        orders.name.split("_")[0],
    }
    assert "public.orders" in tables_in(url)
