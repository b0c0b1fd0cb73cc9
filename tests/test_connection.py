"""FederationConnection, bytes level: every flow over WebSocket, for both roles.

Our client and server talk through :class:`tests.harness.ConnectionPair`; where a peer must
misbehave, a raw wsproto endpoint (:class:`tests.harness.RawClient` / ``RawServer``) frames
whatever the test wants. Also here: replays of the reference's recorded upgrade and session,
and split invariance (whole input, every split point, byte at a time: same events).
"""

from __future__ import annotations

import base64
import hashlib
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from fuzz.seeds import frame
from rhizome_proto import (
    Closed,
    DeltaAcked,
    DeltaFilter,
    DeltaMessage,
    DeltaReceived,
    DeltaRejected,
    ErrorCode,
    ErrorReceived,
    Event,
    FederationConfig,
    FederationConnection,
    FederationProtocol,
    HandshakeComplete,
    LocalProtocolError,
    Paused,
    PingTimeout,
    Pointer,
    ProtocolViolation,
    RemoteProtocolError,
    Resumed,
    Role,
    State,
    SyncBatch,
    SyncBatchReceived,
    SyncCompleted,
    SyncRequested,
    SyncStarted,
    decode,
)
from tests.harness import (
    SIDES,
    VECTORS,
    ConnectionPair,
    FakeClock,
    RawClient,
    RawServer,
    Side,
    decode_output,
    delta_json,
    dumps,
    feed,
    make_client,
    make_delta,
    make_server,
    open_client,
    open_server,
    other,
    reference_session,
    sample_messages,
)

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: how a test feeds bytes: whole chunks, split after 7 bytes, or byte at a time
FEEDING: list[dict[str, Any]] = [{}, {"split_at": 7}, {"byte_at_a_time": True}]
FEEDING_IDS = ["whole", "split7", "bytewise"]


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for ``key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


def pump(
    conn: FederationConnection, raw: RawClient | RawServer, data: bytes, now: float = 0.0
) -> RemoteProtocolError | None:
    """Feed ``data`` to ``conn`` and hand its answer to the raw peer."""
    error = feed(conn, data, now)
    raw.receive(conn.data_to_send())
    return error


def finish_close(conn: FederationConnection, raw: RawClient | RawServer, now: float = 0.0) -> None:
    """The raw peer answers our close; ``conn`` then reports Closed."""
    reply = raw.take()
    if reply and not conn.closed:
        feed(conn, reply, now)
    conn.data_to_send()


# ---------------------------------------------------------------------- handshake


@pytest.mark.parametrize("feeding", FEEDING, ids=FEEDING_IDS)
def test_handshake_over_bytes(feeding: dict[str, Any]) -> None:
    config = FederationConfig(mode="pull", initial_sync="full")
    pair = ConnectionPair(
        client_options={"config": config},
        server_options={"link_id": "L-7"},
        **feeding,
    )
    assert pair.client.state is State.IDLE  # the upgrade comes first
    pair.transfer()
    assert pair.client_events == [
        HandshakeComplete(remote_system_id="server-sys", link_id="L-7", remote_config=None)
    ]
    assert pair.server_events == [
        HandshakeComplete(remote_system_id="client-sys", link_id="L-7", remote_config=config)
    ]
    assert pair.client.is_open and pair.server.is_open
    assert pair.client.link_id == "L-7"
    request = pair.server.request
    assert request is not None
    assert request.target == "/federation"
    assert request.host == "127.0.0.1:8080"
    assert request.subprotocols == []
    assert request.extensions == []
    assert not pair.client.should_close and not pair.server.should_close
    assert pair.errors == {"client": [], "server": []}


def test_extra_headers_reach_the_servers_request() -> None:
    pair = ConnectionPair(
        client_options={
            "extra_headers": [("Authorization", "Bearer t0k3n"), ("X-Rhizome-Node", "n1")],
            "path": "/federation?since=5",
        }
    )
    pair.handshake()
    request = pair.server.request
    assert request is not None
    headers = dict(request.extra_headers)
    assert headers[b"authorization"] == b"Bearer t0k3n"
    assert headers[b"x-rhizome-node"] == b"n1"
    assert request.target == "/federation?since=5"  # the query does not change the path


def test_client_request_is_a_plain_upgrade() -> None:
    client = make_client(host="example.org:8443", path="/fed")
    client.start(0.0)
    head = client.data_to_send().decode()
    lines = head.split("\r\n")
    assert lines[0] == "GET /fed HTTP/1.1"
    names = {line.split(":", 1)[0].lower() for line in lines[1:] if line}
    assert {"host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version"} <= names
    assert "sec-websocket-protocol" not in names
    assert "sec-websocket-extensions" not in names
    assert "host: example.org:8443" in head.lower()


# ---------------------------------------------------------------------- fatal before the handshake


def test_protocol_mismatch_over_bytes() -> None:
    lines = reference_session()
    hello = next(x["msg"] for x in lines if x["conn"] == 2 and x["dir"] == "c2s")
    answer = next(x["msg"] for x in lines if x["conn"] == 2 and x["dir"] == "s2c")
    clock = FakeClock(start=answer["timestamp"])
    server = make_server(clock)
    server.start(0.0)
    raw = RawClient()
    raw.connect(server)
    error = pump(server, raw, raw.send_json(hello))
    assert isinstance(error, RemoteProtocolError)
    assert error.code is ErrorCode.PROTOCOL_MISMATCH
    assert error.close_code == 1002
    assert raw.texts == [dumps(answer)]  # byte for byte the reference's message
    assert [(c.code, c.reason) for c in raw.closes] == [(1002, answer["message"])]
    assert server.events() == []
    assert not server.should_close  # waiting for the close reply
    finish_close(server, raw, 0.5)
    assert server.events() == [Closed(code=1002, reason=answer["message"])]
    assert server.should_close


@pytest.mark.parametrize("mtype", ["delta", "ping", "sync_request", "hello_ack", "pause"])
def test_server_refuses_anything_but_hello_first(mtype: str) -> None:
    server = make_server()
    server.start(0.0)
    raw = RawClient()
    raw.connect(server)
    error = pump(server, raw, raw.send_json(sample_messages()[mtype]))
    assert isinstance(error, RemoteProtocolError)
    assert error.code is ErrorCode.UNEXPECTED_MESSAGE
    (msg,) = raw.messages()
    assert (msg["type"], msg["code"], msg["fatal"]) == ("error", "UNEXPECTED_MESSAGE", True)
    assert raw.closes[0].code == 1002
    finish_close(server, raw)
    assert [type(e) for e in server.events()] == [Closed]
    assert server.should_close


def test_binary_frame_before_hello_is_fatal() -> None:
    server = make_server()
    server.start(0.0)
    raw = RawClient()
    raw.connect(server)
    error = pump(server, raw, raw.send(BytesMessage(data=b"\x00\x01")))
    assert isinstance(error, RemoteProtocolError)
    assert error.code is ErrorCode.MESSAGE_ERROR
    assert raw.messages()[0]["fatal"] is True


