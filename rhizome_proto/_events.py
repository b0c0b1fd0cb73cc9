"""Events: those a federation connection reports, and those a node hands the application.

Connection events (:class:`Event` and its subclasses): frozen, slotted, keyword-only values.
The application reads them with ``events()`` after each input and answers with method calls
(``ack``, ``nack``, ``start_sync`` ...). Nothing follows :class:`Closed`.

Node events (:class:`FederationEvent`, of kind :class:`EventType`): what
:class:`~rhizome_proto.FederationNode` makes of them, per link, for the application's handlers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ._delta import Delta
from ._errors import ErrorCode
from ._filter import DeltaFilter
from ._messages import FederationConfig

__all__ = [
    "Closed",
    "DeltaAcked",
    "DeltaReceived",
    "DeltaRejected",
    "ErrorReceived",
    "Event",
    "EventType",
    "FederationEvent",
    "HandshakeComplete",
    "Paused",
    "PingTimeout",
    "ProtocolViolation",
    "Resumed",
    "SyncBatchReceived",
    "SyncCompleted",
    "SyncRequested",
    "SyncStarted",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base class of all events."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeComplete(Event):
    """``hello`` / ``hello_ack`` exchanged: the link is open.

    On a server ``remote_config`` is the client's ``hello`` config; on a client it is ``None``.
    ``link_id`` is the server-chosen id of the link.
    """

    remote_system_id: str
    link_id: str
    remote_config: FederationConfig | None
    #: the extensions both ends agreed on (empty with a v1 peer)
    extensions: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class DeltaReceived(Event):
    """A live delta arrived (alone, or one per delta of a ``deltas`` message of extension
    ``batch``). Answer it with ``ack(delta.id)`` or ``nack(delta.id, reason)``."""

    delta: Delta


@dataclass(frozen=True, slots=True, kw_only=True)
class DeltaAcked(Event):
    """The peer accepted one of our deltas (by ``delta_ack``, or covered by a cumulative
    ``deltas_ack`` of extension ``batch``: one event per delta, in send order)."""

    delta_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DeltaRejected(Event):
    """The peer rejected one of our live deltas. (A nack of a delta sent in a sync batch is not
    tracked: it is counted in ``stray_acks``.)"""

    delta_id: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncRequested(Event):
    """Server side: the client asked for the initial sync.

    Answer with ``start_sync(total)``, then ``send_sync_batch`` ..., then ``complete_sync()``;
    or ``reject_sync(...)``.
    """

    filter: DeltaFilter | None
    from_timestamp: float | None
    #: extension ``cursor``: resume after this position of our store
    from_cursor: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncStarted(Event):
    """Client side: the server announced a sync of ``total_deltas`` deltas."""

    total_deltas: int
    batch_size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncBatchReceived(Event):
    """Client side: one batch of the sync. Deltas that fail trust may be ``nack``-ed."""

    deltas: tuple[Delta, ...]
    batch_number: int
    is_last_batch: bool
    #: extension ``cursor``: the server's position after this batch
    cursor: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncCompleted(Event):
    """Client side: the sync is over. ``deltas_processed`` is what the server says it sent,
    ``deltas_received`` what arrived in this sync's batches."""

    deltas_processed: int
    deltas_received: int
    #: extension ``cursor``: where the next sync may resume
    cursor: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Paused(Event):
    """The peer asked us to pause: live deltas we send are held until it resumes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Resumed(Event):
    """The peer resumed: held deltas have been queued for sending, in order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PingTimeout(Event):
    """Nothing at all arrived within the heartbeat timeout: the link is dead (closed follows)."""

    silent_for: float


def error_code(code: str) -> ErrorCode | str:
    """``code`` as an :class:`ErrorCode` when it is one; a code unknown to us stays a ``str``."""
    try:
        return ErrorCode(code)
    except ValueError:
        return code


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorReceived(Event):
    """The peer sent an ``error`` message; when ``fatal`` it is about to close.

    ``code`` is an :class:`ErrorCode` when it is one of ours (a ``str`` given at construction
    is converted), else the peer's text."""

    code: ErrorCode | str
    message: str
    fatal: bool

    def __post_init__(self) -> None:
        if not isinstance(self.code, ErrorCode):
            object.__setattr__(self, "code", error_code(self.code))


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolViolation(Event):
    """The peer sent something the protocol does not allow; it has been answered (an ``error``
    or a ``delta_nack``) and the link stays open. Fatal violations raise
    :class:`RemoteProtocolError` instead."""

    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Closed(Event):
    """The link is closed; the last event.

    ``code`` is the WebSocket close code (1006 when the transport was lost without a close
    handshake). ``unsettled`` holds our deltas the peer never acknowledged or rejected, in send
    order, including those held while paused: a new link should send them again.
    """

    code: int
    reason: str
    unsettled: tuple[Delta, ...] = ()


# ---------------------------------------------------------------- node events


class EventType(StrEnum):
    """The kind of a :class:`FederationEvent`. Members are strings equal to the names the seed
    uses (``EventType.LINK_CONNECTED == "link:connected"``), so handlers that compare with
    those strings keep working; compare with the members to let mypy check the comparison."""

    #: an outgoing link starts a connection attempt (made by the adapter)
    LINK_CONNECTING = "link:connecting"
    #: the handshake completed
    LINK_CONNECTED = "link:connected"
    #: the connection closed (``reason``: the close reason)
    LINK_DISCONNECTED = "link:disconnected"
    #: something went wrong on the link (``code``: the error code when there is one)
    LINK_ERROR = "link:error"
    #: the peer asked us to pause
    LINK_PAUSED = "link:paused"
    #: the peer resumed
    LINK_RESUMED = "link:resumed"
    #: the peer acknowledged one of our deltas (``delta_id``)
    DELTA_SENT = "delta:sent"
    #: a delta from the peer was stored (``delta``)
    DELTA_RECEIVED = "delta:received"
    #: a delta was rejected, by us (``delta``) or by the peer (``delta_id``); ``reason``
    DELTA_REJECTED = "delta:rejected"
    #: client side: the initial sync started (``total``)
    SYNC_STARTED = "sync:started"
    #: client side: one batch of the initial sync arrived (``count`` deltas)
    SYNC_PROGRESS = "sync:progress"
    #: client side: the initial sync is over (``count`` deltas received)
    SYNC_COMPLETED = "sync:completed"


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationEvent:
    """An application-level event of one link, of kind ``type`` (see :class:`EventType`).

    ``reason`` is text for people; a program decides by ``type``, ``code`` and ``fatal``:
    ``code`` is the :class:`ErrorCode` of an event that reports an error (``link:error`` for an
    ``error`` message of the peer, a violation of the peer, a ping timeout or a delta too large
    to send), or the peer's code as a ``str`` when it is not one of ours; ``None`` when the
    error has no code (a transport failure). ``fatal``: the connection ends over this error
    (the peer's fatal ``error`` message, a ping timeout).
    """

    type: EventType
    link_id: str
    delta: Delta | None = None
    delta_id: str | None = None
    reason: str | None = None
    count: int | None = None
    total: int | None = None
    code: ErrorCode | str | None = None
    fatal: bool = False
