"""What the fuzz targets are fed: seed inputs, a libFuzzer dictionary, and the frames, upgrade
messages and handshake texts to build them (client frames zero-masked so that a fuzzer can
mutate the payload). No invariant lives here (fuzz/invariants.py), no driving (fuzz/harness.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib
from pathlib import Path

from rhizome_proto import MESSAGE_TYPES

__all__ = [
    "DICTIONARY",
    "HELLO",
    "HELLO_ACK",
    "HELLO_ACK_EXT",
    "HELLO_EXT",
    "UPGRADE_REQUEST",
    "VECTORS",
    "accept_response",
    "batch_messages",
    "client_seed_inputs",
    "deflated",
    "masked_frame",
    "seed_inputs",
    "server_seed_inputs",
    "unmasked_frame",
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


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_UPGRADE_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
#: A valid upgrade request for our server, offering permessage-deflate like the reference.
UPGRADE_REQUEST = (
    b"GET /federation HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: " + _UPGRADE_KEY + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
)
HELLO = (
    b'{"type":"hello","timestamp":1795624086459,"systemId":"fuzz-client","config":{},'
    b'"protocol":"rhizomedb-federation-v1"}'
)
HELLO_ACK = (
    b'{"type":"hello_ack","timestamp":1795624086461,"systemId":"fuzz-server",'
    b'"linkId":"fuzz-link","protocol":"rhizomedb-federation-v1"}'
)
#: the same with extensions ``batch`` and ``credit`` (setup flag 0x80)
HELLO_EXT = HELLO[:-1] + b',"extensions":["batch","credit","cursor"],"window":2}'
HELLO_ACK_EXT = HELLO_ACK[:-1] + b',"extensions":["batch","credit"],"window":2}'


def frame(
    opcode: int,
    payload: bytes,
    key: bytes | None = None,
    *,
    fin: bool = True,
    rsv1: bool = False,
    length_form: int = 0,
) -> bytes:
    """A frame by hand, masked with ``key`` (a client's) or not (``None``: a server's), for
    frames wsproto refuses to make. ``length_form`` 126 or 127 writes the length in the 2- or
    8-byte form even where a shorter one would do (which RFC 6455 forbids)."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    length = len(payload)
    form = length_form or (length if length < 126 else 126 if length < 65536 else 127)
    head = bytes([first, (0x80 if key is not None else 0) | min(form, 127)])
    if form == 126:
        head += struct.pack("!H", length)
    elif form == 127:
        head += struct.pack("!Q", length)
    if key is None:
        return head + payload
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def masked_frame(
    payload: bytes, opcode: int = 0x1, *, fin: bool = True, rsv1: bool = False
) -> bytes:
    """A client frame with an all-zero masking key: the payload stays readable to mutate."""
    return frame(opcode, payload, b"\0\0\0\0", fin=fin, rsv1=rsv1)


def unmasked_frame(
    payload: bytes, opcode: int = 0x1, *, fin: bool = True, rsv1: bool = False
) -> bytes:
    """A server frame (servers never mask)."""
    return frame(opcode, payload, fin=fin, rsv1=rsv1)


def deflated(payload: bytes) -> bytes:
    """``payload`` compressed as one permessage-deflate message (RFC 7692 section 7.2.1)."""
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4]  # without the 00 00 ff ff tail


def accept_response(request: bytes, *, deflate: bool) -> bytes:
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
        bytes([0x07, 0]) + masked_frame(deflated(b'{"type":"ping","timestamp":7}'), rsv1=True),
        bytes([0x0F, 0])
        + masked_frame(deflated(b'{"type":"ping","pad":"' + b"0" * 5000 + b'"}'), rsv1=True),
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
        bytes([0x05, 0]) + unmasked_frame(deflated(_session_messages("s2c")[4]), rsv1=True),
        bytes([0x09, 0])
        + unmasked_frame(b'{"type":"pong","timestamp":1,"p":"' + b"z" * 300 + b'"}'),
        bytes([0xC1, 0]) + b"".join(unmasked_frame(m) for m in batch_messages()) + close,
    ]