@pytest.mark.parametrize("mtype", ["delta", "sync_start", "sync_batch", "hello", "pause"])
def test_client_waiting_for_hello_ack_refuses_other_messages(mtype: str) -> None:
    client = make_client()
    client.start(0.0)
    raw = RawServer()
    raw.accept(client)
    raw.receive(client.data_to_send())
    error = pump(client, raw, raw.send_json(sample_messages()[mtype]))
    assert isinstance(error, RemoteProtocolError)
    assert error.code is ErrorCode.UNEXPECTED_MESSAGE
    assert raw.types() == ["hello", "error"]
    assert raw.messages()[1]["fatal"] is True
    assert raw.closes[0].code == 1002
    finish_close(client, raw)
    assert [type(e) for e in client.events()] == [Closed]


def test_client_waiting_for_hello_ack_answers_ping_and_reports_errors() -> None:
    client = make_client()
    client.start(0.0)
    raw = RawServer()
    raw.accept(client)
    raw.receive(client.data_to_send())
    assert pump(client, raw, raw.send_json(sample_messages()["ping"])) is None
    assert pump(client, raw, raw.send_json(sample_messages()["pong"])) is None
    error = sample_messages()["error"] | {"code": "UNAUTHORIZED", "fatal": True}
    assert pump(client, raw, raw.send_json(error)) is None
    assert raw.types() == ["hello", "pong"]
    assert client.events() == [ErrorReceived(code="UNAUTHORIZED", message="m", fatal=True)]
    # the server closes after a fatal error; the client completes the handshake
    pump(client, raw, raw.send(CloseConnection(code=1008, reason="unauthorized")))
    assert client.events() == [Closed(code=1008, reason="unauthorized")]
    assert client.should_close
    assert raw.closes[-1].code == 1008  # our answer echoes the code


# ---------------------------------------------------------------------- violations once open


@pytest.mark.parametrize(
    ("role", "text", "code"),
    [
        ("server", dumps(sample_messages()["hello"]), "UNEXPECTED_MESSAGE"),
        ("server", dumps(sample_messages()["hello_ack"]), "UNEXPECTED_MESSAGE"),
        ("server", dumps(sample_messages()["sync_batch"]), "UNEXPECTED_MESSAGE"),
        ("server", dumps(sample_messages()["sync_start"]), "UNEXPECTED_MESSAGE"),
        ("client", dumps(sample_messages()["hello_ack"]), "UNEXPECTED_MESSAGE"),
        ("client", dumps(sample_messages()["sync_start"]), "UNEXPECTED_MESSAGE"),
        ("client", dumps(sample_messages()["sync_request"]), "UNEXPECTED_MESSAGE"),
        ("server", "{not json", "MESSAGE_ERROR"),
        ("client", "[1]", "MESSAGE_ERROR"),
        ("server", '{"timestamp": 3}', "MESSAGE_ERROR"),
        ("client", '{"type": "pong"}', "MESSAGE_ERROR"),
        ("server", '{"type": "gossip", "timestamp": 3}', "UNKNOWN_MESSAGE_TYPE"),
        ("client", '{"type": "gossip", "timestamp": 3}', "UNKNOWN_MESSAGE_TYPE"),
        (
            "server",
            dumps({"type": "delta", "timestamp": 3, "delta": {"author": "a"}}),
            "INVALID_DELTA",
        ),
    ],
)
def test_violations_once_open_are_answered_and_the_link_stays_open(
    role: str, text: str, code: str
) -> None:
    conn, raw = open_server() if role == "server" else open_client()
    assert pump(conn, raw, raw.send_text(text)) is None
    (msg,) = raw.messages()
    assert (msg["type"], msg["code"]) == ("error", code)
    assert "fatal" not in msg
    assert conn.events() == [ProtocolViolation(code=code, message=msg["message"])]
    assert conn.is_open and not conn.should_close and raw.closes == []
    assert pump(conn, raw, raw.send_json(sample_messages()["ping"])) is None
    assert raw.types()[-1] == "pong"


@pytest.mark.parametrize("role", ["server", "client"])
def test_invalid_delta_with_id_gets_a_nack_over_bytes(role: str) -> None:
    conn, raw = open_server() if role == "server" else open_client()
    bad = {"type": "delta", "timestamp": 3, "delta": delta_json("bad-7", author="")}
    assert pump(conn, raw, raw.send_json(bad)) is None
    (msg,) = raw.messages()
    assert (msg["type"], msg["deltaId"]) == ("delta_nack", "bad-7")
    assert "$.delta.author" in msg["reason"]
    assert conn.events() == [ProtocolViolation(code="INVALID_DELTA", message=msg["reason"])]


@pytest.mark.parametrize("role", ["server", "client"])
def test_binary_frame_once_open_gets_message_error(role: str) -> None:
    conn, raw = open_server() if role == "server" else open_client()
    data = raw.send(BytesMessage(data=b"\x00" * 10, message_finished=False))
    data += raw.send(BytesMessage(data=b"{}", message_finished=True))
    assert pump(conn, raw, data) is None
    (msg,) = raw.messages()
    assert (msg["type"], msg["code"], msg["message"]) == (
        "error",
        "MESSAGE_ERROR",
        "binary frames are not accepted",
    )
    assert conn.events() == [
        ProtocolViolation(code="MESSAGE_ERROR", message="binary frames are not accepted")
    ]
    assert conn.is_open


def test_fragmented_text_message_is_reassembled() -> None:
    server, raw = open_server()
    text = dumps({"type": "delta", "timestamp": 3, "delta": delta_json("frag-1", author="ünï")})
    data = b""
    for i in range(0, len(text), 20):
        last = i + 20 >= len(text)
        data += raw.send(TextMessage(data=text[i : i + 20], message_finished=last))
    data += raw.send(Ping(payload=b"between"))
    assert pump(server, raw, data) is None
    (event,) = server.events()
    assert isinstance(event, DeltaReceived) and event.delta.author == "ünï"


def _frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """A client (masked) frame built by hand, for frames wsproto refuses to produce."""
    return frame(opcode, payload, b"\x11\x22\x33\x44", fin=fin, rsv1=rsv1)


@pytest.mark.parametrize(
    ("data", "close_code"),
    [
        (_frame(0x1, b'{"type":"\xff"}'), 1007),  # invalid UTF-8 in a text frame
        (_frame(0x1, b"{}", rsv1=True), 1002),  # compressed, but nothing was negotiated
        (_frame(0x0, b"{}"), 1002),  # continuation without a start
        (_frame(0x9, b"x" * 130), 1002),  # control frame too long
        (_frame(0x3, b"x"), 1002),  # reserved opcode
        (bytes([0x81, 0x02]) + b"{}", 1002),  # unmasked client frame
    ],
    ids=["bad-utf8", "rsv1", "continuation", "long-ping", "opcode", "unmasked"],
)
def test_framing_errors_fail_the_connection_at_once(data: bytes, close_code: int) -> None:
    server, raw = open_server()
    server.send_delta(make_delta("pending"))
    raw.receive(server.data_to_send())
    error = feed(server, data, 1.0)
    assert isinstance(error, RemoteProtocolError)
    assert error.code is ErrorCode.MESSAGE_ERROR
    assert error.close_code == close_code
    raw.receive(server.data_to_send())
    assert [c.code for c in raw.closes] == [close_code]
    # the frame stream is broken: no close reply could be read, so the link ends now
    (closed,) = server.events()
    assert isinstance(closed, Closed)
    assert closed.code == close_code
    assert closed.unsettled == (make_delta("pending"),)
    assert server.should_close
    assert server.get_timer() is None
    assert feed(server, raw.take() or b"x", 2.0) is None
    assert server.events() == []


