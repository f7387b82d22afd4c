"""Watching the relay and the consumer: observers with stable hook names.

Subclass :class:`RelayObserver` or :class:`ConsumerObserver`, override the hooks you need and
pass instances as ``observers=[...]``. Hooks run on the relay's or consumer's own thread, in
the order the things happened; keep them quick (count, set a gauge, signal a test). An
exception in a hook is logged (``event=observer.failed``) and does not disturb the loop.

The library's own log lines for these moments are written by an observer too
(:class:`LogRelay`, :class:`LogConsumer`), so what is logged and what is observed never
disagree. Each log record carries a stable ``event`` field (listed in the reference): match
on it, never on the wording.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from outbox.breaker import Transition
    from outbox.transport.base import IncomingMessage

_relay_log = logging.getLogger("outbox.relay")
_consumer_log = logging.getLogger("outbox.consumer")
_logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What became of one claimed batch, once it is recorded in the table."""

    claimed: int
    #: Acknowledged by the broker and marked sent (deleted, or status ``sent``).
    acked: int
    #: Refused or failed: an attempt was counted (``parked`` of them reached max_attempts).
    failed: int
    parked: int
    #: Neither acknowledged nor failed (broker outage, held back, shutdown): still pending.
    unsent: int
    #: From the claim to the record, in seconds.
    seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class MessageRef:
    """Which message a relay hook is about: its row, topic, key and message id."""

    outbox_id: int
    topic: str
    key: bytes | None
    message_id: str

    def fields(self) -> dict[str, Any]:
        """As log fields (the key as text, shortened; never the payload)."""
        key = None if self.key is None else self.key.decode("utf-8", "backslashreplace")[:200]
        return {
            "outbox_id": self.outbox_id,
            "topic": self.topic,
            "key": key,
            "message_id": self.message_id,
        }


class RelayObserver:
    """Hooks called by :class:`~outbox.Relay`. Every hook is optional."""

    def tick(self) -> None:
        """The loop comes round (a claim, a wake-up while idle, a standby's wait on the leader
        lock): a sign of life, for liveness checks."""

    def leadership(self, leader: bool) -> None:
        """This relay became the leader (True) or stopped being it (False)."""

    def standby(self) -> None:
        """This relay waited for the leader lock and another relay holds it (called after
        every wait, so every ``leader_retry_interval`` seconds while a standby)."""

    def claimed(self, rows: int, ahead: bool) -> None:
        """A claim returned ``rows`` rows (0 when nothing is due); ``ahead``: it ran on the
        claims connection while the previous batch was awaited."""

    def claim_finished(self, rows: int, ahead: bool, seconds: float) -> None:
        """Right after :meth:`claimed`: how long the claim took (for a claim that ran ahead,
        the wait for its rows)."""

    def batch_finished(self, outcome: BatchOutcome) -> None:
        """A batch was recorded in the table."""

    def messages_acked(self, topics: Sequence[str], created: list[float], acked_at: float) -> None:
        """A batch's acknowledged messages, once recorded: their topics and creation times
        (POSIX seconds, the database's clock at their transaction's start), and when they were
        acknowledged. Called only for observers that override it (it costs a pass over the
        batch)."""

    def send_failed(self, message: MessageRef, reason: str) -> None:
        """The broker refused ``message``: an attempt was counted."""

    def parked(self, message: MessageRef, attempts: int) -> None:
        """``message`` reached max_attempts: status ``dead``, no more sends."""

    def broker_unavailable(self, reason: str, retry_in: float, failures: int) -> None:
        """The broker failed (``failures`` times in a row); sending pauses ``retry_in`` s."""

    def broker_available(self) -> None:
        """A probe reached the broker again after failures."""

    def breaker_changed(self, transition: Transition) -> None:
        """The broker's state changed: ``open`` (sends pause after a failure), ``half_open``
        (a probe goes out), ``closed`` (the broker answers); as the consumer's breaker."""

    def producer_recreated(self) -> None:
        """The broker client was discarded (fatal state or outage); a new one will be made."""

    def database_error(self, reason: str, retry_in: float) -> None:
        """A statement failed on a live session (a timeout, a lock wait, a conflict); it is
        tried again after ``retry_in`` seconds, keeping leadership and what is in flight."""

    def database_lost(self, reason: str, abandoned: int, retry_in: float) -> None:
        """The database session ended (or failed transiently); ``abandoned`` messages in
        flight stay pending and will be sent again."""

    def stopped(self, stats: Any) -> None:
        """The relay returned from run()/run_once(); ``stats`` is its :class:`RelayStats`."""


