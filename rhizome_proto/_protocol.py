"""``FederationProtocol``: the message-level federation state machine, for one link.

Text messages in, text messages out; no WebSocket, no sockets, no clock. Use it directly when
the application already terminates WebSocket itself (Starlette, aiohttp, Django Channels);
:class:`~rhizome_proto.FederationConnection` stacks it on wsproto for bytes in, bytes out.

The three drivers: text from the peer (:meth:`receive_message`), calls from the application
(``send_delta``, ``ack``, ``pause`` ...), and time (:meth:`handle_timer`). Each queues messages
(:meth:`messages_to_send`) and events (:meth:`events`). Time is ``now``, monotonic seconds,
passed in; message timestamps come from the injected ``clock`` (wall-clock milliseconds).

Every rule of the protocol is one row of ``TRANSITIONS`` (at the end of this module):
``(role, state, sync progress, input) -> Row`` (check, effect, next state, next sync progress).
Every guard reads it: an application call it does not list raises :class:`LocalProtocolError`
before anything changes; a peer's message it does not list is answered with
``UNEXPECTED_MESSAGE``. docs/state-table.md is generated from it.

Extensions ``batch`` and ``credit`` (docs/extensions.md) live here too. With ``batch`` our live
deltas are numbered 1, 2, 3 ... as they are committed to the wire and coalesced into ``deltas``
messages when output is taken; received ones are numbered in arrival order and answered with
one cumulative ``deltas_ack`` (the contiguous answered prefix, kept incrementally). With
``credit`` live deltas beyond the peer's window wait, in order, until acknowledgements free room.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import NoReturn, Protocol, cast

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
from ._ratelimit import TokenBucket

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_ID_LENGTH",
    "DEFAULT_RECEIVE_WINDOW",
    "INPUTS",
    "TRANSITIONS",
    "FederationProtocol",
    "LinkEndpoint",
    "Role",
    "Row",
    "State",
    "SyncProgress",
]

DEFAULT_BATCH_SIZE = 100
#: extension ``batch``: the most live deltas in one ``deltas`` message we send
DEFAULT_MAX_BATCH = 1000
#: extension ``credit``: the most unacknowledged live deltas we accept from the peer
DEFAULT_RECEIVE_WINDOW = 10_000
#: The longest id, author, system id or link id accepted from a peer (characters): a delta
#: with a longer one is refused (``delta_nack`` naming the rule, or an ``INVALID_DELTA`` error
#: when the id itself is the long one), a ``hello`` / ``hello_ack`` with one is fatal.
DEFAULT_MAX_ID_LENGTH = 4096


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


class SyncProgress(Enum):
    """How far the initial sync on this link got (beside :class:`State`, in the table)."""

    #: no sync requested or running
    NONE = "none"
    #: client: ``sync_request`` sent; server: :class:`SyncRequested` emitted
    REQUESTED = "requested"
    #: ``sync_start`` sent (server) or received (client), no batch yet
    STARTED = "started"
    #: batches sent or received, not the last one yet
    BATCHES = "batches"
    #: the last batch went (server) or came (client); ``sync_complete`` follows
    DONE = "done"


# ------------------------------------------------------------------ the inputs of the table
# The peer's messages are named by their ``type``; a ``sync_batch`` and an ``error`` are split
# by what they say. The application's calls are named ``call()``; then time and the channel.
SYNC_BATCH_LAST = "sync_batch(last)"
ERROR_SYNC = "error(SYNC_*)"  # an ``error`` coded SYNC_ERROR or SYNC_NOT_SUPPORTED
MESSAGE_INPUTS: tuple[str, ...] = (
    *(str(cls.__struct_config__.tag) for cls in Message.__args__),
    SYNC_BATCH_LAST,
    ERROR_SYNC,
)
START = "start()"
SEND_DELTA = "send_delta()"
ACK = "ack()"
NACK = "nack()"
PAUSE = "pause()"
RESUME = "resume()"
REQUEST_SYNC = "request_sync()"
START_SYNC = "start_sync()"
SEND_SYNC_BATCH = "send_sync_batch(last=False)"
SEND_LAST_SYNC_BATCH = "send_sync_batch(last=True)"
COMPLETE_SYNC = "complete_sync()"
REJECT_SYNC = "reject_sync()"
SEND_ERROR = "send_error()"
SEND_FATAL_ERROR = "send_error(fatal=True)"
CLOSE = "close()"
CALL_INPUTS = (
    START,
    SEND_DELTA,
    ACK,
    NACK,
    PAUSE,
    RESUME,
    REQUEST_SYNC,
    START_SYNC,
    SEND_SYNC_BATCH,
    SEND_LAST_SYNC_BATCH,
    COMPLETE_SYNC,
    REJECT_SYNC,
    SEND_ERROR,
    SEND_FATAL_ERROR,
    CLOSE,
)
_SYNC_CALLS = frozenset(
    {REQUEST_SYNC, START_SYNC, SEND_SYNC_BATCH, SEND_LAST_SYNC_BATCH, COMPLETE_SYNC, REJECT_SYNC}
)
PING_DUE = "timer: ping due"
PEER_SILENT = "timer: ping timeout"
FATAL = "fatal violation"  # we found the peer's input fatal: we close with an error
CONNECTION_CLOSED = "connection_closed()"
OTHER_INPUTS = (PING_DUE, PEER_SILENT, FATAL, CONNECTION_CLOSED)
INPUTS = (*MESSAGE_INPUTS, *CALL_INPUTS, *OTHER_INPUTS)
#: The peer's input refused before the handshake is fatal (an ``error`` with ``fatal`` and a
#: close); once open it is answered (``error`` or ``delta_nack``) and reported.
HANDSHAKE_STATES = (State.IDLE, State.HELLO_SENT, State.AWAITING_HELLO)


@dataclass(frozen=True, slots=True)
class Row:
    """One transition: what an input does in a (role, state, sync progress).

    ``effect`` names the method that runs (``""``: the input is ignored); ``check`` the
    method that vets a peer's message first (it answers the violation and returns false);
    ``extension`` the extension that must have been agreed. The move to ``next_state`` /
    ``next_sync`` happens after every check and before the effect."""

    next_state: State
    next_sync: SyncProgress
    effect: str
    check: str = ""
    extension: str = ""
    #: the state or the sync progress changes
    moves: bool = False
    #: the effect and the check as functions (resolved when the table is built)
    handler: Callable[..., None] | None = field(default=None, compare=False)
    vet: Callable[..., bool] | None = field(default=None, compare=False)


# Events made per delta of a batch skip the frozen dataclass __init__ (same object, no checks
# to skip: these events have one field and no __post_init__).
_new = object.__new__
_set = object.__setattr__
_encoder = msgspec.json.Encoder()


def _as_deltas(batch: Sequence[Delta | msgspec.Raw]) -> tuple[Delta, ...]:
    """A ``deltas`` message's deltas, some as their JSON already (msgspec writes it as is)."""
    return cast(tuple[Delta, ...], tuple(batch))


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
    def pending_bytes(self) -> int: ...
    @property
    def outbound_size(self) -> int: ...
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
    def limit_rate(self, rate: float, burst: float | None = None) -> None: ...
    def fail_input(self, code: ErrorCode, text: str) -> None: ...
    def shed(self, reason: str) -> None: ...


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
        max_id_length: the longest delta id, author, system id (of a delta or a ``hello``)
            and link id accepted from the peer, in characters (see ``DEFAULT_MAX_ID_LENGTH``).
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
        max_id_length: int = DEFAULT_MAX_ID_LENGTH,
    ) -> None:
        if not system_id:
            raise ValueError("system_id must be a non-empty string")
        if role is Role.SERVER and not link_id:
            raise ValueError("a server connection needs a link_id")
        if ping_interval <= 0 or ping_timeout <= 0:
            raise ValueError("ping_interval and ping_timeout must be positive")
        if receive_window < 1 or max_batch < 1 or max_id_length < 1:
            raise ValueError("receive_window, max_batch and max_id_length must be at least 1")
        #: the longest id, author or system id accepted from the peer (characters)
        self.max_id_length = max_id_length
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
        #: a server: the system ids the peer may claim in ``hello`` (``None``: any); set from
        #: the peer's credential before its ``hello`` (``FederationConnection`` does so)
        self.allowed_system_ids: frozenset[str] | None = None
        #: the link's state; the sync's progress and the pause flags sit beside it
        self.state = State.IDLE if role is Role.CLIENT else State.AWAITING_HELLO
        self._sync = SyncProgress.NONE
        # the table's rows for the current (role, state, sync progress), keyed by input (and
        # by message class), whether the peer's input is ignored here, whether timers run
        self._rows: dict[object, Row] = {}
        self._deaf = False
        self._timed = False
        self._enter(self.state, self._sync)
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
        self._outbox_size = 0  # characters in _outbox
        # rate limit (``limit_rate``): the bucket, units read since the last ``read_delay``,
        # and whether the peer was told it is over its rate in this excursion
        self._bucket: TokenBucket | None = None
        self._rx_units = 0
        self._limited = False
        self._events: deque[Event] = deque()
        self._unacked: dict[str, Delta] = {}
        # the JSON size of each of our pending deltas (held, waiting or unacknowledged)
        self._sizes: dict[str, int] = {}
        self._pending_bytes = 0
        self._held: deque[Message] = deque()
        self._held_ids: set[str] = set()
        self._unanswered: set[str] = set()
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
        # sending, "batch": deltas committed (in _unacked, numbered) not yet in a message,
        # as their JSON when it was at hand
        self._batch: list[Delta | msgspec.Raw] = []
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

    @property
    def pending_bytes(self) -> int:
        """The bytes of JSON of our deltas held or awaiting the peer's answer (the memory
        they keep is about proportional): what a node bounds per link and in all."""
        return self._pending_bytes

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
        return self._sync is not SyncProgress.NONE

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
        return self._outbox_size

    @property
    def outbound_size(self) -> int:
        """What is queued for the peer, in characters of messages (:attr:`outbox_size`)."""
        return self._outbox_size

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
        self._outbox_size = 0
        return out

    def events(self) -> list[Event]:
        """Take the queued events, oldest first."""
        out = list(self._events)
        self._events.clear()
        return out

    def next_event(self) -> Event | None:
        """Take the oldest queued event, or ``None``."""
        return self._events.popleft() if self._events else None

    # ---------------------------------------------------------------- the table

    def _enter(self, state: State, sync: SyncProgress) -> None:
        """The one place the state and the sync progress change (always per a row)."""
        self.state = state
        self._sync = sync
        self._rows, self._deaf, self._timed = _BY_STATE[(self.role, state, sync)]

    def _refuse(self, action: str) -> NoReturn:
        """An application call the table does not allow here: nothing changed."""
        sync = f" (sync {self._sync.value})" if self.state is State.OPEN else ""
        code = (
            ErrorCode.SYNC_ERROR
            if action in _SYNC_CALLS and self.state is State.OPEN
            else ErrorCode.UNEXPECTED_MESSAGE
        )
        raise LocalProtocolError(
            f"cannot {action} for a {self.role.value} in state {self.state.value}{sync}",
            code=code,
        )

    def _allow(self, action: str) -> Row:
        row = self._rows.get(action)
        if row is None:
            self._refuse(action)
        return row

    def _go(self, row: Row) -> None:
        if row.moves:
            self._enter(row.next_state, row.next_sync)

    # ---------------------------------------------------------------- time

    def start(self, now: float) -> None:
        """The message channel is up: a client sends ``hello``; both arm the heartbeat."""
        row = self._allow(START)
        if self._last_heard is not None:
            raise LocalProtocolError("already started", code=ErrorCode.UNEXPECTED_MESSAGE)
        self._go(row)
        assert row.handler is not None
        row.handler(self, now)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called (monotonic seconds), or ``None``."""
        if self._last_heard is None or self._next_ping is None or not self._timed:
            return None
        return min(self._next_ping, self._last_heard + self.ping_timeout)

    def handle_timer(self, now: float) -> None:
        """Send a due ping; declare the link dead after ``ping_timeout`` of silence."""
        if self._last_heard is None or self._next_ping is None:
            return
        # the same sum as get_timer's deadline: ``now - last >= timeout`` can be false in
        # floating point at that very deadline, and the timer would never move on
        if now >= self._last_heard + self.ping_timeout:
            due = PEER_SILENT
        elif now >= self._next_ping:
            due = PING_DUE
        else:
            return
        row = self._rows.get(due)
        if row is not None and row.handler is not None:
            self._go(row)
            row.handler(self, now)

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
        if self._deaf:
            return
        if self._bucket is not None:
            self._rx_units += 1
        try:
            message = decode(text)
        except CodecError as exc:
            self._codec_error(exc)
            return
        if len(text) > self.max_id_length and self._over_length(message):
            return
        self._dispatch(message)

    def receive_invalid(self, code: ErrorCode, detail: str) -> None:
        """The layer below received something that is not a text message (a binary frame):
        answer it like an undecodable message."""
        if not self._deaf:
            self._violation(code, detail)

    def fail(self, code: int, reason: str) -> None:
        """The layer below found the peer's input fatal (a message too big, a framing
        error): closing begins with this close code. A no-op once closing."""
        self._fatal(code, reason)

    def connection_closed(self, code: int = CloseCode.ABNORMAL, reason: str = "") -> None:
        """The link ended (close handshake done, or transport lost): emit :class:`Closed`."""
        row = self._rows[CONNECTION_CLOSED]
        if row.handler is not None:
            self._go(row)
            row.handler(self, code, reason)

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
        row = self._rows.get(SEND_DELTA)
        if row is None:
            self._refuse(SEND_DELTA)
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
        row.handler(self, delta)  # type: ignore[misc]  # every SEND_DELTA row has one

    def ack(self, delta_id: str) -> None:
        """Accept a received delta (after storing it). Does nothing once the link is closing.

        A delta that came in a ``deltas`` message (extension ``batch``) is not acknowledged
        on its own: the next :meth:`messages_to_send` sends one ``deltas_ack`` for every
        delta answered in order so far."""
        row = self._rows.get(ACK)
        if row is None:
            self._refuse(ACK)
        if row.handler is not None:
            row.handler(self, delta_id)

    def nack(self, delta_id: str, reason: str) -> None:
        """Reject a received delta (live or from a sync batch), saying why. Always sent at
        once as ``delta_nack``, so it precedes any ``deltas_ack`` that covers the delta.
        Does nothing once the link is closing."""
        row = self._allow(NACK)
        if row.handler is not None:
            row.handler(self, delta_id, reason)

    def pause(self) -> None:
        """Ask the peer to send no live deltas until :meth:`resume` (no-op if already paused)."""
        self._call(PAUSE)

    def resume(self) -> None:
        """Let the peer send again (no-op if not paused)."""
        self._call(RESUME)

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
        row = self._allow(REQUEST_SYNC)
        self._require_cursor_agreed(from_cursor)
        self._call_row(row, filter, from_timestamp, from_cursor)

    def start_sync(self, total_deltas: int, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        """Server: answer the :class:`SyncRequested` with ``sync_start``."""
        row = self._allow(START_SYNC)
        if total_deltas < 0 or batch_size < 1:
            raise LocalProtocolError(
                "total_deltas must be >= 0 and batch_size >= 1", code=ErrorCode.SYNC_ERROR
            )
        self._call_row(row, total_deltas, batch_size)

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
        row = self._allow(SEND_LAST_SYNC_BATCH if last else SEND_SYNC_BATCH)
        self._require_cursor_agreed(cursor)
        self._call_row(row, deltas, last, cursor)

    def complete_sync(self, cursor: str | None = None) -> None:
        """Server: send ``sync_complete`` (after the last batch, or when there were none);
        ``cursor``: where the next sync resumes (extension)."""
        row = self._allow(COMPLETE_SYNC)
        self._require_cursor_agreed(cursor)
        self._call_row(row, cursor)

    def reject_sync(self, message: str, code: ErrorCode = ErrorCode.SYNC_ERROR) -> None:
        """Server: refuse or abort the requested sync with an ``error``."""
        self._call(REJECT_SYNC, message, code)

    def send_error(self, code: ErrorCode | str, message: str, *, fatal: bool = False) -> None:
        """Send an ``error``; a fatal one starts closing the link."""
        self._call(SEND_FATAL_ERROR if fatal else SEND_ERROR, code, message, fatal)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start closing: nothing more is sent. :class:`Closed` follows when the channel below
        reports it with :meth:`connection_closed`. A no-op once closing."""
        self._call(CLOSE, code, reason)

    def limit_rate(self, rate: float, burst: float | None = None) -> None:
        """Hold the peer to ``rate`` units a second (a unit: one message, or one delta of a
        ``deltas`` message), bursts of ``burst``: past it :meth:`read_delay` says how long
        the transport must not be read, and the peer is told once per excursion with a
        non-fatal ``RATE_LIMITED`` error (``rhizome_proto._ratelimit``)."""
        self._bucket = TokenBucket(rate, burst)

    def read_delay(self, now: float) -> float:
        """Seconds the adapter must wait from ``now`` before reading the peer again (0: read
        on). Counts what arrived since the last call against the rate limit, if any."""
        bucket = self._bucket
        if bucket is None:
            return 0.0
        units, self._rx_units = self._rx_units, 0
        delay = bucket.spend(units, now) if units else bucket.delay(now)
        if delay <= 0:
            self._limited = False
        elif not self._limited:
            self._limited = True
            row = self._rows.get(SEND_ERROR)
            if row is not None and row.handler is not None:
                self._call_row(
                    row,
                    ErrorCode.RATE_LIMITED,
                    f"over the rate limit of {bucket.rate:g} messages/s "
                    f"(burst {bucket.burst:g}): reading paused for {delay:.3f} s",
                    False,
                )
        return delay

    def fail_input(self, code: ErrorCode, text: str) -> None:
        """Handling the peer's input failed on our side (an exception where none should be):
        a fatal ``error`` saying so and closing (close code 1011). A no-op once closing."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        self._send(ErrorMessage(timestamp=self._clock(), code=code, message=text, fatal=True))
        self._fatal(CloseCode.INTERNAL_ERROR, f"{code}: {text}")

    def shed(self, reason: str) -> None:
        """The peer does not read what we queue for it beyond our memory bound: what is queued
        is dropped and the link ends now (:class:`Closed`, close code 1008, its unsettled
        deltas in it: the store has them, the peer gets them again when it returns)."""
        self._outbox.clear()
        self._outbox_size = 0
        if self.state is not State.CLOSED:
            self.close_code, self.close_reason = CloseCode.POLICY_VIOLATION, reason
            self.connection_closed(CloseCode.POLICY_VIOLATION, reason)

    def _call(self, action: str, *args: object) -> None:
        self._call_row(self._allow(action), *args)

    def _call_row(self, row: Row, *args: object) -> None:
        """Every check passed: move per the row, then run its effect."""
        self._go(row)
        if row.handler is not None:
            row.handler(self, *args)

    def _require_cursor_agreed(self, cursor: str | None) -> None:
        if cursor is not None and "cursor" not in self.extensions_agreed:
            raise LocalProtocolError(
                "a cursor needs the cursor extension, which the peer did not agree to",
                code=ErrorCode.SYNC_ERROR,
            )

    # ---------------------------------------------------------------- effects of the calls

    def _start_client(self, now: float) -> None:
        self._arm(now)
        self._send(
            Hello(
                timestamp=self._clock(),
                system_id=self.system_id,
                config=self.config,
                extensions=self.extensions_offered or msgspec.UNSET,
                window=(
                    self.receive_window if "credit" in self.extensions_offered else msgspec.UNSET
                ),
            )
        )

    def _arm(self, now: float) -> None:
        self._last_heard = now
        self._next_ping = now + self.ping_interval

    def _ping(self, now: float) -> None:
        self._send(Ping(timestamp=self._clock()))
        self._next_ping = now + self.ping_interval

    def _no_ping(self, now: float) -> None:  # before the handshake: the timer moves on
        self._next_ping = now + self.ping_interval

    def _peer_silent(self, now: float) -> None:
        assert self._last_heard is not None
        self._events.append(PingTimeout(silent_for=now - self._last_heard))
        self._closed(CloseCode.ABNORMAL, "ping timeout")

    def _closed(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        unsettled = (*self._unacked.values(), *self.held)
        self._unacked.clear()
        self._sizes.clear()
        self._pending_bytes = 0
        self._held.clear()
        self._held_ids.clear()
        self._waiting.clear()
        self._batch.clear()
        self._inflight.clear()
        self._seq_of.clear()
        # nothing more is sent or answered: what was kept for that goes now
        self._outbox.clear()
        self._outbox_size = 0
        self._unanswered.clear()
        self._rx_pending.clear()
        self._rx_dups.clear()
        self._rx_ahead.clear()
        self._events.append(Closed(code=code, reason=reason, unsettled=unsettled))

    def _pending(self, delta: Delta) -> bytes:
        """Our ``delta`` becomes pending: count its size; returns its JSON."""
        raw = _encoder.encode(delta)
        self._sizes[delta.id] = size = len(raw)
        self._pending_bytes += size
        return raw

    def _settle_size(self, delta_id: str) -> None:
        self._pending_bytes -= self._sizes.pop(delta_id, 0)

    def _hold_live(self, delta: Delta) -> None:
        self._pending(delta)
        self._held.append(DeltaMessage(timestamp=self._clock(), delta=delta))
        self._held_ids.add(delta.id)

    def _send_live(self, delta: Delta) -> None:
        raw = self._pending(delta)
        if self.peer_paused or self._held:
            self._held.append(DeltaMessage(timestamp=self._clock(), delta=delta))
            self._held_ids.add(delta.id)
        elif self._waiting or (
            self._send_window is not None and len(self._unacked) >= self._send_window
        ):
            self._waiting.append(delta)
            self._held_ids.add(delta.id)
        elif self._batching:  # _commit, inlined: this is the hot path
            delta_id = delta.id
            self._unacked[delta_id] = delta
            self._tx_seq = number = self._tx_seq + 1
            self._seq_of[delta_id] = number
            self._inflight.append(delta_id)
            self._batch.append(msgspec.Raw(raw))  # encoded once: for its size and the wire
        else:
            wire = cast(Delta, msgspec.Raw(raw))
            self._commit(delta, DeltaMessage(timestamp=self._clock(), delta=wire))

    def _ack(self, delta_id: str) -> None:
        number = self._rx_pending.pop(delta_id, 0)
        if not number:
            self._unanswered.discard(delta_id)
            self._send(DeltaAck(timestamp=self._clock(), delta_id=delta_id))
        elif number == self._rx_done + 1 and not self._rx_ahead and not self._rx_dups:
            self._rx_done = number  # answered in order: the common case
        else:
            self._answered(delta_id, number)

    def _nack(self, delta_id: str, reason: str) -> None:
        self._send(DeltaNack(timestamp=self._clock(), delta_id=delta_id, reason=reason))
        number = self._rx_pending.pop(delta_id, 0)
        if number:
            self._answered(delta_id, number)
        else:
            self._unanswered.discard(delta_id)

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self._send(Pause(timestamp=self._clock()))

    def _resume(self) -> None:
        if self.paused:
            self.paused = False
            self._send(Resume(timestamp=self._clock()))

    def _request_sync(
        self, filter: DeltaFilter | None, from_timestamp: float | None, from_cursor: str | None
    ) -> None:
        self._send(
            SyncRequest(
                timestamp=self._clock(),
                filter=filter,
                from_timestamp=from_timestamp,
                from_cursor=from_cursor,
            )
        )

    def _start_sync(self, total_deltas: int, batch_size: int) -> None:
        self._send(
            SyncStart(timestamp=self._clock(), total_deltas=total_deltas, batch_size=batch_size)
        )
        self._sync_next_batch = 0
        self._sync_count = 0

    def _send_sync_batch(
        self, deltas: Sequence[Delta | msgspec.Raw], last: bool, cursor: str | None
    ) -> None:
        batch = SyncBatch(
            timestamp=self._clock(),
            deltas=cast("tuple[Delta, ...]", tuple(deltas)),
            batch_number=self._sync_next_batch,
            is_last_batch=last,
            cursor=cursor,
        )
        self._sync_next_batch += 1
        self._sync_count += len(batch.deltas)
        self._send_or_hold(batch)

    def _complete_sync(self, cursor: str | None) -> None:
        self._send_or_hold(
            SyncComplete(timestamp=self._clock(), deltas_processed=self._sync_count, cursor=cursor)
        )

    def _reject_sync(self, message: str, code: ErrorCode) -> None:
        # batches held while the peer paused us belong to the sync being abandoned
        self._held = deque(m for m in self._held if not isinstance(m, SyncBatch | SyncComplete))
        self._send(ErrorMessage(timestamp=self._clock(), code=code, message=message))

    def _send_error(self, code: ErrorCode | str, message: str, fatal: bool) -> None:
        self._send(
            ErrorMessage(timestamp=self._clock(), code=code, message=message, fatal=fatal or None)
        )
        if fatal:
            self._closing(CloseCode.POLICY_VIOLATION, f"{code}: {message}")

    def _closing(self, code: int, reason: str) -> None:
        self.close_code, self.close_reason = code, reason

    # ---------------------------------------------------------------- internals

    def _send(self, message: Message) -> None:
        if self._batch:  # committed deltas go first: the wire keeps the order of the calls
            self._flush_batch()
        text = encode(message)
        self._outbox_size += len(text)
        self._outbox.append(text)

    def _flush_batch(self) -> None:
        batch, self._batch = self._batch, []
        timestamp = self._clock()
        size = self.max_batch
        if len(batch) <= size:
            text = encode(DeltasMessage(timestamp=timestamp, deltas=_as_deltas(batch)))
            self._outbox_size += len(text)
            self._outbox.append(text)
            return
        for start in range(0, len(batch), size):
            chunk = _as_deltas(batch[start : start + size])
            text = encode(DeltasMessage(timestamp=timestamp, deltas=chunk))
            self._outbox_size += len(text)
            self._outbox.append(text)

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
        if self.peer_paused:
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

    def _violation(self, code: ErrorCode, message: str, *, delta_id: str | None = None) -> None:
        """Answer a bad message: fatally before the handshake, else with an error or a nack."""
        if self.state in HANDSHAKE_STATES:
            self._send(
                ErrorMessage(timestamp=self._clock(), code=code, message=message, fatal=True)
            )
            self._fatal(CloseCode.PROTOCOL_ERROR, f"{code}: {message}")
            raise RemoteProtocolError(message, code=code, close_code=CloseCode.PROTOCOL_ERROR)
        if delta_id is not None:
            self._send(DeltaNack(timestamp=self._clock(), delta_id=delta_id, reason=message))
        else:
            self._send(ErrorMessage(timestamp=self._clock(), code=code, message=message))
        self._events.append(ProtocolViolation(code=code, message=message))

    def _fatal(self, code: int, reason: str) -> None:
        """We found the peer's input fatal: closing begins (the table's ``FATAL`` input)."""
        self._call(FATAL, code, reason)

    def _codec_error(self, exc: CodecError) -> None:
        rows = self._rows
        if exc.items is not None and "deltas" in rows:  # a ``deltas`` with invalid elements
            if self._batching:
                self._receive_items(exc.items)
            else:
                self._not_agreed("deltas")
            return
        if exc.code is ErrorCode.INVALID_DELTA and "delta" in rows:
            self._violation(exc.code, str(exc), delta_id=exc.delta_id)
        else:
            self._violation(exc.code, str(exc))

    def _dispatch(self, message: Message) -> None:
        rows = self._rows
        row = rows.get(type(message))  # by class: one look-up for most messages
        if row is None:
            name = _input_of(message)
            row = rows.get(name)
            if row is None:
                sync = f" (sync {self._sync.value})" if self.state is State.OPEN else ""
                self._violation(
                    ErrorCode.UNEXPECTED_MESSAGE,
                    f"unexpected {name} for a {self.role.value} in state {self.state.value}" + sync,
                )
                return
        if row.extension and row.extension not in self.extensions_agreed:
            self._not_agreed(_input_of(message))
            return
        if row.vet is not None and not row.vet(self, message):
            return
        if row.moves:
            self._enter(row.next_state, row.next_sync)
        if row.handler is not None:
            row.handler(self, message)

    def _too_long(self, delta: Delta) -> str | None:
        """Which of the delta's ids is over ``max_id_length``, as a reason, or ``None``."""
        cap = self.max_id_length
        if len(delta.id) <= cap and len(delta.author) <= cap and len(delta.system) <= cap:
            return None  # the common case, per delta of every large message: no tuples
        for name, value in (("id", delta.id), ("author", delta.author), ("system", delta.system)):
            if len(value) > cap:
                return f"delta {name} of {len(value)} characters: longer than {cap}"
        return None

    def _refuse_long(self, delta: Delta, reason: str) -> CodecError:
        """The error answering a delta with a too-long id: a ``delta_nack`` naming the rule,
        unless the id itself is too long to echo (then an ``INVALID_DELTA`` error)."""
        delta_id = delta.id if len(delta.id) <= self.max_id_length else None
        return CodecError(
            f"invalid delta: {reason}", code=ErrorCode.INVALID_DELTA, delta_id=delta_id
        )

    def _over_length(self, message: Message) -> bool:
        """A message longer than ``max_id_length`` may carry an id over it: a ``hello`` or
        ``hello_ack`` with one is refused (fatal), a delta with one is answered and not
        delivered (the others of its message are). Returns whether the message was handled
        here (nothing more to do)."""
        cap = self.max_id_length
        if isinstance(message, Hello | HelloAck):
            link_id = message.link_id if isinstance(message, HelloAck) else ""
            for name, value in (("systemId", message.system_id), ("linkId", link_id)):
                if len(value) > cap and self.state in HANDSHAKE_STATES:
                    self._refuse_peer(
                        ErrorCode.MESSAGE_ERROR,
                        f"{_input_of(message)} {name} of {len(value)} characters: "
                        f"longer than {cap}",
                    )
            return False
        if isinstance(message, DeltaMessage):
            reason = self._too_long(message.delta)
            if reason is None or "delta" not in self._rows:
                return False
            error = self._refuse_long(message.delta, reason)
            self._violation(error.code, str(error), delta_id=error.delta_id)
            return True
        if isinstance(message, DeltasMessage):
            reasons = [self._too_long(d) for d in message.deltas]
            if not any(reasons) or not self._batching or "deltas" not in self._rows:
                return False
            self._receive_items(
                tuple(
                    d if r is None else self._refuse_long(d, r)
                    for d, r in zip(message.deltas, reasons, strict=True)
                )
            )
            return True
        if isinstance(message, SyncBatch):
            keep: list[Delta] = []
            for delta in message.deltas:
                reason = self._too_long(delta)
                if reason is None:
                    keep.append(delta)
                elif self.state is State.OPEN:
                    error = self._refuse_long(delta, reason)
                    self._violation(error.code, str(error), delta_id=error.delta_id)
            if len(keep) < len(message.deltas):
                self._dispatch(msgspec.structs.replace(message, deltas=tuple(keep)))
                return True
        return False

    def _not_agreed(self, mtype: str) -> None:
        extension = _TABLE_EXTENSION.get(mtype, "")
        self._violation(
            ErrorCode.UNEXPECTED_MESSAGE,
            f"unexpected {mtype} for a {self.role.value} in state {self.state.value}: "
            f"extension {extension} not agreed",
        )

    def _agree(self, extensions: Iterable[str], window: int | msgspec.UnsetType) -> None:
        self.extensions_agreed = frozenset(extensions)
        self._batching = "batch" in self.extensions_agreed
        self._credit = "credit" in self.extensions_agreed
        self._send_window = window if self._credit and isinstance(window, int) else None

    def _check_hello(self, message: Hello | HelloAck) -> bool:
        """The peer's ``hello`` / ``hello_ack``: our protocol, not ourselves, and (a server
        with authentication) a system id its credential allows. Any failure is fatal."""
        if message.protocol != PROTOCOL_VERSION:
            self._refuse_peer(
                ErrorCode.PROTOCOL_MISMATCH, f"Unsupported protocol: {message.protocol}"
            )
        if message.system_id == self.system_id:
            self._refuse_peer(
                ErrorCode.SELF_LINK,
                f"the peer's system id {message.system_id!r} is ours: "
                "an instance cannot federate with itself",
            )
        allowed = self.allowed_system_ids
        if allowed is not None and message.system_id not in allowed:
            self._refuse_peer(
                ErrorCode.UNAUTHORIZED,
                f"system id {message.system_id!r} is not one this credential may claim",
            )
        return True

    def _on_hello(self, message: Hello) -> None:
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
        self.remote_system_id = message.system_id
        self.link_id = message.link_id
        if message.extensions is not msgspec.UNSET:  # only what we offered counts
            agreed = frozenset(message.extensions) & frozenset(self.extensions_offered)
            if message.window is msgspec.UNSET:  # no credit without the server's window
                agreed -= {"credit"}
            self._agree(agreed, message.window)
        self._events.append(
            HandshakeComplete(
                remote_system_id=message.system_id,
                link_id=message.link_id,
                remote_config=None,
                extensions=self.extensions_agreed,
            )
        )
        self._flush_held()

    def _refuse_peer(self, code: ErrorCode, text: str) -> NoReturn:
        """Refuse the peer's handshake: a fatal ``error``, closing, and the exception."""
        close_code = (
            CloseCode.POLICY_VIOLATION
            if code in (ErrorCode.UNAUTHORIZED, ErrorCode.SELF_LINK)
            else CloseCode.PROTOCOL_ERROR
        )
        self._send(ErrorMessage(timestamp=self._clock(), code=code, message=text, fatal=True))
        self._fatal(close_code, text)
        raise RemoteProtocolError(text, code=code, close_code=close_code)

    def _on_delta(self, message: DeltaMessage) -> None:
        self._check_window(1)
        self._unanswered.add(message.delta.id)
        self._events.append(DeltaReceived(delta=message.delta))

    def _on_delta_ack(self, message: DeltaAck) -> None:
        if self._unacked.pop(message.delta_id, None) is None:
            self.stray_acks += 1
        else:
            self._settle_size(message.delta_id)
            self._events.append(DeltaAcked(delta_id=message.delta_id))
            self._settled(message.delta_id)

    def _on_delta_nack(self, message: DeltaNack) -> None:
        if self._unacked.pop(message.delta_id, None) is None:
            self.stray_acks += 1
        else:
            self._settle_size(message.delta_id)
            self._events.append(DeltaRejected(delta_id=message.delta_id, reason=message.reason))
            self._settled(message.delta_id)

    def _on_deltas(self, message: DeltasMessage) -> None:
        deltas = message.deltas
        if self._bucket is not None:
            self._rx_units += len(deltas) - 1
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
        sizes, freed = self._sizes, 0
        append = self._events.append
        number = self._inflight_base
        while inflight and number < up_to:
            number += 1
            delta_id = inflight.popleft()
            if seq_of.get(delta_id) == number:  # not settled by id meanwhile
                del seq_of[delta_id]
                del unacked[delta_id]
                freed += sizes.pop(delta_id, 0)
                event = _new(DeltaAcked)  # DeltaAcked(delta_id=delta_id), at half the cost
                _set(event, "delta_id", delta_id)
                append(event)
        self._pending_bytes -= freed
        self._inflight_base = max(number, up_to)
        self._tx_acked = up_to
        if self._waiting:
            self._drain_waiting()

    def _on_sync_request_busy(self, message: SyncRequest) -> None:
        self._violation(ErrorCode.SYNC_ERROR, "a sync is already running on this link")

    def _on_sync_request(self, message: SyncRequest) -> None:
        self._events.append(
            SyncRequested(
                filter=message.filter,
                from_timestamp=message.from_timestamp,
                from_cursor=message.from_cursor if "cursor" in self.extensions_agreed else None,
            )
        )

    def _on_sync_start(self, message: SyncStart) -> None:
        self._sync_next_batch = 0
        self._sync_count = 0
        self._events.append(
            SyncStarted(total_deltas=message.total_deltas, batch_size=message.batch_size)
        )

    def _check_sync_batch(self, message: SyncBatch) -> bool:
        if message.batch_number != self._sync_next_batch:
            self._violation(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"unexpected sync_batch {message.batch_number} "
                f"(expected {self._sync_next_batch}, sync {self._sync.value})",
            )
            return False
        return True

    def _on_sync_batch(self, message: SyncBatch) -> None:
        self._sync_next_batch += 1
        self._sync_count += len(message.deltas)
        self._events.append(
            SyncBatchReceived(
                deltas=message.deltas,
                batch_number=message.batch_number,
                is_last_batch=message.is_last_batch,
                cursor=message.cursor if "cursor" in self.extensions_agreed else None,
            )
        )

    def _on_sync_complete(self, message: SyncComplete) -> None:
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
        self._events.append(
            ErrorReceived(code=message.code, message=message.message, fatal=bool(message.fatal))
        )


