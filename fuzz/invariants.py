"""Invariants checked on arbitrary input, shared by the atheris targets and the test suite.

Each ``check_*`` function takes raw fuzzer bytes and either returns (the invariant holds) or
raises: an ``AssertionError`` for a broken invariant, or whatever unexpected exception the code
under test let escape. Nothing here catches more than the documented ``CodecError``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import rhizome_proto
from rhizome_proto import (
    MAX_TIMESTAMP,
    MESSAGE_TYPES,
    CodecError,
    DeltaAck,
    DeltaMessage,
    DeltaNack,
    DeltasAck,
    DeltasMessage,
    ErrorCode,
    ErrorMessage,
    Hello,
    HelloAck,
    Pause,
    Ping,
    Pong,
    Resume,
    SyncBatch,
    SyncComplete,
    SyncRequest,
    SyncStart,
    decode,
    encode,
    validate_delta,
)

__all__ = [
    "DICTIONARY",
    "VECTORS",
    "check_codec",
    "check_decoded",
    "check_error",
    "check_message",
    "seed_inputs",
]

#: The recordings of the TypeScript reference (tests/vectors), used as seeds.
VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors"

_FIELD_NAMES = (
    "type", "timestamp", "systemId", "config", "protocol", "linkId", "delta", "deltaId",
    "reason", "filter", "fromTimestamp", "totalDeltas", "batchSize", "deltas", "batchNumber",
    "isLastBatch", "deltasProcessed", "code", "message", "fatal", "id", "author", "system",
    "pointers", "role", "target", "context", "mode", "initialSync", "syncFromTimestamp",
    "pushFilter", "pullFilter", "reconnect", "trustPolicy", "ids", "targetIds", "targetContexts",
    "authors", "systems", "timestampRange", "start", "end", "includeNegated", "extensions",
    "window", "upTo", "cursor", "fromCursor",
)  # fmt: skip

#: Tokens for libFuzzer's ``-dict``: the wire vocabulary and numbers at the edges.
DICTIONARY: tuple[str, ...] = (
    *(f'"{t}"' for t in sorted(MESSAGE_TYPES)),
    *(f'"{name}"' for name in _FIELD_NAMES),
    '"rhizomedb-federation-v1"',
    "null",
    "true",
    "false",
    "0",
    "-0",
    "0.0",
    "1e400",
    "-1e400",
    "5e-324",
    "9007199254740991",
    "9007199254740992",
    "18446744073709551616",
    "NaN",
    "Infinity",
    "\\ud800",
    "\\udc00",
    "\\u0000",
)


def seed_inputs() -> list[bytes]:
    """Every message of the reference recording, as the compact JSON bytes of one frame."""
    seeds: list[bytes] = []
    with (VECTORS / "reference-session.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                msg = json.loads(line)["msg"]
                seeds.append(json.dumps(msg, separators=(",", ":")).encode())
    return seeds


def check_error(exc: CodecError) -> None:
    """A ``CodecError`` from ``decode`` carries a consistent code, type and delta id."""
    assert isinstance(str(exc), str)
    if exc.delta_id is not None:
        assert exc.code is ErrorCode.INVALID_DELTA
        assert isinstance(exc.delta_id, str) and exc.delta_id
    if exc.items is not None:
        # a ``deltas`` message judged element by element: at least one element is invalid
        assert exc.code is ErrorCode.INVALID_DELTA and exc.delta_id is None
        assert any(isinstance(item, CodecError) for item in exc.items)
        for item in exc.items:
            if isinstance(item, CodecError):
                assert item.code is ErrorCode.INVALID_DELTA and item.items is None
                assert item.message_type == "deltas"
                assert item.delta_id is None or (isinstance(item.delta_id, str) and item.delta_id)
            else:
                assert validate_delta(item) == item
    # One branch per code: the fuzzer's coverage feedback then tells the codes apart.
    match exc.code:
        case ErrorCode.MESSAGE_ERROR:
            assert exc.message_type is None or exc.message_type in MESSAGE_TYPES
        case ErrorCode.UNKNOWN_MESSAGE_TYPE:
            assert isinstance(exc.message_type, str)
            assert exc.message_type not in MESSAGE_TYPES
        case ErrorCode.INVALID_DELTA:
            assert exc.message_type in ("delta", "deltas")
            assert (exc.items is not None) == (exc.message_type == "deltas")
        case _:
            raise AssertionError(f"decode answered with {exc.code!r}")


def check_message(message: rhizome_proto.Message, wire: dict[str, Any]) -> None:
    """Per-class invariants of a decoded ``message`` and its re-encoded JSON ``wire``.

    One ``case`` per class, so that coverage-guided fuzzing keeps a seed of each kind.
    """
    assert wire["type"] == message.__struct_config__.tag
    assert wire["timestamp"] == message.timestamp
    assert type(wire["timestamp"]) is type(message.timestamp)
    assert 0 < message.timestamp <= MAX_TIMESTAMP
    match message:
        case Hello():
            # A v1 peer reads both even when they hold their defaults.
            assert wire["protocol"] == message.protocol
            assert isinstance(wire["config"], dict)
            assert ("window" in wire) == isinstance(message.window, int)
        case HelloAck():
            assert wire["protocol"] == message.protocol
            assert ("window" in wire) == isinstance(message.window, int)
        case DeltaMessage():
            # Decoded deltas obey spec section 2.1.1.
            assert validate_delta(message.delta) == message.delta
        case DeltaAck() | DeltaNack():
            assert wire["deltaId"] == message.delta_id
        case DeltasMessage():
            assert len(wire["deltas"]) == len(message.deltas) >= 1
            assert all(validate_delta(d) == d for d in message.deltas)
        case DeltasAck():
            assert wire["upTo"] == message.up_to >= 0
        case SyncRequest():
            assert ("filter" in wire) == (message.filter is not None)
            assert ("fromTimestamp" in wire) == (message.from_timestamp is not None)
        case SyncStart():
            assert message.batch_size >= 1 and message.total_deltas >= 0
        case SyncBatch():
            assert len(wire["deltas"]) == len(message.deltas)
            assert all(validate_delta(d) == d for d in message.deltas)
        case SyncComplete():
            assert message.deltas_processed >= 0
        case Pause() | Resume() | Ping() | Pong():
            assert set(wire) == {"type", "timestamp"}
        case ErrorMessage():
            assert ("fatal" in wire) == (message.fatal is not None)
        case _:
            raise AssertionError(f"decode returned a {type(message).__name__}")


def check_decoded(text: str | bytes) -> rhizome_proto.Message | CodecError:
    """Decode ``text``: a message that round-trips exactly, or a well-formed ``CodecError``."""
    try:
        message = decode(text)
    except CodecError as exc:
        check_error(exc)
        return exc
    assert type(message) in MESSAGE_TYPES.values(), type(message)
    encoded = encode(message)
    assert isinstance(encoded, str)
    again = decode(encoded)
    assert again == message, (message, again)
    # Equality cannot tell 1 from 1.0 or True; the text can. Encoding must be stable.
    assert encode(again) == encoded, (encoded, encode(again))
    check_message(message, json.loads(encoded))
    return message


def check_codec(data: bytes) -> None:
    """``decode`` on arbitrary bytes, and on their text, returns a message or raises CodecError.

    The bytes are decoded twice: as given, and as ``str`` (undecodable bytes become lone
    surrogates, which must be refused). When ``data`` is valid UTF-8 both must agree.
    """
    from_bytes = check_decoded(data)
    text = data.decode("utf-8", errors="surrogateescape")
    from_text = check_decoded(text)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        assert isinstance(from_text, CodecError)
        return
    if isinstance(from_bytes, CodecError) or isinstance(from_text, CodecError):
        assert isinstance(from_bytes, CodecError) and isinstance(from_text, CodecError), (
            from_bytes,
            from_text,
        )
        assert from_bytes.code == from_text.code
        assert from_bytes.message_type == from_text.message_type
        assert from_bytes.delta_id == from_text.delta_id
    else:
        assert from_bytes == from_text


# --------------------------------------------------------------------------------------------
# FederationConnection on arbitrary bytes (server and client roles)
#
# The first two bytes of the fuzzer's input choose the setup (see ``_options``) and where the
# rest is split into chunks; the rest is what the peer sends. Invariant: ``receive_data`` raises
# nothing but ``RemoteProtocolError``; ``events``, ``data_to_send``, ``get_timer``,
# ``handle_timer`` and ``receive_eof`` raise nothing; no event follows ``Closed``, and there is
# exactly one ``Closed`` once the stream has ended.

import base64  # noqa: E402
import hashlib  # noqa: E402
import struct  # noqa: E402
import zlib  # noqa: E402

from rhizome_proto import (  # noqa: E402
    Closed,
    DeltaReceived,
    Event,
    FederationConnection,
    RemoteProtocolError,
    Role,
    State,
    SyncRequested,
)

__all__ += [
    "UPGRADE_REQUEST",
    "batch_messages",
    "check_client_connection",
    "check_server_connection",
    "client_seed_inputs",
    "masked_frame",
    "run_client_connection",
    "run_server_connection",
    "server_seed_inputs",
    "unmasked_frame",
]

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_UPGRADE_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
#: A valid upgrade request for our server, offering permessage-deflate like the reference.
UPGRADE_REQUEST = (
    b"GET /federation HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: " + _UPGRADE_KEY + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
)
_HELLO = (
    b'{"type":"hello","timestamp":1795624086459,"systemId":"fuzz-client","config":{},'
    b'"protocol":"rhizomedb-federation-v1"}'
)
_HELLO_ACK = (
    b'{"type":"hello_ack","timestamp":1795624086461,"systemId":"fuzz-server",'
    b'"linkId":"fuzz-link","protocol":"rhizomedb-federation-v1"}'
)
#: the same with extensions ``batch`` and ``credit`` (setup flag 0x80)
_HELLO_EXT = _HELLO[:-1] + b',"extensions":["batch","credit","cursor"],"window":2}'
_HELLO_ACK_EXT = _HELLO_ACK[:-1] + b',"extensions":["batch","credit"],"window":2}'
_EXTENSIONS = ("batch", "credit")
_RECEIVE_WINDOW = 3
_NOW = 1.0
_MAX_CHUNKS = 4


def _header(opcode: int, length: int, *, fin: bool, rsv1: bool, masked: bool) -> bytes:
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return bytes([first, mask_bit | length])
    if length < 65536:
        return bytes([first, mask_bit | 126]) + struct.pack("!H", length)
    return bytes([first, mask_bit | 127]) + struct.pack("!Q", length)


def masked_frame(
    payload: bytes, opcode: int = 0x1, *, fin: bool = True, rsv1: bool = False
) -> bytes:
    """A client frame with an all-zero masking key: the payload stays readable to mutate."""
    return _header(opcode, len(payload), fin=fin, rsv1=rsv1, masked=True) + b"\0\0\0\0" + payload


def unmasked_frame(
    payload: bytes, opcode: int = 0x1, *, fin: bool = True, rsv1: bool = False
) -> bytes:
    """A server frame (servers never mask)."""
    return _header(opcode, len(payload), fin=fin, rsv1=rsv1, masked=False) + payload


def _deflated(payload: bytes) -> bytes:
    """``payload`` compressed as one permessage-deflate message (RFC 7692 section 7.2.1)."""
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4]  # without the 00 00 ff ff tail


def _accept_response(request: bytes, *, deflate: bool) -> bytes:
    """The 101 a server answers to our client's ``request`` (RFC 6455 section 4.2.2)."""
    key = b""
    for line in request.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
    extension = b"Sec-WebSocket-Extensions: permessage-deflate\r\n" if deflate else b""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n" + extension + b"\r\n"
    )


