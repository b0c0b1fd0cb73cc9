"""A connection splits its peer's frames itself (``FederationConnection._read_frames``): whole
text frames are read there, every other frame goes to wsproto. These tests give random frame
streams, cut at random places (and pipelined behind the upgrade's request or response, or not),
to our server or client and to bare wsproto, and check that ours acts on exactly the messages,
pings, close and framing error that wsproto reads from the same frames."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from fuzz.seeds import frame
from rhizome_proto import (
    Closed,
    Delta,
    DeltaReceived,
    FederationConnection,
    HandshakeComplete,
    LinkConfig,
    Pointer,
    ProtocolViolation,
)
from tests.harness import (
    RawClient,
    RawServer,
    delta_json,
    dumps,
    feed,
    make_client,
    make_delta,
    make_server,
    open_client,
    open_server,
)
from tests.strategies import deterministic

#: a size limit small enough for a drawn message to cross it
LIMIT = 4096


def padding(size: int) -> list[dict[str, str]]:
    """A delta's pointers that make its message about ``size`` bytes longer."""
    return [{"role": "text", "target": "é" * (size // 2)}]


@dataclass
class Stream:
    data: bytes  # the frames after the handshake's first message (hello, hello_ack)
    pipelined: bool  # the upgrade, that message and the frames in one buffer
    cuts: list[int]  # where the bytes are cut into reads


@st.composite
def text_message(draw: st.DrawFn, number: int, keys: st.SearchStrategy[bytes | None]) -> bytes:
    size = draw(st.sampled_from([0, 10, 200, 3000, 5000, 70_000]))
    text = dumps(
        {
            "type": "delta",
            "timestamp": 3,
            "delta": delta_json(f"d{number}", author="ünï", pointers=padding(size)),
        }
    ).encode()
    parts = draw(st.sampled_from([1, 1, 1, 2, 3]))
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
def streams(draw: st.DrawFn, from_client: bool) -> Stream:
    """Frames a peer sends: a client's masked with random keys, a server's not."""
    keys = st.binary(min_size=4, max_size=4) if from_client else st.none()
    key = b"abcd" if from_client else None
    data = b""
    for number in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["text", "text", "text", "ping", "pong", "binary"]))
        if kind == "text":
            data += draw(text_message(number, keys))
        elif kind == "binary":
            data += frame(0x2, b"\x00\x01", draw(keys))
        else:
            data += frame(0x9 if kind == "ping" else 0xA, draw(st.binary(max_size=20)), draw(keys))
    ending = draw(
        st.sampled_from(
            [
                b"",
                frame(0x8, b"\x03\xe8bye", key),  # close 1000
                frame(0x1, b'{"type":"\xff"}', key),  # not UTF-8
                frame(0x1, b"{}", key, rsv1=True),  # compressed, nothing negotiated
                frame(0x1, b"{}", None if from_client else b"abcd"),  # masked the wrong way
                frame(0x3, b"x", key),  # reserved opcode
                frame(0x0, b"{}", key),  # continuation without a start
                frame(0x1, b"{}", key, length_form=126),  # a length not in its shortest form
                frame(0x1, b"{}", key, length_form=127),
                frame(0x1, b"{}", key, fin=False) + frame(0x1, b"{}", key),
            ]
        )
    )
    data += ending
    cuts = draw(st.lists(st.integers(0, len(data) + 600), max_size=6))
    return Stream(data, draw(st.booleans()), sorted(cuts))


def expected(
    kind: ConnectionType, first: bytes, data: bytes
) -> tuple[list[object], list[bytes], int]:
    """What wsproto alone reads from the frames: the messages in order after the first (a
    delta's id, or ``"binary"``), the payloads of the pings, the close code (0 if none)."""
    ws = Connection(kind)
    ws.receive_data(first + data)
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
            return messages[1:], pings, event.code
    return messages[1:], pings, 0


def check(
    conn: FederationConnection,
    raw: RawClient | RawServer,
    upgrade: bytes,
    first: bytes,
    stream: Stream,
    kind: ConnectionType,
) -> None:
    """Feed ``conn`` the upgrade (a request, or a 101), ``first`` and the stream, cut as
    drawn, and compare what it does with what wsproto reads from ``first`` and the stream."""
    whole = upgrade + first + stream.data
    start = 0 if stream.pipelined else len(upgrade) + len(first)
    reads = [] if stream.pipelined else [upgrade, first]
    bounds = [start, *(c for c in stream.cuts if start < c < len(whole)), len(whole)]
    reads += [whole[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    events: list[object] = []
    error = None
    out = b""
    for data in reads:
        error = feed(conn, data, 1.0)
        events += conn.events()
        out += conn.data_to_send()
        if error is not None or conn.closed:
            break

    messages, pings, close = expected(kind, first, stream.data)
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
    received = raw.receive(out)  # the answers: pongs, a close
    assert [bytes(e.payload) for e in received if isinstance(e, Pong)] == pings
    if close in (0, 1000):
        assert error is None
        assert [c.code for c in raw.closes] == ([1000] if close else [])
    else:
        assert error is not None and error.close_code == close
        assert [c.code for c in raw.closes] == [close]


@deterministic(300)
@given(streams(from_client=True))
def test_a_server_reads_frames_as_wsproto_does(stream: Stream) -> None:
    server = make_server(max_message_size=LIMIT)
    server.start(0.0)
    raw = RawClient()
    hello = RawClient(opened=True).hello()  # masked by wsproto
    check(server, raw, raw.request(), hello, stream, ConnectionType.SERVER)


@deterministic(300)
@given(streams(from_client=False))
def test_a_client_reads_frames_as_wsproto_does(stream: Stream) -> None:
    client = make_client(max_message_size=LIMIT, config=LinkConfig(initial_sync="none"))
    client.start(0.0)
    raw = RawServer()
    (request,) = raw.receive(client.data_to_send())
    assert isinstance(request, Request)
    response = raw.send(AcceptConnection())
    check(client, raw, response, raw.hello_ack(), stream, ConnectionType.CLIENT)


@pytest.mark.parametrize("role", ["server", "client"])
def test_frames_behind_the_upgrade_are_not_given_to_wsproto(
    role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upgrade's request or response and the peer's first frames come in one read: wsproto
    is given the response head only (a server's request is read by our h11), no byte of the
    frames behind it, and the frames are read all the same."""
    given_to_wsproto: list[bytes] = []
    receive_data = WSConnection.receive_data

    def spy(self: WSConnection, data: bytes | None) -> None:
        given_to_wsproto.append(bytes(data or b""))
        receive_data(self, data)

    delta = dumps({"type": "delta", "timestamp": 3, "delta": delta_json("d1")})
    if role == "server":
        conn = make_server()
        conn.start(0.0)
        raw_client = RawClient()
        upgrade = raw_client.request()
        frames = RawClient(opened=True).hello() + frame(0x1, delta.encode(), b"\x01\x02\x03\x04")
    else:
        conn = make_client(config=LinkConfig(initial_sync="none"))
        conn.start(0.0)
        raw_server = RawServer()
        raw_server.receive(conn.data_to_send())
        upgrade = raw_server.send(AcceptConnection())
        frames = raw_server.hello_ack() + frame(0x1, delta.encode(), None)
    monkeypatch.setattr(WSConnection, "receive_data", spy)
    assert feed(conn, upgrade + frames, 1.0) is None
    assert [type(e) for e in conn.events()] == [HandshakeComplete, DeltaReceived]
    assert given_to_wsproto == ([] if role == "server" else [upgrade])


def opened(role: str) -> tuple[FederationConnection, RawClient | RawServer]:
    """Our server or client past the handshake, with a raw peer (a client that asks for no
    initial sync)."""
    if role == "server":
        return open_server()
    return open_client(config=LinkConfig(initial_sync="none"))


@pytest.mark.parametrize("role", ["server", "client"])
@pytest.mark.parametrize("size", [None, 200, 65_535, 65_536, 200_000])
def test_frames_written_by_hand_are_read_by_wsproto(role: str, size: int | None) -> None:
    """Our text frames in each length form (a client's masked), as wsproto reads them: a
    ``pause`` (under 126 bytes), and deltas whose message is ``size`` bytes exactly."""
    conn, peer = opened(role)
    if size is None:
        conn.pause()
    else:

        def delta(number: int, text: str) -> Delta:
            return make_delta(f"big-{number}", pointers=(Pointer(role="t", target=text),))

        conn.send_delta(delta(0, ""))  # to learn the envelope's size
        envelope = len(conn.data_to_send()) - (8 if role == "client" else 4)
        conn.send_delta(delta(1, "a" * (size - envelope)))
    data = conn.data_to_send()
    masked, length = data[1] & 0x80, data[1] & 0x7F
    assert (masked != 0) is (role == "client")
    if size is None:
        assert length < 126
    else:
        form = 126 if size < 65_536 else 127
        assert (length, int.from_bytes(data[2 : 4 if form == 126 else 10], "big")) == (form, size)
    peer.receive(data)
    (message,) = peer.messages()
    assert message["type"] == ("pause" if size is None else "delta")


@pytest.mark.parametrize("role", ["server", "client"])
def test_frames_read_a_byte_at_a_time(role: str) -> None:
    """Frames of each length form (2, 4 and 10 header bytes), a ping between them, given one
    byte per read: each is read once whole."""
    key = b"\x05\x06\x07\x08" if role == "server" else None
    sizes = (50, 3000, 70_000)
    texts = [
        dumps({"type": "delta", "timestamp": 3, "delta": delta_json(f"d{n}", pointers=padding(n))})
        for n in sizes
    ]
    frames = b"".join(frame(0x1, t.encode(), key) + frame(0x9, b"p", key) for t in texts)
    conn, raw = opened(role)
    for i in range(len(frames)):
        assert feed(conn, frames[i : i + 1], 0.0) is None
    received = [e for e in conn.events() if isinstance(e, DeltaReceived)]
    assert [e.delta.id for e in received] == [f"d{size}" for size in sizes]
    answers = raw.receive(conn.data_to_send())
    assert [bytes(e.payload) for e in answers if isinstance(e, Pong)] == [b"p"] * 3
