"""Every command-line option the documentation shows exists: each ``--option`` in README.md
and docs/*.md is one of the ``outbox`` / ``outbox-relay`` commands' options (from their
``--help``), or belongs to another tool the docs show (alembic, pytest, pip, ...)."""

from __future__ import annotations

import re
from pathlib import Path

import click
from click.testing import CliRunner

from outbox import cli

ROOT = Path(__file__).resolve().parents[2]

#: Options of other programs that the docs show: alembic's, mkdocs' and ruff's.
OTHER_TOOLS = {
    "--autogenerate",
    "--branch-label",
    "--head",
    "--version-path",
    "--strict",
    "--check",
}


def command_options() -> set[str]:
    found: set[str] = {"--help"}  # click adds it to every command

    def walk(command: click.Command) -> None:
        for param in command.params:
            found.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                walk(sub)

    walk(cli.main)
    walk(cli.relay_main)
    return found


def documented_options() -> dict[str, set[str]]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "CONTRIBUTING.md"]
    return {
        page.name: set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", page.read_text()))
        for page in pages
    }


def test_every_documented_option_exists() -> None:
    known = command_options() | OTHER_TOOLS
    missing = {
        page: sorted(options - known)
        for page, options in documented_options().items()
        if options - known
    }
    assert not missing, f"options in the docs that no command has: {missing}"


def test_help_runs_for_every_command() -> None:
    runner = CliRunner()
    for argv in (["relay"], ["consume"], ["status"], ["db", "upgrade"], ["inbox", "purge"]):
        result = runner.invoke(cli.main, [*argv, "--help"])
        assert result.exit_code == 0, result.output
