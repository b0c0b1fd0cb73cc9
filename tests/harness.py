"""In-memory test harness: a fake wall clock, connection pairs and raw WebSocket peers.

* :class:`FakeClock`: the injected wall clock (milliseconds), a deterministic counter.
* :class:`ConnectionPair`: a client and a server :class:`FederationConnection` wired byte for
  byte, with a monotonic ``now``, ``transfer`` (bytes both ways until quiet, with a round cap),
  partial delivery, optional chunk splitting, transport closes delivered as end-of-stream, and
  ``advance`` (time moves, due timers fire).
* :class:`ProtocolPair`: the same for two :class:`FederationProtocol` objects exchanging text.
* :class:`RawClient` / :class:`RawServer`: bare wsproto peers to inject frames our side never
  produces (bad JSON, binary frames, WebSocket pings, compressed bombs ...).

Nothing here reads a real clock or uses randomness; every loop is bounded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage
from wsproto.events import Event as WSEvent
from wsproto.events import Ping as WSPing
from wsproto.events import Pong as WSPong
from wsproto.extensions import Extension

from rhizome_proto import (
    Closed,
    Delta,
    Event,
    FederationConnection,
    FederationProtocol,
    HandshakeComplete,
    Pointer,
    Reference,
    RemoteProtocolError,
    Role,
)

__all__ = [
    "SIDES",
    "VECTORS",
    "WALL_START",
    "ConnectionPair",
    "FakeClock",
    "ProtocolPair",
    "RawClient",
    "RawServer",
    "Side",
    "decode_output",
    "delta_json",
    "dumps",
    "feed",
    "make_client",
    "make_delta",
    "make_server",
    "open_client",
    "open_server",
    "other",
    "reference_session",
    "sample_messages",
]

Side = Literal["client", "server"]
SIDES: tuple[Side, Side] = ("client", "server")

#: The recorded vectors of the TypeScript reference.
VECTORS = Path(__file__).resolve().parent / "vectors"

#: A plausible wall clock (2023-11-14), in milliseconds.
WALL_START = 1_700_000_000_000


def other(side: Side) -> Side:
    return "server" if side == "client" else "client"


class FakeClock:
    """The injected wall clock: returns ``ms`` and then moves it on by ``step``."""

    def __init__(self, start: int = WALL_START, step: int = 1) -> None:
        self.ms = start
        self.step = step

    def __call__(self) -> int:
        value = self.ms
        self.ms += self.step
        return value


def make_delta(delta_id: str, timestamp: int = 1_000, **kwargs: Any) -> Delta:
    """A small valid delta (fields overridable)."""
    fields: dict[str, Any] = {
        "author": "author-1",
        "system": "sys-1",
        "pointers": (Pointer(role="subject", target=Reference(id="e-" + delta_id)),),
    }
    fields.update(kwargs)
    return Delta(id=delta_id, timestamp=timestamp, **fields)


def make_client(clock: FakeClock | None = None, **options: Any) -> FederationConnection:
    options.setdefault("system_id", "client-sys")
    options.setdefault("host", "127.0.0.1:8080")
    return FederationConnection(Role.CLIENT, clock=clock or FakeClock(), **options)


def make_server(clock: FakeClock | None = None, **options: Any) -> FederationConnection:
    options.setdefault("system_id", "server-sys")
    options.setdefault("link_id", "link-1")
    return FederationConnection(Role.SERVER, clock=clock or FakeClock(), **options)


def _chunks(data: bytes, split_at: int | None, byte_at_a_time: bool) -> list[bytes]:
    if byte_at_a_time:
        return [data[i : i + 1] for i in range(len(data))]
    if split_at is not None and 0 < split_at < len(data):
        return [data[:split_at], data[split_at:]]
    return [data]


class ConnectionPair:
    """A client and a server :class:`FederationConnection` joined by an in-memory transport.

    Each direction is a pipe: what a side writes (``data_to_send``) goes into its pipe and is
    delivered to the peer by :meth:`transfer` or :meth:`deliver`. When a side's
    ``should_close`` becomes true its transport closes: what it wrote before still arrives, then
    the peer gets ``receive_eof``; bytes written to a closed transport are lost.

    ``events[side]`` keeps every event of a side in order; ``errors[side]`` every
    :class:`RemoteProtocolError` its ``receive_data`` raised.
    """

    def __init__(
        self,
        *,
        client: FederationConnection | None = None,
        server: FederationConnection | None = None,
        client_options: dict[str, Any] | None = None,
        server_options: dict[str, Any] | None = None,
        split_at: int | None = None,
        byte_at_a_time: bool = False,
        start: bool = True,
        now: float = 0.0,
    ) -> None:
        self.clock = FakeClock()
        self.client = client or make_client(self.clock, **(client_options or {}))
        self.server = server or make_server(self.clock, **(server_options or {}))
        self.now = now
        self.split_at = split_at
        self.byte_at_a_time = byte_at_a_time
        self.events: dict[Side, list[Event]] = {"client": [], "server": []}
        self.errors: dict[Side, list[RemoteProtocolError]] = {"client": [], "server": []}
        #: bytes each side wrote and the peer has not received yet
        self.pipes: dict[Side, bytearray] = {"client": bytearray(), "server": bytearray()}
        #: the side closed its transport
        self.transport_closed: dict[Side, bool] = {"client": False, "server": False}
        #: the peer of the side has been given end-of-stream
        self.eof_sent: dict[Side, bool] = {"client": False, "server": False}
        #: all bytes each side ever received, in order (for replay tests)
        self.received: dict[Side, bytearray] = {"client": bytearray(), "server": bytearray()}
        self._cursor: dict[Side, int] = {"client": 0, "server": 0}
        #: called with each side's new events as soon as they are taken (after every input)
        self.listener: Callable[[Side, list[Event]], None] | None = None
        if start:
            self.client.start(self.now)
            self.server.start(self.now)

    # ------------------------------------------------------------------ access

    def conn(self, side: Side) -> FederationConnection:
        return self.client if side == "client" else self.server

    @property
    def client_events(self) -> list[Event]:
        return self.events["client"]

    @property
    def server_events(self) -> list[Event]:
        return self.events["server"]

    def new_events(self, side: Side) -> list[Event]:
        """The side's events since the previous call for that side."""
        self.collect()
        start = self._cursor[side]
        self._cursor[side] = len(self.events[side])
        return self.events[side][start:]

    def collect(self) -> None:
        """Move both sides' queued events into :attr:`events` (telling :attr:`listener`)."""
        for side in SIDES:
            new = self.conn(side).events()
            if new:
                self.events[side].extend(new)
                if self.listener is not None:
                    self.listener(side, new)

    # ------------------------------------------------------------------ moving bytes

    def _write(self, side: Side) -> bool:
        """Take what ``side`` has to send into its pipe; True if there was anything."""
        out = self.conn(side).data_to_send()
        self.collect()
        if not out:
            return False
        if not self.transport_closed[side]:
            self.pipes[side] += out
        return True

    def _feed(self, receiver: Side, data: bytes) -> None:
        conn = self.conn(receiver)
        self.received[receiver] += data
        for chunk in _chunks(data, self.split_at, self.byte_at_a_time):
            try:
                conn.receive_data(chunk, self.now)
            except RemoteProtocolError as exc:
                self.errors[receiver].append(exc)
            self.collect()

    def deliver(self, side: Side, limit: int | None = None) -> int:
        """Write ``side``'s output into its pipe and deliver up to ``limit`` bytes of the pipe
        to the peer (all when ``None``). Returns the number of bytes delivered."""
        self._write(side)
        pipe = self.pipes[side]
        count = len(pipe) if limit is None else min(limit, len(pipe))
        if count == 0:
            return 0
        data = bytes(pipe[:count])
        del pipe[:count]
        if self.transport_closed[other(side)]:
            return count  # the peer's transport is gone: lost
        self._feed(other(side), data)
        return count

    def _settle_closes(self) -> bool:
        """Close transports whose side asked for it; give EOF once a closed pipe drained."""
        changed = False
        for side in SIDES:
            conn = self.conn(side)
            if conn.should_close and not self.transport_closed[side]:
                self._write(side)  # the last bytes still go out
                self.transport_closed[side] = True
                changed = True
        for side in SIDES:
            if self.transport_closed[side] and not self.pipes[side] and not self.eof_sent[side]:
                self.eof_sent[side] = True
                changed = True
                peer = other(side)
                if not self.transport_closed[peer]:
                    self.conn(peer).receive_eof(self.now)
                    self.collect()
        return changed

    def transfer(self, max_rounds: int = 50) -> None:
        """Move bytes both ways (and transport closes) until nothing moves; the pair must go
        quiet within ``max_rounds`` rounds."""
        for _ in range(max_rounds):
            moved = False
            for side in SIDES:
                moved |= self.deliver(side) > 0
            moved |= self._settle_closes()
            if not moved:
                return
        raise AssertionError(f"the pair did not go quiet within {max_rounds} rounds")

    def close_transport(self, side: Side) -> None:
        """Drop ``side``'s transport abruptly (no close handshake): the peer gets EOF."""
        self.transport_closed[side] = True
        self.pipes[side].clear()
        self.conn(side).connection_lost(self.now, "transport dropped")
        self.collect()
        self._settle_closes()

    # ------------------------------------------------------------------ time

    def advance(self, seconds: float, max_steps: int = 10_000) -> None:
        """Move time forward by ``seconds``, firing every deadline that falls due on the way
        (at its own time, earliest first, as an event loop would). No bytes move."""
        target = self.now + seconds
        for _ in range(max_steps):
            due = [
                t
                for t in (self.client.get_timer(), self.server.get_timer())
                if t is not None and t <= target
            ]
            if not due:
                break
            self.now = max(self.now, min(due))
            for side in SIDES:
                conn = self.conn(side)
                timer = conn.get_timer()
                if timer is not None and timer <= self.now:
                    conn.handle_timer(self.now)
                    later = conn.get_timer()
                    assert later is None or later > self.now, f"{side} timer did not move on"
            self.collect()
        else:
            raise AssertionError("timers kept firing: busy loop")
        self.now = target

    # ------------------------------------------------------------------ shortcuts

    def handshake(self) -> None:
        """Transfer until both sides are open and drop the HandshakeComplete events."""
        self.transfer()
        for side in SIDES:
            new = self.new_events(side)
            assert [type(e) for e in new] == [HandshakeComplete], (side, new)

    @classmethod
    def opened(cls, **kwargs: Any) -> ConnectionPair:
        pair = cls(**kwargs)
        pair.handshake()
        return pair

    def closed_events(self, side: Side) -> list[Closed]:
        return [e for e in self.events[side] if isinstance(e, Closed)]


