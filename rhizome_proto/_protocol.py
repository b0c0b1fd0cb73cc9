"""``FederationProtocol``: the message-level federation state machine, for one link.

Text messages in, text messages out; no WebSocket, no sockets, no clock. Use it directly when
the application already terminates WebSocket itself (Starlette, aiohttp, Django Channels);
:class:`~rhizome_proto.FederationConnection` stacks it on wsproto for bytes in, bytes out.

The three drivers: text from the peer (:meth:`receive_message`), calls from the application
(``send_delta``, ``ack``, ``pause`` ...), and time (:meth:`handle_timer`). Each queues messages
(:meth:`messages_to_send`) and events (:meth:`events`). Time is ``now``, monotonic seconds,
passed in; message timestamps come from the injected ``clock`` (wall-clock milliseconds).

Extensions ``batch`` and ``credit`` (docs/extensions.md) live here too. With ``batch`` our live
deltas are numbered 1, 2, 3 ... as they are committed to the wire and coalesced into ``deltas``
messages when output is taken; received ones are numbered in arrival order and answered with
one cumulative ``deltas_ack`` (the contiguous answered prefix, kept incrementally). With
``credit`` live deltas beyond the peer's window wait, in order, until acknowledgements free room.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from typing import Protocol, cast

import msgspec

from ._codec import decode, encode
from ._delta import Delta, InvalidDeltaError, validate_delta
from ._errors import CloseCode, CodecError, ErrorCode, LocalProtocolError, RemoteProtocolError
from ._events import (
    Closed,
    DeltaAcked,
    DeltaReceived,
    DeltaRejected,
    ErrorReceived,
    Event,
    HandshakeComplete,
    Paused,
    PingTimeout,
    ProtocolViolation,
    Resumed,
    SyncBatchReceived,
    SyncCompleted,
    SyncRequested,
    SyncStarted,
)
from ._filter import DeltaFilter
from ._messages import (
    PROTOCOL_VERSION,
    DeltaAck,
    DeltaMessage,
    DeltaNack,
    DeltasAck,
    DeltasMessage,
    ErrorMessage,
    FederationConfig,
    Hello,
    HelloAck,
    Message,
    Pause,
    Ping,
    Pong,
    Resume,
    SyncBatch,
    SyncComplete,
    SyncRequest,
    SyncStart,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_RECEIVE_WINDOW",
    "FederationProtocol",
    "LinkEndpoint",
    "Role",
    "State",
]

DEFAULT_BATCH_SIZE = 100
#: extension ``batch``: the most live deltas in one ``deltas`` message we send
DEFAULT_MAX_BATCH = 1000
#: extension ``credit``: the most unacknowledged live deltas we accept from the peer
DEFAULT_RECEIVE_WINDOW = 10_000


class Role(Enum):
    """Which end of the link: the client opens it and speaks first."""

    CLIENT = "client"
    SERVER = "server"


class State(Enum):
    """The link's state. Pause flags and the sync's progress sit beside it."""

    #: client before ``start``
    IDLE = "idle"
    #: client: ``hello`` sent, waiting for ``hello_ack``
    HELLO_SENT = "hello_sent"
    #: server: waiting for ``hello``
    AWAITING_HELLO = "awaiting_hello"
    #: handshake done: deltas, sync, pause, ping
    OPEN = "open"
    #: we closed or hit a fatal error; nothing more is sent, input is ignored
    CLOSING = "closing"
    #: the link is over (``Closed`` was emitted)
    CLOSED = "closed"


class _Sync(Enum):
    NONE = "none"
    REQUESTED = "requested"  # client: sync_request sent; server: SyncRequested emitted
    RUNNING = "running"  # client: sync_start received; server: start_sync called
    BATCHES_DONE = "batches_done"  # the last batch went (server) or came (client)


# Which message types each (role, state) accepts; anything else is UNEXPECTED_MESSAGE, fatal
# before the handshake. The sync messages are further checked against the sync's progress.
_ACCEPTED: dict[tuple[Role, State], frozenset[str]] = {
    (Role.SERVER, State.AWAITING_HELLO): frozenset({"hello"}),
    (Role.CLIENT, State.HELLO_SENT): frozenset({"hello_ack", "error", "ping", "pong"}),
    (Role.SERVER, State.OPEN): frozenset(
        {"delta", "delta_ack", "delta_nack", "sync_request"}
        | {"pause", "resume", "ping", "pong", "error", "deltas", "deltas_ack"}
    ),
    (Role.CLIENT, State.OPEN): frozenset(
        {"delta", "delta_ack", "delta_nack", "sync_start", "sync_batch", "sync_complete"}
        | {"pause", "resume", "ping", "pong", "error", "deltas", "deltas_ack"}
    ),
}
_HANDSHAKE_STATES = (State.IDLE, State.HELLO_SENT, State.AWAITING_HELLO)
#: Messages of an extension: accepted (where ``_ACCEPTED`` says) only once it was agreed.
_EXTENSION_OF: dict[str, str] = {"deltas": "batch", "deltas_ack": "batch"}
#: The method handling each message type (``_on_<type>``).
_HANDLERS: dict[type, str] = {cls: f"_on_{cls.__struct_config__.tag}" for cls in Message.__args__}
# Events made per delta of a batch skip the frozen dataclass __init__ (same object, no checks
# to skip: these events have one field and no __post_init__).
_new = object.__new__
_set = object.__setattr__


class LinkEndpoint(Protocol):
    """What :class:`~rhizome_proto.FederationNode` needs of a link's protocol object: the
    message-level application calls and what they depend on. Both
    :class:`FederationProtocol` and :class:`~rhizome_proto.FederationConnection` are one."""

    @property
    def role(self) -> Role: ...
    @property
    def state(self) -> State: ...
    @property
    def is_open(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def peer_paused(self) -> bool: ...
    @property
    def pending_count(self) -> int: ...
    @property
    def extensions_agreed(self) -> frozenset[str]: ...
    def is_pending(self, delta_id: str) -> bool: ...
    def next_event(self) -> Event | None: ...
    def send_delta(self, delta: Delta, *, validate: bool = True) -> None: ...
    def ack(self, delta_id: str) -> None: ...
    def nack(self, delta_id: str, reason: str) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def request_sync(
        self,
        filter: DeltaFilter | None = None,
        from_timestamp: float | None = None,
        *,
        from_cursor: str | None = None,
    ) -> None: ...
    def start_sync(self, total_deltas: int, batch_size: int = DEFAULT_BATCH_SIZE) -> None: ...
    def send_sync_batch(
        self, deltas: Sequence[Delta | msgspec.Raw], *, last: bool, cursor: str | None = None
    ) -> None: ...
    def complete_sync(self, cursor: str | None = None) -> None: ...
    def reject_sync(self, message: str, code: ErrorCode = ErrorCode.SYNC_ERROR) -> None: ...


class FederationProtocol:
    """The federation protocol for one link, at the level of text messages.

    Parameters:
        role: :attr:`Role.CLIENT` or :attr:`Role.SERVER`.
        system_id: our instance's system id (sent in ``hello`` / ``hello_ack``).
        clock: returns the wall clock in milliseconds since the epoch, for message timestamps.
        config: the client's link configuration, announced in ``hello``.
        link_id: the server's id for this link, sent in ``hello_ack`` (required for a server).
        ping_interval: seconds between our pings once started (the reference uses 30).
        ping_timeout: seconds without any message from the peer after which the link is dead.
        extensions: the extensions of ours this end speaks (a client offers them in ``hello``,
            a server accepts those it knows); :attr:`extensions_agreed` holds the outcome.
            A v1 peer agrees to none. Known: ``"cursor"`` (see :meth:`request_sync`),
            ``"batch"`` (live deltas in ``deltas`` messages, one cumulative ``deltas_ack``) and
            ``"credit"`` (flow control by windows exchanged in the handshake).
        receive_window: extension ``credit``: the most unacknowledged live deltas we accept
            from the peer (announced in the handshake; a peer beyond it is reported as a
            :class:`ProtocolViolation` with ``FLOW_CONTROL``, its deltas still delivered).
        max_batch: extension ``batch``: the most deltas in one ``deltas`` message we send.
    """

    def __init__(
        self,
        role: Role,
        *,
        system_id: str,
        clock: Callable[[], int | float],
        config: FederationConfig | None = None,
        link_id: str | None = None,
        ping_interval: float = 30.0,
        ping_timeout: float = 90.0,
        extensions: Iterable[str] = (),
        receive_window: int = DEFAULT_RECEIVE_WINDOW,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if not system_id:
            raise ValueError("system_id must be a non-empty string")
        if role is Role.SERVER and not link_id:
            raise ValueError("a server connection needs a link_id")
        if ping_interval <= 0 or ping_timeout <= 0:
            raise ValueError("ping_interval and ping_timeout must be positive")
        if receive_window < 1 or max_batch < 1:
            raise ValueError("receive_window and max_batch must be at least 1")
        self.role = role
        self.system_id = system_id
        self.config = config or FederationConfig()
        self.link_id = link_id
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._clock = clock
        self.extensions_offered = tuple(dict.fromkeys(extensions))
        #: the extensions both ends agreed on in the handshake
        self.extensions_agreed: frozenset[str] = frozenset()
        self.state = State.IDLE if role is Role.CLIENT else State.AWAITING_HELLO
        # what the peer may send in ``_accepted_in`` (``_dispatch`` keeps it current)
        self._accepted_in: State | None = None
        self._accepted: frozenset[str] = frozenset()
        #: the peer's system id, once the handshake is done
        self.remote_system_id: str | None = None
        #: the client's ``hello`` config (server side), once received
        self.remote_config: FederationConfig | None = None
        #: the peer asked us to pause; our live deltas and sync batches are held
        self.peer_paused = False
        #: we asked the peer to pause
        self.paused = False
        #: acks / nacks for ids we never sent or that were already settled (ignored)
        self.stray_acks = 0
        #: the close code and reason once closing began
        self.close_code: int | None = None
        self.close_reason = ""
        self._outbox: list[str] = []
        self._events: deque[Event] = deque()
        self._unacked: dict[str, Delta] = {}
        self._held: deque[Message] = deque()
        self._held_ids: set[str] = set()
        self._unanswered: set[str] = set()
        self._sync = _Sync.NONE
        self._sync_next_batch = 0
        self._sync_count = 0
        self._last_heard: float | None = None
        self._next_ping: float | None = None
        #: extension ``credit``: the most unacknowledged live deltas we accept from the peer
        self.receive_window = receive_window
        #: extension ``batch``: the most deltas per ``deltas`` message we send
        self.max_batch = max_batch
        self._batching = False  # "batch" agreed
        self._credit = False  # "credit" agreed
        self._send_window: int | None = None
        # sending, "credit": live deltas waiting for room in the peer's window (ids in _held_ids)
        self._waiting: deque[Delta] = deque()
        # sending, "batch": deltas committed (in _unacked, numbered) not yet in a message
        self._batch: list[Delta] = []
        self._tx_seq = 0  # the number of our last committed delta
        self._tx_acked = 0  # the highest ``upTo`` the peer acknowledged
        self._inflight: deque[str] = deque()  # ids by number, from _inflight_base + 1
        self._inflight_base = 0
        self._seq_of: dict[str, int] = {}  # the number of each unsettled batched delta
        # receiving, "batch": the peer's deltas numbered in arrival order
        self._rx_seq = 0  # the number of the last delta received
        self._rx_done = 0  # deltas 1 .. _rx_done are all answered
        self._rx_ahead: set[int] = set()  # answered numbers beyond _rx_done + 1
        self._rx_pending: dict[str, int] = {}  # unanswered: id -> its (first) number
        self._rx_dups: dict[str, deque[int]] = {}  # more unanswered numbers of the same id
        self._rx_acked = 0  # the ``upTo`` of our last ``deltas_ack``

    # ---------------------------------------------------------------- inspection

    @property
    def unacknowledged(self) -> tuple[Delta, ...]:
        """Our deltas sent and not yet acknowledged or rejected, in send order."""
        return tuple(self._unacked.values())

    @property
    def held(self) -> tuple[Delta, ...]:
        """Our live deltas held back (peer paused, handshake not done, or waiting for room in
        the peer's window), in order."""
        held = tuple(m.delta for m in self._held if isinstance(m, DeltaMessage))
        return (*self._waiting, *held) if self._waiting else held

    @property
    def send_window(self) -> int | None:
        """Extension ``credit``: the peer's window (the most of our live deltas it accepts
        unacknowledged), or ``None`` when ``credit`` was not agreed."""
        return self._send_window

    @property
    def pending_count(self) -> int:
        """How many of our deltas are held or awaiting the peer's answer."""
        return len(self._unacked) + len(self._held_ids)

    def is_pending(self, delta_id: str) -> bool:
        """Whether our delta with this id is held or awaiting the peer's answer."""
        return delta_id in self._unacked or delta_id in self._held_ids

    @property
    def unanswered(self) -> frozenset[str]:
        """Ids of live deltas received and not yet answered with ``ack`` / ``nack``."""
        return frozenset(self._unanswered.union(self._rx_pending))

    @property
    def syncing(self) -> bool:
        """A sync is requested or running on this link."""
        return self._sync is not _Sync.NONE

    @property
    def closed(self) -> bool:
        """The link is over (:class:`Closed` was emitted)."""
        return self.state is State.CLOSED

    @property
    def is_open(self) -> bool:
        """The handshake is done and the link is not closing."""
        return self.state is State.OPEN

    @property
    def has_output(self) -> bool:
        """Whether :meth:`messages_to_send` has something to hand out."""
        return bool(self._outbox or self._batch) or (
            self._rx_done > self._rx_acked and self.state is not State.CLOSED
        )

    @property
    def outbox_size(self) -> int:
        """Characters of the messages queued for :meth:`messages_to_send` (the live deltas
        committed to the next ``deltas`` message are not encoded yet and not counted)."""
        return sum(len(m) for m in self._outbox)

    def messages_to_send(self) -> list[str]:
        """Take the queued outgoing messages (JSON text, one per WebSocket text frame).

        With extension ``batch``, this is when committed live deltas become ``deltas``
        messages (at most ``max_batch`` each) and when the answers given since the last call
        become one ``deltas_ack``."""
        if self._batch:
            self._flush_batch()
        if self._rx_done > self._rx_acked and self.state is not State.CLOSED:
            self._rx_acked = self._rx_done
            self._outbox.append(encode(DeltasAck(timestamp=self._clock(), up_to=self._rx_done)))
        out, self._outbox = self._outbox, []
        return out

    def events(self) -> list[Event]:
        """Take the queued events, oldest first."""
        out = list(self._events)
        self._events.clear()
        return out

    def next_event(self) -> Event | None:
        """Take the oldest queued event, or ``None``."""
        return self._events.popleft() if self._events else None

    # ---------------------------------------------------------------- time

    def start(self, now: float) -> None:
        """The message channel is up: a client sends ``hello``; both arm the heartbeat."""
        if self._last_heard is not None or self.state in (State.CLOSING, State.CLOSED):
            raise LocalProtocolError("already started", code=ErrorCode.UNEXPECTED_MESSAGE)
        self._last_heard = now
        self._next_ping = now + self.ping_interval
        if self.role is Role.CLIENT:
            self._send(
                Hello(
                    timestamp=self._clock(),
                    system_id=self.system_id,
                    config=self.config,
                    extensions=self.extensions_offered or msgspec.UNSET,
                    window=self.receive_window
                    if "credit" in self.extensions_offered
                    else msgspec.UNSET,
                )
            )
            self.state = State.HELLO_SENT

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called (monotonic seconds), or ``None``."""
        if self._last_heard is None or self._next_ping is None or self.state is State.CLOSED:
            return None
        if self.state is State.CLOSING:
            return None
        return min(self._next_ping, self._last_heard + self.ping_timeout)

    def handle_timer(self, now: float) -> None:
        """Send a due ping; declare the link dead after ``ping_timeout`` of silence."""
        if self._last_heard is None or self._next_ping is None:
            return
        if self.state in (State.CLOSING, State.CLOSED):
            return
        # the same sum as get_timer's deadline: ``now - last >= timeout`` can be false in
        # floating point at that very deadline, and the timer would never move on
        if now >= self._last_heard + self.ping_timeout:
            self._events.append(PingTimeout(silent_for=now - self._last_heard))
            self.connection_closed(CloseCode.ABNORMAL, "ping timeout")
            return
        if now >= self._next_ping:
            if self.state is State.OPEN:
                self._send(Ping(timestamp=self._clock()))
            self._next_ping = now + self.ping_interval

    def heard_from_peer(self, now: float) -> None:
        """Any frame arrived (a WebSocket ping counts): the peer is alive."""
        if self._last_heard is not None and now > self._last_heard:
            self._last_heard = now

    # ---------------------------------------------------------------- input

    def receive_message(self, text: str, now: float | None = None) -> None:
        """Handle one message from the peer.

        Raises :class:`RemoteProtocolError` on a fatal violation (the ``error`` message is
        queued and the state is ``CLOSING``); non-fatal violations are answered and reported as
        :class:`ProtocolViolation` events.
        """
        if now is not None:
            self.heard_from_peer(now)
        if self.state in (State.CLOSING, State.CLOSED):
            return
        try:
            message = decode(text)
        except CodecError as exc:
            self._codec_error(exc)
            return
        self._dispatch(message)

    def receive_invalid(self, code: ErrorCode, detail: str) -> None:
        """The layer below received something that is not a text message (a binary frame):
        answer it like an undecodable message."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        self._violation(code, detail)

    def connection_closed(self, code: int = CloseCode.ABNORMAL, reason: str = "") -> None:
        """The link ended (close handshake done, or transport lost): emit :class:`Closed`."""
        if self.state is State.CLOSED:
            return
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.state = State.CLOSED
        unsettled = (*self._unacked.values(), *self.held)
        self._unacked.clear()
        self._held.clear()
        self._held_ids.clear()
        self._waiting.clear()
        self._batch.clear()
        self._inflight.clear()
        self._seq_of.clear()
        self._events.append(Closed(code=code, reason=reason, unsettled=unsettled))

    # ---------------------------------------------------------------- application calls

    def send_delta(self, delta: Delta, *, validate: bool = True) -> None:
        """Send a live delta. Held (not dropped) while the peer has paused us or the handshake
        is not done, or (extension ``credit``) while the peer's window is full; tracked until
        the peer acknowledges or rejects it. With extension ``batch`` it goes out in the next
        ``deltas`` message, made when output is taken (:meth:`messages_to_send`).

        ``validate=False`` skips the check against spec section 2.1.1 (a round trip through
        the codec, the dearest part of this call): only for deltas valid by construction,
        such as those decoded from the wire; an invalid one would be rejected by the peer.
        """
        state = self.state
        if state is State.CLOSING or state is State.CLOSED:
            self._require_not_closing("send a delta")
        delta_id = delta.id
        if delta_id in self._unacked or delta_id in self._held_ids:
            raise LocalProtocolError(
                f"delta {delta_id!r} is already pending on this link",
                code=ErrorCode.UNEXPECTED_MESSAGE,
            )
        if validate:
            try:
                delta = validate_delta(delta)
            except InvalidDeltaError as exc:
                raise LocalProtocolError(
                    f"invalid delta: {exc}", code=ErrorCode.INVALID_DELTA
                ) from None
        if state is not State.OPEN or self.peer_paused or self._held:
            self._held.append(DeltaMessage(timestamp=self._clock(), delta=delta))
            self._held_ids.add(delta_id)
        elif self._waiting or (
            self._send_window is not None and len(self._unacked) >= self._send_window
        ):
            self._waiting.append(delta)
            self._held_ids.add(delta_id)
        elif self._batching:  # _commit, inlined: this is the hot path
            self._unacked[delta_id] = delta
            self._tx_seq = number = self._tx_seq + 1
            self._seq_of[delta_id] = number
            self._inflight.append(delta_id)
            self._batch.append(delta)
        else:
            self._commit(delta)

    def ack(self, delta_id: str) -> None:
        """Accept a received delta (after storing it). Does nothing once the link is closing.

        A delta that came in a ``deltas`` message (extension ``batch``) is not acknowledged
        on its own: the next :meth:`messages_to_send` sends one ``deltas_ack`` for every
        delta answered in order so far."""
        if self.state is State.OPEN or self._answerable():
            number = self._rx_pending.pop(delta_id, 0)
            if not number:
                self._unanswered.discard(delta_id)
                self._send(DeltaAck(timestamp=self._clock(), delta_id=delta_id))
            elif number == self._rx_done + 1 and not self._rx_ahead and not self._rx_dups:
                self._rx_done = number  # answered in order: the common case
            else:
                self._answered(delta_id, number)

    def nack(self, delta_id: str, reason: str) -> None:
        """Reject a received delta (live or from a sync batch), saying why. Always sent at
        once as ``delta_nack``, so it precedes any ``deltas_ack`` that covers the delta."""
        if self._answerable():
            self._send(DeltaNack(timestamp=self._clock(), delta_id=delta_id, reason=reason))
            number = self._rx_pending.pop(delta_id, 0)
            if number:
                self._answered(delta_id, number)
            else:
                self._unanswered.discard(delta_id)

    def pause(self) -> None:
        """Ask the peer to send no live deltas until :meth:`resume` (no-op if already paused)."""
        self._require_open("pause")
        if not self.paused:
            self.paused = True
            self._send(Pause(timestamp=self._clock()))

    def resume(self) -> None:
        """Let the peer send again (no-op if not paused)."""
        self._require_open("resume")
        if self.paused:
            self.paused = False
            self._send(Resume(timestamp=self._clock()))

    def request_sync(
        self,
        filter: DeltaFilter | None = None,
        from_timestamp: float | None = None,
        *,
        from_cursor: str | None = None,
    ) -> None:
        """Client: ask for the initial sync (one at a time).

        ``from_cursor`` (extension ``cursor``): resume after the position the server gave in
        its last ``sync_batch`` / ``sync_complete``, whatever the clocks say.
        """
        self._require_open("request a sync")
        if self.role is not Role.CLIENT:
            raise LocalProtocolError(
                "only a client requests a sync", code=ErrorCode.UNEXPECTED_MESSAGE
            )
        if from_cursor is not None and "cursor" not in self.extensions_agreed:
            raise LocalProtocolError(
                "from_cursor needs the cursor extension, which the peer did not agree to",
                code=ErrorCode.SYNC_ERROR,
            )
        if self._sync is not _Sync.NONE:
            raise LocalProtocolError("a sync is already running", code=ErrorCode.SYNC_ERROR)
        self._send(
            SyncRequest(
                timestamp=self._clock(),
                filter=filter,
                from_timestamp=from_timestamp,
                from_cursor=from_cursor,
            )
        )
        self._sync = _Sync.REQUESTED

    def start_sync(self, total_deltas: int, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        """Server: answer the :class:`SyncRequested` with ``sync_start``."""
        self._require_server_sync(_Sync.REQUESTED, "start a sync")
        if total_deltas < 0 or batch_size < 1:
            raise LocalProtocolError(
                "total_deltas must be >= 0 and batch_size >= 1", code=ErrorCode.SYNC_ERROR
            )
        self._send(
            SyncStart(timestamp=self._clock(), total_deltas=total_deltas, batch_size=batch_size)
        )
        self._sync = _Sync.RUNNING
        self._sync_next_batch = 0
        self._sync_count = 0

    def send_sync_batch(
        self,
        deltas: Sequence[Delta | msgspec.Raw],
        *,
        last: bool,
        cursor: str | None = None,
    ) -> None:
        """Server: send the next batch (numbered automatically; ``last`` flags the final one).
        Held while the peer has paused us. ``cursor``: the position after it (extension).
        A delta may be given as ``msgspec.Raw`` of its canonical JSON (as a store keeps it):
        it is written into the message as it is, unchecked."""
        self._require_server_sync(_Sync.RUNNING, "send a sync batch")
        self._require_cursor_agreed(cursor)
        batch = SyncBatch(
            timestamp=self._clock(),
            deltas=cast("tuple[Delta, ...]", tuple(deltas)),
            batch_number=self._sync_next_batch,
            is_last_batch=last,
            cursor=cursor,
        )
        self._sync_next_batch += 1
        self._sync_count += len(batch.deltas)
        if last:
            self._sync = _Sync.BATCHES_DONE
        self._send_or_hold(batch)

    def complete_sync(self, cursor: str | None = None) -> None:
        """Server: send ``sync_complete`` (after the last batch, or when there were none);
        ``cursor``: where the next sync resumes (extension)."""
        self._require_cursor_agreed(cursor)
        if self._sync is _Sync.RUNNING and self._sync_next_batch == 0:
            self._sync = _Sync.BATCHES_DONE
        self._require_server_sync(_Sync.BATCHES_DONE, "complete a sync")
        self._sync = _Sync.NONE
        self._send_or_hold(
            SyncComplete(timestamp=self._clock(), deltas_processed=self._sync_count, cursor=cursor)
        )

    def _require_cursor_agreed(self, cursor: str | None) -> None:
        if cursor is not None and "cursor" not in self.extensions_agreed:
            raise LocalProtocolError(
                "a cursor needs the cursor extension, which the peer did not agree to",
                code=ErrorCode.SYNC_ERROR,
            )

    def reject_sync(self, message: str, code: ErrorCode = ErrorCode.SYNC_ERROR) -> None:
        """Server: refuse or abort the requested sync with an ``error``."""
        if self.role is not Role.SERVER or self._sync is _Sync.NONE:
            raise LocalProtocolError("no sync to reject", code=ErrorCode.SYNC_ERROR)
        self._require_open("reject a sync")
        self._sync = _Sync.NONE
        # batches held while the peer paused us belong to the sync being abandoned
        self._held = deque(m for m in self._held if not isinstance(m, SyncBatch | SyncComplete))
        self._send(ErrorMessage(timestamp=self._clock(), code=code, message=message))

    def send_error(self, code: ErrorCode | str, message: str, *, fatal: bool = False) -> None:
        """Send an ``error``; a fatal one starts closing the link."""
        self._require_not_closing("send an error")
        self._send(
            ErrorMessage(timestamp=self._clock(), code=code, message=message, fatal=fatal or None)
        )
        if fatal:
            self._begin_close(CloseCode.POLICY_VIOLATION, f"{code}: {message}")

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start closing: nothing more is sent. :class:`Closed` follows when the channel below
        reports it with :meth:`connection_closed`. A no-op once closing."""
        if self.state not in (State.CLOSING, State.CLOSED):
            self._begin_close(code, reason)

    # ---------------------------------------------------------------- internals

    def _send(self, message: Message) -> None:
        if self._batch:  # committed deltas go first: the wire keeps the order of the calls
            self._flush_batch()
        self._outbox.append(encode(message))

    def _flush_batch(self) -> None:
        batch, self._batch = self._batch, []
        timestamp = self._clock()
        size = self.max_batch
        if len(batch) <= size:
            self._outbox.append(encode(DeltasMessage(timestamp=timestamp, deltas=tuple(batch))))
            return
        for start in range(0, len(batch), size):
            chunk = tuple(batch[start : start + size])
            self._outbox.append(encode(DeltasMessage(timestamp=timestamp, deltas=chunk)))

    def _commit(self, delta: Delta, message: DeltaMessage | None = None) -> None:
        """Put a live delta on the wire (now, or with ``batch`` at the next output) and track
        it until the peer settles it."""
        delta_id = delta.id
        self._unacked[delta_id] = delta
        if self._batching:
            self._tx_seq += 1
            self._seq_of[delta_id] = self._tx_seq
            self._inflight.append(delta_id)
            self._batch.append(delta)
        else:
            self._send(message or DeltaMessage(timestamp=self._clock(), delta=delta))

    def _no_room(self) -> bool:
        return self._send_window is not None and len(self._unacked) >= self._send_window

    def _drain_waiting(self) -> None:
        """Extension ``credit``: send waiting deltas, in order, while the window has room."""
        if self.peer_paused or self.state is not State.OPEN:
            return
        waiting = self._waiting
        window = self._send_window
        room = len(waiting) if window is None else window - len(self._unacked)
        held_ids = self._held_ids
        while waiting and room > 0:
            delta = waiting.popleft()
            held_ids.discard(delta.id)
            self._commit(delta)
            room -= 1

    def _settled(self, delta_id: str) -> None:
        """One of our deltas was settled by id (``delta_ack`` / ``delta_nack``)."""
        seq_of = self._seq_of
        if seq_of and seq_of.pop(delta_id, None) is not None and not seq_of:
            # every batched delta is settled: the numbers still queued name none of them
            self._inflight.clear()
            self._inflight_base = self._tx_seq
        if self._waiting:
            self._drain_waiting()

    def _answered(self, delta_id: str, number: int) -> None:
        """The application answered the peer's batched delta ``number`` (id ``delta_id``)."""
        if self._rx_dups:
            more = self._rx_dups.get(delta_id)
            if more:
                self._rx_pending[delta_id] = more.popleft()
                if not more:
                    del self._rx_dups[delta_id]
        self._answered_number(number)

    def _answered_number(self, number: int) -> None:
        if number == self._rx_done + 1:
            ahead = self._rx_ahead
            if ahead:
                while number + 1 in ahead:
                    number += 1
                    ahead.remove(number)
            self._rx_done = number
        else:
            self._rx_ahead.add(number)

    def _check_window(self, arriving: int) -> None:
        """Extension ``credit``: report a peer whose live deltas in flight go beyond our
        window (once per excursion beyond it; the deltas are delivered all the same)."""
        if not self._credit:
            return
        unanswered = len(self._unanswered) + self._rx_seq - self._rx_done - len(self._rx_ahead)
        if unanswered <= self.receive_window < unanswered + arriving:
            self._violation(
                ErrorCode.FLOW_CONTROL,
                f"{unanswered + arriving} unacknowledged live deltas in flight, "
                f"beyond the window of {self.receive_window}",
            )

    def _send_or_hold(self, message: Message) -> None:
        if self.peer_paused or self._held:
            self._held.append(message)
        else:
            self._send(message)

    def _flush_held(self) -> None:
        """The handshake is done or the peer resumed: send what was held, in order."""
        if self._waiting:  # older than anything held
            self._drain_waiting()
        held = self._held
        while held:
            message = held.popleft()
            if isinstance(message, DeltaMessage):
                if self._waiting or self._no_room():
                    self._waiting.append(message.delta)  # its id stays in _held_ids
                    continue
                self._held_ids.discard(message.delta.id)
                self._commit(message.delta, message)
            else:
                self._send(message)

    def _begin_close(self, code: int, reason: str) -> None:
        self.state = State.CLOSING
        self.close_code, self.close_reason = code, reason

    def _answerable(self) -> bool:
        if self.state in (State.CLOSING, State.CLOSED):
            return False
        if self.state is not State.OPEN:
            raise LocalProtocolError(
                "nothing to answer before the handshake", code=ErrorCode.UNEXPECTED_MESSAGE
            )
        return True

    def _require_open(self, action: str) -> None:
        if self.state is not State.OPEN:
            raise LocalProtocolError(
                f"cannot {action} in state {self.state.value}", code=ErrorCode.UNEXPECTED_MESSAGE
            )

    def _require_not_closing(self, action: str) -> None:
        if self.state in (State.CLOSING, State.CLOSED):
            raise LocalProtocolError(
                f"cannot {action}: the link is {self.state.value}",
                code=ErrorCode.UNEXPECTED_MESSAGE,
            )

    def _require_server_sync(self, expected: _Sync, action: str) -> None:
        self._require_open(action)
        if self.role is not Role.SERVER or self._sync is not expected:
            raise LocalProtocolError(
                f"cannot {action} now (sync is {self._sync.value})", code=ErrorCode.SYNC_ERROR
            )

    def _violation(self, code: ErrorCode, message: str, *, delta_id: str | None = None) -> None:
        """Answer a bad message: fatally before the handshake, else with an error or a nack."""
        if self.state in _HANDSHAKE_STATES:
            self._send(
                ErrorMessage(timestamp=self._clock(), code=code, message=message, fatal=True)
            )
            self._begin_close(CloseCode.PROTOCOL_ERROR, f"{code}: {message}")
            raise RemoteProtocolError(message, code=code, close_code=CloseCode.PROTOCOL_ERROR)
        if delta_id is not None:
            self._send(DeltaNack(timestamp=self._clock(), delta_id=delta_id, reason=message))
        else:
            self._send(ErrorMessage(timestamp=self._clock(), code=code, message=message))
        self._events.append(ProtocolViolation(code=code, message=message))

    def _codec_error(self, exc: CodecError) -> None:
        if exc.items is not None and self.state is State.OPEN:
            if self._batching:
                self._receive_items(exc.items)
            else:
                self._not_agreed("deltas")
            return
        if exc.code is ErrorCode.INVALID_DELTA and self.state is State.OPEN:
            self._violation(exc.code, str(exc), delta_id=exc.delta_id)
        else:
            self._violation(exc.code, str(exc))

    def _dispatch(self, message: Message) -> None:
        mtype = type(message).__struct_config__.tag
        state = self.state
        if state is not self._accepted_in:  # looked up again only when the state changed
            self._accepted_in = state
            self._accepted = _ACCEPTED.get((self.role, state), frozenset())
        if mtype not in self._accepted:
            self._violation(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"unexpected {mtype} for a {self.role.value} in state {self.state.value}",
            )
            return
        extension = _EXTENSION_OF.get(str(mtype))
        if extension is not None and extension not in self.extensions_agreed:
            self._not_agreed(str(mtype))
            return
        getattr(self, _HANDLERS[type(message)])(message)

    def _not_agreed(self, mtype: str) -> None:
        self._violation(
            ErrorCode.UNEXPECTED_MESSAGE,
            f"unexpected {mtype} for a {self.role.value} in state {self.state.value}: "
            f"extension {_EXTENSION_OF[mtype]} not agreed",
        )

    def _agree(self, extensions: Iterable[str], window: int | msgspec.UnsetType) -> None:
        self.extensions_agreed = frozenset(extensions)
        self._batching = "batch" in self.extensions_agreed
        self._credit = "credit" in self.extensions_agreed
        self._send_window = window if self._credit and isinstance(window, int) else None

    def _on_hello(self, message: Hello) -> None:
        if message.protocol != PROTOCOL_VERSION:
            self._protocol_mismatch(message.protocol)
        assert self.link_id is not None
        self.remote_system_id = message.system_id
        self.remote_config = message.config
        answer: tuple[str, ...] | msgspec.UnsetType = msgspec.UNSET
        if message.extensions is not msgspec.UNSET:  # a client of ours: answer with a list
            offered = message.extensions
            if message.window is msgspec.UNSET:  # no credit without the client's window
                offered = tuple(e for e in offered if e != "credit")
            answer = tuple(e for e in self.extensions_offered if e in offered)
            self._agree(answer, message.window)
        self._send(
            HelloAck(
                timestamp=self._clock(),
                system_id=self.system_id,
                link_id=self.link_id,
                extensions=answer,
                window=self.receive_window if self._credit else msgspec.UNSET,
            )
        )
        self.state = State.OPEN
        self._events.append(
            HandshakeComplete(
                remote_system_id=message.system_id,
                link_id=self.link_id,
                remote_config=message.config,
                extensions=self.extensions_agreed,
            )
        )
        self._flush_held()

    def _on_hello_ack(self, message: HelloAck) -> None:
        if message.protocol != PROTOCOL_VERSION:
            self._protocol_mismatch(message.protocol)
        self.remote_system_id = message.system_id
        self.link_id = message.link_id
        if message.extensions is not msgspec.UNSET:  # only what we offered counts
            agreed = frozenset(message.extensions) & frozenset(self.extensions_offered)
            if message.window is msgspec.UNSET:  # no credit without the server's window
                agreed -= {"credit"}
            self._agree(agreed, message.window)
        self.state = State.OPEN
        self._events.append(
            HandshakeComplete(
                remote_system_id=message.system_id,
                link_id=message.link_id,
                remote_config=None,
                extensions=self.extensions_agreed,
            )
        )
        self._flush_held()

    def _protocol_mismatch(self, protocol: str) -> None:
        text = f"Unsupported protocol: {protocol}"
        self._send(
            ErrorMessage(
                timestamp=self._clock(), code=ErrorCode.PROTOCOL_MISMATCH, message=text, fatal=True
            )
        )
        self._begin_close(CloseCode.PROTOCOL_ERROR, text)
        raise RemoteProtocolError(
            text, code=ErrorCode.PROTOCOL_MISMATCH, close_code=CloseCode.PROTOCOL_ERROR
        )

    def _on_delta(self, message: DeltaMessage) -> None:
        self._check_window(1)
        self._unanswered.add(message.delta.id)
        self._events.append(DeltaReceived(delta=message.delta))

    def _on_delta_ack(self, message: DeltaAck) -> None:
        if self._unacked.pop(message.delta_id, None) is None:
            self.stray_acks += 1
        else:
            self._events.append(DeltaAcked(delta_id=message.delta_id))
            self._settled(message.delta_id)

    def _on_delta_nack(self, message: DeltaNack) -> None:
        if self._unacked.pop(message.delta_id, None) is None:
            self.stray_acks += 1
        else:
            self._events.append(DeltaRejected(delta_id=message.delta_id, reason=message.reason))
            self._settled(message.delta_id)

    def _on_deltas(self, message: DeltasMessage) -> None:
        deltas = message.deltas
        self._check_window(len(deltas))
        number = self._rx_seq
        pending = self._rx_pending
        append = self._events.append
        for delta in deltas:
            number += 1
            if pending.setdefault(delta.id, number) != number:  # already pending: a duplicate
                self._rx_dups.setdefault(delta.id, deque()).append(number)
            event = _new(DeltaReceived)  # DeltaReceived(delta=delta), at half the cost
            _set(event, "delta", delta)
            append(event)
        self._rx_seq = number

    def _receive_items(self, items: Sequence[Delta | CodecError]) -> None:
        """A ``deltas`` message holding invalid deltas: each element keeps its number; the
        valid ones are delivered, the invalid ones answered at once (``delta_nack`` naming
        the rule, or ``INVALID_DELTA`` when the id cannot be read) and counted as answered."""
        self._check_window(len(items))
        for item in items:
            self._rx_seq += 1
            if isinstance(item, CodecError):
                self._answered_number(self._rx_seq)
                self._violation(ErrorCode.INVALID_DELTA, str(item), delta_id=item.delta_id)
            else:
                if self._rx_pending.setdefault(item.id, self._rx_seq) != self._rx_seq:
                    self._rx_dups.setdefault(item.id, deque()).append(self._rx_seq)
                self._events.append(DeltaReceived(delta=item))

    def _on_deltas_ack(self, message: DeltasAck) -> None:
        sent = self._tx_seq - len(self._batch)  # numbers that went out in ``deltas`` messages
        up_to = message.up_to
        if up_to > sent or up_to <= self._tx_acked:  # beyond what we sent, or backwards
            self.stray_acks += 1
            up_to = min(up_to, sent)
            if up_to <= self._tx_acked:
                return
        inflight, seq_of, unacked = self._inflight, self._seq_of, self._unacked
        append = self._events.append
        number = self._inflight_base
        while inflight and number < up_to:
            number += 1
            delta_id = inflight.popleft()
            if seq_of.get(delta_id) == number:  # not settled by id meanwhile
                del seq_of[delta_id]
                del unacked[delta_id]
                event = _new(DeltaAcked)  # DeltaAcked(delta_id=delta_id), at half the cost
                _set(event, "delta_id", delta_id)
                append(event)
        self._inflight_base = max(number, up_to)
        self._tx_acked = up_to
        if self._waiting:
            self._drain_waiting()

    def _on_sync_request(self, message: SyncRequest) -> None:
        if self._sync is not _Sync.NONE:
            self._violation(ErrorCode.SYNC_ERROR, "a sync is already running on this link")
            return
        self._sync = _Sync.REQUESTED
        self._events.append(
            SyncRequested(
                filter=message.filter,
                from_timestamp=message.from_timestamp,
                from_cursor=message.from_cursor if "cursor" in self.extensions_agreed else None,
            )
        )

    def _on_sync_start(self, message: SyncStart) -> None:
        if self._sync is not _Sync.REQUESTED:
            self._violation(ErrorCode.UNEXPECTED_MESSAGE, "sync_start without a sync_request")
            return
        self._sync = _Sync.RUNNING
        self._sync_next_batch = 0
        self._sync_count = 0
        self._events.append(
            SyncStarted(total_deltas=message.total_deltas, batch_size=message.batch_size)
        )

    def _on_sync_batch(self, message: SyncBatch) -> None:
        if self._sync is not _Sync.RUNNING or message.batch_number != self._sync_next_batch:
            self._violation(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"unexpected sync_batch {message.batch_number} "
                f"(expected {self._sync_next_batch}, sync {self._sync.value})",
            )
            return
        self._sync_next_batch += 1
        self._sync_count += len(message.deltas)
        if message.is_last_batch:
            self._sync = _Sync.BATCHES_DONE
        self._events.append(
            SyncBatchReceived(
                deltas=message.deltas,
                batch_number=message.batch_number,
                is_last_batch=message.is_last_batch,
                cursor=message.cursor if "cursor" in self.extensions_agreed else None,
            )
        )

    def _on_sync_complete(self, message: SyncComplete) -> None:
        if self._sync not in (_Sync.RUNNING, _Sync.BATCHES_DONE):
            self._violation(ErrorCode.UNEXPECTED_MESSAGE, "sync_complete without a sync")
            return
        self._sync = _Sync.NONE
        self._events.append(
            SyncCompleted(
                deltas_processed=message.deltas_processed,
                deltas_received=self._sync_count,
                cursor=message.cursor if "cursor" in self.extensions_agreed else None,
            )
        )

    def _on_pause(self, message: Pause) -> None:
        self.peer_paused = True
        self._events.append(Paused())

    def _on_resume(self, message: Resume) -> None:
        self.peer_paused = False
        self._events.append(Resumed())
        self._flush_held()

    def _on_ping(self, message: Ping) -> None:
        self._send(Pong(timestamp=self._clock()))

    def _on_pong(self, message: Pong) -> None:
        pass

    def _on_error(self, message: ErrorMessage) -> None:
        if (
            self.role is Role.CLIENT
            and self._sync is not _Sync.NONE
            and message.code in (ErrorCode.SYNC_ERROR, ErrorCode.SYNC_NOT_SUPPORTED)
        ):
            self._sync = _Sync.NONE  # the server refused or aborted our sync: it is over
        self._events.append(
            ErrorReceived(code=message.code, message=message.message, fatal=bool(message.fatal))
        )