# ---------------------------------------------------------------------- sync, deltas, pause


@pytest.mark.parametrize("feeding", FEEDING, ids=FEEDING_IDS)
def test_sync_flow_over_bytes(feeding: dict[str, Any]) -> None:
    pair = ConnectionPair.opened(**feeding)
    flt = DeltaFilter(authors=("author-1",))
    pair.client.request_sync(filter=flt, from_timestamp=500)
    pair.transfer()
    assert pair.new_events("server") == [SyncRequested(filter=flt, from_timestamp=500)]
    deltas = [make_delta(f"s{i}", timestamp=500 + i) for i in range(5)]
    pair.server.start_sync(5, batch_size=2)
    for i in range(0, 5, 2):
        pair.server.send_sync_batch(deltas[i : i + 2], last=i + 2 >= 5)
    pair.server.complete_sync()
    pair.transfer()
    assert pair.new_events("client") == [
        SyncStarted(total_deltas=5, batch_size=2),
        SyncBatchReceived(deltas=tuple(deltas[0:2]), batch_number=0, is_last_batch=False),
        SyncBatchReceived(deltas=tuple(deltas[2:4]), batch_number=1, is_last_batch=False),
        SyncBatchReceived(deltas=tuple(deltas[4:]), batch_number=2, is_last_batch=True),
        SyncCompleted(deltas_processed=5, deltas_received=5),
    ]
    # a trust failure in a batch is answered with a nack, which the server counts as stray
    pair.client.nack("s3", "untrusted")
    pair.transfer()
    assert pair.server.stray_acks == 1
    assert pair.new_events("server") == []


def test_empty_sync_and_rejected_sync_over_bytes() -> None:
    pair = ConnectionPair.opened()
    pair.client.request_sync()
    pair.transfer()
    pair.server.start_sync(0)
    pair.server.complete_sync()
    pair.transfer()
    assert pair.new_events("client") == [
        SyncStarted(total_deltas=0, batch_size=100),
        SyncCompleted(deltas_processed=0, deltas_received=0),
    ]
    pair.client.request_sync()
    pair.transfer()
    pair.server.reject_sync("busy")
    pair.transfer()
    assert pair.new_events("client") == [
        ErrorReceived(code="SYNC_ERROR", message="busy", fatal=False)
    ]
    assert not pair.client.syncing


def test_second_sync_request_over_bytes() -> None:
    server, raw = open_server()
    request = sample_messages()["sync_request"]
    assert pump(server, raw, raw.send_json(request)) is None
    assert server.events() == [SyncRequested(filter=None, from_timestamp=None)]
    assert pump(server, raw, raw.send_json(request)) is None
    (msg,) = raw.messages()
    assert (msg["type"], msg["code"]) == ("error", "SYNC_ERROR")
    assert [type(e) for e in server.events()] == [ProtocolViolation]


@pytest.mark.parametrize("feeding", FEEDING, ids=FEEDING_IDS)
@pytest.mark.parametrize("sender", SIDES)
def test_live_deltas_ack_nack_over_bytes(sender: Side, feeding: dict[str, Any]) -> None:
    pair = ConnectionPair.opened(**feeding)
    receiver = other(sender)
    src, dst = pair.conn(sender), pair.conn(receiver)
    deltas = [make_delta(f"L{i}") for i in range(4)]
    for d in deltas:
        src.send_delta(d)
    assert src.unacknowledged == tuple(deltas)
    pair.transfer()
    assert pair.new_events(receiver) == [DeltaReceived(delta=d) for d in deltas]
    assert dst.unanswered == frozenset(d.id for d in deltas)
    dst.ack("L0")
    dst.nack("L1", "no trust")
    dst.ack("L3")
    pair.transfer()
    assert pair.new_events(sender) == [
        DeltaAcked(delta_id="L0"),
        DeltaRejected(delta_id="L1", reason="no trust"),
        DeltaAcked(delta_id="L3"),
    ]
    assert src.unacknowledged == (deltas[2],)
    assert dst.unanswered == frozenset({"L2"})
    dst.ack("L0")  # again: a stray ack on the other side
    dst.ack("zzz")
    pair.transfer()
    assert src.stray_acks == 2
    assert pair.new_events(sender) == []


@pytest.mark.parametrize("pauser", SIDES)
def test_pause_holds_and_resume_delivers_in_order_over_bytes(pauser: Side) -> None:
    pair = ConnectionPair.opened()
    sender = other(pauser)
    src = pair.conn(sender)
    pair.conn(pauser).pause()
    pair.transfer()
    assert pair.new_events(sender) == [Paused()]
    for i in range(3):
        src.send_delta(make_delta(f"h{i}"))
    pair.transfer()
    assert pair.new_events(pauser) == []
    assert [d.id for d in src.held] == ["h0", "h1", "h2"]
    assert src.outbound_size == 0
    pair.advance(30.0)  # pings are not held
    pair.transfer()
    assert pair.new_events(pauser) == [] and pair.new_events(sender) == []
    pair.conn(pauser).resume()
    pair.transfer()
    assert pair.new_events(sender) == [Resumed()]
    assert [e.delta.id for e in pair.new_events(pauser) if isinstance(e, DeltaReceived)] == [
        "h0",
        "h1",
        "h2",
    ]
    assert src.held == ()


def test_sync_batches_held_while_paused_over_bytes() -> None:
    pair = ConnectionPair.opened()
    pair.client.request_sync()
    pair.client.pause()
    pair.transfer()
    pair.server.start_sync(2, batch_size=1)
    pair.server.send_sync_batch([make_delta("b0")], last=False)
    pair.server.send_sync_batch([make_delta("b1")], last=True)
    pair.server.complete_sync()
    pair.transfer()
    assert pair.new_events("client") == [SyncStarted(total_deltas=2, batch_size=1)]
    pair.client.resume()
    pair.transfer()
    assert [type(e) for e in pair.new_events("client")] == [
        SyncBatchReceived,
        SyncBatchReceived,
        SyncCompleted,
    ]


@pytest.mark.parametrize("sender", SIDES)
def test_deltas_sent_before_the_handshake_are_held_then_sent_over_bytes(sender: Side) -> None:
    pair = ConnectionPair(start=False)
    src = pair.conn(sender)
    src.send_delta(make_delta("early"))
    assert src.held == (make_delta("early"),)
    pair.client.start(0.0)
    pair.server.start(0.0)
    pair.transfer()
    assert [type(e) for e in pair.new_events(other(sender))] == [HandshakeComplete, DeltaReceived]
    assert not src.held
    assert src.unacknowledged == (make_delta("early"),)


