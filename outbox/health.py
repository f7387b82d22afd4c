"""Health endpoints for the relay and the consumer (``--metrics-port``): ``/healthz`` says
whether the loop is alive, ``/readyz`` whether it can do its job.

:class:`Health` is what the endpoints read: when the loop last showed a sign of life, and what
(if anything) keeps it from being ready, as one line. :class:`RelayHealth` and
:class:`ConsumerHealth` are observers (:mod:`outbox.observe`) that keep it up to date from the
loop's own hooks: the endpoints tell what the loop has seen, and probe nothing themselves.
:class:`HealthServer` serves a table of paths (the standard library's ``http.server``, on a
daemon thread); ``/metrics`` is one more entry in that table.

Liveness has one rule: the loop gave a sign of life within ``stale_after`` seconds, or within
the backoff it announced plus that (a hook that says "retrying in 20 s" moves the deadline).
``stale_after`` is a margin of 30 s beyond the longest the loop may legitimately stay silent
(:func:`relay_stale_after`, :func:`consumer_stale_after`), so that a slow round or a long
handler is not taken for a hang.
"""

from __future__ import annotations

import http.server
import logging
import socket
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from outbox.observe import BatchOutcome, ConsumerObserver, Outcome, RelayObserver

if TYPE_CHECKING:
    from outbox.breaker import Transition
    from outbox.config import RelayConfig
    from outbox.transport.base import IncomingMessage

logger = logging.getLogger(__name__)

#: What a route returns: HTTP status, content type, body.
Response = tuple[int, str, bytes]
#: A route: called on the server's thread for each request to its path.
Route = Callable[[], Response]

TEXT = "text/plain; charset=utf-8"
#: How much longer than its longest legitimate silence a loop may be silent before
#: ``/healthz`` fails.
MARGIN = 30.0
#: A reason is cut to this many characters (the endpoints answer one short line).
_REASON_MAX = 300


def one_line(text: str, limit: int = _REASON_MAX) -> str:
    """``text``'s first line, shortened to ``limit`` characters."""
    lines = text.strip().splitlines()
    line = lines[0].strip() if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _because(state: str, reason: str) -> str:
    """``state (reason)``, the reason on one line and short enough to keep the parenthesis."""
    return f"{state} ({one_line(reason, _REASON_MAX - len(state) - 3)})"


