"""OpenTelemetry tracing: one trace from the code that publishes to the consumers downstream.

* ``publish`` records the current trace context in the message's headers (W3C ``traceparent``,
  and ``tracestate`` / ``baggage`` when there are some, through the API's propagator) inside a
  ``create {topic}`` span (kind PRODUCER), whose context is the one stored: the message's
  *creation context*. A ``traceparent`` the caller set is kept as it is, with no span.
* The relay sends the stored headers as they are, and reports each batch as one
  ``send {topic}`` span per topic (kind CLIENT: its context is not the creation context),
  linked to the creation contexts of the messages in it; its parent is the first of those,
  so a message's own trace shows when it was sent.
* ``outbox consume`` runs each attempt of the handler in a ``process {topic}`` span (kind
  CONSUMER) whose parent is the context in the message's headers: what the handler publishes
  continues the same trace.

Only the OpenTelemetry *API* is used, and only once a tracer provider is configured (an SDK,
say by ``opentelemetry-instrument``). Otherwise every function here returns at once: no span,
no header, nothing parsed. Whether tracing is live is asked once per publish call, relay batch
and consumed message, never per row: the API is not imported by this module, and while nobody
has imported it, the answer is a dictionary look-up. See docs/design.md, "Tracing".
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from outbox.message import EncodedMessage

if TYPE_CHECKING:
    from opentelemetry.trace import Link, Span, SpanContext, Tracer

    from outbox.claims import Row
    from outbox.transport.base import IncomingMessage

#: The W3C trace context header: the message's creation context.
HEADER_TRACEPARENT = "traceparent"

#: At most this many links on a ``send`` span (the SDK's default link limit,
#: ``OTEL_SPAN_LINK_COUNT_LIMIT``): the relay parses no more ``traceparent`` headers per topic
#: and batch than a span can keep. ``messaging.batch.message_count`` counts them all.
MAX_LINKS = 128

_SYSTEM = "kafka"
_TRACEPARENT_NAME = HEADER_TRACEPARENT.encode()
# W3C trace context, version 00 (a later version starts the same way and may add fields).
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


class _Api:
    """The parts of the OpenTelemetry API used here, imported when first needed: only after
    someone else imported ``opentelemetry.trace`` (configuring an SDK does)."""

    def __init__(self) -> None:
        from opentelemetry import context, propagate, trace

        self.trace = trace
        self.context = context
        self.propagate = propagate
        self._unset = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
        self._provider: object = None
        self._tracer: Tracer | None = None

    def tracer(self) -> Tracer | None:
        """Our tracer from the global provider; None while none is configured (the API's
        default, a proxy to nothing)."""
        provider = self.trace.get_tracer_provider()
        if provider is not self._provider:
            self._provider = provider
            tracer = None
            if not isinstance(provider, self._unset):
                tracer = provider.get_tracer("outbox", _version())
                if isinstance(tracer, self.trace.NoOpTracer):
                    tracer = None  # an SDK that is disabled (OTEL_SDK_DISABLED)
            self._tracer = tracer
        return self._tracer


#: The API once imported (one element at most).
_imported: list[_Api] = []


def _live() -> tuple[_Api, Tracer] | None:
    """The API and our tracer when tracing is configured, else None (then do nothing)."""
    if _imported:
        api = _imported[0]
    else:
        # Nobody imported the API: no tracer provider can be configured. (None in sys.modules:
        # the import is blocked.)
        if sys.modules.get("opentelemetry.trace") is None:
            return None
        api = _Api()
        _imported.append(api)
    tracer = api.tracer()
    return None if tracer is None else (api, tracer)


def live() -> bool:
    """Whether tracing is configured: a tracer provider other than the API's default is set."""
    return _live() is not None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sqlalchemy-outbox")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


# -- publish ----------------------------------------------------------------------------------