class ProtocolPair:
    """Two :class:`FederationProtocol` objects exchanging text messages directly.

    The message channel is modelled as a WebSocket would behave: once a side is closing and has
    flushed its messages, the channel closes and both sides get ``connection_closed`` with the
    closing side's code.
    """

    def __init__(
        self,
        *,
        client_options: dict[str, Any] | None = None,
        server_options: dict[str, Any] | None = None,
        start: bool = True,
        now: float = 0.0,
    ) -> None:
        self.clock = FakeClock()
        copts: dict[str, Any] = {"system_id": "client-sys", **(client_options or {})}
        sopts: dict[str, Any] = {
            "system_id": "server-sys",
            "link_id": "link-1",
            **(server_options or {}),
        }
        self.client = FederationProtocol(Role.CLIENT, clock=self.clock, **copts)
        self.server = FederationProtocol(Role.SERVER, clock=self.clock, **sopts)
        self.now = now
        self.events: dict[Side, list[Event]] = {"client": [], "server": []}
        self.errors: dict[Side, list[RemoteProtocolError]] = {"client": [], "server": []}
        #: every message each side sent, in order
        self.sent: dict[Side, list[str]] = {"client": [], "server": []}
        self.channel_closed = False
        self._cursor: dict[Side, int] = {"client": 0, "server": 0}
        if start:
            self.client.start(now)
            self.server.start(now)

    def proto(self, side: Side) -> FederationProtocol:
        return self.client if side == "client" else self.server

    def collect(self) -> None:
        for side in SIDES:
            self.events[side].extend(self.proto(side).events())

    def new_events(self, side: Side) -> list[Event]:
        self.collect()
        start = self._cursor[side]
        self._cursor[side] = len(self.events[side])
        return self.events[side][start:]

    def inject(self, receiver: Side, text: str) -> None:
        """Hand ``receiver`` one message as if its peer had sent it."""
        try:
            self.proto(receiver).receive_message(text, self.now)
        except RemoteProtocolError as exc:
            self.errors[receiver].append(exc)
        self.collect()

    def take_sent(self, side: Side) -> list[dict[str, Any]]:
        """Drain ``side``'s outbox without delivering it, decoded to dicts."""
        out = self.proto(side).messages_to_send()
        self.sent[side].extend(out)
        return [json.loads(m) for m in out]

    def transfer(self, max_rounds: int = 50) -> None:
        for _ in range(max_rounds):
            moved = False
            for side in SIDES:
                out = self.proto(side).messages_to_send()
                self.sent[side].extend(out)
                for text in out:
                    moved = True
                    if not self.channel_closed:
                        self.inject(other(side), text)
            if not self.channel_closed:
                for side in SIDES:
                    proto = self.proto(side)
                    if proto.state.value == "closing":
                        code = proto.close_code if proto.close_code is not None else 1000
                        reason = proto.close_reason
                        self.channel_closed = True
                        moved = True
                        proto.connection_closed(code, reason)
                        self.proto(other(side)).connection_closed(code, reason)
                        break
            self.collect()
            if not moved:
                return
        raise AssertionError(f"the pair did not go quiet within {max_rounds} rounds")

    def advance(self, seconds: float, max_steps: int = 10_000) -> None:
        target = self.now + seconds
        for _ in range(max_steps):
            due = [
                t
                for t in (self.client.get_timer(), self.server.get_timer())
                if t is not None and t <= target
            ]
            if not due:
                break
            self.now = max(self.now, min(due))
            for side in SIDES:
                proto = self.proto(side)
                timer = proto.get_timer()
                if timer is not None and timer <= self.now:
                    proto.handle_timer(self.now)
            self.collect()
        else:
            raise AssertionError("timers kept firing: busy loop")
        self.now = target

    def handshake(self) -> None:
        self.transfer()
        for side in SIDES:
            new = self.new_events(side)
            assert [type(e) for e in new] == [HandshakeComplete], (side, new)

    @classmethod
    def opened(cls, **kwargs: Any) -> ProtocolPair:
        pair = cls(**kwargs)
        pair.handshake()
        return pair


