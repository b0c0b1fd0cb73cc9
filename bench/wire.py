"""Raw WebSocket and federation bytes, built once before any timing: payloads, frames (client
frames masked with a fixed key, RFC 6455 5.3), hand-made HTTP upgrades, and cheap counting of a
pattern in a byte stream. No WebSocket or federation library is imported here (the raw processes
import only this module), except :func:`delta_objects`, which imports ``rhizome_proto`` lazily.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rhizome_proto import Delta

T0 = 1_795_624_086_443  # the fixed wall-clock time (ms) of every message and delta
MASK_KEY = b"\x37\xfa\x21\x3d"  # a fixed masking key: fine for a load generator
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BATCH = 100  # deltas per sync_batch, the v1 default
CLOSE_CLIENT = b"\x88\x82" + MASK_KEY + bytes([0x03 ^ MASK_KEY[0], 0xE8 ^ MASK_KEY[1]])
CLOSE_SERVER = b"\x88\x02\x03\xe8"


def dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def delta_dict(i: int) -> dict[str, Any]:
    """Delta number ``i``: three pointers; its ``delta`` message is about 300 bytes."""
    return {
        "id": f"bench-{i:08d}",
        "timestamp": T0 + i,
        "author": "bench",
        "system": "bench-gen",
        "pointers": [
            {"role": "movie", "target": {"id": f"movie-{i % 97}", "context": "reviews"}},
            {"role": "text", "target": f"review {i:08d}: a fine film!"},
            {"role": "rating", "target": i % 5 + 1},
        ],
    }


def delta_objects(start: int, stop: int) -> list[Delta]:
    """The same deltas as ``rhizome_proto.Delta`` values (to preload a store)."""
    from rhizome_proto import Delta, Pointer, Reference

    out = []
    for i in range(start, stop):
        d = delta_dict(i)
        pointers = tuple(
            Pointer(role=p["role"], target=Reference(**t) if isinstance(t, dict) else t)
            for p in d["pointers"]
            for t in [p["target"]]
        )
        out.append(
            Delta(
                id=d["id"],
                timestamp=d["timestamp"],
                author=d["author"],
                system=d["system"],
                pointers=pointers,
            )
        )
    return out


# ------------------------------------------------------------------ messages (JSON bytes)


def hello(initial_sync: str, mode: str = "bidirectional") -> bytes:
    """A v1 client's hello; ``mode`` as the client sees it (a server mirrors it: it relays
    deltas to ``pull`` and ``bidirectional`` clients, never to ``push`` ones)."""
    config = {"mode": mode, "initialSync": initial_sync}
    return dumps(
        {
            "type": "hello",
            "timestamp": T0,
            "systemId": "bench-gen",
            "config": config,
            "protocol": "rhizomedb-federation-v1",
        }
    )


def hello_ack() -> bytes:
    return dumps(
        {
            "type": "hello_ack",
            "timestamp": T0,
            "systemId": "bench-raw",
            "linkId": "l1",
            "protocol": "rhizomedb-federation-v1",
        }
    )


def delta_message(i: int) -> bytes:
    return dumps({"type": "delta", "timestamp": T0, "delta": delta_dict(i)})


def ack_message(i: int) -> bytes:
    return dumps({"type": "delta_ack", "timestamp": T0, "deltaId": f"bench-{i:08d}"})


def sync_request() -> bytes:
    return dumps({"type": "sync_request", "timestamp": T0})


def sync_stream(n: int) -> bytes:
    """sync_start, sync_batch frames of 100 deltas, sync_complete: server frames, joined."""
    parts = [
        frame(dumps({"type": "sync_start", "timestamp": T0, "totalDeltas": n, "batchSize": BATCH}))
    ]
    for b, i in enumerate(range(0, n, BATCH)):
        deltas = b",".join(dumps(delta_dict(j)) for j in range(i, min(i + BATCH, n)))
        last = b"true" if i + BATCH >= n else b"false"
        parts.append(
            frame(
                b'{"type":"sync_batch","timestamp":%d,"deltas":[%s],"batchNumber":%d,'
                b'"isLastBatch":%s}' % (T0, deltas, b, last)
            )
        )
    parts.append(frame(dumps({"type": "sync_complete", "timestamp": T0, "deltasProcessed": n})))
    return b"".join(parts)


# ------------------------------------------------------------------ frames


def frame(payload: bytes, *, mask: bool = False, opcode: int = 1) -> bytes:
    """One final frame; ``mask`` for a client frame (16- and 64-bit lengths as needed)."""
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes([0x80 | opcode, bit | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, bit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = (MASK_KEY * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + MASK_KEY + masked


def client_frame(payload: bytes) -> bytes:
    return frame(payload, mask=True)


def unmask(data: bytes, key: bytes) -> bytes:
    n = len(data)
    full = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(full, "big")).to_bytes(n, "big")


class FrameSplitter:
    """Splits a byte stream into frames by reading their headers only; ``feed`` returns
    ``(opcode, masking key, payload start, payload end)`` into :attr:`buf` for each complete
    frame (valid until the next ``feed``)."""

    def __init__(self) -> None:
        self.buf = b""
        self.last = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes, int, int]]:
        buf = self.buf + data if self.buf else data
        out: list[tuple[int, bytes, int, int]] = []
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b1 = buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            key = b""
            if b1 & 0x80:
                key, head = buf[pos + head : pos + head + 4], head + 4
            end = pos + head + length
            if end > size:
                break
            out.append((buf[pos] & 0x0F, key, pos + head, end))
            pos = end
        self.last, self.buf = buf, buf[pos:]
        return out


class Counter:
    """Counts ``pattern`` in a byte stream, carrying a tail across reads."""

    def __init__(self, pattern: bytes) -> None:
        self.pattern = pattern
        self.keep = len(pattern) - 1
        self.tail = b""
        self.count = 0

    def feed(self, data: bytes) -> int:
        buf = self.tail + data
        self.count += buf.count(self.pattern)
        self.tail = buf[-self.keep :]
        return self.count


# ------------------------------------------------------------------ HTTP upgrade by hand


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read until the end of an HTTP head; return it and the bytes after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"connection closed during the HTTP upgrade: {data[:200]!r}")
        data += chunk
        if len(data) > 65536:
            raise ConnectionError("HTTP head too long")
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def client_upgrade(url: str, timeout: float) -> tuple[socket.socket, bytes, int]:
    """Connect to ``ws://host:port/path`` and upgrade; return the socket (with ``timeout`` on
    every read), the bytes read past the response head, and the bytes exchanged."""
    rest = url.removeprefix("ws://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    sock.sendall(request)
    head, extra = read_head(sock)
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise ConnectionError(f"upgrade refused: {head[:200]!r}")
    return sock, extra, len(request) + len(head) + 4 + len(extra)


def server_upgrade(sock: socket.socket) -> tuple[bytes, int]:
    """Answer a client's upgrade with 101; return the bytes past the request and the bytes
    exchanged."""
    head, extra = read_head(sock)
    key = b""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    response = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    sock.sendall(response)
    return extra, len(head) + 4 + len(extra) + len(response)