Outcome = Literal["processed", "duplicate", "dead_lettered"]


class ConsumerObserver:
    """Hooks called by :class:`outbox.consumer.Consumer`. Every hook is optional."""

    def tick(self) -> None:
        """The loop comes round (once per message, or per poll of at most 0.5 s while idle or
        paused): a sign of life, for liveness checks."""

    def joined(self) -> None:
        """The consumer joined its group and got its first assignment."""

    def message_finished(self, message: IncomingMessage, outcome: Outcome, seconds: float) -> None:
        """A message is done: its effects committed, skipped as a duplicate, or
        dead-lettered; its offset may be committed. ``seconds`` includes retries."""

    def attempt_failed(
        self,
        message: IncomingMessage,
        key: str,
        attempts: int,
        error: str,
        retry_in: float,
        exception: BaseException | None = None,
    ) -> None:
        """The handler raised ``exception`` (``error``: its one-line form) at the message with
        idempotency key ``key``; it is tried again in ``retry_in`` seconds."""

    def transient_failure(
        self,
        message: IncomingMessage,
        key: str,
        error: str,
        retry_in: float,
        exception: BaseException | None = None,
    ) -> None:
        """The handler's dependency failed (:class:`~outbox.DownstreamUnavailable`, a
        ``transient=`` type, or the retry budget is spent); no attempt is counted and the
        message is tried again in ``retry_in`` seconds (the breaker stayed closed)."""

    def breaker_changed(self, transition: Transition) -> None:
        """The circuit breaker changed state (``transition.state``: ``open``, ``half_open``,
        ``closed``); see :class:`outbox.breaker.Transition` for the counts it carries."""

    def database_unavailable(self, error: str, retry_in: float) -> None:
        """The database could not be reached; no attempt is counted."""

    def stopped(self, stats: Any) -> None:
        """The consumer returned from run(); ``stats`` is its ``ConsumerStats``."""


ObserverT = TypeVar("ObserverT", RelayObserver, ConsumerObserver)


class _Fanout:
    """Calls a hook on every observer, isolating their failures."""

    def __init__(self, observers: Sequence[object]) -> None:
        self._observers = list(observers)

    def __getattr__(self, name: str) -> Any:
        hooks = [getattr(o, name) for o in self._observers]

        def call(*args: Any) -> None:
            for hook in hooks:
                try:
                    hook(*args)
                except Exception:
                    _logger.exception(
                        "observer failed",
                        extra={"event": "observer.failed", "hook": name},
                    )

        setattr(self, name, call)  # resolved once per hook name
        return call


def fanout(first: ObserverT, observers: Sequence[ObserverT]) -> ObserverT:
    """One observer that calls ``first`` and then each of ``observers``."""
    if not observers:
        return first
    combined: Any = _Fanout([first, *observers])
    return combined  # type: ignore[no-any-return]