# ---------------------------------------------------------------------- heartbeat and timers


def test_timers_exact_over_bytes() -> None:
    pair = ConnectionPair(
        client_options={"ping_interval": 30.0, "ping_timeout": 90.0, "open_timeout": 5.0},
        server_options={"ping_interval": 25.0, "ping_timeout": 60.0, "open_timeout": 8.0},
        now=1000.0,
    )
    assert pair.client.get_timer() == 1005.0  # opening handshake timeout
    assert pair.server.get_timer() == 1008.0
    pair.now = 1001.0
    pair.handshake()
    assert pair.client.get_timer() == 1031.0  # the heartbeat starts with the upgrade
    assert pair.server.get_timer() == 1026.0
    pair.advance(25.0)  # to 1026: the server pings
    assert pair.server.get_timer() == 1051.0
    assert pair.client.get_timer() == 1031.0
    pair.transfer()  # the ping arrives (life), the pong comes back (life)
    assert pair.client.get_timer() == 1031.0
    pair.advance(5.0)  # 1031: the client pings
    assert pair.client.get_timer() == 1061.0
    pair.transfer()
    assert pair.new_events("client") == [] and pair.new_events("server") == []
    assert pair.server.get_timer() == 1051.0


def test_ping_timeout_closes_both_ends() -> None:
    pair = ConnectionPair.opened(
        client_options={"ping_interval": 30.0, "ping_timeout": 90.0},
        server_options={"ping_timeout": 300.0},
    )
    pair.client.send_delta(make_delta("u"))
    pair.client.data_to_send()  # written, then the network goes silent
    pair.advance(89.0)
    assert pair.new_events("client") == []
    pair.advance(1.0)
    assert pair.new_events("client") == [
        PingTimeout(silent_for=90.0),
        Closed(code=1006, reason="ping timeout", unsettled=(make_delta("u"),)),
    ]
    assert pair.client.should_close
    assert pair.client.get_timer() is None
    pair.transfer()  # the client's transport closes: the server sees end of stream
    assert pair.new_events("server") == [Closed(code=1006, reason="connection closed by peer")]
    assert pair.transport_closed == {"client": True, "server": True}


def test_a_websocket_ping_counts_as_life() -> None:
    server, raw = open_server(ping_interval=30.0, ping_timeout=90.0)
    assert server.get_timer() == 30.0
    assert pump(server, raw, raw.send(Ping(payload=b"alive?")), 80.0) is None
    assert any(isinstance(e, Pong) and e.payload == b"alive?" for e in raw.ws_events)
    for t in (30.0, 60.0, 90.0, 120.0, 150.0):
        server.handle_timer(t)
    assert server.events() == []
    assert server.get_timer() == 170.0
    raw.receive(server.data_to_send())
    assert raw.types() == ["ping"] * 5  # our pings went out, unanswered
    # half a frame is life too
    part = raw.send_json(sample_messages()["pong"])
    assert feed(server, part[:3], 169.0) is None
    server.handle_timer(170.0)
    assert server.events() == []
    assert server.get_timer() == 180.0
    server.handle_timer(259.0)
    assert [type(e) for e in server.events()] == [PingTimeout, Closed]


def test_opening_handshake_timeout_server() -> None:
    server = make_server(open_timeout=4.0)
    server.start(10.0)
    assert server.get_timer() == 14.0
    assert feed(server, b"GET /federation HT", 13.0) is None  # a slow request
    server.handle_timer(13.9)
    assert server.events() == []
    server.handle_timer(14.0)
    assert server.events() == [Closed(code=1006, reason="opening handshake timed out")]
    assert server.should_close and server.get_timer() is None


def test_opening_handshake_timeout_client() -> None:
    pair = ConnectionPair(client_options={"open_timeout": 3.0})
    pair.deliver("client")  # the request reaches the server...
    pair.server.data_to_send()  # ...whose 101 is lost
    pair.advance(3.0)
    assert pair.new_events("client") == [Closed(code=1006, reason="opening handshake timed out")]
    assert pair.client.should_close


def test_closing_handshake_timeout() -> None:
    server, raw = open_server(close_timeout=2.0)
    server.close(now=0.0)
    raw.receive(server.data_to_send())  # the raw peer gets the close but never answers
    assert raw.closes[0].code == 1000
    raw.take()
    assert server.get_timer() == 2.0
    server.handle_timer(1.9)
    assert server.events() == []
    server.handle_timer(2.0)
    assert server.events() == [Closed(code=1006, reason="closing handshake timed out")]
    assert server.should_close


def test_handle_timer_always_moves_the_deadline_on() -> None:
    pair = ConnectionPair.opened()
    for _ in range(5):
        timer = pair.server.get_timer()
        assert timer is not None
        pair.now = timer
        pair.server.handle_timer(timer)
        later = pair.server.get_timer()
        assert later is not None and later > timer
        pair.transfer()


# ---------------------------------------------------------------------- close


@pytest.mark.parametrize("feeding", FEEDING, ids=FEEDING_IDS)
@pytest.mark.parametrize("closer", SIDES)
def test_close_by_either_side(closer: Side, feeding: dict[str, Any]) -> None:
    pair = ConnectionPair.opened(**feeding)
    pair.conn(closer).close(now=pair.now)
    pair.conn(closer).close(1001, now=pair.now)  # a no-op once closing
    pair.transfer()
    for side in SIDES:
        assert pair.new_events(side) == [Closed(code=1000, reason="")]
        assert pair.conn(side).should_close
        assert pair.conn(side).closed
    assert pair.errors == {"client": [], "server": []}
    assert pair.transport_closed == {"client": True, "server": True}


def test_close_code_and_reason_reach_the_peer() -> None:
    pair = ConnectionPair.opened()
    pair.server.close(1001, "shutting down", now=pair.now)
    pair.transfer()
    assert pair.new_events("client") == [Closed(code=1001, reason="shutting down")]
    assert pair.new_events("server") == [Closed(code=1001, reason="shutting down")]


def test_the_close_timeout_runs_from_the_time_close_is_called() -> None:
    """11 s of quiet, then close(now=11): the handshake has its 10 s from 11, not from 0 (it
    used to time out at once and end in 1006 instead of a clean 1000)."""
    pair = ConnectionPair.opened(
        client_options={"ping_interval": 100.0, "ping_timeout": 300.0},
        server_options={"ping_interval": 100.0, "ping_timeout": 300.0},
    )
    pair.now = 11.0  # nothing arrived meanwhile
    pair.client.close(now=pair.now)
    pair.client.data_to_send()  # the close frame goes out now (lost here)
    assert pair.client.get_timer() == 21.0
    pair.client.handle_timer(11.5)
    assert not pair.client.closed


def test_close_after_a_quiet_spell_ends_cleanly() -> None:
    """start, 11 s of quiet, close(now=11), the peer answers at once: a clean 1000 on both
    sides, not "closing handshake timed out" with 1006."""
    pair = ConnectionPair.opened(
        client_options={"ping_interval": 100.0, "ping_timeout": 300.0},
        server_options={"ping_interval": 100.0, "ping_timeout": 300.0},
    )
    pair.now += 11.0
    pair.client.close(now=pair.now)
    pair.advance(0.0)  # a timer due now would fire here
    pair.transfer()
    for side in SIDES:
        assert pair.new_events(side) == [Closed(code=1000, reason="")]


