"""``FederationConnection``: the federation protocol over WebSocket, bytes in, bytes out.

The way wsproto stacks on h11, this stacks :class:`FederationProtocol` (messages) on wsproto
(frames and the HTTP upgrade). It adds what WebSocket needs: the client's upgrade request, the
server's acceptance (or a plain HTTP error for anything that is not an upgrade to our path), the
close handshake with proper codes, a maximum message size (close 1009), answers to WebSocket
pings, a bound on what a compressed message may inflate to, and timeouts for the opening and
closing handshakes.

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

import zlib
from collections.abc import Callable, Iterable, Sequence

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
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol
from wsproto.utilities import RemoteProtocolError as WSRemoteProtocolError

from ._errors import CloseCode, ErrorCode, LocalProtocolError, RemoteProtocolError
from ._messages import FederationConfig
from ._protocol import DEFAULT_MAX_BATCH, DEFAULT_RECEIVE_WINDOW, FederationProtocol, Role, State

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "DEFAULT_PATH", "FederationConnection"]

DEFAULT_PATH = "/federation"
#: Messages larger than this (in bytes of UTF-8) close the connection with 1009.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
_MAX_REJECT_BODY = 4096


_DATA = (TextMessage, BytesMessage)


class _BoundedDeflate(PerMessageDeflate):
    """permessage-deflate that refuses to inflate a message beyond ``max_size`` bytes.

    wsproto inflates without a bound; a few KiB of deflate can expand to gigabytes. This
    decompresses with ``max_length`` and fails the message with 1009 past the limit.
    """

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self.max_size = max_size
        self._inflated = 0

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        assert self._decompressor is not None
        remaining = self.max_size - self._inflated
        try:
            out = self._decompressor.decompress(bytes(data), remaining + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if self._inflated > self.max_size or self._decompressor.unconsumed_tail:
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        result = super().frame_inbound_complete(proto, fin)
        if fin:
            self._inflated = 0
        return result


class FederationConnection(FederationProtocol):
    """One federation link over WebSocket, for either role, as a sans-IO object.

    Parameters are those of :class:`FederationProtocol` plus:
        host: the ``Host`` of the client's upgrade request.
        path: the request path (client) or the only path accepted (server).
        extra_headers: more request headers for the client (an auth token, for instance).
        max_message_size: the largest message accepted, in bytes (close 1009 beyond).
        compression: offer (client) or accept (server) permessage-deflate, bounded as above.
        open_timeout: seconds allowed for the HTTP upgrade to complete.
        close_timeout: seconds to wait for the peer's close frame before giving up.

    Feed transport bytes to :meth:`receive_data`, write :meth:`data_to_send`, close the
    transport when :attr:`should_close` is true, and call :meth:`handle_timer` at
    :meth:`get_timer`. All of :class:`FederationProtocol`'s application calls apply.
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
    ) -> None:
        super().__init__(
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
        )
        if max_message_size < 1:
            raise ValueError("max_message_size must be positive")
        self.host = host
        self.path = path
        self.extra_headers = tuple(extra_headers)
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
        self._out = bytearray()
        self._rx: list[str] = []
        self._rx_size = 0
        self._rx_binary = False
        self._now = 0.0
        self._ws_started = False
        self._open_deadline: float | None = None
        self._closing_since: float | None = None
        self._reject_status: int | None = None
        self._reject_body = bytearray()
        #: wsproto hit a framing error: its input is dead, no close reply can be read
        self._ws_failed = False

    # ---------------------------------------------------------------- driving

    def start(self, now: float) -> None:
        """The transport is connected: a client sends its upgrade request; both arm the
        opening timeout. (The federation ``hello`` follows once the upgrade completes.)"""
        if self._ws_started or self.state in (State.CLOSING, State.CLOSED):
            raise LocalProtocolError("already started", code=ErrorCode.UNEXPECTED_MESSAGE)
        self._ws_started = True
        self._now = now
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
        if self.state is State.CLOSED:
            return
        self._now = max(self._now, now)
        self.heard_from_peer(now)
        try:
            self._ws.receive_data(data)
        except WSRemoteProtocolError as exc:
            self._failed_upgrade(str(exc))
            return
        except UnicodeError:  # wsproto decodes some handshake headers as ASCII unchecked
            self._failed_upgrade("Bad HTTP message: non-ASCII header value")
            return
        for event in self._ws.events():
            if isinstance(event, _DATA):
                self._on_data(event)
            elif isinstance(event, Ping):
                if self._ws.state is ConnectionState.OPEN:  # not once our close is sent
                    self._out += self._ws.send(event.response())
            elif isinstance(event, CloseConnection):
                self._on_close(event)
            elif isinstance(event, Request):
                self._on_request(event)
            elif isinstance(event, AcceptConnection):
                self._opened()
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

    def close(
        self, code: int = CloseCode.NORMAL, reason: str = "", *, now: float | None = None
    ) -> None:
        """Start the closing handshake (see :meth:`FederationProtocol.close`). ``now``: the
        time of the call, from which the close timeout runs; without it, the time of the last
        input is used, which after a quiet spell makes the handshake time out at once."""
        if now is not None:
            self._now = max(self._now, now)
        super().close(code, reason)

    def receive_eof(self, now: float) -> None:
        """The peer closed its side of the transport."""
        self.connection_lost(now, "connection closed by peer")

    def connection_lost(self, now: float, reason: str = "connection lost") -> None:
        """The transport ended under us: :class:`Closed` with code 1006 unless already closed."""
        self._now = max(self._now, now)
        self._abort(reason)

    def get_timer(self) -> float | None:
        """The next deadline of either layer (monotonic seconds), or ``None``."""
        if self.state is State.CLOSED:
            return None
        deadlines = [
            t
            for t in (super().get_timer(), self._open_deadline, self._close_deadline())
            if t is not None
        ]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        """Fire what is due: opening/closing handshake timeouts, pings, the heartbeat timeout."""
        self._now = max(self._now, now)
        if self.state is State.CLOSED:
            return
        if self._open_deadline is not None and now >= self._open_deadline:
            self._abort("opening handshake timed out")
            return
        deadline = self._close_deadline()
        if deadline is not None and now >= deadline:
            self._abort("closing handshake timed out")
            return
        super().handle_timer(now)
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
        return len(self._out) + sum(len(m) for m in self._outbox)

    @property
    def reject_status(self) -> int | None:
        """Client: the HTTP status the server refused the upgrade with, else ``None``."""
        return self._reject_status

    # ---------------------------------------------------------------- internals

    def _opened(self) -> None:
        self._open_deadline = None
        if self.state is not State.CLOSING:  # else close() came first: _pump sends the close
            super().start(self._now)

    def _pump(self) -> None:
        """Frame queued messages; send the close frame once the protocol is closing."""
        ws_state = self._ws.state
        if ws_state is ConnectionState.OPEN:
            self._frame_messages()
            if self.state is State.CLOSING:
                code = self.close_code or CloseCode.NORMAL
                self._out += self._ws.send(CloseConnection(code=code, reason=self.close_reason))
                self._closing_since = self._now
        else:
            self.messages_to_send()  # no channel can carry them any more
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
            self.connection_closed(self.close_code or CloseCode.PROTOCOL_ERROR, self.close_reason)
        if self.state is State.CLOSED:
            self.should_close = True

    def _frame_messages(self) -> None:
        if not self.has_output:
            return  # nothing queued (the common case after an event)
        if self._ws.state is ConnectionState.OPEN:
            messages = self.messages_to_send()
            if self.role is Role.SERVER and not self.compression:
                # unmasked, unfragmented, uncompressed text frames (RFC 6455 section 5.2): what
                # wsproto would write, without its per-frame objects (no extension can apply)
                out = self._out
                for text in messages:
                    payload = text.encode()
                    size = len(payload)
                    if size < 126:
                        out += bytes((0x81, size))
                    elif size < 65536:
                        out += b"\x81\x7e" + size.to_bytes(2, "big")
                    else:
                        out += b"\x81\x7f" + size.to_bytes(8, "big")
                    out += payload
                return
            for text in messages:
                self._out += self._ws.send(TextMessage(data=text))

    def _close_deadline(self) -> float | None:
        if self.state is State.CLOSING and self._closing_since is not None:
            return self._closing_since + self.close_timeout
        return None

    def _abort(self, reason: str) -> None:
        self.should_close = True
        self._open_deadline = None
        self.connection_closed(CloseCode.ABNORMAL, reason)

    def _on_data(self, event: TextMessage | BytesMessage) -> None:
        if self.state is State.CLOSING:
            return
        data = event.data
        limit = self.max_message_size
        if isinstance(data, str):
            if event.message_finished and not self._rx and not self._rx_binary:
                # a whole message in one frame (the usual case): no copies, and its size is
                # counted only when it could be over the limit (a character is <= 4 bytes)
                if 4 * len(data) > limit and len(data.encode()) > limit:
                    self._too_big()
                self.receive_message(data)
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
                self.receive_invalid(ErrorCode.MESSAGE_ERROR, "binary frames are not accepted")
            else:
                self.receive_message(text)

    def _too_big(self) -> None:
        self._begin_close(CloseCode.MESSAGE_TOO_BIG, "message too big")
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
            self.connection_closed(int(event.code), event.reason or "")
        elif ws_state is ConnectionState.CLOSED:  # the answer to our close
            self.should_close = True
            self.connection_closed(self.close_code or int(event.code), self.close_reason)
        elif event.code == CloseCode.MESSAGE_TOO_BIG:  # our deflate bound tripped
            self._ws_failed = True
            self._too_big()
        else:  # wsproto found a framing error: fail the connection with its code
            self._ws_failed = True
            self._begin_close(int(event.code), event.reason or "")
            raise RemoteProtocolError(
                f"WebSocket protocol error: {event.reason}",
                code=ErrorCode.MESSAGE_ERROR,
                close_code=int(event.code),
            )

    def _on_request(self, event: Request) -> None:
        self.request = event
        if event.target.split("?", 1)[0] != self.path:
            self._reject(404, f"Not Found: federation is served at {self.path}\n")
            self._abort(f"upgrade request for unknown path {event.target[:200]!r}")
            return
        extensions: list[Extension] = (
            [_BoundedDeflate(self.max_message_size)] if self.compression else []
        )
        self._out += self._ws.send(AcceptConnection(extensions=extensions))
        # wsproto's server handshake drops what arrived after the request in the same read
        # (h11's trailing data); hand it on so frames sent right behind it are not lost
        trailing = self._ws.handshake._h11_connection.trailing_data[0]
        if trailing and self._ws.connection is not None:
            self._ws.connection.receive_data(trailing)
        self._opened()

    def _reject(self, status: int, body: str) -> None:
        data = body.encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(data)).encode()),
            (b"connection", b"close"),
        ]
        self._out += self._ws.send(
            RejectConnection(status_code=status, headers=headers, has_body=True)
        )
        self._out += self._ws.send(RejectData(data=data, body_finished=True))

    def _failed_upgrade(self, reason: str) -> None:
        """The HTTP side of the upgrade failed (not a WebSocket request, bad headers...)."""
        if self.role is Role.SERVER:
            if "Upgrade" in reason or "Connection" in reason:
                self._reject(426, "This is a RhizomeDB federation endpoint: use WebSocket.\n")
            else:
                self._reject(400, f"Bad Request: {reason}\n")
        self._abort(f"upgrade failed: {reason}")
