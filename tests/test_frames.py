"""A server splits its client's frames itself (``FederationConnection._read_frames``): whole
masked text frames are read there, every other frame goes to wsproto. These tests give random
frame streams, cut at random places (and pipelined behind the upgrade request or not), to our
server and to a bare wsproto server, and check that ours acts on exactly the messages, pings,
close and framing error that wsproto reads from the same bytes."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from rhizome_proto import Closed, DeltaReceived, HandshakeComplete, ProtocolViolation
from tests.harness import RawClient, delta_json, dumps, feed, make_server
from tests.strategies import deterministic

#: a size limit small enough for a drawn message to cross it
LIMIT = 4096


def frame(
    opcode: int,
    payload: bytes,
    key: bytes | None,
    *,
    fin: bool = True,
    rsv1: bool = False,
    length_form: int = 0,
) -> bytes:
    """A client frame by hand (``key`` ``None``: unmasked). ``length_form`` 126 or 127 writes
    the length in the 2- or 8-byte form even when a shorter one would do (RFC 6455 allows
    it only for the minimal form; wsproto refuses the others, as our server must)."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    mask_bit = 0x80 if key is not None else 0
    n = len(payload)
    form = length_form or (n if n < 126 else 126 if n < 65536 else 127)
    head = bytes([first, mask_bit | min(form, 127)])
    if form == 126:
        head += n.to_bytes(2, "big")
    elif form == 127:
        head += n.to_bytes(8, "big")
    if key is None:
        return head + payload
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@dataclass
class Stream:
    data: bytes  # the frames after the client's hello
    pipelined: bool  # request, hello and frames in one buffer
    cuts: list[int]  # where the bytes are cut into reads


keys = st.binary(min_size=4, max_size=4)
pieces = st.sampled_from([1, 1, 1, 2, 3])


@st.composite
def text_message(draw: st.DrawFn, number: int) -> bytes:
    size = draw(st.sampled_from([0, 10, 200, 3000, 5000, 70_000]))
    text = dumps(
        {
            "type": "delta",
            "timestamp": 3,
            "delta": delta_json(f"d{number}", author="ünï", system="s" * size or "s"),
        }
    ).encode()
    parts = draw(pieces)
    cuts = draw(st.lists(st.integers(0, len(text)), min_size=parts - 1, max_size=parts - 1))
    bounds = [0, *sorted(cuts), len(text)]
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out = b""
    for i, chunk in enumerate(chunks):
        out += frame(0x1 if i == 0 else 0x0, chunk, draw(keys), fin=i == len(chunks) - 1)
        if i < len(chunks) - 1 and draw(st.booleans()):
            out += frame(0x9, b"between", draw(keys))  # a control frame between fragments
    return out


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    data = b""
    for number in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["text", "text", "text", "ping", "pong", "binary"]))
        if kind == "text":
            data += draw(text_message(number))
        elif kind == "binary":
            data += frame(0x2, b"\x00\x01", draw(keys))
        else:
            data += frame(0x9 if kind == "ping" else 0xA, draw(st.binary(max_size=20)), draw(keys))
    ending = draw(
        st.sampled_from(
            [
                b"",
                frame(0x8, b"\x03\xe8bye", b"abcd"),  # close 1000
                frame(0x1, b'{"type":"\xff"}', b"abcd"),  # not UTF-8
                frame(0x1, b"{}", b"abcd", rsv1=True),  # compressed, nothing negotiated
                frame(0x1, b"{}", None),  # unmasked
                frame(0x3, b"x", b"abcd"),  # reserved opcode
                frame(0x0, b"{}", b"abcd"),  # continuation without a start
                frame(0x1, b"{}", b"abcd", length_form=126),  # a length not in its form
                frame(0x1, b"{}", b"abcd", length_form=127),
                frame(0x1, b"{}", b"abcd", fin=False) + frame(0x1, b"{}", b"abcd"),
            ]
        )
    )
    data += ending
    cuts = draw(st.lists(st.integers(0, len(data) + 600), max_size=6))
    return Stream(data, draw(st.booleans()), sorted(cuts))


def expected(request: bytes, hello: bytes, data: bytes) -> tuple[list[object], list[bytes], int]:
    """What wsproto alone reads from the bytes: the messages in order (a delta's id, or
    ``"binary"``), the payloads of the pings, and the close code (0 if none)."""
    ws = WSConnection(ConnectionType.SERVER)
    ws.receive_data(request)
    for event in ws.events():
        assert isinstance(event, Request)
        ws.send(AcceptConnection())
    ws.receive_data(hello + data)
    messages: list[object] = []
    pings: list[bytes] = []
    text: list[str] = []
    for event in ws.events():
        if isinstance(event, TextMessage):
            text.append(event.data)
            if sum(len(t.encode()) for t in text) > LIMIT:
                return messages[1:], pings, 1009  # ours stops at the size limit
            if event.message_finished:
                messages.append(json.loads("".join(text)).get("delta", {}).get("id"))
                text.clear()
        elif isinstance(event, BytesMessage):
            if event.message_finished:
                messages.append("binary")
        elif isinstance(event, Ping):
            pings.append(bytes(event.payload))
        elif isinstance(event, CloseConnection):
            return messages[1:], pings, event.code  # (the first message is the hello)
    return messages[1:], pings, 0


@deterministic(300)
@given(streams())
def test_the_server_reads_frames_as_wsproto_does(stream: Stream) -> None:
    raw = RawClient()
    request = raw.request()
    server = make_server(max_message_size=LIMIT)
    server.start(0.0)
    raw_hello = RawClient(opened=True)  # frames only: the hello, masked by wsproto
    hello = raw_hello.hello()
    whole = request + hello + stream.data
    start = 0 if stream.pipelined else len(request) + len(hello)
    reads = [] if stream.pipelined else [request, hello]
    bounds = [start, *(c for c in stream.cuts if start < c < len(whole)), len(whole)]
    reads += [whole[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    events: list[object] = []
    error = None
    out = b""
    for data in reads:
        error = feed(server, data, 1.0)
        events += server.events()
        out += server.data_to_send()
        if error is not None or server.closed:
            break

    messages, pings, close = expected(request, hello, stream.data)
    assert isinstance(events[0], HandshakeComplete)
    got: list[object] = []
    for event in events[1:]:
        if isinstance(event, DeltaReceived):
            got.append(event.delta.id)
        elif isinstance(event, ProtocolViolation):
            assert event.message == "binary frames are not accepted"
            got.append("binary")
        else:
            assert isinstance(event, Closed)
    assert got == messages
    received = raw.receive(out)  # the 101, the hello_ack, pongs, a close
    answered = [bytes(e.payload) for e in received if isinstance(e, Pong)]
    assert answered == pings
    if close in (0, 1000):
        assert error is None
        assert [c.code for c in raw.closes] == ([1000] if close else [])
    else:
        assert error is not None and error.close_code == close
        assert [c.code for c in raw.closes] == [close]
