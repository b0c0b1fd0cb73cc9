"""FederationProtocol, message level: every flow of PROTOCOL.md, for both roles.

Two protocol objects talk through :class:`tests.harness.ProtocolPair`; a peer that misbehaves is
simulated by injecting raw JSON with ``pair.inject``. Assertions are exact: events, the
messages on the wire (decoded), states and timers.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from rhizome_proto import (
    PROTOCOL_VERSION,
    Closed,
    DeltaAcked,
    DeltaFilter,
    DeltaReceived,
    DeltaRejected,
    ErrorCode,
    ErrorReceived,
    FederationConfig,
    FederationProtocol,
    HandshakeComplete,
    LocalProtocolError,
    Paused,
    PingTimeout,
    ProtocolViolation,
    Resumed,
    Role,
    State,
    SyncBatchReceived,
    SyncCompleted,
    SyncRequested,
    SyncStarted,
    TimestampRange,
)
from tests.harness import (
    FakeClock,
    ProtocolPair,
    Side,
    delta_json,
    dumps,
    make_delta,
    other,
    reference_session,
    sample_messages,
)

SIDES: tuple[Side, ...] = ("client", "server")


def strip_ts(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k != "timestamp"}


def wire_types(pair: ProtocolPair, side: Side) -> list[str]:
    return [m["type"] for m in pair.take_sent(side)]


def opened(**kwargs: Any) -> ProtocolPair:
    pair = ProtocolPair.opened(**kwargs)
    pair.take_sent("client")
    pair.take_sent("server")
    return pair


# ---------------------------------------------------------------------- handshake


def test_handshake_events_link_id_and_remote_config() -> None:
    config = FederationConfig(mode="bidirectional", initial_sync="none")
    pair = ProtocolPair(client_options={"config": config}, server_options={"link_id": "L-42"})
    assert pair.client.state is State.HELLO_SENT
    assert pair.server.state is State.AWAITING_HELLO
    hello = pair.take_sent("client")
    assert [strip_ts(m) for m in hello] == [
        {
            "type": "hello",
            "systemId": "client-sys",
            "config": {"mode": "bidirectional", "initialSync": "none"},
            "protocol": PROTOCOL_VERSION,
        }
    ]
    pair.inject("server", dumps(hello[0]))
    ack = pair.take_sent("server")
    assert [strip_ts(m) for m in ack] == [
        {
            "type": "hello_ack",
            "systemId": "server-sys",
            "linkId": "L-42",
            "protocol": PROTOCOL_VERSION,
        }
    ]
    pair.inject("client", dumps(ack[0]))
    assert pair.new_events("server") == [
        HandshakeComplete(remote_system_id="client-sys", link_id="L-42", remote_config=config)
    ]
    assert pair.new_events("client") == [
        HandshakeComplete(remote_system_id="server-sys", link_id="L-42", remote_config=None)
    ]
    assert pair.client.is_open and pair.server.is_open
    assert pair.client.link_id == "L-42"
    assert pair.client.remote_system_id == "server-sys"
    assert pair.server.remote_system_id == "client-sys"
    assert pair.server.remote_config == config
    assert pair.client.is_open and pair.server.is_open


def test_message_timestamps_come_from_the_injected_clock() -> None:
    pair = ProtocolPair(start=False)
    pair.clock.ms = 1795624086459
    pair.client.start(0.0)
    (hello,) = pair.take_sent("client")
    assert hello["timestamp"] == 1795624086459


def test_protocol_mismatch_is_answered_exactly_like_the_reference() -> None:
    lines = reference_session()
    hello = next(x["msg"] for x in lines if x["conn"] == 2 and x["dir"] == "c2s")
    answer = next(x["msg"] for x in lines if x["conn"] == 2 and x["dir"] == "s2c")
    pair = ProtocolPair()
    pair.take_sent("client")
    pair.clock.ms = answer["timestamp"]
    pair.inject("server", dumps(hello))
    (error,) = pair.errors["server"]
    assert error.code is ErrorCode.PROTOCOL_MISMATCH
    assert str(error) == "Unsupported protocol: rhizomedb-federation-v0"
    (text,) = pair.server.messages_to_send()
    # byte for byte the reference's message (the clock was set to its timestamp)
    assert text == dumps(answer)
    assert json.loads(text) == {
        "type": "error",
        "timestamp": answer["timestamp"],
        "code": "PROTOCOL_MISMATCH",
        "message": "Unsupported protocol: rhizomedb-federation-v0",
        "fatal": True,
    }
    assert pair.server.state is State.CLOSING
    assert pair.new_events("server") == []
    pair.inject("server", dumps(sample_messages()["ping"]))  # ignored once closing
    assert pair.server.messages_to_send() == []
    pair.server.connection_closed(1002, "closed")
    assert pair.new_events("server") == [Closed(code=1002, reason="closed")]


def test_client_refuses_a_hello_ack_with_another_protocol() -> None:
    pair = ProtocolPair()
    pair.take_sent("client")
    ack = sample_messages()["hello_ack"] | {"protocol": "rhizomedb-federation-v9"}
    pair.inject("client", dumps(ack))
    (error,) = pair.errors["client"]
    assert error.code is ErrorCode.PROTOCOL_MISMATCH
    (sent,) = pair.take_sent("client")
    assert strip_ts(sent) == {
        "type": "error",
        "code": "PROTOCOL_MISMATCH",
        "message": "Unsupported protocol: rhizomedb-federation-v9",
        "fatal": True,
    }
    assert pair.client.state is State.CLOSING
    assert pair.new_events("client") == []


def test_an_instance_refuses_to_federate_with_itself() -> None:
    """Server side: a hello with our own system id; client side: a hello_ack with ours."""
    pair = ProtocolPair(client_options={"system_id": "same"}, server_options={"system_id": "same"})
    pair.take_sent("client")
    pair.inject("server", pair.sent["client"][-1])
    (error,) = pair.errors["server"]
    assert error.code is ErrorCode.SELF_LINK and error.close_code == 1008
    (sent,) = pair.take_sent("server")
    assert strip_ts(sent) == {
        "type": "error",
        "code": "SELF_LINK",
        "message": "the peer's system id 'same' is ours: an instance cannot federate with itself",
        "fatal": True,
    }
    assert pair.server.state is State.CLOSING and pair.server.remote_system_id is None

    pair = ProtocolPair()
    pair.take_sent("client")
    ack = sample_messages()["hello_ack"] | {"systemId": "client-sys"}
    pair.inject("client", dumps(ack))
    (error,) = pair.errors["client"]
    assert error.code is ErrorCode.SELF_LINK
    assert pair.client.state is State.CLOSING and not pair.new_events("client")


def test_a_server_holds_the_peer_to_the_system_ids_its_credential_allows() -> None:
    pair = ProtocolPair(start=False)
    pair.server.allowed_system_ids = frozenset({"spoke-1"})
    pair.client.start(0)
    pair.server.start(0)
    pair.transfer()
    (error,) = pair.errors["server"]
    assert error.code is ErrorCode.UNAUTHORIZED and error.close_code == 1008
    assert "system id 'client-sys' is not one this credential may claim" in str(error)
    assert pair.server.closed and pair.server.close_code == 1008  # the pair closed the channel
    (refusal,) = [e for e in pair.new_events("client") if isinstance(e, ErrorReceived)]
    assert refusal.code == ErrorCode.UNAUTHORIZED and refusal.fatal

    pair = ProtocolPair(start=False)
    pair.server.allowed_system_ids = frozenset({"spoke-1", "client-sys"})
    pair.client.start(0)
    pair.server.start(0)
    pair.transfer()
    assert not pair.errors["server"] and pair.server.is_open and pair.client.is_open


@pytest.mark.parametrize("mtype", sorted(set(sample_messages()) - {"hello"}))
def test_server_refuses_anything_but_hello_before_the_handshake(mtype: str) -> None:
    pair = ProtocolPair()
    pair.take_sent("client")
    pair.inject("server", dumps(sample_messages()[mtype]))
    (error,) = pair.errors["server"]
    assert error.code is ErrorCode.UNEXPECTED_MESSAGE
    (sent,) = pair.take_sent("server")
    assert sent["type"] == "error"
    assert sent["code"] == "UNEXPECTED_MESSAGE"
    assert sent["fatal"] is True
    assert mtype in sent["message"]
    assert pair.server.state is State.CLOSING
    assert pair.new_events("server") == []
    pair.transfer()
    assert pair.new_events("server") == [Closed(code=1002, reason=pair.server.close_reason)]


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", ErrorCode.MESSAGE_ERROR),
        ("[1,2]", ErrorCode.MESSAGE_ERROR),
        ('{"type":"nope","timestamp":1}', ErrorCode.UNKNOWN_MESSAGE_TYPE),
    ],
)
def test_server_refuses_garbage_before_the_handshake_fatally(text: str, code: ErrorCode) -> None:
    pair = ProtocolPair()
    pair.take_sent("client")
    pair.inject("server", text)
    (error,) = pair.errors["server"]
    assert error.code is code
    (sent,) = pair.take_sent("server")
    assert (sent["type"], sent["code"], sent["fatal"]) == ("error", code.value, True)
    assert pair.server.state is State.CLOSING


def test_client_waiting_for_hello_ack_accepts_error_ping_pong() -> None:
    pair = ProtocolPair()
    pair.take_sent("client")
    samples = sample_messages()
    pair.inject("client", dumps(samples["ping"]))
    assert wire_types(pair, "client") == ["pong"]
    pair.inject("client", dumps(samples["pong"]))
    pair.inject("client", dumps(samples["error"] | {"fatal": True}))
    assert pair.new_events("client") == [ErrorReceived(code="SOMETHING", message="m", fatal=True)]
    assert pair.take_sent("client") == []
    assert pair.client.state is State.HELLO_SENT
    assert pair.errors["client"] == []


@pytest.mark.parametrize(
    "mtype", sorted(set(sample_messages()) - {"hello_ack", "error", "ping", "pong"})
)
def test_client_waiting_for_hello_ack_refuses_anything_else(mtype: str) -> None:
    pair = ProtocolPair()
    pair.take_sent("client")
    pair.inject("client", dumps(sample_messages()[mtype]))
    (error,) = pair.errors["client"]
    assert error.code is ErrorCode.UNEXPECTED_MESSAGE
    (sent,) = pair.take_sent("client")
    assert (sent["type"], sent["code"], sent["fatal"]) == ("error", "UNEXPECTED_MESSAGE", True)
    assert pair.client.state is State.CLOSING
    assert pair.new_events("client") == []


# ---------------------------------------------------------------------- violations once open

UNEXPECTED_WHEN_OPEN: list[tuple[Side, str]] = [
    ("server", "hello"),
    ("server", "hello_ack"),
    ("server", "sync_start"),
    ("server", "sync_batch"),
    ("server", "sync_complete"),
    ("client", "hello"),
    ("client", "hello_ack"),
    ("client", "sync_request"),
    ("client", "sync_start"),  # without a sync_request
    ("client", "sync_batch"),  # without a sync
    ("client", "sync_complete"),  # without a sync
]


@pytest.mark.parametrize(("receiver", "mtype"), UNEXPECTED_WHEN_OPEN)
def test_unexpected_message_once_open_is_answered_not_fatal(receiver: Side, mtype: str) -> None:
    pair = opened()
    pair.inject(receiver, dumps(sample_messages()[mtype]))
    assert pair.errors[receiver] == []
    (sent,) = pair.take_sent(receiver)
    assert sent["type"] == "error"
    assert sent["code"] == "UNEXPECTED_MESSAGE"
    assert "fatal" not in sent
    (event,) = pair.new_events(receiver)
    assert isinstance(event, ProtocolViolation)
    assert event.code == "UNEXPECTED_MESSAGE"
    assert event.message == sent["message"]
    proto = pair.proto(receiver)
    assert proto.state is State.OPEN
    # the link still works both ways
    pair.proto(other(receiver)).send_delta(make_delta("after"))
    pair.transfer()
    assert [type(e) for e in pair.new_events(receiver)] == [DeltaReceived]


def test_out_of_order_sync_batches_are_refused() -> None:
    pair = opened()
    pair.client.request_sync()
    pair.transfer()
    pair.server.start_sync(3, batch_size=1)
    pair.transfer()
    pair.new_events("client")
    batch = sample_messages()["sync_batch"] | {"isLastBatch": False}
    pair.inject("client", dumps(batch | {"batchNumber": 1}))  # 0 expected
    (event,) = pair.new_events("client")
    assert isinstance(event, ProtocolViolation) and event.code == "UNEXPECTED_MESSAGE"
    assert "expected 0" in event.message
    pair.inject("client", dumps(batch | {"batchNumber": 0}))
    pair.inject("client", dumps(batch | {"batchNumber": 0}))  # a repeat
    events = pair.new_events("client")
    assert isinstance(events[0], SyncBatchReceived) and events[0].batch_number == 0
    assert isinstance(events[1], ProtocolViolation)
    assert [m["code"] for m in pair.take_sent("client")] == ["UNEXPECTED_MESSAGE"] * 2
    pair.inject("client", dumps(batch | {"batchNumber": 1, "isLastBatch": True}))
    pair.inject("client", dumps(batch | {"batchNumber": 2}))  # after the last one
    events = pair.new_events("client")
    assert isinstance(events[0], SyncBatchReceived) and events[0].is_last_batch
    assert isinstance(events[1], ProtocolViolation)
    assert pair.client.state is State.OPEN


@pytest.mark.parametrize("receiver", SIDES)
@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "{",
        "",
        "[]",
        "42",
        '"hello"',
        "null",
        "{}",
        '{"timestamp": 1}',
        '{"type": 5, "timestamp": 1}',
        '{"type": "ping"}',
        '{"type": "ping", "timestamp": 0}',
        '{"type": "delta_ack", "timestamp": 1}',
    ],
)
def test_undecodable_messages_get_message_error(receiver: Side, text: str) -> None:
    pair = opened()
    pair.inject(receiver, text)
    (sent,) = pair.take_sent(receiver)
    assert (sent["type"], sent["code"]) == ("error", "MESSAGE_ERROR")
    assert "fatal" not in sent
    (event,) = pair.new_events(receiver)
    assert event == ProtocolViolation(code="MESSAGE_ERROR", message=sent["message"])
    assert pair.proto(receiver).state is State.OPEN


@pytest.mark.parametrize("receiver", SIDES)
def test_unknown_type_gets_unknown_message_type(receiver: Side) -> None:
    pair = opened()
    pair.inject(receiver, '{"type":"subscribe","timestamp":5,"topic":"x"}')
    (sent,) = pair.take_sent(receiver)
    assert (sent["type"], sent["code"]) == ("error", "UNKNOWN_MESSAGE_TYPE")
    assert "subscribe" in sent["message"]
    (event,) = pair.new_events(receiver)
    assert isinstance(event, ProtocolViolation) and event.code == "UNKNOWN_MESSAGE_TYPE"


@pytest.mark.parametrize("receiver", SIDES)
@pytest.mark.parametrize(
    ("fields", "rule"),
    [
        ({"author": ""}, "$.delta.author"),
        ({"system": ""}, "$.delta.system"),
        ({"timestamp": 0}, "$.delta.timestamp"),
        ({"timestamp": -5}, "$.delta.timestamp"),
        ({"pointers": [{"role": "", "target": "x"}]}, "$.delta.pointers[0].role"),
        ({"pointers": [{"role": "r", "target": None}]}, "$.delta.pointers[0].target"),
        ({"pointers": [{"role": "r", "target": [1]}]}, "$.delta.pointers[0].target"),
        ({"pointers": [{"role": "r", "target": {"id": ""}}]}, "$.delta.pointers[0].target.id"),
        ({"pointers": [{"role": "r", "target": {"id": "a", "x": {}}}]}, "$.delta.pointers[0]"),
        ({"pointers": "nope"}, "$.delta.pointers"),
    ],
)
def test_invalid_delta_with_readable_id_gets_a_nack_naming_the_rule(
    receiver: Side, fields: dict[str, Any], rule: str
) -> None:
    pair = opened()
    msg = {"type": "delta", "timestamp": 7, "delta": delta_json("bad-1", **fields)}
    pair.inject(receiver, dumps(msg))
    (sent,) = pair.take_sent(receiver)
    assert sent["type"] == "delta_nack"
    assert sent["deltaId"] == "bad-1"
    assert rule in sent["reason"], sent["reason"]
    (event,) = pair.new_events(receiver)
    assert event == ProtocolViolation(code="INVALID_DELTA", message=sent["reason"])
    assert pair.proto(receiver).unanswered == frozenset()


@pytest.mark.parametrize("receiver", SIDES)
@pytest.mark.parametrize("delta", [{"id": ""}, {"id": 5}, {"author": "a"}, "str", None])
def test_invalid_delta_without_id_gets_invalid_delta_error(receiver: Side, delta: Any) -> None:
    pair = opened()
    if isinstance(delta, dict) and "id" in delta:
        delta = delta_json(**{"delta_id": delta["id"]})
    pair.inject(receiver, dumps({"type": "delta", "timestamp": 7, "delta": delta}))
    (sent,) = pair.take_sent(receiver)
    assert (sent["type"], sent["code"]) == ("error", "INVALID_DELTA")
    assert "fatal" not in sent
    (event,) = pair.new_events(receiver)
    assert isinstance(event, ProtocolViolation) and event.code == "INVALID_DELTA"


@pytest.mark.parametrize("receiver", SIDES)
def test_receive_invalid_is_answered_like_a_bad_message(receiver: Side) -> None:
    pair = opened()
    pair.proto(receiver).receive_invalid(ErrorCode.MESSAGE_ERROR, "binary frames are not accepted")
    (sent,) = pair.take_sent(receiver)
    assert strip_ts(sent) == {
        "type": "error",
        "code": "MESSAGE_ERROR",
        "message": "binary frames are not accepted",
    }
    assert pair.new_events(receiver) == [
        ProtocolViolation(code="MESSAGE_ERROR", message="binary frames are not accepted")
    ]


def test_receive_invalid_before_the_handshake_is_fatal() -> None:
    pair = ProtocolPair()
    with pytest.raises(Exception) as info:
        pair.server.receive_invalid(ErrorCode.MESSAGE_ERROR, "binary")
    assert getattr(info.value, "code", None) is ErrorCode.MESSAGE_ERROR
    assert pair.server.state is State.CLOSING


# ---------------------------------------------------------------------- sync


@pytest.mark.parametrize(
    ("kwargs", "wire"),
    [
        ({}, {}),
        ({"from_timestamp": 1234}, {"fromTimestamp": 1234}),
        (
            {"filter": DeltaFilter(authors=("a",), timestamp_range=TimestampRange(start=5))},
            {"filter": {"authors": ["a"], "timestampRange": {"start": 5}}},
        ),
        (
            {"filter": DeltaFilter(systems=("s",)), "from_timestamp": 9.5},
            {"filter": {"systems": ["s"]}, "fromTimestamp": 9.5},
        ),
    ],
)
def test_sync_request_carries_filter_and_from_timestamp(
    kwargs: dict[str, Any], wire: dict[str, Any]
) -> None:
    pair = opened()
    pair.client.request_sync(**kwargs)
    assert pair.client.syncing
    (sent,) = pair.take_sent("client")
    assert strip_ts(sent) == {"type": "sync_request", **wire}
    pair.inject("server", dumps(sent))
    assert pair.new_events("server") == [
        SyncRequested(filter=kwargs.get("filter"), from_timestamp=kwargs.get("from_timestamp"))
    ]
    assert pair.server.syncing


def test_sync_with_zero_batches() -> None:
    pair = opened()
    pair.client.request_sync()
    pair.transfer()
    pair.new_events("server")
    pair.server.start_sync(0)
    pair.server.complete_sync()
    assert [strip_ts(m) for m in pair.take_sent("server")] == [
        {"type": "sync_start", "totalDeltas": 0, "batchSize": 100},
        {"type": "sync_complete", "deltasProcessed": 0},
    ]
    assert not pair.server.syncing
    with pytest.raises(LocalProtocolError):  # the sync is over
        pair.server.start_sync(0)


def test_sync_with_several_batches_end_to_end() -> None:
    pair = opened()
    deltas = [make_delta(f"s{i}", timestamp=100 + i) for i in range(5)]
    pair.client.request_sync()
    pair.transfer()
    assert pair.new_events("server") == [SyncRequested(filter=None, from_timestamp=None)]
    pair.server.start_sync(5, batch_size=2)
    pair.server.send_sync_batch(deltas[0:2], last=False)
    pair.server.send_sync_batch(deltas[2:4], last=False)
    pair.server.send_sync_batch(deltas[4:], last=True)
    pair.server.complete_sync()
    sent = pair.take_sent("server")
    assert [m["type"] for m in sent] == ["sync_start"] + ["sync_batch"] * 3 + ["sync_complete"]
    assert [(m["batchNumber"], m["isLastBatch"]) for m in sent[1:4]] == [
        (0, False),
        (1, False),
        (2, True),
    ]
    assert [len(m["deltas"]) for m in sent[1:4]] == [2, 2, 1]
    assert sent[4]["deltasProcessed"] == 5
    for m in sent:
        pair.inject("client", dumps(m))
    assert pair.new_events("client") == [
        SyncStarted(total_deltas=5, batch_size=2),
        SyncBatchReceived(deltas=tuple(deltas[0:2]), batch_number=0, is_last_batch=False),
        SyncBatchReceived(deltas=tuple(deltas[2:4]), batch_number=1, is_last_batch=False),
        SyncBatchReceived(deltas=tuple(deltas[4:]), batch_number=2, is_last_batch=True),
        SyncCompleted(deltas_processed=5, deltas_received=5),
    ]
    assert not pair.client.syncing and not pair.server.syncing
    # sync deltas are not live deltas: nothing to answer, but a nack of one is allowed
    assert pair.client.unanswered == frozenset()
    pair.client.nack("s1", "untrusted")
    pair.transfer()
    assert pair.server.stray_acks == 1  # the server did not send s1 live
    # a second sync may follow the first
    pair.client.request_sync(from_timestamp=104)
    pair.transfer()
    assert pair.new_events("server") == [SyncRequested(filter=None, from_timestamp=104)]


def test_second_sync_request_during_a_sync_gets_sync_error() -> None:
    pair = opened()
    pair.client.request_sync()
    pair.transfer()
    pair.new_events("server")
    with pytest.raises(LocalProtocolError) as info:
        pair.client.request_sync()
    assert info.value.code is ErrorCode.SYNC_ERROR
    pair.inject("server", dumps(sample_messages()["sync_request"]))  # a peer that insists
    (sent,) = pair.take_sent("server")
    assert (sent["type"], sent["code"]) == ("error", "SYNC_ERROR")
    assert "fatal" not in sent
    assert pair.new_events("server") == [
        ProtocolViolation(code="SYNC_ERROR", message=sent["message"])
    ]
    # the first sync is unaffected
    pair.server.start_sync(0)
    pair.server.complete_sync()
    pair.transfer()
    assert pair.new_events("client") == [
        SyncStarted(total_deltas=0, batch_size=100),
        SyncCompleted(deltas_processed=0, deltas_received=0),
    ]


@pytest.mark.parametrize("started", [False, True])
def test_reject_sync(started: bool) -> None:
    pair = opened()
    pair.client.request_sync()
    pair.transfer()
    if started:
        pair.server.start_sync(10)
        pair.server.send_sync_batch([make_delta("a")], last=False)
    pair.server.reject_sync("store unavailable")
    assert not pair.server.syncing
    pair.transfer()
    events = pair.new_events("client")
    assert events[-1] == ErrorReceived(code="SYNC_ERROR", message="store unavailable", fatal=False)
    assert pair.client.state is State.OPEN
    # the client may ask again once the server refused
    assert not pair.client.syncing
    pair.client.request_sync()
    pair.transfer()
    assert pair.new_events("server")[-1] == SyncRequested(filter=None, from_timestamp=None)


def test_reject_sync_with_another_code() -> None:
    pair = opened()
    pair.client.request_sync()
    pair.transfer()
    pair.server.reject_sync("no", code=ErrorCode.SYNC_NOT_SUPPORTED)
    (sent,) = pair.take_sent("server")
    assert strip_ts(sent) == {"type": "error", "code": "SYNC_NOT_SUPPORTED", "message": "no"}


# ---------------------------------------------------------------------- live deltas


@pytest.mark.parametrize("sender", SIDES)
def test_live_delta_ack_and_nack(sender: Side) -> None:
    pair = opened()
    receiver = other(sender)
    src, dst = pair.proto(sender), pair.proto(receiver)
    d1, d2 = make_delta("d1"), make_delta("d2")
    src.send_delta(d1)
    src.send_delta(d2)
    assert src.unacknowledged == (d1, d2)
    sent = pair.take_sent(sender)
    assert [strip_ts(m) for m in sent] == [
        {
            "type": "delta",
            "delta": delta_json("d1", pointers=[{"role": "subject", "target": {"id": "e-d1"}}]),
        },
        {
            "type": "delta",
            "delta": delta_json("d2", pointers=[{"role": "subject", "target": {"id": "e-d2"}}]),
        },
    ]
    for m in sent:
        pair.inject(receiver, dumps(m))
    assert pair.new_events(receiver) == [DeltaReceived(delta=d1), DeltaReceived(delta=d2)]
    assert dst.unanswered == frozenset({"d1", "d2"})
    dst.ack("d1")
    dst.nack("d2", "untrusted author")
    assert dst.unanswered == frozenset()
    assert [strip_ts(m) for m in pair.take_sent(receiver)] == [
        {"type": "delta_ack", "deltaId": "d1"},
        {"type": "delta_nack", "deltaId": "d2", "reason": "untrusted author"},
    ]
    pair.inject(sender, dumps({"type": "delta_ack", "timestamp": 1, "deltaId": "d1"}))
    pair.inject(
        sender,
        dumps(
            {"type": "delta_nack", "timestamp": 1, "deltaId": "d2", "reason": "untrusted author"}
        ),
    )
    assert pair.new_events(sender) == [
        DeltaAcked(delta_id="d1"),
        DeltaRejected(delta_id="d2", reason="untrusted author"),
    ]
    assert not src.unacknowledged
    assert src.stray_acks == 0


@pytest.mark.parametrize("sender", SIDES)
def test_stray_acks_are_ignored_and_counted(sender: Side) -> None:
    pair = opened()
    src = pair.proto(sender)
    src.send_delta(make_delta("d1"))
    pair.transfer()
    pair.proto(other(sender)).ack("d1")
    pair.transfer()
    assert pair.new_events(sender) == [DeltaAcked(delta_id="d1")]
    for msg in (
        {"type": "delta_ack", "timestamp": 1, "deltaId": "d1"},  # already settled
        {"type": "delta_nack", "timestamp": 1, "deltaId": "d1", "reason": "late"},
        {"type": "delta_ack", "timestamp": 1, "deltaId": "never-sent"},
    ):
        pair.inject(sender, dumps(msg))
    assert src.stray_acks == 3
    assert pair.new_events(sender) == []
    assert pair.take_sent(sender) == []
    assert src.state is State.OPEN


def test_duplicate_pending_delta_id_is_refused() -> None:
    pair = opened()
    pair.client.send_delta(make_delta("d1"))
    with pytest.raises(LocalProtocolError):
        pair.client.send_delta(make_delta("d1", timestamp=5))
    assert len(pair.take_sent("client")) == 1
    # once settled, the same id may be sent again
    pair.inject("client", dumps({"type": "delta_ack", "timestamp": 1, "deltaId": "d1"}))
    pair.client.send_delta(make_delta("d1"))
    assert wire_types(pair, "client") == ["delta"]


# ---------------------------------------------------------------------- pause / resume


@pytest.mark.parametrize("pauser", SIDES)
def test_pause_holds_live_deltas_and_resume_sends_them_in_order(pauser: Side) -> None:
    pair = opened()
    sender = other(pauser)
    src = pair.proto(sender)
    pair.proto(pauser).pause()
    pair.proto(pauser).pause()  # no-op
    assert pair.proto(pauser).paused
    assert wire_types(pair, pauser) == ["pause"]
    pair.inject(sender, dumps(sample_messages()["pause"]))
    assert pair.new_events(sender) == [Paused()]
    assert src.peer_paused
    deltas = [make_delta(f"p{i}") for i in range(3)]
    for d in deltas:
        src.send_delta(d)
    assert pair.take_sent(sender) == []  # held, not sent
    assert src.held == tuple(deltas)
    assert src.unacknowledged == ()
    # pings still flow while paused
    src.handle_timer(30.0)
    assert wire_types(pair, sender) == ["ping"]
    pair.proto(pauser).resume()
    pair.proto(pauser).resume()  # no-op
    assert wire_types(pair, pauser) == ["resume"]
    pair.inject(sender, dumps(sample_messages()["resume"]))
    assert pair.new_events(sender) == [Resumed()]
    sent = pair.take_sent(sender)
    assert [m["delta"]["id"] for m in sent if m["type"] == "delta"] == ["p0", "p1", "p2"]
    assert src.held == ()
    assert src.unacknowledged == tuple(deltas)


def test_pause_holds_sync_batches_too_and_keeps_order_with_live_deltas() -> None:
    pair = opened()
    pair.client.request_sync()
    pair.transfer()
    pair.client.pause()
    pair.transfer()
    assert pair.new_events("server") == [
        SyncRequested(filter=None, from_timestamp=None),
        Paused(),
    ]
    pair.server.start_sync(3, batch_size=1)  # sync_start is not a batch: it goes out
    pair.server.send_sync_batch([make_delta("s0")], last=False)
    pair.server.send_delta(make_delta("live"))
    pair.server.send_sync_batch([make_delta("s1")], last=True)
    pair.server.complete_sync()
    pair.transfer()
    assert pair.new_events("client") == [SyncStarted(total_deltas=3, batch_size=1)]
    assert pair.server.held == (make_delta("live"),)
    assert pair.server.unacknowledged == ()
    pair.client.resume()
    pair.transfer()
    types = [json.loads(m)["type"] for m in pair.sent["server"][-5:]]
    assert types == ["sync_start", "sync_batch", "delta", "sync_batch", "sync_complete"]
    events = pair.new_events("client")
    assert [type(e).__name__ for e in events] == [
        "SyncBatchReceived",
        "DeltaReceived",
        "SyncBatchReceived",
        "SyncCompleted",
    ]
    assert events[-1] == SyncCompleted(deltas_processed=2, deltas_received=2)


def test_pause_and_resume_require_an_open_link() -> None:
    pair = ProtocolPair()
    with pytest.raises(LocalProtocolError):
        pair.client.pause()
    with pytest.raises(LocalProtocolError):
        pair.server.resume()
    assert not pair.client.paused


@pytest.mark.parametrize("sender", SIDES)
def test_deltas_sent_before_the_handshake_are_held_then_sent(sender: Side) -> None:
    pair = ProtocolPair()
    src = pair.proto(sender)
    src.send_delta(make_delta("early-1"))
    src.send_delta(make_delta("early-2"))
    assert src.held == (make_delta("early-1"), make_delta("early-2"))
    assert src.unacknowledged == ()
    pair.transfer()
    events = pair.new_events(other(sender))
    assert [type(e) for e in events] == [HandshakeComplete, DeltaReceived, DeltaReceived]
    assert [e.delta.id for e in events if isinstance(e, DeltaReceived)] == ["early-1", "early-2"]
    types = [json.loads(m)["type"] for m in pair.sent[sender]]
    first = "hello" if sender == "client" else "hello_ack"
    assert types == [first, "delta", "delta"]
    assert not src.held
    assert len(src.unacknowledged) == 2


# ---------------------------------------------------------------------- heartbeat


def test_ping_interval_timers_and_pong() -> None:
    pair = ProtocolPair(
        client_options={"ping_interval": 30.0, "ping_timeout": 90.0},
        server_options={"ping_interval": 20.0, "ping_timeout": 50.0},
        now=100.0,
    )
    assert pair.client.get_timer() == 130.0
    assert pair.server.get_timer() == 120.0
    pair.handshake()
    pair.take_sent("client"), pair.take_sent("server")
    pair.now = 119.0
    pair.client.handle_timer(119.0)  # early: nothing
    pair.server.handle_timer(119.0)
    assert pair.take_sent("client") == [] and pair.take_sent("server") == []
    pair.now = 120.0
    pair.server.handle_timer(120.0)
    assert wire_types(pair, "server") == ["ping"]
    assert pair.server.get_timer() == 140.0  # next ping (timeout would be at 150)
    pair.inject("client", dumps(sample_messages()["ping"]))
    assert wire_types(pair, "client") == ["pong"]
    assert pair.client.get_timer() == 130.0
    pair.inject("server", dumps(sample_messages()["pong"]))
    assert pair.new_events("server") == [] and pair.new_events("client") == []
    assert pair.take_sent("server") == []  # pong needs no answer
    pair.advance(40.0)  # to 160: server pings at 140, 160; client at 130, 160
    assert pair.now == 160.0
    pair.transfer()
    assert pair.new_events("server") == [] and pair.new_events("client") == []
    assert pair.client.get_timer() == 190.0
    assert pair.server.get_timer() == 180.0


def test_ping_timeout_after_silence() -> None:
    pair = ProtocolPair.opened(client_options={"ping_interval": 30.0, "ping_timeout": 90.0})
    pair.client.send_delta(make_delta("lost"))
    pair.client.messages_to_send()  # the delta is written but never answered
    pair.client.handle_timer(30.0)
    pair.client.handle_timer(60.0)
    assert pair.client.get_timer() == 90.0
    pair.client.handle_timer(89.9)
    assert pair.new_events("client") == []
    pair.client.handle_timer(90.0)
    assert pair.new_events("client") == [
        PingTimeout(silent_for=90.0),
        Closed(code=1006, reason="ping timeout", unsettled=(make_delta("lost"),)),
    ]
    assert pair.client.closed
    assert pair.client.get_timer() is None
    pair.client.handle_timer(1000.0)
    assert pair.new_events("client") == []


def test_the_ping_timeout_fires_at_the_deadline_get_timer_gave() -> None:
    """Found by the state machine: 20.56708414217102 + 60 rounds to a deadline at which
    ``now - last_heard`` is 59.99999999999999, so a check by difference never fired and the
    timer stood still."""
    pair = ProtocolPair.opened(client_options={"ping_interval": 20.0, "ping_timeout": 60.0})
    pair.client.heard_from_peer(20.56708414217102)
    for _ in range(10):
        deadline = pair.client.get_timer()
        if deadline is None:
            break
        pair.client.handle_timer(deadline)
        later = pair.client.get_timer()
        assert later is None or later > deadline
    assert pair.client.closed
    assert [type(e) for e in pair.new_events("client")][-2:] == [PingTimeout, Closed]


def test_any_message_resets_the_heartbeat() -> None:
    pair = ProtocolPair.opened(server_options={"ping_interval": 30.0, "ping_timeout": 90.0})
    pair.server.receive_message(dumps(sample_messages()["pong"]), 80.0)
    pair.server.heard_from_peer(85.0)  # any frame: a WebSocket ping counts
    pair.server.heard_from_peer(10.0)  # time never goes back
    pair.server.handle_timer(30.0)
    pair.server.handle_timer(60.0)
    pair.server.handle_timer(90.0)
    pair.server.handle_timer(120.0)
    pair.server.handle_timer(150.0)
    assert pair.new_events("server") == []
    assert pair.server.get_timer() == 175.0
    pair.server.handle_timer(175.0)
    assert [type(e) for e in pair.new_events("server")] == [PingTimeout, Closed]


def test_no_ping_before_the_handshake_but_the_timer_moves_on() -> None:
    pair = ProtocolPair()
    pair.take_sent("client")
    pair.client.handle_timer(30.0)
    assert pair.take_sent("client") == []
    assert pair.client.get_timer() == 60.0


# ---------------------------------------------------------------------- close


@pytest.mark.parametrize("closer", SIDES)
def test_close_either_side_gives_each_exactly_one_closed(closer: Side) -> None:
    pair = ProtocolPair.opened()
    pair.proto(closer).close()
    pair.proto(closer).close(1001, "again")  # no-op once closing
    assert pair.proto(closer).state is State.CLOSING
    assert pair.proto(closer).get_timer() is None
    pair.transfer()
    for side in SIDES:
        assert pair.new_events(side) == [Closed(code=1000, reason="")]
        assert pair.proto(side).closed
    pair.proto(closer).connection_closed(1006)  # again: nothing
    assert pair.new_events(closer) == []


def test_closed_unsettled_carries_unacked_and_held_deltas_in_order() -> None:
    pair = ProtocolPair.opened()
    pair.server.pause()
    pair.client.send_delta(make_delta("u1"))  # sent before the pause arrives
    pair.transfer()
    pair.client.send_delta(make_delta("h1"))
    pair.client.send_delta(make_delta("h2"))
    assert pair.client.unacknowledged == (make_delta("u1"),)
    assert pair.client.held == (make_delta("h1"), make_delta("h2"))
    pair.client.close(1001, "going away")
    pair.transfer()
    (closed,) = pair.new_events("client")[-1:]
    assert closed == Closed(
        code=1001,
        reason="going away",
        unsettled=(make_delta("u1"), make_delta("h1"), make_delta("h2")),
    )
    assert not pair.client.unacknowledged and not pair.client.held


def test_nothing_after_closed() -> None:
    pair = ProtocolPair.opened()
    pair.client.connection_closed(1006, "lost")
    assert pair.new_events("client") == [Closed(code=1006, reason="lost")]
    for msg in sample_messages().values():
        pair.client.receive_message(dumps(msg), 5.0)
    pair.client.receive_invalid(ErrorCode.MESSAGE_ERROR, "x")
    pair.client.handle_timer(1e6)
    pair.client.ack("x")
    pair.client.nack("x", "y")
    pair.client.close()
    assert pair.client.events() == []
    assert pair.client.messages_to_send() == []
    assert pair.client.next_event() is None


def test_send_error_fatal_starts_closing() -> None:
    pair = ProtocolPair.opened()
    pair.server.send_error(ErrorCode.UNAUTHORIZED, "who are you", fatal=True)
    (sent,) = pair.take_sent("server")
    assert strip_ts(sent) == {
        "type": "error",
        "code": "UNAUTHORIZED",
        "message": "who are you",
        "fatal": True,
    }
    assert pair.server.state is State.CLOSING
    assert pair.server.close_code == 1008
    with pytest.raises(LocalProtocolError):
        pair.server.send_error("X", "again")


def test_send_error_non_fatal() -> None:
    pair = ProtocolPair.opened()
    pair.client.send_error("RATE_LIMITED", "slow down")
    pair.transfer()
    assert pair.new_events("server") == [
        ErrorReceived(code="RATE_LIMITED", message="slow down", fatal=False)
    ]
    assert pair.client.state is State.OPEN


# ---------------------------------------------------------------------- local misuse


def _snapshot(proto: FederationProtocol) -> tuple[Any, ...]:
    return (
        proto.state,
        proto.unacknowledged,
        proto.held,
        proto.unanswered,
        proto.syncing,
        proto.paused,
        proto.peer_paused,
        proto.close_code,
        proto.get_timer(),
    )


MISUSE: list[tuple[str, str, str]] = [
    # (state to reach, side, call)
    ("open", "client", "send_delta_invalid"),
    ("open", "server", "send_delta_invalid"),
    ("handshake", "client", "ack"),
    ("handshake", "server", "nack"),
    ("open", "server", "start_sync"),
    ("open", "server", "send_sync_batch"),
    ("open", "server", "complete_sync"),
    ("open", "server", "reject_sync"),
    ("open", "server", "request_sync"),
    ("open", "client", "start_sync"),
    ("handshake", "client", "request_sync"),
    ("handshake", "client", "pause"),
    ("closing", "client", "send_delta"),
    ("closing", "server", "send_delta"),
    ("closing", "client", "pause"),
    ("closing", "client", "request_sync"),
    ("closing", "server", "send_error"),
    ("closed", "client", "send_delta"),
    ("closed", "server", "resume"),
    ("open", "client", "start"),
    ("open", "server", "start"),
]


def _misuse(proto: FederationProtocol, call: str) -> None:
    if call == "send_delta_invalid":
        proto.send_delta(make_delta("bad", author=""))
    elif call == "send_delta":
        proto.send_delta(make_delta("late"))
    elif call == "ack":
        proto.ack("x")
    elif call == "nack":
        proto.nack("x", "y")
    elif call == "start_sync":
        proto.start_sync(1)
    elif call == "send_sync_batch":
        proto.send_sync_batch([], last=True)
    elif call == "complete_sync":
        proto.complete_sync()
    elif call == "reject_sync":
        proto.reject_sync("no")
    elif call == "request_sync":
        proto.request_sync()
    elif call == "pause":
        proto.pause()
    elif call == "resume":
        proto.resume()
    elif call == "send_error":
        proto.send_error("X", "y")
    elif call == "start":
        proto.start(1.0)
    else:  # pragma: no cover
        raise AssertionError(call)


@pytest.mark.parametrize(("reach", "side", "call"), MISUSE)
def test_local_misuse_raises_and_changes_nothing(reach: str, side: Side, call: str) -> None:
    pair = ProtocolPair() if reach == "handshake" else ProtocolPair.opened()
    proto = pair.proto(side)
    if reach == "handshake":
        pair.take_sent("client")
    if reach in ("closing", "closed"):
        proto.close()
    if reach == "closed":
        proto.connection_closed(1000)
    pair.collect()
    proto.messages_to_send()  # drain what the setup queued
    before = _snapshot(proto)
    with pytest.raises(LocalProtocolError):
        _misuse(proto, call)
    assert _snapshot(proto) == before
    assert proto.messages_to_send() == []
    assert proto.events() == []


def test_start_sync_rejects_bad_numbers() -> None:
    pair = opened()
    pair.client.request_sync()
    pair.transfer()
    with pytest.raises(LocalProtocolError):
        pair.server.start_sync(-1)
    with pytest.raises(LocalProtocolError):
        pair.server.start_sync(3, batch_size=0)
    assert pair.take_sent("server") == []
    pair.server.start_sync(3, batch_size=1)
    assert wire_types(pair, "server") == ["sync_start"]
    pair.server.send_sync_batch([make_delta("a")], last=False)
    with pytest.raises(LocalProtocolError):
        pair.server.complete_sync()  # batches started: the last one must come first
    pair.server.send_sync_batch([make_delta("b")], last=True)
    with pytest.raises(LocalProtocolError):
        pair.server.send_sync_batch([make_delta("c")], last=True)  # after the last one
    pair.server.complete_sync()
    assert wire_types(pair, "server") == ["sync_batch", "sync_batch", "sync_complete"]


def test_constructor_checks() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError):
        FederationProtocol(Role.CLIENT, system_id="", clock=clock)
    with pytest.raises(ValueError):
        FederationProtocol(Role.SERVER, system_id="s", clock=clock)
    with pytest.raises(ValueError):
        FederationProtocol(Role.CLIENT, system_id="s", clock=clock, ping_interval=0)
    with pytest.raises(ValueError):
        FederationProtocol(Role.CLIENT, system_id="s", clock=clock, ping_timeout=-1)


def test_next_event_pops_in_order() -> None:
    server = FederationProtocol(Role.SERVER, system_id="s", clock=FakeClock(), link_id="L")
    server.start(0.0)
    server.receive_message(dumps(sample_messages()["hello"]))
    server.receive_message(dumps(sample_messages()["pause"]))
    assert isinstance(server.next_event(), HandshakeComplete)
    assert server.next_event() == Paused()
    assert server.next_event() is None
    assert server.events() == []


def test_reject_sync_while_paused_drops_the_held_batches_of_that_sync() -> None:
    pair = opened()
    pair.client.request_sync()
    pair.transfer()
    pair.server.start_sync(total_deltas=2, batch_size=1)
    pair.client.pause()
    pair.transfer()
    pair.server.send_sync_batch([make_delta("held-1")], last=False)
    assert pair.server.messages_to_send() == []  # held while the client paused us
    pair.server.reject_sync("storage failed")
    pair.transfer()
    pair.new_events("client")
    pair.client.resume()
    pair.transfer()
    sent = [json.loads(m)["type"] for m in pair.sent["server"]]
    assert "sync_batch" not in sent and sent[-1] == "error"
    assert not any(isinstance(e, ProtocolViolation) for e in pair.new_events("client"))
    assert not pair.client.syncing and not pair.server.syncing
