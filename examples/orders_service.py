"""An HTTP orders service: ``POST /orders`` with an ``Idempotency-Key`` header writes the order
and its ``OrderPlaced`` event in one transaction; a retry with the same key replays the stored
response instead of placing a second order.

Plain WSGI (standard library only). Run: ``python examples/orders_service.py --db-url URL``.
With OpenTelemetry installed, each request is a server span (``POST /orders``), and the
``OrderPlaced`` event carries its trace on to the consumers (see docs/howto.md, "Trace a
message end to end").
"""

from __future__ import annotations

import argparse
import decimal
import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import make_server

import sqlalchemy as sa
from orders_app import Order, outbox, place_order
from sqlalchemy.orm import Session

from outbox import CommandInProgress, IdempotencyKeyReused, Inbox, PayloadError

inbox = Inbox(outbox)
StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def make_app(engine: sa.Engine, topic: str = "orders") -> WsgiApp:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def reply(status: int, body: dict[str, Any], replayed: bool = False) -> list[bytes]:
            headers = [("Content-Type", "application/json")]
            if replayed:
                headers.append(("Idempotent-Replayed", "true"))
            start_response(f"{status} {_REASONS.get(status, '')}", headers)
            return [json.dumps(body).encode()]

        if environ["REQUEST_METHOD"] != "POST" or environ["PATH_INFO"] != "/orders":
            return reply(404, {"error": "not found"})
        key = environ.get("HTTP_IDEMPOTENCY_KEY")
        if not key:
            return reply(400, {"error": "Idempotency-Key header required"})
        raw = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        try:
            data = json.loads(raw)
            customer, amount = str(data["customer"]), decimal.Decimal(str(data["amount"]))
        except (ValueError, KeyError, decimal.InvalidOperation):
            return reply(400, {"error": "expected JSON {customer, amount}"})
        fingerprint = hashlib.sha256(b"POST /orders\n" + raw).hexdigest()
        try:
            with Session(engine) as session, session.begin():
                command = inbox.command(session, "POST /orders", key, fingerprint)
                if command.replay:
                    return reply(command.status or 200, json.loads(command.body or b"{}"), True)
                order = place_order(session, customer, amount, topic)
                body = {"order_id": str(order.id), "customer": customer, "amount": str(amount)}
                command.complete(session, 201, json.dumps(body).encode())
            return reply(201, body)
        except CommandInProgress:
            return reply(409, {"error": "a request with this key is in progress; retry"})
        except IdempotencyKeyReused:
            return reply(422, {"error": "this Idempotency-Key was used for another request"})
        except PayloadError as exc:
            return reply(400, {"error": str(exc)})

    return traced(app)


def traced(app: WsgiApp) -> WsgiApp:
    """A server span around each request, continuing the caller's ``traceparent`` header, when
    OpenTelemetry is installed: what a framework's instrumentation does (for WSGI,
    opentelemetry-instrumentation-wsgi), in a few lines. Publishing inside the span stores its
    context with the event."""
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return app
    tracer = trace.get_tracer("orders_service")

    def traced_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        headers = {
            k[5:].lower().replace("_", "-"): v for k, v in environ.items() if k.startswith("HTTP_")
        }
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        with tracer.start_as_current_span(
            f"{method} {path}" if path == "/orders" else method,  # the route, when known
            context=propagate.extract(headers),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        ) as span:

            def respond(status: str, response_headers: list[tuple[str, str]]) -> Any:
                span.set_attribute("http.response.status_code", int(status[:3]))
                return start_response(status, response_headers)

            return list(app(environ, respond))

    return traced_app


_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    404: "Not Found",
    409: "Conflict",
    422: "Unprocessable Entity",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db-url", required=True)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--topic", default="orders")
    args = parser.parse_args()
    engine = sa.create_engine(args.db_url)
    Order.__table__.create(engine, checkfirst=True)  # type: ignore[attr-defined]
    with make_server("127.0.0.1", args.port, make_app(engine, args.topic)) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