def test_a_fatal_error_times_its_close_from_the_call() -> None:
    pair = ConnectionPair.opened(
        client_options={"ping_interval": 100.0, "ping_timeout": 300.0, "close_timeout": 5.0},
    )
    pair.now += 11.0
    pair.client.send_error(ErrorCode.UNAUTHORIZED, "go away", fatal=True, now=pair.now)
    pair.client.data_to_send()  # the error and the close go out (lost here)
    assert pair.client.get_timer() == pair.now + 5.0


def test_the_connection_has_no_message_level_back_door() -> None:
    """A connection owns its protocol: nothing public takes messages off it or feeds it text,
    so a queued delta always reaches the wire (``messages_to_send`` used to be inherited and
    silently took it)."""
    pair = ConnectionPair.opened()
    for name in ("messages_to_send", "receive_message", "receive_invalid", "connection_closed"):
        with pytest.raises(AttributeError):
            getattr(pair.client, name)
    assert not isinstance(pair.client, FederationProtocol)
    pair.client.send_delta(make_delta("q1"))
    pair.transfer()
    assert pair.new_events("server") == [DeltaReceived(delta=make_delta("q1"))]


def test_closed_unsettled_carries_unacked_and_held() -> None:
    pair = ConnectionPair.opened()
    pair.client.send_delta(make_delta("a1"))
    pair.transfer()
    pair.server.pause()
    pair.transfer()
    pair.client.send_delta(make_delta("h1"))
    pair.server.close(now=pair.now)
    pair.transfer()
    (closed,) = pair.new_events("client")[-1:]
    assert isinstance(closed, Closed)
    assert closed.unsettled == (make_delta("a1"), make_delta("h1"))


def test_transport_lost_gives_closed_1006_with_unsettled() -> None:
    pair = ConnectionPair.opened()
    pair.server.send_delta(make_delta("x"))
    pair.close_transport("client")
    assert pair.new_events("client") == [Closed(code=1006, reason="transport dropped")]
    pair.transfer()
    assert pair.new_events("server") == [
        Closed(code=1006, reason="connection closed by peer", unsettled=(make_delta("x"),))
    ]


def test_nothing_after_closed() -> None:
    server, raw = open_server()
    server.close(now=0.0)
    raw.receive(server.data_to_send())
    finish_close(server, raw)
    assert [type(e) for e in server.events()] == [Closed]
    ping = _frame(0x1, dumps(sample_messages()["ping"]).encode())
    for data in (ping, b"garbage", RawClient().request()):
        assert feed(server, data, 5.0) is None
    server.receive_eof(6.0)
    server.connection_lost(7.0)
    server.handle_timer(1e9)
    server.close(now=0.0)
    assert server.events() == []
    assert server.data_to_send() == b""
    assert server.get_timer() is None


def test_close_before_the_upgrade_completes() -> None:
    client = make_client()
    client.start(0.0)
    client.data_to_send()
    client.close(now=0.0)
    assert client.data_to_send() == b""
    assert client.events() == [Closed(code=1006, reason="closed before the upgrade completed")]
    assert client.should_close
    assert client.closed


@pytest.mark.parametrize("role", ["server", "client"])
def test_a_websocket_ping_after_our_close_is_not_answered(role: str) -> None:
    conn, raw = open_server() if role == "server" else open_client()
    conn.close(now=0.0)
    raw.receive(conn.data_to_send())
    assert [c.code for c in raw.closes] == [1000]
    reply = raw.take()  # the raw peer's close reply, held back for now
    # a masked client frame, or an unmasked server one
    ping = _frame(0x9, b"late") if role == "server" else b"\x89\x04late"
    assert feed(conn, ping, 1.0) is None  # wsproto cannot send a pong once closing
    assert conn.data_to_send() == b""
    assert feed(conn, reply, 1.1) is None
    assert conn.events() == [Closed(code=1000, reason="")]


def test_frames_pipelined_behind_the_upgrade_request_are_processed() -> None:
    server = make_server()
    server.start(0.0)
    raw = RawClient()
    request = raw.request()
    opened = RawClient(opened=True)  # frames as the client would send them once open
    data = request + opened.hello() + opened.send_json(sample_messages()["ping"])
    assert feed(server, data, 0.0) is None
    assert [type(e) for e in server.events()] == [HandshakeComplete]
    out = decode_output(server.data_to_send(), from_server=True)
    assert out[0] == "HTTP/1.1 101 Switching Protocols"
    assert [json.loads(x[5:])["type"] for x in out[1:]] == ["hello_ack", "pong"]


def test_server_closed_before_the_request_arrives() -> None:
    """close() first, then the upgrade request, with no data_to_send() in between."""
    pair = ConnectionPair()
    pair.server.close(1001, "changed my mind", now=pair.now)
    pair.transfer()  # the request arrives at a closing server: it upgrades, then closes
    assert pair.errors == {"client": [], "server": []}
    for side in SIDES:
        assert pair.new_events(side) == [Closed(code=1001, reason="changed my mind")]


def test_client_closed_before_the_101_arrives() -> None:
    pair = ConnectionPair()
    pair.deliver("client")  # the request reaches the server
    response = pair.server.data_to_send()
    pair.client.close(1001, "changed my mind", now=pair.now)
    assert feed(pair.client, response, 0.0) is None  # the 101 arrives at a closing client
    pair.transfer()  # the client sends its close at once, without a hello
    assert pair.errors == {"client": [], "server": []}
    for side in SIDES:
        assert pair.new_events(side) == [Closed(code=1001, reason="changed my mind")]
    assert pair.transport_closed == {"client": True, "server": True}