class LogRelay(RelayObserver):
    """The relay's log lines for what it reports to observers."""

    def __init__(self) -> None:
        self._standby_logged = False

    def leadership(self, leader: bool) -> None:
        if leader:
            self._standby_logged = False
            _relay_log.info("relay is the leader", extra={"event": "relay.leader"})

    def standby(self) -> None:
        if not self._standby_logged:  # once, not after every wait on the lock
            self._standby_logged = True
            _relay_log.info(
                "relay is a standby: another relay is the leader", extra={"event": "relay.standby"}
            )

    def batch_finished(self, outcome: BatchOutcome) -> None:
        if _relay_log.isEnabledFor(logging.DEBUG):
            fields = dataclasses.asdict(outcome)
            fields["ms"] = round(fields.pop("seconds") * 1000, 1)
            _relay_log.debug("batch done", extra={"event": "relay.batch", **fields})

    def send_failed(self, message: MessageRef, reason: str) -> None:
        _relay_log.warning(
            "send failed",
            extra={"event": "relay.send_failed", **message.fields(), "error": reason},
        )

    def parked(self, message: MessageRef, attempts: int) -> None:
        _relay_log.error(
            "message parked",
            extra={"event": "relay.parked", **message.fields(), "attempts": attempts},
        )

    def broker_unavailable(self, reason: str, retry_in: float, failures: int) -> None:
        _relay_log.warning(
            "broker unavailable, backing off",
            extra={
                "event": "relay.broker_unavailable",
                "error": reason,
                "retry_in_s": round(retry_in, 2),
                "failures": failures,
            },
        )

    def broker_available(self) -> None:
        _relay_log.info("broker reachable again", extra={"event": "relay.broker_available"})

    def breaker_changed(self, transition: Transition) -> None:
        _log_transition(_relay_log, "relay", transition)

    def producer_recreated(self) -> None:
        _relay_log.warning(
            "re-creating the broker client", extra={"event": "relay.producer_recreated"}
        )

    def database_error(self, reason: str, retry_in: float) -> None:
        _relay_log.warning(
            "database statement failed, retrying",
            extra={
                "event": "relay.database_error",
                "error": reason,
                "retry_in_s": round(retry_in, 2),
            },
        )

    def database_lost(self, reason: str, abandoned: int, retry_in: float) -> None:
        _relay_log.warning(
            "database connection lost, reconnecting",
            extra={
                "event": "relay.database_lost",
                "error": reason,
                "abandoned": abandoned,
                "retry_in_s": round(retry_in, 2),
            },
        )

    def stopped(self, stats: Any) -> None:
        _relay_log.info(
            "relay stopped", extra={"event": "relay.stopped", **dataclasses.asdict(stats)}
        )


def message_fields(message: IncomingMessage) -> dict[str, Any]:
    """A message's position, as log fields."""
    return {"topic": message.topic, "partition": message.partition, "offset": message.offset}


class LogConsumer(ConsumerObserver):
    """The consumer's log lines for what it reports to observers."""

    def joined(self) -> None:
        _consumer_log.info("consumer joined its group", extra={"event": "consumer.joined"})

    def attempt_failed(
        self,
        message: IncomingMessage,
        key: str,
        attempts: int,
        error: str,
        retry_in: float,
        exception: BaseException | None = None,
    ) -> None:
        _consumer_log.warning(
            "handler failed, retrying",
            exc_info=exception,
            extra={
                "event": "consumer.retry",
                "key": key,
                "attempts": attempts,
                "error": error,
                "retry_in_s": round(retry_in, 2),
                **message_fields(message),
            },
        )

    def transient_failure(
        self,
        message: IncomingMessage,
        key: str,
        error: str,
        retry_in: float,
        exception: BaseException | None = None,
    ) -> None:
        _consumer_log.warning(
            "dependency failed, retrying without counting an attempt",
            extra={
                "event": "consumer.transient_failure",
                "key": key,
                "error": error,
                "retry_in_s": round(retry_in, 2),
                **message_fields(message),
            },
        )

    def breaker_changed(self, transition: Transition) -> None:
        _log_transition(_consumer_log, "consumer", transition)

    def database_unavailable(self, error: str, retry_in: float) -> None:
        _consumer_log.warning(
            "database unavailable, retrying",
            extra={
                "event": "consumer.database_unavailable",
                "error": error,
                "retry_in_s": round(retry_in, 2),
            },
        )

    def stopped(self, stats: Any) -> None:
        _consumer_log.info(
            "consumer stopped", extra={"event": "consumer.stopped", **dataclasses.asdict(stats)}
        )


def _log_transition(log: logging.Logger, who: str, t: Transition) -> None:
    """One line per breaker transition: ``<who>.breaker_open|half_open|closed``."""
    fields: dict[str, Any] = {
        "event": f"{who}.breaker_{t.state}",
        "reason": t.reason,
        "failures_in_row": t.failures_in_row,
        "window_attempts": t.window_attempts,
        "window_failures": t.window_failures,
    }
    if t.state == "open":
        fields["retry_in_s"] = round(t.seconds, 2)
        log.warning("circuit breaker open", extra=fields)
    elif t.state == "closed":
        fields["paused_s"] = round(t.seconds, 2)
        log.info("circuit breaker closed", extra=fields)
    else:
        log.info("circuit breaker half-open", extra=fields)
