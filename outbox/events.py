"""Domain events: entities record them, a session hook writes them into the outbox.

    class Order(EventSource, Base): ...

    collect_events(outbox, SessionFactory)   # a sessionmaker; also Session classes and async
    order.record_event("orders", {"type": "OrderPlaced", "id": order.id}, key=str(order.id))

Events are written by :meth:`Outbox.publish_many` in the session's own transaction, at the next
flush or at commit, in recording order; a rollback discards them.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import uuid
import weakref
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction, object_session, sessionmaker
from sqlalchemy.orm.exc import UnmappedInstanceError

from outbox import tracing
from outbox.message import Headers, Message, encode

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from outbox.outbox import Outbox

EventTarget: TypeAlias = (
    "Session | type[Session] | sessionmaker[Any] | AsyncSession | type[AsyncSession]"
    " | async_sessionmaker[Any]"
)
_Pending: TypeAlias = "list[tuple[int, Message]]"

_ATTR = "_outbox_pending_events"  # in the instance __dict__: not mapped, pickled with it
_INFO = "outbox.events"
# One sequence across all entities, so that a batch sorts into recording order and a savepoint
# can tell the events recorded inside it from the older ones.
_seq = itertools.count()


class EventSource:
    """Mixin for mapped classes: events recorded on an entity wait on it until its session
    writes them (see :func:`collect_events`)."""

    def record_event(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | bytes | None = None,
        headers: Headers | None = None,
        message_id: uuid.UUID | None = None,
        content_type: str | None = None,
    ) -> uuid.UUID:
        """Record an event, written at the next flush or commit; returns its message id.

        Validated and encoded now, like :meth:`Outbox.publish`: raises
        :class:`~outbox.PayloadError` at once, and later changes to ``payload`` are not seen.
        """
        # The trace context is taken now, in the code that records the event (the create span),
        # not at the flush that writes it.
        [e] = tracing.created(
            [encode(Message(topic, payload, key, headers, message_id, content_type))]
        )
        # The encoded form encodes to itself (its content-type header is kept as it is, and its
        # traceparent stops publish from making another): the entity keeps a snapshot rather
        # than the caller's mutable payload.
        msg = Message(e.topic, e.payload, e.key, e.headers, e.message_id)
        self.__dict__.setdefault(_ATTR, []).append((next(_seq), msg))
        try:
            session = object_session(self)
        except UnmappedInstanceError:  # a plain domain object, e.g. in a unit test
            session = None
        if session is not None:
            _state(session).instances[id(self)] = self
        return e.message_id

    @property
    def pending_events(self) -> tuple[Message, ...]:
        """Events recorded and not yet written, in recording order."""
        return tuple(m for _, m in _pending(self))


@dataclasses.dataclass
class _Savepoint:
    tx: SessionTransaction
    mark: int = dataclasses.field(default_factory=lambda: next(_seq))
    written: list[tuple[EventSource, int, Message]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _State:
    # Keyed by id(): mapped classes with __eq__ (dataclasses) are not hashable.
    instances: dict[int, EventSource] = dataclasses.field(default_factory=dict)
    savepoints: list[_Savepoint] = dataclasses.field(default_factory=list)
    committed: SessionTransaction | None = None


def _pending(obj: EventSource) -> _Pending:
    return cast("_Pending", obj.__dict__.get(_ATTR, []))


def _state(session: Session) -> _State:
    state = session.info.get(_INFO)
    if state is None:
        state = session.info[_INFO] = _State()
    return cast(_State, state)


class _Writer:
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def before_flush(self, session: Session, flush_context: Any, instances: Any) -> None:
        self.write(session)

    def before_commit(self, session: Session) -> None:
        # Flush here, not in commit after us, so that events recorded during that flush (by
        # mapper events) are written too; the entities' rows then also come before the events,
        # which holds publish's per-key lock the least time.
        session.flush()
        self.write(session)

    def write(self, session: Session) -> None:
        state = session.info.get(_INFO)
        if state is None or not state.instances:
            return
        # An entity expunged since it recorded keeps its events; attaching it registers it again.
        owned = [o for o in state.instances.values() if object_session(o) is session]
        batch = sorted(((s, m, o) for o in owned for s, m in _pending(o)), key=lambda b: b[0])
        if batch:
            self.outbox.publish_many(session, [m for _, m, _ in batch])
        # Only now: after a failed write the rollback still finds the events to discard them.
        for obj in owned:
            obj.__dict__.pop(_ATTR, None)
        state.instances.clear()
        nested = session.get_nested_transaction()
        if state.savepoints and state.savepoints[-1].tx is nested:
            state.savepoints[-1].written += [(o, s, m) for s, m, o in batch]


def _after_attach(session: Session, instance: object) -> None:
    if isinstance(instance, EventSource) and _pending(instance):
        _state(session).instances[id(instance)] = instance


def _after_transaction_create(session: Session, transaction: SessionTransaction) -> None:
    if transaction.nested:
        _state(session).savepoints.append(_Savepoint(transaction))


def _end_savepoint(state: _State, tx: SessionTransaction) -> list[_Savepoint]:
    """Pop savepoint ``tx`` and any opened inside it; the last one returned is ``tx``'s."""
    for i, sp in enumerate(state.savepoints):
        if sp.tx is tx:
            ended = state.savepoints[i:][::-1]
            del state.savepoints[i:]
            return ended
    return []


