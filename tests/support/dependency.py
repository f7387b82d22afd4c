"""A handler's downstream dependency that the test controls: a tiny threaded HTTP server on
127.0.0.1 that is *up* (answers ``200`` with a JSON body) or *down* (answers ``503`` at once,
or closes the connection without answering), flipped by the test while consumers call it.

Every request is recorded with its time (``time.monotonic()``), the message it was made for
(query ``m``, and ``n``) and whether it was served or refused, and every flip of the state is
recorded too: a test can count requests per message, and refused requests per second of down
time. Handlers call it through :mod:`tests.support.downstream`.
"""

from __future__ import annotations

import collections
import dataclasses
import http.server
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Literal

#: How a down dependency refuses: a quick ``503``, or a connection closed unanswered.
Refusal = Literal["503", "close"]


@dataclasses.dataclass(frozen=True)
class Request:
    at: float  # time.monotonic()
    message_id: str
    n: int
    served: bool


class Dependency:
    """The server. ``with Dependency() as dep:`` starts it (up) and stops it; ``dep.url`` is
    what handlers call (``DOWNSTREAM_URL``)."""

    def __init__(self, refusal: Refusal = "503") -> None:
        self.refusal: Refusal = refusal
        self._lock = threading.Lock()
        self._up = True
        self._requests: list[Request] = []
        self._served: collections.Counter[str] = collections.Counter()
        self._refused: collections.Counter[str] = collections.Counter()
        #: (time.monotonic(), up) per change of state, starting with the initial "up".
        self._flips: list[tuple[float, bool]] = [(time.monotonic(), True)]
        #: Goes down (refusing that request) when a request matches: see :meth:`down_on`.
        self._trigger: Callable[[str, int], bool] | None = None
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Dependency:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="dependency",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Dependency:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/call"

    # -- state ----------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        with self._lock:
            return self._up

    def set_up(self, up: bool) -> None:
        with self._lock:
            self._set_locked(up)

    def _set_locked(self, up: bool) -> None:
        if up != self._up:
            self._up = up
            self._flips.append((time.monotonic(), up))

    def down_on(self, trigger: Callable[[str, int], bool]) -> None:
        """Go down when a request for a message (``message_id, n``) matching ``trigger``
        arrives (that request is refused): an outage that starts at a chosen message."""
        with self._lock:
            self._trigger = trigger

    def flap(self, up_s: float, down_s: float, duration: float) -> threading.Thread:
        """Alternate down ``down_s`` / up ``up_s`` seconds, starting with down, for about
        ``duration`` seconds in a thread (returned; join it), ending up."""

        def run() -> None:
            end = time.monotonic() + duration
            while time.monotonic() < end:
                self.set_up(False)
                time.sleep(down_s)
                self.set_up(True)
                time.sleep(up_s)

        thread = threading.Thread(target=run, name="dependency-flap", daemon=True)
        thread.start()
        return thread

    # -- what happened --------------------------------------------------------------------------

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def served(self) -> collections.Counter[str]:
        """Served requests per message id."""
        with self._lock:
            return collections.Counter(self._served)

    def refused(self) -> collections.Counter[str]:
        """Refused requests per message id."""
        with self._lock:
            return collections.Counter(self._refused)

    def down_periods(self) -> list[tuple[float, float]]:
        """(start, end) of each down period in ``time.monotonic()`` time; an ongoing one ends
        now."""
        with self._lock:
            flips = list(self._flips)
        periods: list[tuple[float, float]] = []
        start: float | None = None
        for at, up in flips:
            if not up and start is None:
                start = at
            elif up and start is not None:
                periods.append((start, at))
                start = None
        if start is not None:
            periods.append((start, time.monotonic()))
        return periods

    # -- the server -----------------------------------------------------------------------------

    def _answer(self, message_id: str, n: int) -> tuple[bool, int, int]:
        """Record a request: (served, served so far, refused so far) for its message."""
        with self._lock:
            trigger = self._trigger
            if self._up and trigger is not None and trigger(message_id, n):
                self._trigger = None
                self._set_locked(False)
            served = self._up
            (self._served if served else self._refused)[message_id] += 1
            self._requests.append(Request(time.monotonic(), message_id, n, served))
            return served, self._served[message_id], self._refused[message_id]

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        dependency = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                message_id = query.get("m", [""])[0]
                n = int(query.get("n", ["-1"])[0])
                served, times, refusals = dependency._answer(message_id, n)
                if not served and dependency.refusal == "close":
                    self.close_connection = True
                    # Nothing written: the client sees the connection end unanswered.
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = json.dumps({"served": times, "refused": refusals}).encode()
                self.send_response(200 if served else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet

        return Handler