class _Options:
    """Setup flags from the first byte; the second byte places the chunk boundaries."""

    def __init__(self, data: bytes) -> None:
        flags = data[0] if data else 0
        self.prelude = bool(flags & 0x01)  # server: valid upgrade fed; client: hello_ack fed
        self.hello = bool(flags & 0x02)  # server: a valid hello fed as well
        self.compression = bool(flags & 0x04)
        self.small_limit = bool(flags & 0x08)  # max_message_size 256 bytes, else 64 KiB
        self.sync = bool(flags & 0x10)  # client: request_sync once open
        self.pause = bool(flags & 0x20)  # pause the peer once open
        self.pending = bool(flags & 0x40)  # a delta of ours is pending
        self.extensions = bool(flags & 0x80)  # we speak batch and credit (window 3)
        self.split = data[1] if len(data) > 1 else 0
        self.body = data[2:]

    def max_message_size(self) -> int:
        return 256 if self.small_limit else 64 * 1024

    def extension_options(self) -> dict[str, Any]:
        if not self.extensions:
            return {}
        return {"extensions": _EXTENSIONS, "receive_window": _RECEIVE_WINDOW}

    def chunks(self) -> list[bytes]:
        body = self.body
        if not body:
            return []
        if self.split == 0:
            return [body]
        step = max(1, len(body) * self.split // 255 // _MAX_CHUNKS + 1)
        pieces = [body[i : i + step] for i in range(0, len(body), step)]
        if len(pieces) > _MAX_CHUNKS:  # keep the work per input bounded
            pieces[_MAX_CHUNKS - 1 :] = [b"".join(pieces[_MAX_CHUNKS - 1 :])]
        return pieces


class _Checker:
    """Drives one connection and checks the invariant after every call."""

    def __init__(self, conn: FederationConnection) -> None:
        self.conn = conn
        self.closed = 0
        self.now = _NOW
        self.events: list[Event] = []

    def take(self) -> None:
        for event in self.conn.events():
            assert isinstance(event, Event), event
            assert self.closed == 0, f"{event!r} after Closed"
            self.events.append(event)
            if isinstance(event, Closed):
                self.closed += 1
            self.react(event)
        out = self.conn.data_to_send()
        assert isinstance(out, bytes)
        window = self.conn.send_window
        if window is not None:  # credit: never more than the peer's window in flight
            assert len(self.conn.unacknowledged) <= window
        if self.conn.closed:
            assert self.conn.should_close
            assert self.conn.get_timer() is None

    def react(self, event: Event) -> None:
        """An application that answers what it is asked, as an adapter's user would."""
        conn = self.conn
        if isinstance(event, DeltaReceived):
            conn.ack(event.delta.id)
        elif isinstance(event, SyncRequested) and conn.is_open:
            conn.start_sync(1, batch_size=1)
            conn.send_sync_batch(
                [rhizome_proto.Delta(id="s1", timestamp=1, author="a", system="s")], last=True
            )
            conn.complete_sync()

    def feed(self, chunk: bytes) -> None:
        try:
            self.conn.receive_data(chunk, self.now)
        except RemoteProtocolError as exc:
            assert isinstance(exc.code, ErrorCode)
            assert self.conn.state in (State.CLOSING, State.CLOSED), self.conn.state
        self.take()

    def tick(self) -> None:
        timer = self.conn.get_timer()
        if timer is not None:
            self.now = max(self.now, timer)
            self.conn.handle_timer(self.now)
            later = self.conn.get_timer()
            assert later is None or later > self.now, (timer, later)
        self.take()

    def finish(self) -> None:
        self.tick()
        self.conn.receive_eof(self.now + 1.0)
        self.take()
        assert self.closed == 1
        assert self.conn.should_close


def _run(checker: _Checker, options: _Options) -> None:
    conn = checker.conn
    if options.pending and conn.state is not State.CLOSED:
        for name in ("mine", "mine-2", "mine-3") if options.extensions else ("mine",):
            conn.send_delta(rhizome_proto.Delta(id=name, timestamp=1, author="a", system="s"))
    if options.pause and conn.is_open:
        conn.pause()
    if options.sync and conn.is_open and conn.role is Role.CLIENT:
        conn.request_sync()
    checker.take()
    for chunk in options.chunks():
        checker.feed(chunk)
        if checker.closed:
            break
    checker.finish()


def check_server_connection(data: bytes) -> None:
    """Our server, started (optionally upgraded, optionally past ``hello``), fed ``data``."""
    run_server_connection(data)


def check_client_connection(data: bytes) -> None:
    """Our client, started, its upgrade accepted (optionally past ``hello_ack``), fed ``data``."""
    run_client_connection(data)


def run_server_connection(data: bytes) -> list[Event]:
    """:func:`check_server_connection`, returning the server's events."""
    options = _Options(data)
    conn = FederationConnection(
        Role.SERVER,
        system_id="fuzz-server",
        link_id="fuzz-link",
        clock=lambda: 1795624086459,
        max_message_size=options.max_message_size(),
        compression=options.compression,
        **options.extension_options(),
    )
    conn.start(0.0)
    checker = _Checker(conn)
    if options.prelude or options.hello:
        checker.feed(UPGRADE_REQUEST)
        assert conn.request is not None
        if options.hello:
            checker.feed(masked_frame(_HELLO_EXT if options.extensions else _HELLO))
            assert conn.is_open
    _run(checker, options)
    return checker.events


def run_client_connection(data: bytes) -> list[Event]:
    """:func:`check_client_connection`, returning the client's events."""
    options = _Options(data)
    conn = FederationConnection(
        Role.CLIENT,
        system_id="fuzz-client",
        clock=lambda: 1795624086459,
        max_message_size=options.max_message_size(),
        compression=options.compression,
        **options.extension_options(),
    )
    conn.start(0.0)
    checker = _Checker(conn)
    request = conn.data_to_send()
    checker.feed(_accept_response(request, deflate=options.compression))
    assert conn.state is State.HELLO_SENT, conn.state
    if options.prelude:
        checker.feed(unmasked_frame(_HELLO_ACK_EXT if options.extensions else _HELLO_ACK))
        assert conn.is_open
    _run(checker, options)
    return checker.events


def _session_messages(direction: str) -> list[bytes]:
    with (VECTORS / "reference-session.jsonl").open(encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [
        json.dumps(x["msg"], separators=(",", ":"), ensure_ascii=False).encode()
        for x in lines
        if x["dir"] == direction and x["conn"] == 1
    ]


def batch_messages() -> list[bytes]:
    """Messages of extension ``batch`` from a peer: deltas (one invalid), cumulative acks
    (one beyond what was sent), a nack, and more deltas than a window of 3."""
    delta = b'{"id":"%s","timestamp":5,"author":"a","system":"s","pointers":[]}'
    two = delta % b"b1" + b"," + delta % b"b2"
    bad = b'{"id":"b3","timestamp":5,"author":"","system":"s"}'
    many = b",".join(delta % b"m%d" % i for i in range(4))
    return [
        b'{"type":"deltas","timestamp":7,"deltas":[' + two + b"]}",
        b'{"type":"deltas_ack","timestamp":8,"upTo":1}',
        b'{"type":"deltas","timestamp":9,"deltas":[' + bad + b",7," + delta % b"b4" + b"]}",
        b'{"type":"delta_nack","timestamp":10,"deltaId":"mine-2","reason":"no"}',
        b'{"type":"deltas_ack","timestamp":11,"upTo":9}',
        b'{"type":"deltas","timestamp":12,"deltas":[' + many + b"]}",
        b'{"type":"deltas","timestamp":13,"deltas":[]}',
    ]


def server_seed_inputs() -> list[bytes]:
    """Inputs for :func:`check_server_connection`: the reference client's side of a session
    (zero-masked frames), with and without the upgrade, whole and split, plus odd frames."""
    messages = _session_messages("c2s")
    frames = b"".join(masked_frame(m) for m in messages)
    close = masked_frame(struct.pack("!H", 1000) + b"bye", opcode=0x8)
    after_hello = b"".join(masked_frame(m) for m in messages[1:])
    return [
        bytes([0x00, 0]) + UPGRADE_REQUEST + frames + close,
        bytes([0x01, 0]) + frames + close,
        bytes([0x03, 40]) + after_hello + close,
        bytes([0x63, 200]) + after_hello,
        bytes([0x0B, 0]) + masked_frame(b'{"type":"ping","timestamp":1,"x":"' + b"y" * 300 + b'"}'),
        bytes([0x03, 0]) + masked_frame(b"\x00\x01", opcode=0x2) + masked_frame(b"ping", 0x9),
        bytes([0x03, 0])
        + masked_frame(b'{"type":"ping",', fin=False)
        + masked_frame(b'"timestamp":5}', opcode=0x0),
        bytes([0x07, 0]) + masked_frame(_deflated(b'{"type":"ping","timestamp":7}'), rsv1=True),
        bytes([0x0F, 0])
        + masked_frame(_deflated(b'{"type":"ping","pad":"' + b"0" * 5000 + b'"}'), rsv1=True),
        bytes([0x00, 0]) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes([0xC3, 0]) + b"".join(masked_frame(m) for m in batch_messages()) + close,
        bytes([0x43, 0]) + b"".join(masked_frame(m) for m in batch_messages()) + close,
    ]


def client_seed_inputs() -> list[bytes]:
    """Inputs for :func:`check_client_connection`: the reference server's side of a session
    (unmasked frames), with and without ``hello_ack``, plus odd frames."""
    messages = _session_messages("s2c")
    close = unmasked_frame(struct.pack("!H", 1001) + b"later", opcode=0x8)
    return [
        bytes([0x00, 0]) + b"".join(unmasked_frame(m) for m in messages) + close,
        bytes([0x11, 0]) + b"".join(unmasked_frame(m) for m in messages[1:]) + close,
        bytes([0x71, 90]) + b"".join(unmasked_frame(m) for m in messages[1:]),
        bytes([0x01, 0]) + unmasked_frame(b"\x00", opcode=0x2) + unmasked_frame(b"p", 0x9),
        bytes([0x05, 0]) + unmasked_frame(_deflated(_session_messages("s2c")[4]), rsv1=True),
        bytes([0x09, 0])
        + unmasked_frame(b'{"type":"pong","timestamp":1,"p":"' + b"z" * 300 + b'"}'),
        bytes([0xC1, 0]) + b"".join(unmasked_frame(m) for m in batch_messages()) + close,
    ]
