"""Log output for the command-line programs: text or JSON lines on stderr.

Every record the library writes has a stable ``event`` field (see the reference): the text
format prints it among the ``key=value`` fields, the JSON format as a top-level field. Match
on ``event``, never on the message's wording.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}

LEVELS = ("debug", "info", "warning", "error")


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record (what was passed as ``extra=``)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in extras(record).items())
        return f"{base} {fields}" if fields else base


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO-8601, UTC), ``level``, ``logger``, ``message``,
    then the record's fields; ``exc`` holds the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        data = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **extras(record),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup(level: str, fmt: str) -> None:
    """Send every log record at ``level`` (any case) or above to stderr in ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