# ---------------------------------------------------------------------- raw wsproto peers


class _RawPeer:
    """A bare wsproto endpoint: frames whatever it is told to, decodes what it receives."""

    def __init__(self, kind: ConnectionType, *, opened: bool = False) -> None:
        #: a full endpoint (HTTP upgrade first), or with ``opened`` a frame layer already open
        self.ws: WSConnection | Connection = Connection(kind) if opened else WSConnection(kind)
        #: every wsproto event received, in order
        self.ws_events: list[WSEvent] = []
        #: complete text messages received, in order
        self.texts: list[str] = []
        #: complete binary messages received
        self.binaries: list[bytes] = []
        self.closes: list[CloseConnection] = []
        self._text: list[str] = []
        self._bin = bytearray()
        self.out = bytearray()

    def receive(self, data: bytes) -> list[WSEvent]:
        """Feed bytes; answers pings and closes automatically; returns the new events."""
        self.ws.receive_data(data)
        new: list[WSEvent] = []
        for event in self.ws.events():
            new.append(event)
            if isinstance(event, TextMessage):
                self._text.append(event.data)
                if event.message_finished:
                    self.texts.append("".join(self._text))
                    self._text.clear()
            elif isinstance(event, BytesMessage):
                self._bin += event.data
                if event.message_finished:
                    self.binaries.append(bytes(self._bin))
                    self._bin.clear()
            elif isinstance(event, CloseConnection):
                self.closes.append(event)
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    self.out += self.ws.send(event.response())
            elif isinstance(event, WSPing):
                self.out += self.ws.send(event.response())
        self.ws_events.extend(new)
        return new

    def send(self, event: WSEvent) -> bytes:
        """Frame ``event``; returns the bytes (not queued: the caller delivers them)."""
        return self.ws.send(event)

    def send_text(self, text: str) -> bytes:
        return self.send(TextMessage(data=text))

    def send_json(self, obj: Any) -> bytes:
        return self.send_text(dumps(obj))

    def take(self) -> bytes:
        """The automatic answers queued by :meth:`receive` (pongs, the close reply)."""
        data, self.out = bytes(self.out), bytearray()
        return data

    def messages(self) -> list[dict[str, Any]]:
        """The JSON messages received so far (decoded)."""
        return [json.loads(t) for t in self.texts]

    def types(self) -> list[str]:
        return [str(m.get("type")) for m in self.messages()]


