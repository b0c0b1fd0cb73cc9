"""``FederationProtocol``: the message-level federation state machine, for one link.

Text messages in, text messages out; no WebSocket, no sockets, no clock. Use it directly when
the application already terminates WebSocket itself (Starlette, aiohttp, Django Channels);
:class:`~rhizome_proto.FederationConnection` stacks it on wsproto for bytes in, bytes out.

The three drivers: text from the peer (:meth:`receive_message`), calls from the application
(``send_delta``, ``ack``, ``pause`` ...), and time (:meth:`handle_timer`). Each queues messages
(:meth:`messages_to_send`) and events (:meth:`events`). Time is ``now``, monotonic seconds,
passed in; message timestamps come from the injected ``clock`` (wall-clock milliseconds).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from enum import Enum

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

__all__ = ["DEFAULT_BATCH_SIZE", "FederationProtocol", "Role", "State"]

DEFAULT_BATCH_SIZE = 100


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
        | {"pause", "resume", "ping", "pong", "error"}
    ),
    (Role.CLIENT, State.OPEN): frozenset(
        {"delta", "delta_ack", "delta_nack", "sync_start", "sync_batch", "sync_complete"}
        | {"pause", "resume", "ping", "pong", "error"}
    ),
}
_HANDSHAKE_STATES = (State.IDLE, State.HELLO_SENT, State.AWAITING_HELLO)


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
            A v1 peer agrees to none. Known: ``"cursor"`` (see :meth:`request_sync`).
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
    ) -> None:
        if not system_id:
            raise ValueError("system_id must be a non-empty string")
        if role is Role.SERVER and not link_id:
            raise ValueError("a server connection needs a link_id")
        if ping_interval <= 0 or ping_timeout <= 0:
            raise ValueError("ping_interval and ping_timeout must be positive")
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

    # ---------------------------------------------------------------- inspection

    @property
    def unacknowledged(self) -> tuple[Delta, ...]:
        """Our deltas sent and not yet acknowledged or rejected, in send order."""
        return tuple(self._unacked.values())

    @property
    def held(self) -> tuple[Delta, ...]:
        """Our live deltas held back (peer paused, or handshake not done), in order."""
        return tuple(m.delta for m in self._held if isinstance(m, DeltaMessage))

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
        return frozenset(self._unanswered)

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

    def messages_to_send(self) -> list[str]:
        """Take the queued outgoing messages (JSON text, one per WebSocket text frame)."""
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
        silent = now - self._last_heard
        if silent >= self.ping_timeout:
            self._events.append(PingTimeout(silent_for=silent))
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
        self._events.append(Closed(code=code, reason=reason, unsettled=unsettled))

    # ---------------------------------------------------------------- application calls

    def send_delta(self, delta: Delta) -> None:
        """Send a live delta. Held (not dropped) while the peer has paused us or the handshake
        is not done; tracked until the peer acknowledges or rejects it."""
        self._require_not_closing("send a delta")
        if self.is_pending(delta.id):
            raise LocalProtocolError(
                f"delta {delta.id!r} is already pending on this link",
                code=ErrorCode.UNEXPECTED_MESSAGE,
            )
        try:
            delta = validate_delta(delta)
        except InvalidDeltaError as exc:
            raise LocalProtocolError(
                f"invalid delta: {exc}", code=ErrorCode.INVALID_DELTA
            ) from None
        message = DeltaMessage(timestamp=self._clock(), delta=delta)
        if self.state is not State.OPEN or self.peer_paused or self._held:
            self._held.append(message)
            self._held_ids.add(delta.id)
        else:
            self._unacked[delta.id] = delta
            self._send(message)

    def ack(self, delta_id: str) -> None:
        """Accept a received delta (after storing it). Does nothing once the link is closing."""
        if self._answerable():
            self._unanswered.discard(delta_id)
            self._send(DeltaAck(timestamp=self._clock(), delta_id=delta_id))

    def nack(self, delta_id: str, reason: str) -> None:
        """Reject a received delta (live or from a sync batch), saying why."""
        if self._answerable():
            self._unanswered.discard(delta_id)
            self._send(DeltaNack(timestamp=self._clock(), delta_id=delta_id, reason=reason))

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
        self, deltas: tuple[Delta, ...] | list[Delta], *, last: bool, cursor: str | None = None
    ) -> None:
        """Server: send the next batch (numbered automatically; ``last`` flags the final one).
        Held while the peer has paused us. ``cursor``: the position after it (extension)."""
        self._require_server_sync(_Sync.RUNNING, "send a sync batch")
        self._require_cursor_agreed(cursor)
        batch = SyncBatch(
            timestamp=self._clock(),
            deltas=tuple(deltas),
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
        self._outbox.append(encode(message))

    def _send_or_hold(self, message: Message) -> None:
        if self.peer_paused or self._held:
            self._held.append(message)
        else:
            self._send(message)

    def _flush_held(self) -> None:
        while self._held and not self.peer_paused:
            message = self._held.popleft()
            if isinstance(message, DeltaMessage):
                self._held_ids.discard(message.delta.id)
                self._unacked[message.delta.id] = message.delta
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
        if exc.code is ErrorCode.INVALID_DELTA and self.state is State.OPEN:
            self._violation(exc.code, str(exc), delta_id=exc.delta_id)
        else:
            self._violation(exc.code, str(exc))

    def _dispatch(self, message: Message) -> None:
        mtype = type(message).__struct_config__.tag
        accepted = _ACCEPTED.get((self.role, self.state), frozenset())
        if mtype not in accepted:
            self._violation(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"unexpected {mtype} for a {self.role.value} in state {self.state.value}",
            )
            return
        handler = getattr(self, "_on_" + str(mtype))
        handler(message)

    def _on_hello(self, message: Hello) -> None:
        if message.protocol != PROTOCOL_VERSION:
            self._protocol_mismatch(message.protocol)
        assert self.link_id is not None
        self.remote_system_id = message.system_id
        self.remote_config = message.config
        answer: tuple[str, ...] | msgspec.UnsetType = msgspec.UNSET
        if message.extensions is not msgspec.UNSET:  # a client of ours: answer with a list
            answer = tuple(e for e in self.extensions_offered if e in message.extensions)
            self.extensions_agreed = frozenset(answer)
        self._send(
            HelloAck(
                timestamp=self._clock(),
                system_id=self.system_id,
                link_id=self.link_id,
                extensions=answer,
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
            self.extensions_agreed = frozenset(message.extensions) & frozenset(
                self.extensions_offered
            )
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
        self._unanswered.add(message.delta.id)
        self._events.append(DeltaReceived(delta=message.delta))

    def _on_delta_ack(self, message: DeltaAck) -> None:
        if self._unacked.pop(message.delta_id, None) is None:
            self.stray_acks += 1
        else:
            self._events.append(DeltaAcked(delta_id=message.delta_id))

    def _on_delta_nack(self, message: DeltaNack) -> None:
        if self._unacked.pop(message.delta_id, None) is None:
            self.stray_acks += 1
        else:
            self._events.append(DeltaRejected(delta_id=message.delta_id, reason=message.reason))

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