# ====================================================================== the transition table
#
# ``TRANSITIONS[(role, state, sync progress, input)]`` is every rule of the protocol: what the
# input does there (``Row``). Anything absent is refused: an application call raises
# ``LocalProtocolError`` and changes nothing; a peer's message is answered with
# ``UNEXPECTED_MESSAGE`` (fatal before the handshake, an ``error`` + ``ProtocolViolation``
# once open). docs/state-table.md is generated from it (docs/gen_state_table.py).

TRANSITIONS: dict[tuple[Role, State, SyncProgress, str], Row] = {}
_TABLE_EXTENSION: dict[str, str] = {"deltas": "batch", "deltas_ack": "batch"}


def _input_of(message: Message) -> str:
    """The table's input for a peer's message."""
    if isinstance(message, SyncBatch) and message.is_last_batch:
        return SYNC_BATCH_LAST
    if isinstance(message, ErrorMessage) and message.code in (
        ErrorCode.SYNC_ERROR,
        ErrorCode.SYNC_NOT_SUPPORTED,
    ):
        return ERROR_SYNC
    return str(type(message).__struct_config__.tag)


def _rule(
    roles: Iterable[Role],
    states: Iterable[State],
    syncs: Iterable[SyncProgress],
    inputs: Iterable[str],
    effect: str,
    *,
    to: State | None = None,
    sync_to: SyncProgress | None = None,
    check: str = "",
) -> None:
    """Add the rows: in each (role, state, sync) each input runs ``effect`` and moves to
    ``to`` / ``sync_to`` (unchanged when ``None``)."""
    syncs = tuple(syncs)
    inputs = tuple(inputs)
    for role in roles:
        for state in states:
            for sync in syncs:
                for name in inputs:
                    key = (role, state, sync, name)
                    assert key not in TRANSITIONS, key
                    next_state, next_sync = to or state, sync_to or sync
                    TRANSITIONS[key] = Row(
                        next_state,
                        next_sync,
                        effect,
                        check=check,
                        extension=_TABLE_EXTENSION.get(name, "") if effect else "",
                        moves=(next_state, next_sync) != (state, sync),
                        handler=getattr(FederationProtocol, effect) if effect else None,
                        vet=getattr(FederationProtocol, check) if check else None,
                    )


