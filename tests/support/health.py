"""The health endpoints (``--metrics-port``) as a probe sees them, and a consumer handler whose
dependency the test turns off and on.

``tests.support.health:gated_effect`` is importable by the real ``outbox consume`` command:
while the file named by ``HEALTH_TEST_DOWN_FILE`` exists, its dependency is down
(:class:`~outbox.DownstreamUnavailable`); otherwise it records the message's effect as
:func:`tests.support.handlers.record_effect` does.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy.orm import Session

from outbox import DownstreamUnavailable
from outbox.transport.base import IncomingMessage
from tests.support.handlers import record_effect
from tests.support.waits import Watched, wait_until

DOWN_FILE_ENV = "HEALTH_TEST_DOWN_FILE"


def get(port: int, path: str) -> tuple[int, str] | None:
    """(status, body) of ``GET http://127.0.0.1:PORT/PATH``; None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None


def wait_answer(
    port: int,
    path: str,
    status: int,
    body: str,
    *,
    timeout: float = 30.0,
    processes: Iterable[Watched] = (),
) -> str:
    """Poll ``path`` until it answers ``status`` with a body matching the regex ``body``
    (whole, without its newline); returns the body."""

    def answered() -> str | None:
        got = get(port, path)
        if got is None or got[0] != status:
            return None
        text = got[1].removesuffix("\n")
        return text if re.fullmatch(body, text) else None

    return wait_until(
        answered,
        timeout,
        f"{path} on port {port} to answer {status} {body!r}",
        interval=0.05,
        processes=processes,
    )


def gated_effect(session: Session, message: IncomingMessage) -> None:
    down = os.environ.get(DOWN_FILE_ENV)
    if down and Path(down).exists():
        raise DownstreamUnavailable("the test turned the dependency off")
    record_effect(session, message)