def created(messages: list[EncodedMessage]) -> list[EncodedMessage]:
    """``messages`` as they are stored: each one without a ``traceparent`` of the caller's gets
    the context of a ``create {topic}`` span (child of the current span) in its headers. The
    list itself when tracing is off."""
    found = _live()
    if found is None:
        return messages
    api, tracer = found
    return [_create(api, tracer, m) for m in messages]


def _create(api: _Api, tracer: Tracer, message: EncodedMessage) -> EncodedMessage:
    names = {name.lower() for name, _ in message.headers}
    if HEADER_TRACEPARENT in names:
        return message  # the caller's own creation context: kept, and no span of ours
    attributes: dict[str, Any] = {
        "messaging.system": _SYSTEM,
        "messaging.destination.name": message.topic,
        "messaging.operation.type": "create",
        "messaging.operation.name": "create",
        "messaging.message.id": str(message.message_id),
    }
    _describe_key(attributes, message.key, message.payload is None)
    span = tracer.start_span(
        f"create {message.topic}", kind=api.trace.SpanKind.PRODUCER, attributes=attributes
    )
    carrier: dict[str, str] = {}
    # The current context with the create span in it: baggage goes along.
    api.propagate.inject(carrier, context=api.trace.set_span_in_context(span))
    span.end()
    added = tuple((k, v.encode()) for k, v in carrier.items() if k.lower() not in names)
    if not added:
        return message  # an invalid span (the SDK disabled): nothing to propagate
    return dataclasses.replace(message, headers=message.headers + added)


def _describe_key(attributes: dict[str, Any], key: bytes | None, tombstone: bool) -> None:
    if key is not None:
        # A key without a canonical text form is left out, as the conventions say.
        with contextlib.suppress(UnicodeDecodeError):
            attributes["messaging.kafka.message.key"] = key.decode()
    if tombstone:
        attributes["messaging.kafka.message.tombstone"] = True


# -- relay ------------------------------------------------------------------------------------


def parse_traceparent(value: bytes) -> tuple[int, int, int] | None:
    """``(trace_id, span_id, flags)`` of a W3C ``traceparent`` value; None if it is not one."""
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    tid, sid = int(trace_id, 16), int(span_id, 16)
    if not tid or not sid:
        return None
    return tid, sid, int(flags, 16)


class _Traceparents:
    """Where ``traceparent`` is among a row's header names (the names array in binary, as the
    claim reads it): found once per distinct array, as HeaderCache does."""

    __slots__ = ("_at",)

    def __init__(self) -> None:
        self._at: dict[bytes, int] = {}

    def __call__(self, row: Row) -> bytes | None:
        from outbox.claims import parse_array  # the relay's module: imported by then

        at = self._at.get(row.header_names)
        if at is None:
            if len(self._at) > 1024:
                self._at.clear()
            names = [n.lower() for n in parse_array(row.header_names)]
            at = names.index(_TRACEPARENT_NAME) if _TRACEPARENT_NAME in names else -1
            self._at[row.header_names] = at
        if at < 0:
            return None
        values = parse_array(row.header_values)
        return values[at] if at < len(values) else None


_traceparents = _Traceparents()


class Sending:
    """The ``send`` spans of one relay batch, one per topic: see :func:`sending`."""

    __slots__ = ("_api", "_spans")

    def __init__(self, api: _Api, spans: dict[str, tuple[Span, set[int]]]) -> None:
        self._api = api
        self._spans = spans

    def finished(
        self, failed: Sequence[tuple[int, str]], transport_failures: Sequence[str], fatal: bool
    ) -> None:
        """End the spans: an error where a message failed (``error.type`` ``message``), on
        every topic when the broker did (``transport`` or ``fatal``)."""
        error = self._api.trace.StatusCode.ERROR
        failed_ids = {row_id: reason for row_id, reason in failed}
        for span, ids in self._spans.values():
            if transport_failures:
                span.set_attribute("error.type", "fatal" if fatal else "transport")
                span.set_status(error, transport_failures[0])
            else:
                reason = next((failed_ids[i] for i in ids if i in failed_ids), None)
                if reason is not None:
                    span.set_attribute("error.type", "message")
                    span.set_status(error, reason)
            span.end()

    def abandoned(self) -> None:
        """End the spans of a batch given up (the database was lost): sent again later."""
        self.finished((), ["abandoned: the relay lost its database session"], False)