def _build() -> None:
    both, client, server = tuple(Role), (Role.CLIENT,), (Role.SERVER,)
    Y = SyncProgress
    anysync, nosync = tuple(Y), (Y.NONE,)
    OPEN, CLOSING, CLOSED = State.OPEN, State.CLOSING, State.CLOSED
    hs_client, hs_server = (State.IDLE, State.HELLO_SENT), (State.AWAITING_HELLO,)
    started = {Role.CLIENT: (State.HELLO_SENT,), Role.SERVER: (State.AWAITING_HELLO,)}

    # the handshake
    _rule(client, [State.IDLE], nosync, [START], "_start_client", to=State.HELLO_SENT)
    _rule(server, hs_server, nosync, [START], "_arm")
    _rule(server, [OPEN], anysync, [START], "_arm")  # a server may hear hello before start
    _rule(server, hs_server, nosync, ["hello"], "_on_hello", to=OPEN, check="_check_hello")
    _rule(
        client, [State.HELLO_SENT], nosync, ["hello_ack"], "_on_hello_ack", to=OPEN,
        check="_check_hello",
    )  # fmt: skip
    _rule(client, [State.HELLO_SENT], nosync, ["ping"], "_on_ping")
    _rule(client, [State.HELLO_SENT], nosync, ["pong"], "_on_pong")
    _rule(client, [State.HELLO_SENT], nosync, ["error", ERROR_SYNC], "_on_error")
    # before the handshake: live deltas are held until the link is open
    for role, states in ((Role.CLIENT, hs_client), (Role.SERVER, hs_server)):
        _rule([role], states, nosync, [SEND_DELTA], "_hold_live")
        _rule([role], states, nosync, [SEND_ERROR], "_send_error")
        _rule([role], states, nosync, [SEND_FATAL_ERROR], "_send_error", to=CLOSING)
        _rule([role], states, nosync, [CLOSE], "_closing", to=CLOSING)
        _rule([role], states, nosync, [FATAL], "_closing", to=CLOSING)
        _rule([role], states, nosync, [CONNECTION_CLOSED], "_closed", to=CLOSED)
        _rule([role], started[role], nosync, [PING_DUE], "_no_ping")
        _rule([role], started[role], nosync, [PEER_SILENT], "_peer_silent", to=CLOSED)

    # open, whatever the sync does: live deltas, pause, ping, errors, closing
    for name, effect in (
        ("delta", "_on_delta"),
        ("delta_ack", "_on_delta_ack"),
        ("delta_nack", "_on_delta_nack"),
        ("deltas", "_on_deltas"),
        ("deltas_ack", "_on_deltas_ack"),
        ("pause", "_on_pause"),
        ("resume", "_on_resume"),
        ("ping", "_on_ping"),
        ("pong", "_on_pong"),
        ("error", "_on_error"),
        (SEND_DELTA, "_send_live"),
        (ACK, "_ack"),
        (NACK, "_nack"),
        (PAUSE, "_pause"),
        (RESUME, "_resume"),
        (SEND_ERROR, "_send_error"),
        (PING_DUE, "_ping"),
    ):
        _rule(both, [OPEN], anysync, [name], effect)
    _rule(both, [OPEN], anysync, [SEND_FATAL_ERROR], "_send_error", to=CLOSING)
    _rule(both, [OPEN], anysync, [CLOSE, FATAL], "_closing", to=CLOSING)
    _rule(both, [OPEN], anysync, [PEER_SILENT], "_peer_silent", to=CLOSED)
    _rule(both, [OPEN], anysync, [CONNECTION_CLOSED], "_closed", to=CLOSED)

    # the sync, client side: request, then start, batches numbered 0, 1, 2 ..., complete
    _rule(client, [OPEN], nosync, [REQUEST_SYNC], "_request_sync", sync_to=Y.REQUESTED)
    _rule(client, [OPEN], [Y.REQUESTED], ["sync_start"], "_on_sync_start", sync_to=Y.STARTED)
    for name, after in (("sync_batch", Y.BATCHES), (SYNC_BATCH_LAST, Y.DONE)):
        _rule(
            client, [OPEN], [Y.STARTED, Y.BATCHES], [name], "_on_sync_batch", sync_to=after,
            check="_check_sync_batch",
        )  # fmt: skip
    _rule(
        client, [OPEN], [Y.STARTED, Y.BATCHES, Y.DONE], ["sync_complete"], "_on_sync_complete",
        sync_to=Y.NONE,
    )  # fmt: skip
    # the server refused or aborted our sync: it is over
    _rule(client, [OPEN], anysync, [ERROR_SYNC], "_on_error", sync_to=Y.NONE)

    # the sync, server side: one at a time; batches after start; complete after the last one
    # (or with none at all)
    _rule(server, [OPEN], nosync, ["sync_request"], "_on_sync_request", sync_to=Y.REQUESTED)
    _rule(server, [OPEN], tuple(Y)[1:], ["sync_request"], "_on_sync_request_busy")
    _rule(server, [OPEN], anysync, [ERROR_SYNC], "_on_error")
    _rule(server, [OPEN], [Y.REQUESTED], [START_SYNC], "_start_sync", sync_to=Y.STARTED)
    _rule(
        server, [OPEN], [Y.STARTED, Y.BATCHES], [SEND_SYNC_BATCH], "_send_sync_batch",
        sync_to=Y.BATCHES,
    )  # fmt: skip
    _rule(
        server, [OPEN], [Y.STARTED, Y.BATCHES], [SEND_LAST_SYNC_BATCH], "_send_sync_batch",
        sync_to=Y.DONE,
    )  # fmt: skip
    _rule(server, [OPEN], [Y.STARTED, Y.DONE], [COMPLETE_SYNC], "_complete_sync", sync_to=Y.NONE)
    _rule(server, [OPEN], tuple(Y)[1:], [REJECT_SYNC], "_reject_sync", sync_to=Y.NONE)

    # closing and closed: the peer's input is ignored, answers and closing are no-ops
    _rule(both, [CLOSING, CLOSED], anysync, MESSAGE_INPUTS, "")
    _rule(both, [CLOSING, CLOSED], anysync, [ACK, NACK, CLOSE, FATAL, PING_DUE, PEER_SILENT], "")
    _rule(both, [CLOSING], anysync, [CONNECTION_CLOSED], "_closed", to=CLOSED)
    _rule(both, [CLOSED], anysync, [CONNECTION_CLOSED], "")


_build()

_CLASS_OF: dict[str, type] = {
    str(cls.__struct_config__.tag): cls
    for cls in Message.__args__
    if cls not in (SyncBatch, ErrorMessage)  # split by content: looked up by input name
}


def _by_state() -> dict[tuple[Role, State, SyncProgress], tuple[dict[object, Row], bool, bool]]:
    """Per (role, state, sync): the rows by input (and by message class, for one look-up per
    message), whether the peer's input is ignored there, whether the heartbeat timers run."""
    rows: dict[tuple[Role, State, SyncProgress], dict[object, Row]] = {
        (role, state, sync): {} for role in Role for state in State for sync in SyncProgress
    }
    for (role, state, sync, name), row in TRANSITIONS.items():
        here = rows[(role, state, sync)]
        here[name] = row
        if name in _CLASS_OF:
            here[_CLASS_OF[name]] = row
    out = {}
    for key, here in rows.items():
        deaf = all(name in here and here[name].handler is None for name in MESSAGE_INPUTS)
        silent = here.get(PEER_SILENT)
        out[key] = (here, deaf, silent is not None and silent.handler is not None)
    return out


_BY_STATE = _by_state()
