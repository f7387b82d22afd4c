"""Every log event the library writes is listed in docs/reference.md: operators match on the
``event`` field, so an undocumented one is a promise nobody can rely on."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Events whose name is built at run time (outbox.observe._log_transition).
BUILT = [
    f"{who}.breaker_{state}"
    for who in ("relay", "consumer")
    for state in ("open", "half_open", "closed")
]


def logged_events() -> set[str]:
    found: set[str] = set(BUILT)
    for path in (ROOT / "outbox").rglob("*.py"):
        found.update(
            re.findall(r"""["']event["']:\s*["']([a-z_]+\.[a-z_]+)["']""", path.read_text())
        )
    return found


def test_every_logged_event_is_in_the_reference() -> None:
    reference = (ROOT / "docs" / "reference.md").read_text()
    documented = set(re.findall(r"`([a-z_]+\.[a-z_]+)`", reference))
    events = logged_events()
    assert len(events) > 40
    assert sorted(events - documented) == []
