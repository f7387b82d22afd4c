"""Every exception's default message is one line (the CLI prints exactly one)."""

from __future__ import annotations

import pytest

import outbox
import outbox.consumer
from outbox.exceptions import OutboxError

#: The public exceptions, and the consumer's (PoisonMessage).
CLASSES = sorted(
    {
        obj
        for module in (outbox, outbox.consumer)
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, OutboxError)
    },
    key=lambda cls: cls.__name__,
)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_default_message_is_one_nonempty_line(cls: type[OutboxError]) -> None:
    text = str(cls())
    assert text and "\n" not in text and "  " not in text


def test_explicit_message_wins() -> None:
    assert str(OutboxError("x went wrong")) == "x went wrong"