class RawClient(_RawPeer):
    """A wsproto client to talk to our server at frame level (``opened``: no upgrade, frames
    only, e.g. to decode a server's output or to make seeds)."""

    def __init__(self, *, opened: bool = False) -> None:
        super().__init__(ConnectionType.CLIENT, opened=opened)

    def request(
        self,
        target: str = "/federation",
        host: str = "localhost",
        extensions: Sequence[Extension] = (),
        extra_headers: Iterable[tuple[bytes, bytes]] = (),
        subprotocols: Sequence[str] = (),
    ) -> bytes:
        return self.send(
            Request(
                host=host,
                target=target,
                extensions=list(extensions),
                extra_headers=list(extra_headers),
                subprotocols=list(subprotocols),
            )
        )

    def connect(
        self, server: FederationConnection, now: float = 0.0, **request: Any
    ) -> list[WSEvent]:
        """Upgrade against ``server`` (already started): afterwards the raw client is open."""
        server.receive_data(self.request(**request), now)
        self.take()
        new = self.receive(server.data_to_send())
        assert any(isinstance(e, AcceptConnection) for e in new), new
        return new

    def hello(self, system_id: str = "raw-client", **fields: Any) -> bytes:
        msg: dict[str, Any] = {
            "type": "hello",
            "timestamp": WALL_START,
            "systemId": system_id,
            "config": {},
            "protocol": "rhizomedb-federation-v1",
        }
        msg.update(fields)
        return self.send_json(msg)