class Health:
    """The state behind ``/healthz`` and ``/readyz``. Thread-safe: the loop's thread writes it,
    the server's threads read it.

    ``checks``: the conditions readiness depends on, name -> what is wrong at first (None: all
    right), in the order they are reported (the first one wrong is the reason given).
    ``stale_after``: seconds without a :meth:`tick` after which the loop counts as stalled.
    """

    def __init__(
        self,
        checks: Mapping[str, str | None],
        *,
        stale_after: float = MARGIN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not stale_after > 0:
            raise ValueError("stale_after must be positive")
        self.stale_after = stale_after
        self._clock = clock
        self._lock = threading.Lock()
        self._problems: dict[str, str | None] = {
            name: None if problem is None else one_line(problem) for name, problem in checks.items()
        }
        self._status = "ok"
        self._stopped = False
        self._last = clock()
        self._deadline = self._last + stale_after

    def tick(self, quiet_for: float = 0.0) -> None:
        """A sign of life. ``quiet_for``: the loop is about to wait that long (a backoff) and
        may give no other sign meanwhile."""
        now = self._clock()
        with self._lock:
            self._last = now
            self._deadline = now + max(0.0, quiet_for) + self.stale_after

    def update(self, *, status: str | None = None, **problems: str | None) -> None:
        """Set what is wrong with each named check (None: it is all right), at once; ``status``:
        what readiness says when nothing is wrong (default ``ok``)."""
        with self._lock:
            unknown = problems.keys() - self._problems.keys()
            if unknown:
                raise KeyError(f"unknown checks: {sorted(unknown)}")
            for name, problem in problems.items():
                self._problems[name] = None if problem is None else one_line(problem)
            if status is not None:
                self._status = one_line(status)

    def stop(self) -> None:
        """The loop has ended: neither alive nor ready from now on."""
        with self._lock:
            self._stopped = True

    def liveness(self) -> tuple[bool, str]:
        """(alive, one line): alive while the loop ticks in time."""
        now = self._clock()
        with self._lock:
            return self._liveness(now)

    def readiness(self) -> tuple[bool, str]:
        """(ready, one line): ready while alive and no check is wrong; else the first wrong
        check's reason."""
        now = self._clock()
        with self._lock:
            alive, reason = self._liveness(now)
            if not alive:
                return False, reason
            for problem in self._problems.values():
                if problem is not None:
                    return False, problem
            return True, self._status

    def _liveness(self, now: float) -> tuple[bool, str]:
        if self._stopped:
            return False, "stopped"
        if now <= self._deadline:
            return True, "ok"
        return False, (
            f"stalled: the loop gave no sign of life for {now - self._last:.0f} s "
            f"(limit {self._deadline - self._last:.0f} s)"
        )


def health_routes(health: Health) -> dict[str, Route]:
    """``/healthz`` and ``/readyz`` for ``health``: 200 or 503, with one line of text. Add
    more paths (``/metrics``) to the dict before starting the server."""

    def answer(check: Callable[[], tuple[bool, str]]) -> Route:
        def route() -> Response:
            ok, reason = check()
            return (200 if ok else 503), TEXT, f"{reason}\n".encode()

        return route

    return {"/healthz": answer(health.liveness), "/readyz": answer(health.readiness)}


# -- the relay and the consumer -----------------------------------------------------------------


def relay_stale_after(config: RelayConfig) -> float:
    """:data:`MARGIN` beyond the longest a relay's loop may go without a tick: its poll
    interval, a standby's wait on the leader lock (plus the statement margin), a batch awaiting
    its delivery reports, a connection attempt."""
    return MARGIN + max(
        config.poll_interval,
        config.leader_retry_interval + 5.0,
        config.delivery_timeout + 5.0,
        config.db_connect_timeout,
    )


def consumer_stale_after(handler_timeout: float | None) -> float:
    """:data:`MARGIN` beyond the longest a consumer's loop may go without a tick: one handler
    attempt up to its time limit and the watchdog's grace (without a limit, a handler running
    longer than the margin counts as hung)."""
    return MARGIN + (handler_timeout + 5.0 if handler_timeout else 0.0)


_STARTING = "starting"


class RelayHealth(RelayObserver):
    """Keeps :attr:`health` up to date from a relay's hooks.

    Ready (``ok: leader``, ``ok: standby``) once the relay leads or waits as a standby, with
    its database session alive and, for the leader, the broker answering. Not ready:
    ``starting``; ``database unreachable (...)`` after the session was lost, until it is back;
    ``degraded: database statement failed (...)`` until a statement succeeds again;
    ``degraded: broker unreachable (...)`` from a failed send or probe until the broker answers.
    A standby does not use the broker, so its readiness leaves the broker out (it learns the
    broker's state when it takes over).
    """

    def __init__(
        self, stale_after: float = MARGIN, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.health = Health(
            {"database": None, "role": _STARTING, "broker": None},
            stale_after=stale_after,
            clock=clock,
        )
        self._leader = False
        self._broker: str | None = None

    def tick(self) -> None:
        self.health.tick()

    def leadership(self, leader: bool) -> None:
        self._leader = leader
        if leader:
            self.health.update(status="ok: leader", database=None, role=None, broker=self._broker)
        else:
            self.health.update(role=_STARTING, broker=None)

    def standby(self) -> None:
        self._leader = False
        self.health.update(status="ok: standby", database=None, role=None, broker=None)

    def claimed(self, rows: int, ahead: bool) -> None:
        self.health.update(database=None)

    def batch_finished(self, outcome: BatchOutcome) -> None:
        self.health.update(database=None)

    def broker_unavailable(self, reason: str, retry_in: float, failures: int) -> None:
        self._set_broker(_because("degraded: broker unreachable", reason))

    def broker_available(self) -> None:
        self._set_broker(None)

    def breaker_changed(self, transition: Transition) -> None:
        # Open: broker_unavailable has given the reason; half-open: a probe is out, the broker
        # is not back yet.
        if transition.state == "closed":
            self._set_broker(None)

    def database_error(self, reason: str, retry_in: float) -> None:
        self.health.update(database=_because("degraded: database statement failed", reason))
        self.health.tick(retry_in)

    def database_lost(self, reason: str, abandoned: int, retry_in: float) -> None:
        self.health.update(database=_because("database unreachable", reason))
        self.health.tick(retry_in)

    def stopped(self, stats: Any) -> None:
        self.health.stop()

    def _set_broker(self, problem: str | None) -> None:
        self._broker = problem
        if self._leader:
            self.health.update(broker=problem)


class ConsumerHealth(ConsumerObserver):
    """Keeps :attr:`health` up to date from a consumer's hooks.

    Ready (``ok``) once the consumer has joined its group, with its circuit breaker closed.
    Not ready: ``starting: not joined yet``; ``degraded: circuit breaker open (...)`` or
    ``half_open`` while the handler's dependency is down (the partitions are paused);
    ``degraded: database unreachable (...)`` until a message is done again.
    """

    def __init__(
        self, stale_after: float = MARGIN, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.health = Health(
            {"joined": "starting: not joined yet", "breaker": None, "database": None},
            stale_after=stale_after,
            clock=clock,
        )

    def tick(self) -> None:
        self.health.tick()

    def joined(self) -> None:
        self.health.update(joined=None)

    def message_finished(self, message: IncomingMessage, outcome: Outcome, seconds: float) -> None:
        self.health.update(database=None)

    def attempt_failed(
        self,
        message: IncomingMessage,
        key: str,
        attempts: int,
        error: str,
        retry_in: float,
        exception: BaseException | None = None,
    ) -> None:
        self.health.tick(retry_in)

    def transient_failure(
        self,
        message: IncomingMessage,
        key: str,
        error: str,
        retry_in: float,
        exception: BaseException | None = None,
    ) -> None:
        self.health.tick(retry_in)

    def breaker_changed(self, transition: Transition) -> None:
        if transition.state == "closed":
            self.health.update(breaker=None)
        else:
            state = f"degraded: circuit breaker {transition.state}"
            self.health.update(breaker=_because(state, transition.reason))

    def database_unavailable(self, error: str, retry_in: float) -> None:
        self.health.update(database=_because("degraded: database unreachable", error))
        self.health.tick(retry_in)

    def stopped(self, stats: Any) -> None:
        self.health.stop()


# -- the server ---------------------------------------------------------------------------------


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    # TCPServer rather than http.server.HTTPServer: that one looks the host's name up in DNS
    # (socket.getfqdn) when it binds, which can take seconds; nothing here needs the name.
    allow_reuse_address = True
    daemon_threads = True
    routes: Mapping[str, Route]


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "outbox"
    sys_version = ""
    #: Seconds a client may take to send its request.
    timeout = 5.0

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, *, with_body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        route = self.server.routes.get(path)
        if route is None:
            status, content_type, body = 404, TEXT, b"not found\n"
        else:
            try:
                status, content_type, body = route()
            except Exception as exc:
                logger.exception(
                    "health endpoint failed",
                    extra={"event": "health.endpoint_failed", "path": path},
                )
                status, content_type, body = 500, TEXT, f"error: {one_line(str(exc))}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Probes come every few seconds: no log line per request."""


class HealthServer:
    """Serves ``routes`` (path -> :data:`Route`; the query string is ignored) over HTTP on
    ``host:port`` from a daemon thread; any other path is 404. :meth:`start` binds, so an
    address that cannot be used fails there (``OSError``), before anything else starts."""

    def __init__(self, routes: Mapping[str, Route], host: str = "", port: int = 0) -> None:
        self.routes = routes
        self.host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen by the system when created with 0)."""
        if self._server is None:
            return self._port
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        server_class = _Server6 if ":" in self.host else _Server
        server = server_class((self.host, self._port), _Handler)
        server.routes = self.routes
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"outbox-health-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
