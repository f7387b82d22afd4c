"""Log lines by their stable ``event`` field (see docs/reference.md, Logs): tests match on
it, never on the wording. The text format prints it as ``event=NAME`` among the fields."""

from __future__ import annotations

import re


def event(name: str, *fields: str) -> str:
    """A regex for a text-format log line of ``event`` ``name``; each of ``fields`` is a
    further regex the line's fields must contain (e.g. ``r"acked=[1-9]"``)."""
    pattern = rf"\bevent={re.escape(name)}(?=\s|$)"
    return pattern + "".join(rf"(?=.*\b{f})" for f in fields)
