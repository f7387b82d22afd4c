"""``outbox.consumer.load_handler``: ``--handler`` / ``--key-extractor`` of ``outbox consume``
name a callable as ``package.module:attribute``; every invalid form is a ConfigurationError
(usage, exit status 2) whose one line says what is wrong. The command's own reaction is in
tests/integration/test_consumer.py."""

from __future__ import annotations

import pytest

from outbox import ConfigurationError
from outbox.consumer import load_handler
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