class RawServer(_RawPeer):
    """A wsproto server to talk to our client at frame level (``opened``: frames only)."""

    def __init__(self, *, opened: bool = False) -> None:
        super().__init__(ConnectionType.SERVER, opened=opened)

    def accept(
        self, client: FederationConnection, now: float = 0.0, extensions: Sequence[Extension] = ()
    ) -> Request:
        """Take ``client``'s upgrade request (client already started) and accept it; the 101
        is delivered, so the client is open and has queued its ``hello``."""
        new = self.receive(client.data_to_send())
        requests = [e for e in new if isinstance(e, Request)]
        assert len(requests) == 1, new
        client.receive_data(self.send(AcceptConnection(extensions=list(extensions))), now)
        self.take()
        return requests[0]

    def hello_ack(self, link_id: str = "raw-link", **fields: Any) -> bytes:
        msg: dict[str, Any] = {
            "type": "hello_ack",
            "timestamp": WALL_START,
            "systemId": "raw-server",
            "linkId": link_id,
            "protocol": "rhizomedb-federation-v1",
        }
        msg.update(fields)
        return self.send_json(msg)


def feed(conn: FederationConnection, data: bytes, now: float = 0.0) -> RemoteProtocolError | None:
    """``conn.receive_data`` returning (instead of raising) a :class:`RemoteProtocolError`."""
    try:
        conn.receive_data(data, now)
    except RemoteProtocolError as exc:
        return exc
    return None


def open_server(now: float = 0.0, **options: Any) -> tuple[FederationConnection, RawClient]:
    """Our server, upgraded and past ``hello``, talking to a raw client."""
    server = make_server(**options)
    server.start(now)
    raw = RawClient()
    raw.connect(server, now)
    assert feed(server, raw.hello(), now) is None
    raw.take()
    assert [type(e) for e in server.events()] == [HandshakeComplete]
    raw.receive(server.data_to_send())
    assert raw.types() == ["hello_ack"]
    raw.texts.clear()
    return server, raw