def test_non_ascii_upgrade_header_gets_400() -> None:
    server = make_server()
    server.start(0.0)
    request = (
        b"GET /federation HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgr\xe4de\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    assert feed(server, request, 0.0) is None
    assert server.data_to_send().startswith(b"HTTP/1.1 400 ")
    (closed,) = server.events()
    assert isinstance(closed, Closed) and closed.code == 1006
    assert server.should_close


# ---------------------------------------------------------------------- size limits and compression


def test_message_over_the_limit_closes_with_1009() -> None:
    text = dumps({"type": "delta", "timestamp": 3, "delta": delta_json("big", author="x" * 200)})
    server, raw = open_server(max_message_size=len(text) - 1)
    error = pump(server, raw, raw.send_text(text))
    assert isinstance(error, RemoteProtocolError)
    assert error.code is ErrorCode.MESSAGE_TOO_LARGE
    assert error.close_code == 1009
    assert [c.code for c in raw.closes] == [1009]
    assert server.events() == []
    finish_close(server, raw)
    assert server.events() == [Closed(code=1009, reason="message too big")]


def test_message_exactly_at_the_limit_passes() -> None:
    text = dumps({"type": "delta", "timestamp": 3, "delta": delta_json("big", author="é" * 100)})
    size = len(text.encode())
    assert size > len(text)  # the limit counts UTF-8 bytes
    server, raw = open_server(max_message_size=size)
    assert pump(server, raw, raw.send_text(text)) is None
    assert [type(e) for e in server.events()] == [DeltaReceived]
    server2, raw2 = open_server(max_message_size=size - 1)
    assert isinstance(pump(server2, raw2, raw2.send_text(text)), RemoteProtocolError)


def test_fragmented_message_over_the_limit_is_caught_before_it_completes() -> None:
    server, raw = open_server(max_message_size=1000)
    data = raw.send(TextMessage(data='{"type":"ping","timestamp":1,"x":"', message_finished=False))
    for _ in range(3):
        data += raw.send(TextMessage(data="y" * 400, message_finished=False))
    error = pump(server, raw, data)
    assert isinstance(error, RemoteProtocolError) and error.close_code == 1009


def test_limit_applies_per_message_not_per_connection() -> None:
    server, raw = open_server(max_message_size=200)
    for i in range(20):
        msg = {"type": "delta", "timestamp": 3, "delta": delta_json(f"d{i}")}
        assert pump(server, raw, raw.send_json(msg)) is None
    assert len(server.events()) == 20


def test_compression_on_both_sides() -> None:
    pair = ConnectionPair(
        client_options={"compression": True}, server_options={"compression": True}
    )
    pair.handshake()
    assert pair.server.request is not None
    assert any("permessage-deflate" in str(e) for e in pair.server.request.extensions)
    assert b"permessage-deflate" in bytes(pair.received["client"]).split(b"\r\n\r\n")[0]
    big = make_delta("z", pointers=(Pointer(role="text", target="a" * 5000),))
    before = len(pair.received["server"])
    pair.client.send_delta(big)
    pair.transfer()
    assert pair.new_events("server") == [DeltaReceived(delta=big)]
    assert len(pair.received["server"]) - before < 500  # it went compressed
    pair.server.ack("z")
    pair.server.close(now=pair.now)
    pair.transfer()
    assert [type(e) for e in pair.new_events("client")] == [DeltaAcked, Closed]


def test_compression_offered_but_declined_by_default() -> None:
    pair = ConnectionPair(client_options={"compression": True})
    pair.handshake()
    head = bytes(pair.received["client"]).split(b"\r\n\r\n")[0].lower()
    assert b"sec-websocket-extensions" not in head
    pair.client.send_delta(make_delta("q", author="b" * 3000))
    pair.transfer()
    assert [type(e) for e in pair.new_events("server")] == [DeltaReceived]


def test_compressed_message_over_the_limit_is_refused() -> None:
    server = make_server(max_message_size=10_000, compression=True)
    server.start(0.0)
    raw = RawClient()
    raw.connect(server, extensions=[PerMessageDeflate()])
    feed(server, raw.hello(), 0.0)
    raw.take()
    server.events()
    raw.receive(server.data_to_send())
    ok = dumps({"type": "ping", "timestamp": 1, "pad": "p" * 9000})
    assert pump(server, raw, raw.send_text(ok)) is None
    too_big = dumps({"type": "ping", "timestamp": 1, "pad": "p" * 10_000})
    error = pump(server, raw, raw.send_text(too_big))
    assert isinstance(error, RemoteProtocolError) and error.close_code == 1009
    assert raw.closes[-1].code == 1009


@pytest.mark.parametrize("no_takeover", [False, True])
def test_compressed_messages_in_a_row_and_in_fragments(no_takeover: bool) -> None:
    """Our inbound permessage-deflate: messages in a row (with and without context takeover,
    as negotiated), one message in compressed fragments, an uncompressed one between."""
    server = make_server(max_message_size=10_000, compression=True)
    server.start(0.0)
    raw = RawClient()
    deflate = PerMessageDeflate(
        client_no_context_takeover=no_takeover, server_no_context_takeover=no_takeover
    )
    raw.connect(server, extensions=[deflate])
    feed(server, raw.hello(), 0.0)
    raw.take()
    server.events()
    raw.receive(server.data_to_send())
    pings = [dumps({"type": "ping", "timestamp": n, "pad": "p" * 500}) for n in (1, 2, 3)]
    data = b"".join(raw.send_text(text) for text in pings[:2])
    half = len(pings[2]) // 2
    data += raw.send(TextMessage(data=pings[2][:half], message_finished=False))
    data += raw.send(TextMessage(data=pings[2][half:], message_finished=True))
    assert feed(server, data, 0.1) is None
    assert server.events() == []
    raw.receive(server.data_to_send())
    assert raw.types() == ["hello_ack", "pong", "pong", "pong"]  # compressed too


@pytest.mark.slow
def test_compressed_bomb_is_refused_without_inflating_it() -> None:
    server = make_server(max_message_size=1024 * 1024, compression=True)
    server.start(0.0)
    raw = RawClient()
    raw.connect(server, extensions=[PerMessageDeflate()])
    feed(server, raw.hello(), 0.0)
    server.events()
    raw.receive(server.data_to_send())
    bomb = raw.send_text("0" * (50 * 1024 * 1024))  # one message, deflated by wsproto
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        error = feed(server, bomb, 1.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(error, RemoteProtocolError)
    assert error.code is ErrorCode.MESSAGE_TOO_LARGE and error.close_code == 1009
    assert peak < 20 * 1024 * 1024, peak
    raw.receive(server.data_to_send())
    assert [c.code for c in raw.closes] == [1009]
    assert server.events() == [Closed(code=1009, reason="message too big")]
    assert server.should_close


# ---------------------------------------------------------------------- HTTP


def test_plain_get_gets_426() -> None:
    server = make_server()
    server.start(0.0)
    assert feed(server, b"GET /federation HTTP/1.1\r\nHost: x\r\n\r\n", 0.1) is None
    out = server.data_to_send()
    assert out.startswith(b"HTTP/1.1 426 ")
    assert b"use WebSocket" in out
    (closed,) = server.events()
    assert isinstance(closed, Closed) and closed.code == 1006
    assert server.should_close


def test_garbage_instead_of_http_gets_400() -> None:
    server = make_server()
    server.start(0.0)
    assert feed(server, b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 0.1) is None
    assert server.data_to_send().startswith(b"HTTP/1.1 400 ")
    assert [type(e) for e in server.events()] == [Closed]


def test_wrong_path_gets_404_and_the_client_sees_why() -> None:
    pair = ConnectionPair(client_options={"path": "/elsewhere"})
    pair.transfer()
    (server_closed,) = pair.server_events
    assert isinstance(server_closed, Closed) and "/elsewhere" in server_closed.reason
    assert bytes(pair.received["client"]).startswith(b"HTTP/1.1 404 ")
    (client_closed,) = pair.client_events
    assert isinstance(client_closed, Closed)
    assert client_closed.code == 1006
    assert "404" in client_closed.reason
    assert pair.client.should_close and pair.server.should_close


def test_client_refused_without_a_body() -> None:
    client = make_client()
    client.start(0.0)
    raw = RawServer()
    raw.receive(client.data_to_send())
    data = raw.send(RejectConnection(status_code=403, has_body=False))
    assert feed(client, data, 0.1) is None
    (closed,) = client.events()
    assert isinstance(closed, Closed) and "403" in closed.reason
    assert client.should_close


def test_client_refused_with_a_long_body_keeps_a_bounded_reason() -> None:
    client = make_client()
    client.start(0.0)
    raw = RawServer()
    raw.receive(client.data_to_send())
    headers = [(b"content-length", b"100000")]
    data = raw.send(RejectConnection(status_code=503, headers=headers, has_body=True))
    data += raw.send(RejectData(data=b"x" * 100_000, body_finished=True))
    assert feed(client, data, 0.1) is None
    (closed,) = client.events()
    assert isinstance(closed, Closed) and "503" in closed.reason
    assert len(closed.reason) < 5000


# ---------------------------------------------------------------------- local misuse


def test_start_twice_raises_and_changes_nothing() -> None:
    for role in (Role.CLIENT, Role.SERVER):
        conn = make_client() if role is Role.CLIENT else make_server()
        conn.start(0.0)
        out = conn.data_to_send()
        state = conn.state
        with pytest.raises(LocalProtocolError):
            conn.start(1.0)
        assert conn.state is state
        assert conn.data_to_send() == b""
        assert conn.get_timer() == 10.0
        del out
    # and the link still opens normally afterwards
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError):
        pair.client.start(0.5)
    with pytest.raises(LocalProtocolError):
        pair.server.start(0.5)
    pair.handshake()
    with pytest.raises(LocalProtocolError):
        pair.client.start(1.0)


def test_receive_data_needs_bytes() -> None:
    server = make_server()
    server.start(0.0)
    with pytest.raises(ValueError):
        server.receive_data(b"", 0.0)


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        make_server(max_message_size=0)
    with pytest.raises(ValueError):
        FederationConnection(Role.SERVER, system_id="s", clock=FakeClock())


@pytest.mark.parametrize(
    ("when", "side", "call"),
    [
        ("open", "client", lambda c: c.send_delta(make_delta("bad", system=""))),
        ("open", "server", lambda c: c.start_sync(1)),
        ("open", "server", lambda c: c.request_sync()),
        ("open", "client", lambda c: c.send_sync_batch([], last=True)),
        ("upgrading", "client", lambda c: c.ack("x")),
        ("upgrading", "server", lambda c: c.pause()),
        ("closing", "client", lambda c: c.send_delta(make_delta("late"))),
        ("closed", "server", lambda c: c.send_delta(make_delta("late"))),
        ("closed", "client", lambda c: c.request_sync()),
    ],
)
def test_local_misuse_raises_and_changes_nothing(
    when: str, side: Side, call: Callable[[FederationConnection], None]
) -> None:
    pair = ConnectionPair() if when == "upgrading" else ConnectionPair.opened()
    conn = pair.conn(side)
    if when in ("closing", "closed"):
        conn.close(now=0.0)
        conn.data_to_send()
    if when == "closed":
        pair.transfer()
    before = (conn.state, conn.held, conn.unacknowledged, conn.syncing, conn.outbound_size)
    with pytest.raises(LocalProtocolError):
        call(conn)
    assert (conn.state, conn.held, conn.unacknowledged, conn.syncing, conn.outbound_size) == before
    assert conn.events() == []


def test_outbound_size_counts_queued_messages() -> None:
    pair = ConnectionPair.opened()
    assert pair.client.outbound_size == 0
    pair.client.send_delta(make_delta("o"))
    size = pair.client.outbound_size
    assert size > 50
    assert len(pair.client.data_to_send()) >= size
    assert pair.client.outbound_size == 0


# ---------------------------------------------------------------------- reference vectors


def _reference_request(entry: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    raw_headers: list[str] = entry["rawHeaders"]
    pairs = list(zip(raw_headers[::2], raw_headers[1::2], strict=True))
    head = entry["requestLine"] + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs) + "\r\n"
    return head.encode(), dict(pairs)


@pytest.mark.parametrize("index", [0, 1])
def test_reference_upgrade_request_is_accepted(index: int) -> None:
    entry = json.loads((VECTORS / "reference-upgrade.json").read_text(encoding="utf-8"))[index]
    request, headers = _reference_request(entry)
    server = make_server()
    server.start(0.0)
    assert feed(server, request, 0.0) is None
    response = server.data_to_send()
    head, _, rest = response.partition(b"\r\n\r\n")
    assert rest == b""
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 101 Switching Protocols"
    fields = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    expected = accept_key(headers["Sec-WebSocket-Key"])
    assert fields["sec-websocket-accept"] == expected
    assert fields["upgrade"].lower() == "websocket"
    assert fields["connection"].lower() == "upgrade"
    assert "sec-websocket-extensions" not in fields  # compression declined by default
    assert "sec-websocket-protocol" not in fields
    if "rawServerResponse" in entry:
        assert f"Sec-WebSocket-Accept: {expected}" in entry["rawServerResponse"]
    assert server.request is not None
    assert server.request.extensions == ["permessage-deflate; client_max_window_bits"]
    assert server.events() == []


def test_reference_upgrade_with_compression_enabled() -> None:
    entry = json.loads((VECTORS / "reference-upgrade.json").read_text(encoding="utf-8"))[0]
    request, _ = _reference_request(entry)
    server = make_server(compression=True)
    server.start(0.0)
    assert feed(server, request, 0.0) is None
    head = server.data_to_send().split(b"\r\n\r\n")[0].decode().lower()
    assert "sec-websocket-extensions: permessage-deflate" in head


def test_reference_session_replayed_into_our_server() -> None:
    lines = [x for x in reference_session() if x["conn"] == 1]
    client_ids = {
        x["msg"]["delta"]["id"] for x in lines if x["dir"] == "c2s" and "delta" in x["msg"]
    }
    expected = [
        x["msg"]
        for x in lines
        if x["dir"] == "s2c"
        and not (x["msg"]["type"] == "delta" and x["msg"]["delta"]["id"] in client_ids)
    ]
    sync_batch = next(x["msg"] for x in lines if x["msg"]["type"] == "sync_batch")
    batch = decode(dumps(sync_batch))
    assert isinstance(batch, SyncBatch)

    server = make_server()
    server.start(0.0)
    raw = RawClient()
    raw.connect(server, extensions=[PerMessageDeflate()])  # offered, declined
    events: list[Event] = []
    now = 0.0
    for line in lines:
        now += 0.1
        msg = line["msg"]
        if line["dir"] == "c2s":
            assert pump(server, raw, raw.send_json(msg), now) is None
        elif msg["type"] == "delta" and msg["delta"]["id"] not in client_ids:
            decoded = decode(dumps(msg))
            assert isinstance(decoded, DeltaMessage)
            server.send_delta(decoded.delta)
            raw.receive(server.data_to_send())
        for event in server.events():
            events.append(event)
            if isinstance(event, DeltaReceived):
                server.ack(event.delta.id)
            elif isinstance(event, SyncRequested):
                server.start_sync(len(batch.deltas))
                server.send_sync_batch(batch.deltas, last=True)
                server.complete_sync()
        raw.receive(server.data_to_send())
    got = raw.messages()
    assert [m["type"] for m in got] == [m["type"] for m in expected]
    assert [m["type"] for m in got] == [
        "hello_ack",
        "sync_start",
        "sync_batch",
        "sync_complete",
        "delta_ack",
        "delta",
        "delta_ack",
        "pong",
    ]
    # beyond the types: the same content as the reference's, timestamps and ids aside
    for ours, theirs in zip(got[1:], expected[1:], strict=True):
        assert {k: v for k, v in ours.items() if k != "timestamp"} == {
            k: v for k, v in theirs.items() if k != "timestamp"
        }
    assert [type(e).__name__ for e in events] == [
        "HandshakeComplete",
        "SyncRequested",
        "DeltaReceived",
        "DeltaAcked",
        "Paused",
        "Resumed",
        "DeltaReceived",
    ]
    assert server.stray_acks == 2  # the client's acks of the reference's echoes
    assert server.unacknowledged == ()
    assert raw.closes == [] and server.is_open


# ---------------------------------------------------------------------- split invariance


def _server_script(long: bool) -> bytes:
    """What a raw client sends for a whole session: upgrade, messages, close."""
    scratch = make_server()
    scratch.start(0.0)
    raw = RawClient()
    data = raw.request()
    feed(scratch, data, 0.0)
    raw.receive(scratch.data_to_send())
    samples = sample_messages()
    data += raw.hello()
    data += raw.send_json(samples["sync_request"])
    data += raw.send_json({"type": "delta", "timestamp": 5, "delta": delta_json("w1")})
    data += raw.send_text("not json")
    if long:
        data += raw.send_json(samples["pause"])
        data += raw.send(Ping(payload=b"p"))
        text = dumps({"type": "delta", "timestamp": 6, "delta": delta_json("w2", author="ü" * 80)})
        data += raw.send(TextMessage(data=text[:50], message_finished=False))
        data += raw.send(TextMessage(data=text[50:], message_finished=True))
        data += raw.send(BytesMessage(data=b"bin"))
        data += raw.send_json({"type": "gossip", "timestamp": 1})
        data += raw.send_json(samples["resume"])
        bad = {"type": "delta", "timestamp": 5, "delta": delta_json("w3", author="")}
        data += raw.send_json(bad)
        data += raw.send_json(samples["delta_ack"])
        data += raw.send_json(samples["ping"])
    data += raw.send(CloseConnection(code=1000, reason="bye"))
    return data


def _client_script(request: bytes) -> bytes:
    """A raw server's whole session towards the client that sent ``request``."""
    raw = RawServer()
    raw.receive(request)
    data = raw.send(AcceptConnection())
    samples = sample_messages()
    data += raw.hello_ack()
    data += raw.send_json({"type": "delta", "timestamp": 5, "delta": delta_json("c1")})
    data += raw.send_json(samples["ping"])
    data += raw.send_json(samples["pause"])
    data += raw.send(Ping(payload=b"x"))
    data += raw.send_text('{"type": 1}')
    data += raw.send_json(samples["resume"])
    data += raw.send(BytesMessage(data=b"\x00"))
    data += raw.send_json(samples["delta_nack"])
    data += raw.send(CloseConnection(code=1001, reason="later"))
    return data


Splitter = Callable[[bytes], list[bytes]]
Outcome = tuple[list[Event], list[str], list[str]]

#: the server scripts, made once (the raw client's masking keys are random)
SERVER_SCRIPTS = {True: _server_script(long=True), False: _server_script(long=False)}


def _run(role: Role, split: Splitter, *, long: bool = True, react: bool = False) -> Outcome:
    """Run one side through its whole script, fed in the chunks ``split`` makes of it:
    its events, everything it wrote, and the codes of the errors it raised."""
    conn = make_server() if role is Role.SERVER else make_client()
    conn.start(0.0)
    if role is Role.CLIENT:
        # the 101 depends on the client's random key; the frames after it do not
        script = _client_script(conn.data_to_send())
        conn.send_delta(make_delta("mine"))
    else:
        script = SERVER_SCRIPTS[long]
    events: list[Event] = []
    out = bytearray()
    errors: list[str] = []
    for chunk in split(script):
        error = feed(conn, chunk, 1.0)
        if error is not None:
            errors.append(error.code)
        for event in conn.events():
            events.append(event)
            if react and isinstance(event, DeltaReceived):
                conn.ack(event.delta.id)
        out += conn.data_to_send()
    events += conn.events()
    return events, decode_output(bytes(out), from_server=role is Role.SERVER), errors


def _whole(data: bytes) -> list[bytes]:
    return [data]


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def _at(offset: int) -> Splitter:
    return lambda data: [data[:offset], data[offset:]]


def _every(n: int) -> Splitter:
    return lambda data: [data[i : i + n] for i in range(0, len(data), n)]


def _check_split_invariance(role: Role, offsets: range, long: bool = True) -> Outcome:
    whole = _run(role, _whole, long=long)
    assert whole[0], "the script produced no events"
    assert isinstance(whole[0][-1], Closed)
    assert _run(role, _bytewise, long=long) == whole
    for offset in offsets:
        assert _run(role, _at(offset), long=long) == whole, offset
    # an application that answers as events arrive sees the same events
    assert _run(role, _every(7), long=long, react=True)[0] == whole[0]
    return whole


def test_split_invariance_server_long_script() -> None:
    events, out, errors = _check_split_invariance(
        Role.SERVER, range(1, len(SERVER_SCRIPTS[True]), 37)
    )
    assert errors == []
    assert [type(e).__name__ for e in events] == [
        "HandshakeComplete",
        "SyncRequested",
        "DeltaReceived",
        "ProtocolViolation",
        "Paused",
        "DeltaReceived",
        "ProtocolViolation",
        "ProtocolViolation",
        "Resumed",
        "ProtocolViolation",
        "Closed",
    ]
    assert events[-1] == Closed(code=1000, reason="bye")
    # every answer went out before the close reply, whatever the chunking
    assert out[0] == "HTTP/1.1 101 Switching Protocols"
    types = [json.loads(x[5:])["type"] if x.startswith("text:") else x for x in out[1:]]
    assert types == [
        "hello_ack",
        "error",
        "pong:b'p'",
        "error",
        "error",
        "delta_nack",
        "pong",
        "close:1000:bye",
    ]


def test_split_invariance_server_every_offset() -> None:
    script = SERVER_SCRIPTS[False]
    assert len(script) < 600
    _check_split_invariance(Role.SERVER, range(1, len(script)), long=False)


def test_split_invariance_client_every_offset() -> None:
    client = make_client()
    client.start(0.0)
    length = len(_client_script(client.data_to_send()))
    events, _, errors = _check_split_invariance(Role.CLIENT, range(1, length))
    assert errors == []
    assert [type(e).__name__ for e in events] == [
        "HandshakeComplete",
        "DeltaReceived",
        "Paused",
        "ProtocolViolation",
        "Resumed",
        "ProtocolViolation",
        "Closed",
    ]
    assert events[-1] == Closed(code=1001, reason="later", unsettled=(make_delta("mine"),))