def _after_commit(session: Session) -> None:
    state, nested = _state(session), session.get_nested_transaction()
    if nested is None:
        # An event recorded from now on (say, by another after_commit listener) is the next
        # transaction's, not discarded as one that was rolled back.
        state.committed = session.get_transaction()
    elif (ended := _end_savepoint(state, nested)) and state.savepoints:
        # A released savepoint's rows now live and die with the enclosing savepoint.
        state.savepoints[-1].written += [w for sp in ended for w in sp.written]


def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    state = session.info.get(_INFO)
    if state is None or not previous_transaction.nested:
        return  # the end of the outermost transaction is _after_transaction_end's
    ended = _end_savepoint(state, previous_transaction)
    if not ended:
        return
    mark = ended[-1].mark
    for obj in state.instances.values():
        obj.__dict__[_ATTR] = [(s, m) for s, m in _pending(obj) if s < mark]
    # Events recorded before the savepoint are still due, though their rows went with it.
    for obj, s, m in (w for sp in ended for w in sp.written if w[1] < mark):
        obj.__dict__[_ATTR] = sorted([*_pending(obj), (s, m)], key=lambda p: p[0])
        state.instances[id(obj)] = obj


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    state = session.info.get(_INFO)
    if state is None or transaction.parent is not None:
        return
    state.savepoints.clear()
    if state.committed is not transaction:  # rolled back or closed: nothing may leak onwards
        for obj in state.instances.values():
            obj.__dict__.pop(_ATTR, None)
        state.instances.clear()


_writers: weakref.WeakKeyDictionary[Outbox, _Writer] = weakref.WeakKeyDictionary()
_made: weakref.WeakSet[type[Session]] = weakref.WeakSet()
# Not event.contains(): SQLAlchemy keys listeners by id(target), and a new class (every
# sessionmaker makes one) may reuse the id of a collected one, which then reads as hooked.
_hooked: weakref.WeakKeyDictionary[Any, set[Any]] = weakref.WeakKeyDictionary()


def _sync_target(target: EventTarget) -> Session | type[Session]:
    t: Any = target
    if isinstance(t, sessionmaker):
        return cast("type[Session]", t.class_)
    if isinstance(t, Session) or (isinstance(t, type) and issubclass(t, Session)):
        return t
    aio = sys.modules.get("sqlalchemy.ext.asyncio")  # not imported: no asyncio object exists
    if aio is not None and isinstance(t, aio.AsyncSession):
        return cast(Session, t.sync_session)
    if aio is not None and isinstance(t, type) and issubclass(t, aio.AsyncSession):
        return cast("type[Session]", cast(Any, t).sync_session_class)
    if aio is None or not isinstance(t, aio.async_sessionmaker):
        raise TypeError(f"collect_events() needs a session, session class or factory, not {t!r}")
    cls = t.kw.get("sync_session_class") or t.class_.sync_session_class
    if cls not in _made:
        # A class of the factory's own, as sessionmaker does: the default sync class is
        # Session itself, which every session of the process shares.
        cls = type(cls.__name__, (cls,), {})
        _made.add(cls)
        t.configure(sync_session_class=cls)
    return cast("type[Session]", cls)


def collect_events(outbox: Outbox, target: EventTarget) -> None:
    """Write the events of :class:`EventSource` entities with ``outbox`` in the sessions of
    ``target``: a ``Session`` class or instance, a ``sessionmaker``, an ``AsyncSession`` (class
    or instance) or an ``async_sessionmaker``. Calling it again changes nothing.

    Events are written at each flush (for entities in the session) and at commit; events still
    pending when the transaction rolls back or closes are discarded. Rolling back a savepoint
    discards the events recorded inside it; older events written inside it are pending again.
    """
    sync = _sync_target(target)
    writer = _writers.get(outbox)
    if writer is None:
        writer = _writers[outbox] = _Writer(outbox)
    listeners: dict[str, Any] = {
        "before_flush": writer.before_flush,
        "before_commit": writer.before_commit,
        "after_attach": _after_attach,
        "after_transaction_create": _after_transaction_create,
        "after_commit": _after_commit,
        "after_soft_rollback": _after_soft_rollback,
        "after_transaction_end": _after_transaction_end,
    }
    done = _hooked.setdefault(sync, set())
    for name, fn in listeners.items():
        if (name, fn) not in done:
            event.listen(sync, name, fn)
            done.add((name, fn))