def open_client(now: float = 0.0, **options: Any) -> tuple[FederationConnection, RawServer]:
    """Our client, upgraded and past ``hello_ack``, talking to a raw server."""
    client = make_client(**options)
    client.start(now)
    raw = RawServer()
    raw.accept(client, now)
    raw.receive(client.data_to_send())
    assert raw.types() == ["hello"]
    raw.texts.clear()
    assert feed(client, raw.hello_ack(), now) is None
    raw.take()
    assert [type(e) for e in client.events()] == [HandshakeComplete]
    return client, raw


def delta_json(delta_id: str = "wire-1", **fields: Any) -> dict[str, Any]:
    """A valid delta as JSON (fields overridable, ``None`` removes one)."""
    obj: dict[str, Any] = {
        "id": delta_id,
        "timestamp": 1_000,
        "author": "author-1",
        "system": "sys-1",
        "pointers": [{"role": "subject", "target": {"id": "e-1", "context": "c"}}],
    }
    obj.update(fields)
    return {k: v for k, v in obj.items() if v is not None}


def sample_messages(ts: int = WALL_START) -> dict[str, dict[str, Any]]:
    """One valid message of every v1 type, as JSON objects."""
    return {
        "hello": {
            "type": "hello",
            "timestamp": ts,
            "systemId": "peer-sys",
            "config": {},
            "protocol": "rhizomedb-federation-v1",
        },
        "hello_ack": {
            "type": "hello_ack",
            "timestamp": ts,
            "systemId": "peer-sys",
            "linkId": "peer-link",
            "protocol": "rhizomedb-federation-v1",
        },
        "delta": {"type": "delta", "timestamp": ts, "delta": delta_json("sample-1")},
        "delta_ack": {"type": "delta_ack", "timestamp": ts, "deltaId": "nobody"},
        "delta_nack": {"type": "delta_nack", "timestamp": ts, "deltaId": "nobody", "reason": "x"},
        "sync_request": {"type": "sync_request", "timestamp": ts},
        "sync_start": {"type": "sync_start", "timestamp": ts, "totalDeltas": 0, "batchSize": 100},
        "sync_batch": {
            "type": "sync_batch",
            "timestamp": ts,
            "deltas": [],
            "batchNumber": 0,
            "isLastBatch": True,
        },
        "sync_complete": {"type": "sync_complete", "timestamp": ts, "deltasProcessed": 0},
        "pause": {"type": "pause", "timestamp": ts},
        "resume": {"type": "resume", "timestamp": ts},
        "ping": {"type": "ping", "timestamp": ts},
        "pong": {"type": "pong", "timestamp": ts},
        "error": {"type": "error", "timestamp": ts, "code": "SOMETHING", "message": "m"},
    }


def dumps(obj: Any) -> str:
    """Compact JSON with non-ASCII kept, as the reference (``JSON.stringify``) writes it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def reference_session() -> list[dict[str, Any]]:
    """The lines of ``reference-session.jsonl``: ``{"dir", "conn", "msg"}``."""
    text = (VECTORS / "reference-session.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def decode_output(data: bytes, *, from_server: bool) -> list[str]:
    """What a side wrote, as readable items: the HTTP status line, then one item per frame
    (``text:...``, ``binary:...``, ``ping:...``, ``pong:...``, ``close:code:reason``).
    Client frames are masked with random keys, so compare this rather than the bytes."""
    items: list[str] = []
    if data.startswith((b"HTTP/", b"GET ")):
        head, sep, data = data.partition(b"\r\n\r\n")
        items.append(head.split(b"\r\n", 1)[0].decode())
        if not sep:
            return items
    peer: _RawPeer = RawClient(opened=True) if from_server else RawServer(opened=True)
    if data:
        peer.receive(data)
    for event in peer.ws_events:
        if isinstance(event, TextMessage):
            items.append(f"text:{event.data}")
        elif isinstance(event, BytesMessage):
            items.append(f"binary:{bytes(event.data)!r}")
        elif isinstance(event, WSPing):
            items.append(f"ping:{bytes(event.payload)!r}")
        elif isinstance(event, WSPong):
            items.append(f"pong:{bytes(event.payload)!r}")
        elif isinstance(event, CloseConnection):
            items.append(f"close:{int(event.code)}:{event.reason}")
        else:
            items.append(type(event).__name__)
    return items