def sending(rows: Sequence[Row], sent: Sequence[int], started: float) -> Sending | None:
    """Start the ``send {topic}`` spans of a batch whose rows ``sent`` (ids) were handed to the
    transport from ``started`` (``time.monotonic()``) on. None when tracing is off: then no
    row is looked at."""
    found = _live()
    if found is None or not sent:
        return None
    api, tracer = found
    trace = api.trace
    if len(sent) != len(rows):
        ids = set(sent)
        rows = [row for row in rows if row.id in ids]
    by_topic: dict[str, list[Row]] = {}
    for row in rows:
        by_topic.setdefault(row.topic, []).append(row)
    start = time.time_ns() - int((time.monotonic() - started) * 1e9)
    spans: dict[str, tuple[Span, set[int]]] = {}
    for topic, topic_rows in by_topic.items():
        links = _links(trace, topic_rows)
        parent = (
            trace.set_span_in_context(trace.NonRecordingSpan(links[0].context)) if links else None
        )
        span = tracer.start_span(
            f"send {topic}",
            context=parent if parent is not None else api.context.Context(),
            kind=trace.SpanKind.CLIENT,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.destination.name": topic,
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.batch.message_count": len(topic_rows),
            },
            links=links,
            start_time=start,
        )
        spans[topic] = (span, {row.id for row in topic_rows})
    return Sending(api, spans)


def _links(trace: Any, rows: list[Row]) -> list[Link]:
    links: list[Link] = []
    for row in rows:
        value = _traceparents(row)
        parsed = None if value is None else parse_traceparent(value)
        if parsed is None:
            continue
        trace_id, span_id, flags = parsed
        context: SpanContext = trace.SpanContext(
            trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags & 0xFF)
        )
        links.append(trace.Link(context, {"messaging.message.id": row.message_id}))
        if len(links) >= MAX_LINKS:
            break
    return links


# -- consumer ---------------------------------------------------------------------------------

_OFF: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


def processing(message: IncomingMessage, consumer: str) -> contextlib.AbstractContextManager[None]:
    """Around one attempt at ``message``: a ``process {topic}`` span whose parent is the
    context in the message's headers, current while the handler runs (so what it publishes
    continues the trace); an exception ends it with an error status. Nothing when tracing is
    off."""
    found = _live()
    if found is None:
        return _OFF
    return _process(*found, message, consumer)


@contextlib.contextmanager
def _process(api: _Api, tracer: Tracer, message: IncomingMessage, consumer: str) -> Iterator[None]:
    trace = api.trace
    carrier: dict[str, str] = {}
    for name, value in message.headers:
        # The first of a name: ours, not one a Kafka instrumentation appended in the relay.
        carrier.setdefault(name.lower(), value.decode("utf-8", "replace"))
    parent = api.propagate.extract(carrier)
    created_in = trace.get_current_span(parent).get_span_context()
    attributes: dict[str, Any] = {
        "messaging.system": _SYSTEM,
        "messaging.destination.name": message.topic,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.partition.id": str(message.partition),
        "messaging.kafka.offset": message.offset,
        "messaging.consumer.group.name": consumer,
    }
    message_id = carrier.get("message-id")
    if message_id is not None:
        attributes["messaging.message.id"] = message_id
    _describe_key(attributes, message.key, message.value is None)
    span = tracer.start_span(
        f"process {message.topic}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        links=[trace.Link(created_in)] if created_in.is_valid else None,
    )
    token = api.context.attach(trace.set_span_in_context(span, parent))
    try:
        yield
    except Exception as exc:
        span.record_exception(exc)
        span.set_attribute("error.type", type(exc).__qualname__)
        span.set_status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        api.context.detach(token)
        span.end()
