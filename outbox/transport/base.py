"""The relay's view of a message broker: a small protocol that every transport implements."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol


class FailureKind(enum.Enum):
    #: The message itself was refused (too large, invalid, not authorized, unknown topic):
    #: counts as an attempt; the message is parked after ``max_attempts``.
    MESSAGE = "message"
    #: The broker could not be reached or did not answer in time: not the message's fault,
    #: so no attempt is counted; the relay backs off and sends it again.
    TRANSPORT = "transport"
    #: The client is in a state it cannot leave (fenced, fatal): the relay re-creates it.
    FATAL = "fatal"


@dataclasses.dataclass(frozen=True)
class DeliveryFailure:
    kind: FailureKind
    reason: str


class OutgoingMessage(NamedTuple):
    """One message to send. A named tuple: the relay builds one per message, and a frozen
    dataclass costs several times as much to create."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


#: Called exactly once per accepted message, from :meth:`Transport.poll` or
#: :meth:`Transport.flush`, as ``on_delivery(error, message)``: ``error`` is None when the broker
#: acknowledged the message; otherwise :meth:`Transport.failure` says what it means. The form
#: is librdkafka's own delivery callback, so the Kafka transport hands the relay's callback to
#: the client as it is: no adapter object per message.
OnDelivery = Callable[[Any, Any], None]


class Transport(Protocol):
    """What the relay needs from a broker client.

    Order: messages passed to :meth:`send` for the same topic and key reach the broker in the
    order of the calls. Acknowledgement: ``on_delivery(None, message)`` means the broker
    durably accepted the message (for Kafka: all in-sync replicas).
    """

    def send(self, message: OutgoingMessage, on_delivery: OnDelivery) -> None:
        """Queue a message; raises :class:`~outbox.exceptions.MessageRejected` or
        :class:`~outbox.exceptions.TransportUnavailable`."""

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds and run pending delivery callbacks."""

    def flush(self, timeout: float) -> None:
        """Send everything queued now (no batching delay), wait up to ``timeout`` seconds for
        it to be acknowledged, and run the delivery callbacks."""

    def failure(self, error: Any) -> DeliveryFailure:
        """What the ``error`` passed to a delivery callback means (and, for a fatal one, mark
        the client broken)."""

    def check(self, timeout: float) -> None:
        """Raise :class:`~outbox.exceptions.TransportUnavailable` unless the broker answers
        within ``timeout``."""

    @property
    def broken(self) -> bool:
        """True once the client must be closed and re-created."""

    def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for queued messages, then release resources."""


@dataclasses.dataclass(frozen=True)
class IncomingMessage:
    """A message read from the broker, as handed to a consumer's handler."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name`` (case-insensitive), or None."""
        found = None
        lowered = name.lower()
        for k, v in self.headers:
            if k.lower() == lowered:
                found = v
        return found


class Source(Protocol):
    """What the consumer runner needs from a broker: read in partition order, remember what
    was processed, and commit those positions."""

    #: True once this member joined its group and got an assignment (even an empty one):
    #: until then no message can come, so the runner does not count the wait as idle.
    joined: bool
    #: False while the broker is known to be unreachable (no join can happen meanwhile).
    reachable: bool

    def check(self, timeout: float) -> None:
        """Raise :class:`~outbox.exceptions.TransportUnavailable` unless the broker answers
        within ``timeout``."""

    def poll(self, timeout: float) -> IncomingMessage | None:
        """The next message, or None after ``timeout`` seconds."""

    def poll_batch(
        self, max_messages: int, timeout: float, max_wait: float = 0.0
    ) -> list[IncomingMessage]:
        """Up to ``max_messages`` messages, in partition order (each partition's in offset
        order, after any rewound ones): waits up to ``timeout`` seconds for the first, then up
        to ``max_wait`` more for the batch to fill (what is already fetched comes at once).
        Empty after ``timeout``, and while paused."""

    def processed(self, message: IncomingMessage) -> None:
        """``message`` is done (its effects are committed): its position may be committed."""

    def commit(self) -> None:
        """Commit the positions of processed messages now (synchronously)."""

    def pause(self) -> None:
        """Stop handing out messages from every assigned partition, and from those assigned
        later, until :meth:`resume`; the member stays in its group meanwhile (:meth:`poll`
        keeps it there and returns None)."""

    def resume(self) -> None:
        """Undo :meth:`pause`."""

    def rewind(self, message: IncomingMessage) -> None:
        """Hand ``message`` out again, before anything after it in its partition: the first
        :meth:`poll` (or :meth:`poll_batch`) after :meth:`resume` returns it, unless its
        partition was revoked meanwhile (then the partition's next owner reads it from the
        committed position). Several messages of a partition may be rewound (a batch's tail):
        they come back in offset order; rewinding a message already held changes nothing."""

    def close(self) -> None:
        """Commit, leave the group and release resources."""
