"""``FederationConnection``: the federation protocol over WebSocket, bytes in, bytes out.

The way wsproto stacks on h11, this stacks :class:`FederationProtocol` (messages) on wsproto
(frames and the HTTP upgrade). It adds what WebSocket needs: the client's upgrade request, the
server's acceptance (or a plain HTTP error for anything that is not an upgrade to our path), the
close handshake with proper codes, a maximum message size (close 1009), answers to WebSocket
pings, a bound on what a compressed message may inflate to, and timeouts for the opening and
closing handshakes.

Once upgraded, it writes its text frames and splits the peer's frames itself: a whole text
frame, nearly every frame either side sends, is read without wsproto's per-frame objects
(which cost more than the rest of a small message's work), and every other frame goes to
wsproto from its first byte, which decides it as it always does.

The pump an adapter runs after every input is always the same::

    try:
        conn.receive_data(data, now)
    except RemoteProtocolError:
        pass                      # already answered; the close is queued
    for event in conn.events(): ...
    transport.write(conn.data_to_send())
    if conn.should_close: transport.close()
    sleep until conn.get_timer(), then conn.handle_timer(now)
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import h11
import msgspec
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits
from wsproto.utilities import RemoteProtocolError as WSRemoteProtocolError

from ._auth import (
    BEARER_SUBPROTOCOL_PREFIX,
    SUBPROTOCOL,
    Credentials,
    Principal,
    token_from_request,
)
from ._delta import Delta
from ._errors import CloseCode, ErrorCode, LocalProtocolError, RemoteProtocolError
from ._events import Event
from ._filter import DeltaFilter
from ._messages import FederationConfig
from ._protocol import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_ID_LENGTH,
    DEFAULT_RECEIVE_WINDOW,
    FederationProtocol,
    LinkEndpoint,
    Role,
    State,
)

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "DEFAULT_PATH", "FederationConnection", "server_path"]

DEFAULT_PATH = "/federation"


def server_path(path: str) -> str:
    """The URL path a server serves, checked: ``federation`` means ``/federation`` (without its
    slash the URL would read ``ws://host:portfederation``). Raises ``ValueError`` for a path
    with spaces, ``?``, ``#`` or anything but printable ASCII."""
    checked = path if path.startswith("/") else "/" + path
    if any(c in checked for c in "?#") or any(not 0x21 <= ord(c) <= 0x7E for c in checked):
        raise ValueError(f"not a URL path: {path!r} (printable ASCII, no '?', '#' or spaces)")
    return checked


#: Messages larger than this (in bytes of UTF-8) close the connection with 1009.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
_MAX_REJECT_BODY = 4096


_DATA = (TextMessage, BytesMessage)
#: where h11 ends an HTTP head (its own rule: the first blank line, ``\n\r?\n``)
_HEAD_END = re.compile(b"\n\r?\n")


#: for each byte value ``k``, the table that translates a byte ``b`` to ``b ^ k``
_XOR = [bytes(b ^ k for b in range(256)) for k in range(256)]


def _mask(data: bytes, key: bytes) -> bytes:
    """``data`` XOR the 4-byte masking ``key`` repeated (RFC 6455 section 5.3): masks and
    unmasks. A short payload as one integer; a longer one every fourth byte at once, by
    ``bytes.translate`` (about 1 ns a byte, against 3 for integers)."""
    size = len(data)
    if size < 512:
        mask = int.from_bytes(key * ((size >> 2) + 1), "little")
        return (int.from_bytes(data, "little") ^ mask).to_bytes(size + 4, "little")[:size]
    out = bytearray(data)
    for i in range(4):
        out[i::4] = out[i::4].translate(_XOR[key[i]])
    return bytes(out)


class _BoundedDeflate(PerMessageDeflate):
    """permessage-deflate that refuses to inflate a message beyond ``max_size`` bytes.

    wsproto inflates without a bound; a few KiB of deflate can expand to gigabytes. The
    negotiation and the outbound side are wsproto's; the inbound side (RFC 7692 section 7.2.2)
    is carried here, on wsproto's public extension hooks and negotiated parameters only: it
    decompresses with ``max_length`` and fails the message with 1009 past the limit.
    """

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self.max_size = max_size
        self._inflated = 0  # bytes of the current message so far
        self._rx_inflater: zlib._Decompress | None = None
        self._rx_message_compressed: bool | None = None  # set by a message's first frame
        self._rx_frame_data = False  # the current frame is a data frame (not control)

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, length: int
    ) -> CloseReason | RsvBits:
        if rsv.rsv1 and (opcode.iscontrol() or opcode is Opcode.CONTINUATION):
            return CloseReason.PROTOCOL_ERROR
        self._rx_frame_data = not opcode.iscontrol()
        if self._rx_frame_data and self._rx_message_compressed is None:
            self._rx_message_compressed = rsv.rsv1
            if rsv.rsv1 and self._rx_inflater is None:
                bits = self.server_max_window_bits if proto.client else self.client_max_window_bits
                self._rx_inflater = zlib.decompressobj(-bits)
        return RsvBits(True, False, False)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._rx_frame_data or not self._rx_message_compressed:
            return data
        assert self._rx_inflater is not None
        return self._inflate(bytes(data))

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if not fin or not self._rx_frame_data:
            return None
        compressed, self._rx_message_compressed = self._rx_message_compressed, None
        if not compressed:
            self._inflated = 0
            return None
        out = self._inflate(b"\x00\x00\xff\xff")  # the tail the sender stripped
        self._inflated = 0
        no_takeover = (
            self.server_no_context_takeover if proto.client else self.client_no_context_takeover
        )
        if no_takeover:
            self._rx_inflater = None
        return out

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        assert self._rx_inflater is not None
        remaining = self.max_size - self._inflated
        try:
            out = self._rx_inflater.decompress(data, remaining + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if self._inflated > self.max_size or self._rx_inflater.unconsumed_tail:
            return CloseReason.MESSAGE_TOO_BIG
        return out


class FederationConnection:
    """One federation link over WebSocket, for either role, as a sans-IO object.

    It owns a :class:`FederationProtocol` (the way wsproto owns an h11 connection) and offers
    only its own surface: bytes in and out, events, the timer, and the application calls,
    each handed on to the protocol explicitly. Nothing on it reaches the message level
    directly, so every message it queues reaches the wire.

    Parameters are those of :class:`FederationProtocol` plus:
        host: the ``Host`` of the client's upgrade request.
        path: the request path (client) or the only path accepted (server).
        extra_headers: more request headers for the client (an auth token, for instance).
        max_message_size: the largest message accepted, in bytes (close 1009 beyond).
        compression: offer (client) or accept (server) permessage-deflate, bounded as above.
        open_timeout: seconds allowed for the HTTP upgrade to complete.
        close_timeout: seconds to wait for the peer's close frame before giving up.
        credentials: a server's accepted bearer tokens (``rhizome_proto._auth``): an upgrade
            without a valid one is answered 401, and the ``hello`` may claim only the system
            ids the token allows (else a fatal ``UNAUTHORIZED``). ``None``: anyone (v1).
        token: a client's bearer token, sent as ``Authorization: Bearer <token>``.

    Feed transport bytes to :meth:`receive_data`, write :meth:`data_to_send`, close the
    transport when :attr:`should_close` is true, and call :meth:`handle_timer` at
    :meth:`get_timer`.
    """

    def __init__(
        self,
        role: Role,
        *,
        system_id: str,
        clock: Callable[[], int | float],
        config: FederationConfig | None = None,
        link_id: str | None = None,
        host: str = "localhost",
        path: str = DEFAULT_PATH,
        extra_headers: Sequence[tuple[str, str]] = (),
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        compression: bool = False,
        ping_interval: float = 30.0,
        ping_timeout: float = 90.0,
        open_timeout: float = 10.0,
        close_timeout: float = 10.0,
        extensions: Iterable[str] = (),
        receive_window: int = DEFAULT_RECEIVE_WINDOW,
        max_batch: int = DEFAULT_MAX_BATCH,
        credentials: Credentials | None = None,
        token: str | None = None,
        max_id_length: int = DEFAULT_MAX_ID_LENGTH,
    ) -> None:
        self._proto = FederationProtocol(
            role,
            system_id=system_id,
            clock=clock,
            config=config,
            link_id=link_id,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            extensions=extensions,
            receive_window=receive_window,
            max_batch=max_batch,
            max_id_length=max_id_length,
        )
        if max_message_size < 1:
            raise ValueError("max_message_size must be positive")
        self.role = role
        self.host = host
        self.path = path
        if token is not None:
            if not token or any(c.isspace() or not c.isprintable() for c in token):
                raise ValueError("a token must be non-empty printable text without spaces")
            extra_headers = (*extra_headers, ("Authorization", f"Bearer {token}"))
        self.extra_headers = tuple(extra_headers)
        self.credentials = credentials
        #: server with credentials: who the client authenticated as, once it did
        self.principal: Principal | None = None
        self.max_message_size = max_message_size
        self.compression = compression
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        #: the client's upgrade request (server side), once received
        self.request: Request | None = None
        #: the transport should be closed once :meth:`data_to_send` has been written
        self.should_close = False
        self._ws = WSConnection(
            ConnectionType.CLIENT if role is Role.CLIENT else ConnectionType.SERVER
        )
        # server: our h11 reads the upgrade request (and answers a refusal); what follows
        # the request in the same read is kept in _trailing until the upgrade is accepted
        self._http = h11.Connection(h11.SERVER) if role is Role.SERVER else None
        self._trailing: bytes | None = None
        # upgraded, we split the peer's frames (:meth:`_read_frames`): an incomplete frame's
        # bytes wait in _frames until there are _frames_need of them, wsproto owes _ws_owed
        # bytes of a frame it was given the start of, and a fragmented message it was given
        # is not finished. A client keeps the response head read so far in _head (None once
        # it ended)
        self._split = False
        self._head: bytes | None = b"" if role is Role.CLIENT else None
        self._frames = bytearray()
        self._frames_need = 0
        self._ws_owed = 0
        self._ws_in_message = False
        self._request_headers: list[tuple[bytes, bytes]] = []
        self._out = bytearray()
        self._rx: list[str] = []
        self._rx_size = 0
        self._rx_binary = False
        self._ws_started = False
        self._open_deadline: float | None = None
        # when closing began (the close timeout runs from it): always the ``now`` of the call
        # during which it began, never one remembered from an earlier call
        self._closing_since: float | None = None
        self._reject_status: int | None = None
        self._reject_body = bytearray()
        #: wsproto hit a framing error: its input is dead, no close reply can be read
        self._ws_failed = False
        # the ``now`` of the last call given one: a close begun by a call without a time
        # (``fail_input``, from the node acting on our events) times out from there
        self._last_now: float | None = None

    # ---------------------------------------------------------------- the protocol's view

    @property
    def state(self) -> State:
        """The link's :class:`State`."""
        return self._proto.state

    @property
    def is_open(self) -> bool:
        """The handshake is done and the link is not closing."""
        return self._proto.state is State.OPEN

    @property
    def closed(self) -> bool:
        """The link is over (:class:`Closed` was emitted)."""
        return self._proto.state is State.CLOSED

    @property
    def system_id(self) -> str:
        """Our system id."""
        return self._proto.system_id

    @property
    def config(self) -> FederationConfig:
        """The client's link configuration (announced in ``hello``)."""
        return self._proto.config

    @property
    def remote_system_id(self) -> str | None:
        """The peer's system id, once the handshake is done."""
        return self._proto.remote_system_id

    @property
    def remote_config(self) -> FederationConfig | None:
        """The client's ``hello`` config (server side), once received."""
        return self._proto.remote_config

    @property
    def link_id(self) -> str | None:
        """The server's id of this link (a client learns it in ``hello_ack``)."""
        return self._proto.link_id

    @property
    def extensions_offered(self) -> tuple[str, ...]:
        """The extensions this end speaks."""
        return self._proto.extensions_offered

    @property
    def extensions_agreed(self) -> frozenset[str]:
        """The extensions both ends agreed on in the handshake."""
        return self._proto.extensions_agreed

    @property
    def ping_interval(self) -> float:
        """Seconds between our pings."""
        return self._proto.ping_interval

    @property
    def ping_timeout(self) -> float:
        """Seconds of the peer's silence after which the link is dead."""
        return self._proto.ping_timeout

    @property
    def receive_window(self) -> int:
        """Extension ``credit``: the most unacknowledged live deltas we accept."""
        return self._proto.receive_window

    @property
    def max_batch(self) -> int:
        """Extension ``batch``: the most deltas per ``deltas`` message we send."""
        return self._proto.max_batch

    @property
    def send_window(self) -> int | None:
        """Extension ``credit``: the peer's window, or ``None`` when not agreed."""
        return self._proto.send_window

    @property
    def unacknowledged(self) -> tuple[Delta, ...]:
        """Our deltas sent and not yet acknowledged or rejected, in send order."""
        return self._proto.unacknowledged

    @property
    def held(self) -> tuple[Delta, ...]:
        """Our live deltas held back, in order."""
        return self._proto.held

    @property
    def pending_count(self) -> int:
        """How many of our deltas are held or awaiting the peer's answer."""
        return self._proto.pending_count

    @property
    def pending_bytes(self) -> int:
        """The bytes of JSON of our deltas held or awaiting the peer's answer."""
        return self._proto.pending_bytes

    def is_pending(self, delta_id: str) -> bool:
        """Whether our delta with this id is held or awaiting the peer's answer."""
        return self._proto.is_pending(delta_id)

    @property
    def unanswered(self) -> frozenset[str]:
        """Ids of live deltas received and not yet answered."""
        return self._proto.unanswered

    @property
    def syncing(self) -> bool:
        """A sync is requested or running on this link."""
        return self._proto.syncing

    @property
    def peer_paused(self) -> bool:
        """The peer asked us to pause."""
        return self._proto.peer_paused

    @property
    def paused(self) -> bool:
        """We asked the peer to pause."""
        return self._proto.paused

    @property
    def stray_acks(self) -> int:
        """Acks / nacks for ids we never sent or that were already settled."""
        return self._proto.stray_acks

    @property
    def close_code(self) -> int | None:
        """The close code once closing began."""
        return self._proto.close_code

    @property
    def close_reason(self) -> str:
        """The close reason once closing began."""
        return self._proto.close_reason

    def events(self) -> list[Event]:
        """Take the queued events, oldest first."""
        return self._proto.events()

    def next_event(self) -> Event | None:
        """Take the oldest queued event, or ``None``."""
        return self._proto.next_event()

    # ---------------------------------------------------------------- application calls

    def send_delta(self, delta: Delta, *, validate: bool = True) -> None:
        """See :meth:`FederationProtocol.send_delta`."""
        self._proto.send_delta(delta, validate=validate)

    def ack(self, delta_id: str) -> None:
        """See :meth:`FederationProtocol.ack`."""
        self._proto.ack(delta_id)

    def nack(self, delta_id: str, reason: str) -> None:
        """See :meth:`FederationProtocol.nack`."""
        self._proto.nack(delta_id, reason)

    def pause(self) -> None:
        """See :meth:`FederationProtocol.pause`."""
        self._proto.pause()

    def resume(self) -> None:
        """See :meth:`FederationProtocol.resume`."""
        self._proto.resume()

    def request_sync(
        self,
        filter: DeltaFilter | None = None,
        from_timestamp: float | None = None,
        *,
        from_cursor: str | None = None,
    ) -> None:
        """See :meth:`FederationProtocol.request_sync`."""
        self._proto.request_sync(filter, from_timestamp, from_cursor=from_cursor)

    def start_sync(self, total_deltas: int, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        """See :meth:`FederationProtocol.start_sync`."""
        self._proto.start_sync(total_deltas, batch_size)

    def send_sync_batch(
        self,
        deltas: Sequence[Delta | msgspec.Raw],
        *,
        last: bool,
        cursor: str | None = None,
    ) -> None:
        """See :meth:`FederationProtocol.send_sync_batch`."""
        self._proto.send_sync_batch(deltas, last=last, cursor=cursor)

    def complete_sync(self, cursor: str | None = None) -> None:
        """See :meth:`FederationProtocol.complete_sync`."""
        self._proto.complete_sync(cursor)

    def reject_sync(self, message: str, code: ErrorCode = ErrorCode.SYNC_ERROR) -> None:
        """See :meth:`FederationProtocol.reject_sync`."""
        self._proto.reject_sync(message, code)

    def send_error(
        self, code: ErrorCode | str, message: str, *, fatal: bool = False, now: float
    ) -> None:
        """Send an ``error``; a fatal one starts closing the link, and the close timeout runs
        from ``now`` (the time of this call)."""
        self._proto.send_error(code, message, fatal=fatal)
        self._closing_began(now)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "", *, now: float) -> None:
        """Start the closing handshake (see :meth:`FederationProtocol.close`); the close
        timeout runs from ``now``, the time of this call. A no-op once closing."""
        self._proto.close(code, reason)
        self._closing_began(now)

    # ---------------------------------------------------------------- driving

    def start(self, now: float) -> None:
        """The transport is connected: a client sends its upgrade request; both arm the
        opening timeout. (The federation ``hello`` follows once the upgrade completes.)"""
        if self._ws_started or self._proto.state in (State.CLOSING, State.CLOSED):
            raise LocalProtocolError("already started", code=ErrorCode.UNEXPECTED_MESSAGE)
        self._ws_started = True
        self._open_deadline = now + self.open_timeout
        if self.role is Role.CLIENT:
            extensions: list[Extension] = (
                [_BoundedDeflate(self.max_message_size)] if self.compression else []
            )
            self._out += self._ws.send(
                Request(
                    host=self.host,
                    target=self.path,
                    extra_headers=[(k.encode(), v.encode()) for k, v in self.extra_headers],
                    extensions=extensions,
                )
            )

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the transport (never empty: use :meth:`receive_eof` for end of stream).

        Raises :class:`RemoteProtocolError` when the peer broke the protocol fatally; the
        answer and the close are already queued. A failed HTTP upgrade is not raised: it ends
        in :class:`Closed` (code 1006), after an HTTP error response on a server.
        """
        if not data:
            raise ValueError("receive_data needs bytes; call receive_eof() at end of stream")
        if self._proto.state is State.CLOSED:
            return
        self._last_now = now
        self._proto.heard_from_peer(now)
        try:
            self._receive(data, now)
        except RemoteProtocolError:
            raise
        except Exception as exc:  # a bug of ours or below us: never a bare drop of the link
            reason = f"internal error handling the peer's input: {type(exc).__name__}"
            self._proto.fail_input(ErrorCode.MESSAGE_ERROR, reason)
            raise RemoteProtocolError(
                reason, code=ErrorCode.MESSAGE_ERROR, close_code=CloseCode.INTERNAL_ERROR
            ) from exc
        finally:
            self._closing_began(now)

    def _receive(self, data: bytes, now: float) -> None:
        if self._split:  # upgraded
            self._read_frames(data, now)
        elif self._http is None:  # client
            self._read_response(data, now)
        elif self._trailing is None and self._read_request(data):  # server: wsproto has it
            self._ws_events(now)  # the request, answered
            if self._ws.state is ConnectionState.OPEN:
                self._split = True
                trailing, self._trailing = self._trailing, b""
                if trailing:  # the frames sent right behind the request, in the same read
                    self._read_frames(trailing, now)

    def _read_response(self, data: bytes, now: float) -> None:
        """Client, before the upgrade completed: wsproto reads the response (and a refusal's
        body). It is given the bytes up to the end of the head only (found as h11 finds it),
        so that after a 101 it holds no part of a frame: the frames behind it are ours."""
        rest, ended = b"", False
        if self._head is not None:
            head = self._head + data
            end = _HEAD_END.search(head)
            if end is None:
                self._head = head
            else:
                cut = end.end() - len(self._head)
                data, rest, self._head, ended = data[:cut], data[cut:], None, True
        try:
            self._ws.receive_data(data)
        except WSRemoteProtocolError as exc:  # a bad response
            self._failed_upgrade(400, str(exc))
            return
        except UnicodeError:  # wsproto decodes some handshake headers as ASCII unchecked
            self._failed_upgrade(400, "Bad HTTP message: non-ASCII header value")
            return
        self._ws_events(now)
        self._split = ended and self._ws.state is ConnectionState.OPEN
        if rest and not self.closed:
            self._receive(rest, now)

    def _read_frames(self, data: bytes, now: float) -> None:
        """Upgraded: split the peer's frames (RFC 6455 section 5.2) ourselves. A whole,
        unfragmented, uncompressed text frame, masked from a client and not from a server
        (nearly every frame a peer sends), is read here, without wsproto's per-frame
        objects; wsproto is given every other frame from its first byte (control frames,
        fragments, compressed, binary, wrongly masked or invalid ones, text that is not
        UTF-8, a message over the size limit), so its parser is always between frames when
        we read one, and decides as before. An eligible frame waits here until whole (at most
        ``max_message_size``; its parts are appended, not copied again at each read)."""
        if owed := self._ws_owed:  # the rest of a frame wsproto has the start of
            self._ws_owed = max(owed - len(data), 0)
            self._to_ws(data[:owed], now)
            data = data[owed:]
        if self._frames:
            self._frames += data
            if len(self._frames) < self._frames_need:
                return
            data, self._frames = bytes(self._frames), bytearray()
        size, at, limit = len(data), 0, self.max_message_size
        expected = 0x80 if self.role is Role.SERVER else 0
        need = 2  # bytes from ``at`` that the next step of reading a frame needs
        while size - at >= need and not self.closed:
            first, second = data[at], data[at + 1]
            length, start, least = second & 0x7F, at + 2, 0
            if length >= 126:  # a longer length, in its shortest form (else wsproto fails)
                start, least = (start + 2, 126) if length == 126 else (start + 8, 65536)
                if start > size:
                    need = start - at
                    break
                length = int.from_bytes(data[at + 2 : start], "big")
            masked = second & 0x80
            if masked:
                start += 4
            if start > size:
                need = start - at
                break
            end = start + length
            if (
                first == 0x81  # FIN, no RSV bit, text
                and masked == expected  # a client's masked, a server's not
                and least <= length <= limit
                and not self._ws_in_message
                and not self._ws_failed
                and self._ws.state is ConnectionState.OPEN
            ):
                if end > size:
                    need = end - at  # wait for the rest
                    break
                payload = data[start:end]
                try:
                    text: str | None = (
                        _mask(payload, data[start - 4 : start]) if masked else payload
                    ).decode()
                except UnicodeDecodeError:  # not UTF-8: given to wsproto below, which fails it
                    text = None
                if text is not None:
                    at = end
                    if self._proto.state is not State.CLOSING:
                        self._proto.receive_message(text)
                        self._frame_messages()  # as after each of wsproto's events
                    continue
            if first & 0x0F in (0x0, 0x1, 0x2):  # a data frame: a message not finished?
                self._ws_in_message = not first & 0x80
            self._ws_owed = max(end - size, 0)
            self._to_ws(data[at:end], now)
            at = end
        if at < size and not self.closed:
            self._frames, self._frames_need = bytearray(data[at:]), need

    def _to_ws(self, data: bytes, now: float) -> None:
        self._ws.receive_data(data)
        self._ws_events(now)

    def _ws_events(self, now: float) -> None:
        for event in self._ws.events():
            if isinstance(event, _DATA):
                self._on_data(event)
            elif isinstance(event, Ping):
                if self._ws.state is ConnectionState.OPEN:  # not once our close is sent
                    self._out += self._ws.send(event.response())
            elif isinstance(event, CloseConnection):
                self._on_close(event)
            elif isinstance(event, Request):
                self._on_request(event, now)
            elif isinstance(event, AcceptConnection):
                self._opened(now)
            elif isinstance(event, RejectConnection):
                self._reject_status = event.status_code
                if not event.has_body:
                    self._abort(f"upgrade rejected with HTTP {event.status_code}")
            elif isinstance(event, RejectData):
                room = _MAX_REJECT_BODY - len(self._reject_body)
                self._reject_body += event.data[: max(room, 0)]
                if event.body_finished:
                    body = self._reject_body.decode("utf-8", "replace").strip()
                    self._abort(f"upgrade rejected with HTTP {self._reject_status}: {body}")
            if self.closed:
                break
            # frame what this event queued now: once wsproto parses a close frame that
            # follows in the same data, no message can be sent any more
            self._frame_messages()

    def receive_eof(self, now: float) -> None:
        """The peer closed its side of the transport."""
        self.connection_lost(now, "connection closed by peer")

    def connection_lost(self, now: float, reason: str = "connection lost") -> None:
        """The transport ended under us: :class:`Closed` with code 1006 unless already closed.
        What was queued for it is dropped (nothing can carry it any more)."""
        self._out = bytearray()
        self._abort(reason)

    def get_timer(self) -> float | None:
        """The next deadline of either layer (monotonic seconds), or ``None``."""
        if self._proto.state is State.CLOSED:
            return None
        deadlines = [
            t
            for t in (self._proto.get_timer(), self._open_deadline, self._close_deadline())
            if t is not None
        ]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        """Fire what is due: opening/closing handshake timeouts, pings, the heartbeat timeout."""
        if self._proto.state is State.CLOSED:
            return
        self._last_now = now
        if self._open_deadline is not None and now >= self._open_deadline:
            self._abort("opening handshake timed out")
            return
        deadline = self._close_deadline()
        if deadline is not None and now >= deadline:
            self._abort("closing handshake timed out")
            return
        self._proto.handle_timer(now)
        if self.closed:
            self.should_close = True

    def data_to_send(self) -> bytes:
        """Take the bytes to write to the transport."""
        self._pump()
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def outbound_size(self) -> int:
        """Bytes waiting for :meth:`data_to_send` (queued messages counted by length; live
        deltas committed to the next ``deltas`` message of extension ``batch`` are not encoded
        yet and not counted)."""
        return len(self._out) + self._proto.outbox_size

    def limit_rate(self, rate: float, burst: float | None = None) -> None:
        """Hold the peer to a rate (:meth:`FederationProtocol.limit_rate`)."""
        self._proto.limit_rate(rate, burst)

    def read_delay(self, now: float) -> float:
        """Seconds not to read the transport from ``now`` (the rate limit; 0: read on). An
        adapter asks after handing over each read, and writes what this may have queued."""
        return self._proto.read_delay(now)

    def fail_input(self, code: ErrorCode, text: str) -> None:
        """Handling the peer's input failed on our side: a fatal ``error`` and the close
        (1011); the close timeout runs from the last time this connection was given."""
        self._proto.fail_input(code, text)
        if self._last_now is not None:
            self._closing_began(self._last_now)

    def shed(self, reason: str) -> None:
        """The peer does not read what is queued for it beyond our bound: it is dropped and
        the link ends at once (:class:`Closed`, 1008; the transport is to be closed)."""
        self._out = bytearray()
        self._rx.clear()
        self.should_close = True
        self._open_deadline = None
        self._proto.shed(reason)

    @property
    def max_id_length(self) -> int:
        """The longest id, author or system id accepted from the peer (characters)."""
        return self._proto.max_id_length

    @property
    def reject_status(self) -> int | None:
        """Client: the HTTP status the server refused the upgrade with, else ``None``."""
        return self._reject_status

    # ---------------------------------------------------------------- internals

    def _closing_began(self, now: float) -> None:
        """Closing may have begun during the call made at ``now``: the close timeout runs
        from there (not from an earlier input: a quiet spell must not time it out at once)."""
        if self._closing_since is None and self._proto.state is State.CLOSING:
            self._closing_since = now

    def _opened(self, now: float) -> None:
        self._open_deadline = None
        if self._proto.state is not State.CLOSING:  # else close() came first: _pump closes
            self._proto.start(now)

    def _pump(self) -> None:
        """Frame queued messages; send the close frame once the protocol is closing."""
        ws_state = self._ws.state
        if ws_state is ConnectionState.OPEN:
            self._frame_messages()
            if self.state is State.CLOSING:
                code = self.close_code or CloseCode.NORMAL
                self._out += self._ws.send(CloseConnection(code=code, reason=self.close_reason))
        else:
            self._proto.messages_to_send()  # no channel can carry them any more
            if self.state is State.CLOSING and ws_state in (
                ConnectionState.CONNECTING,
                ConnectionState.REJECTING,
            ):
                self._abort(self.close_reason or "closed before the upgrade completed")
        if (
            self._ws_failed
            and self.state is State.CLOSING
            and self._ws.state is not ConnectionState.OPEN
        ):
            # RFC 6455 7.1.7: after a framing error, close without waiting for the peer's close
            self.should_close = True
            self._proto.connection_closed(
                self.close_code or CloseCode.PROTOCOL_ERROR, self.close_reason
            )
        if self.state is State.CLOSED:
            self.should_close = True

    def _frame_messages(self) -> None:
        proto = self._proto
        if not proto.has_output:
            return  # nothing queued (the common case after an event)
        if self._ws.state is ConnectionState.OPEN:
            messages = proto.messages_to_send()
            if not self.compression:
                # unfragmented, uncompressed text frames (RFC 6455 section 5.2): what wsproto
                # would write, without its per-frame objects (no extension can apply); a
                # client's masked with a random key each (from os.urandom, as wsproto's)
                out, client = self._out, self.role is Role.CLIENT
                keys = os.urandom(4 * len(messages)) if client else b""
                masked = 0x80 if client else 0
                for i, text in enumerate(messages):
                    payload = text.encode()
                    size = len(payload)
                    if size < 126:
                        out += bytes((0x81, masked | size))
                    elif size < 65536:
                        out += bytes((0x81, masked | 126)) + size.to_bytes(2, "big")
                    else:
                        out += bytes((0x81, masked | 127)) + size.to_bytes(8, "big")
                    if client:
                        key = keys[4 * i : 4 * i + 4]
                        out += key
                        payload = _mask(payload, key)
                    out += payload
                return
            for text in messages:
                self._out += self._ws.send(TextMessage(data=text))

    def _close_deadline(self) -> float | None:
        if self._proto.state is State.CLOSING and self._closing_since is not None:
            return self._closing_since + self.close_timeout
        return None

    def _abort(self, reason: str) -> None:
        self.should_close = True
        self._open_deadline = None
        self._proto.connection_closed(CloseCode.ABNORMAL, reason)

    def _on_data(self, event: TextMessage | BytesMessage) -> None:
        if self._proto.state is State.CLOSING:
            return
        data = event.data
        limit = self.max_message_size
        if isinstance(data, str):
            if event.message_finished and not self._rx and not self._rx_binary:
                # a whole message in one frame (the usual case): no copies, and its size is
                # counted only when it could be over the limit (a character is <= 4 bytes)
                if 4 * len(data) > limit and len(data.encode()) > limit:
                    self._too_big()
                self._proto.receive_message(data)
                return
            self._rx_size += len(data.encode())
        else:
            self._rx_size += len(data)
        if self._rx_size > limit:
            self._rx.clear()
            self._too_big()
        if isinstance(data, str):
            self._rx.append(data)
        else:
            self._rx_binary = True
        if event.message_finished:
            text, binary = "".join(self._rx), self._rx_binary
            self._rx.clear()
            self._rx_size, self._rx_binary = 0, False
            if binary:
                self._proto.receive_invalid(
                    ErrorCode.MESSAGE_ERROR, "binary frames are not accepted"
                )
            else:
                self._proto.receive_message(text)

    def _too_big(self) -> None:
        self._proto.fail(CloseCode.MESSAGE_TOO_BIG, "message too big")
        raise RemoteProtocolError(
            f"message over {self.max_message_size} bytes",
            code=ErrorCode.MESSAGE_TOO_LARGE,
            close_code=CloseCode.MESSAGE_TOO_BIG,
        )

    def _on_close(self, event: CloseConnection) -> None:
        ws_state = self._ws.state
        if ws_state is ConnectionState.REMOTE_CLOSING:  # the peer closes: answer, done
            self._out += self._ws.send(event.response())
            self.should_close = True
            self._proto.connection_closed(int(event.code), event.reason or "")
        elif ws_state is ConnectionState.CLOSED:  # the answer to our close
            self.should_close = True
            self._proto.connection_closed(self.close_code or int(event.code), self.close_reason)
        elif event.code == CloseCode.MESSAGE_TOO_BIG:  # our deflate bound tripped
            self._ws_failed = True
            self._too_big()
        else:  # wsproto found a framing error: fail the connection with its code
            self._ws_failed = True
            self._proto.fail(int(event.code), event.reason or "")
            raise RemoteProtocolError(
                f"WebSocket protocol error: {event.reason}",
                code=ErrorCode.MESSAGE_ERROR,
                close_code=int(event.code),
            )

    def _on_request(self, event: Request, now: float) -> None:
        self.request = event
        if event.target.split("?", 1)[0] != self.path:
            self._reject(404, f"Not Found: federation is served at {self.path}\n")
            self._abort(f"upgrade request for unknown path {event.target[:200]!r}")
            return
        subprotocol = None
        if self.credentials is not None:
            token, offered_as_subprotocol = token_from_request(self._request_headers, event.target)
            principal = self.credentials.authenticate(token)
            if principal is None:
                self._reject(
                    401,
                    "Unauthorized: a valid bearer token is required\n",
                    [(b"www-authenticate", b'Bearer realm="rhizome-federation"')],
                )
                self._abort("upgrade refused: missing or invalid bearer token (HTTP 401)")
                return
            self.principal = principal
            self._proto.allowed_system_ids = principal.system_ids
            if offered_as_subprotocol:  # a browser must see one of its offers selected
                subprotocol = next(
                    (p for p in event.subprotocols if p == SUBPROTOCOL),
                    next(p for p in event.subprotocols if p.startswith(BEARER_SUBPROTOCOL_PREFIX)),
                )
        extensions: list[Extension] = (
            [_BoundedDeflate(self.max_message_size)] if self.compression else []
        )
        self._out += self._ws.send(AcceptConnection(subprotocol=subprotocol, extensions=extensions))
        self._opened(now)

    def _read_request(self, data: bytes) -> bool:
        """Server: read the upgrade request with h11 (ours, so that the bytes after it are
        ours to hand on) and give it to wsproto's public ``initiate_upgrade_connection``.
        True once wsproto has it; false while incomplete, or when refused (answered)."""
        http = self._http
        assert http is not None
        http.receive_data(data)
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            self._failed_upgrade(400, f"Bad HTTP message: {exc}")
            return False
        if event is h11.NEED_DATA:
            return False
        if not isinstance(event, h11.Request):  # pragma: no cover - h11 gives a request first
            self._failed_upgrade(400, "Bad HTTP message")
            return False
        self._trailing = http.trailing_data[0]
        self._request_headers = list(event.headers)
        if not all(value.isascii() for _, value in event.headers):
            self._failed_upgrade(400, "Bad HTTP message: non-ASCII header value")
            return False
        if not _asks_for_websocket(event.headers):
            self._failed_upgrade(426, "not a WebSocket upgrade request")
            return False
        try:
            self._ws.initiate_upgrade_connection(list(event.headers), event.target)
        except WSRemoteProtocolError as exc:
            self._failed_upgrade(400, str(exc))
            return False
        except UnicodeError:  # wsproto decodes some handshake headers as ASCII unchecked
            self._failed_upgrade(400, "Bad HTTP message: non-ASCII header value")
            return False
        return True

    def _reject(self, status: int, body: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Server: answer the upgrade request with an HTTP error (through our h11)."""
        assert self._http is not None
        data = body.encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(data)).encode()),
            (b"connection", b"close"),
            *extra,
        ]
        self._out += self._http.send(h11.Response(status_code=status, headers=headers)) or b""
        self._out += self._http.send(h11.Data(data=data)) or b""
        self._out += self._http.send(h11.EndOfMessage()) or b""

    def _failed_upgrade(self, status: int, reason: str) -> None:
        """The HTTP side of the upgrade failed: a server answers ``status`` (426: not a
        WebSocket request at all; 400: a bad one), then both end with 1006."""
        if self.role is Role.SERVER:
            if status == 426:
                self._reject(426, "This is a RhizomeDB federation endpoint: use WebSocket.\n")
            else:
                self._reject(400, f"Bad Request: {reason}\n")
        self._abort(f"upgrade failed: {reason}")


def _asks_for_websocket(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """The request asks to upgrade to WebSocket (``Connection: upgrade`` and ``Upgrade:
    websocket``, RFC 6455 4.2.1); whether the rest of it is valid is wsproto's to say."""
    connection: set[bytes] = set()
    upgrade: set[bytes] = set()
    for name, value in headers:
        tokens = {t.strip().lower() for t in value.split(b",")}
        if name.lower() == b"connection":
            connection |= tokens
        elif name.lower() == b"upgrade":
            upgrade |= tokens
    return b"upgrade" in connection and b"websocket" in upgrade


if TYPE_CHECKING:  # both layers are what a FederationNode attaches to a link (mypy checks it)

    def _endpoints(p: FederationProtocol, c: FederationConnection) -> list[LinkEndpoint]:
        return [p, c]
