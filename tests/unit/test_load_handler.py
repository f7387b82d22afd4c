"""``outbox.consumer.load_handler``: ``--handler`` / ``--key-extractor`` of ``outbox consume``
name a callable as ``package.module:attribute``; every invalid form is a ConfigurationError
(usage, exit status 2) whose one line says what is wrong. The command's own reaction is in
tests/integration/test_consumer.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from outbox import ConfigurationError
from outbox.consumer import load_exception, load_handler
from tests.support import handlers


def test_module_and_function() -> None:
    assert load_handler("tests.support.handlers:record_effect") is handlers.record_effect


def test_nested_attribute() -> None:
    assert load_handler("tests.support.handlers:Payments.capture") is handlers.Payments.capture


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("tests.support.handlers", "invalid handler 'tests.support.handlers': expected package"),
        (":record_effect", "invalid handler ':record_effect': expected package.module:function"),
        ("tests.support.handlers:", "expected package.module:function"),
        ("tests.support.nope:handler", "cannot import handler module 'tests.support.nope'"),
        ("tests.support.handlers:missing", "tests.support.handlers has no 'missing'"),
        ("tests.support.handlers:Payments.refund", "has no 'Payments.refund'"),
        ("tests.support.handlers:NOT_CALLABLE", "'tests.support.handlers:NOT_CALLABLE' is not"),
        ("tests.support.handlers:FLAKY_EVERY.real", "is not callable"),
    ],
    ids=[
        "no-colon",
        "empty-module",
        "empty-attribute",
        "missing-module",
        "missing-attribute",
        "missing-nested-attribute",
        "not-callable",
        "nested-not-callable",
    ],
)
def test_invalid_forms(path: str, expected: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_handler(path)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_the_working_directory_is_searched_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `outbox consume --handler payments:capture` run from the folder of payments.py
    # (the how-to's own example) used to fail with "No module named 'payments'".
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "cwd_payments.py").write_text("def capture(session, message):\n    return 42\n")
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(folder))])
    assert load_handler("cwd_payments:capture")(None, None) == 42  # type: ignore[arg-type]


def test_app_dir_names_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "appdir_handlers.py").write_text("def handle(session, message):\n    return 7\n")
    assert load_handler("appdir_handlers:handle", app_dir=str(folder))(None, None) == 7  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="is not a directory"):
        load_handler("appdir_handlers:handle", app_dir=str(folder / "missing"))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("ValueError", "invalid --transient 'ValueError': expected package.module.ExceptionClass"),
        ("nosuch.Error", "cannot import --transient module 'nosuch'"),
        ("builtins.NoSuchError", "--transient 'builtins:NoSuchError': builtins has no"),
        ("tests.support.handlers.record_effect", "is not an exception type"),
        ("tests.support.handlers:FLAKY_EVERY", "is not callable"),
    ],
)
def test_transient_names_an_exception_type(path: str, expected: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_exception(path)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_transient_in_both_spellings() -> None:
    assert load_exception("builtins.ConnectionError") is ConnectionError
    assert load_exception("outbox.exceptions:DownstreamUnavailable").__name__ == (
        "DownstreamUnavailable"
    )
