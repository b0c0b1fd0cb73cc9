"""The codec (v1 and our extensions' messages): round trips, wire names, and how every kind
of bad input is refused."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import rhizome_proto as rp
from rhizome_proto import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    CodecError,
    Delta,
    DeltaAck,
    DeltaFilter,
    DeltaMessage,
    DeltaNack,
    DeltasAck,
    DeltasMessage,
    ErrorCode,
    ErrorMessage,
    FederationConfig,
    Hello,
    HelloAck,
    Pause,
    Ping,
    Pointer,
    Pong,
    ReconnectConfig,
    Reference,
    Resume,
    SyncBatch,
    SyncComplete,
    SyncRequest,
    SyncStart,
    TimestampRange,
    decode,
    encode,
)
from tests.strategies import (
    MESSAGE_STRATEGIES,
    deterministic,
    json_values,
    messages,
)

TS = 1795624086459
DELTA = Delta(
    id="d1",
    timestamp=TS - 1,
    author="alice",
    system="sys-a",
    pointers=(
        Pointer("movie", Reference("m1", "reviews")),
        Pointer("about", Reference("m2")),
        Pointer("text", "très bien"),
        Pointer("rating", 4),
        Pointer("score", 0.5),
        Pointer("seen", True),
    ),
)
DELTA_JSON: dict[str, Any] = {
    "id": "d1",
    "timestamp": TS - 1,
    "author": "alice",
    "system": "sys-a",
    "pointers": [
        {"role": "movie", "target": {"id": "m1", "context": "reviews"}},
        {"role": "about", "target": {"id": "m2"}},
        {"role": "text", "target": "très bien"},
        {"role": "rating", "target": 4},
        {"role": "score", "target": 0.5},
        {"role": "seen", "target": True},
    ],
}
DELTA_2 = Delta(id="d2", timestamp=TS, author="bob", system="sys-b")
DELTA_2_JSON: dict[str, Any] = {
    "id": "d2",
    "timestamp": TS,
    "author": "bob",
    "system": "sys-b",
    "pointers": [],
}

# One message of every class with its exact wire form (camelCase names, absent fields omitted).
EXAMPLES: list[tuple[Any, dict[str, Any]]] = [
    (
        Hello(
            timestamp=TS,
            system_id="client-1",
            config=FederationConfig(
                mode="bidirectional",
                initial_sync="from_timestamp",
                sync_from_timestamp=0,
                push_filter=DeltaFilter(authors=("alice",)),
                pull_filter=DeltaFilter(
                    target_ids=("m1",),
                    target_contexts=("reviews",),
                    timestamp_range=TimestampRange(start=1, end=2.5),
                    include_negated=True,
                ),
                reconnect=ReconnectConfig(
                    enabled=True,
                    max_attempts=5,
                    initial_delay=1000,
                    max_delay=30000,
                    backoff_multiplier=2,
                ),
                trust_policy={"type": "author", "trustedAuthors": ["alice"]},
            ),
        ),
        {
            "type": "hello",
            "timestamp": TS,
            "systemId": "client-1",
            "config": {
                "mode": "bidirectional",
                "initialSync": "from_timestamp",
                "syncFromTimestamp": 0,
                "pushFilter": {"authors": ["alice"]},
                "pullFilter": {
                    "targetIds": ["m1"],
                    "targetContexts": ["reviews"],
                    "timestampRange": {"start": 1, "end": 2.5},
                    "includeNegated": True,
                },
                "reconnect": {
                    "enabled": True,
                    "maxAttempts": 5,
                    "initialDelay": 1000,
                    "maxDelay": 30000,
                    "backoffMultiplier": 2,
                },
                "trustPolicy": {"type": "author", "trustedAuthors": ["alice"]},
            },
            "protocol": PROTOCOL_VERSION,
        },
    ),
    (
        HelloAck(timestamp=TS, system_id="server-1", link_id="link-7"),
        {
            "type": "hello_ack",
            "timestamp": TS,
            "systemId": "server-1",
            "linkId": "link-7",
            "protocol": PROTOCOL_VERSION,
        },
    ),
    (
        DeltaMessage(timestamp=TS, delta=DELTA),
        {"type": "delta", "timestamp": TS, "delta": DELTA_JSON},
    ),
    (
        DeltaAck(timestamp=TS, delta_id="d1"),
        {"type": "delta_ack", "timestamp": TS, "deltaId": "d1"},
    ),
    (
        DeltaNack(timestamp=TS, delta_id="d1", reason="untrusted author: mallory"),
        {
            "type": "delta_nack",
            "timestamp": TS,
            "deltaId": "d1",
            "reason": "untrusted author: mallory",
        },
    ),
    (
        DeltasMessage(timestamp=TS, deltas=(DELTA, DELTA_2)),
        {"type": "deltas", "timestamp": TS, "deltas": [DELTA_JSON, DELTA_2_JSON]},
    ),
    (
        DeltasAck(timestamp=TS, up_to=2),
        {"type": "deltas_ack", "timestamp": TS, "upTo": 2},
    ),
    (
        SyncRequest(
            timestamp=TS,
            filter=DeltaFilter(ids=("d1",), systems=("sys-a",), include_negated=False),
            from_timestamp=12.5,
        ),
        {
            "type": "sync_request",
            "timestamp": TS,
            "filter": {"ids": ["d1"], "systems": ["sys-a"], "includeNegated": False},
            "fromTimestamp": 12.5,
        },
    ),
    (
        SyncStart(timestamp=TS, total_deltas=3, batch_size=100),
        {"type": "sync_start", "timestamp": TS, "totalDeltas": 3, "batchSize": 100},
    ),
    (
        SyncBatch(timestamp=TS, deltas=(DELTA,), batch_number=0, is_last_batch=True),
        {
            "type": "sync_batch",
            "timestamp": TS,
            "deltas": [DELTA_JSON],
            "batchNumber": 0,
            "isLastBatch": True,
        },
    ),
    (
        SyncComplete(timestamp=TS, deltas_processed=3),
        {"type": "sync_complete", "timestamp": TS, "deltasProcessed": 3},
    ),
    (Pause(timestamp=TS), {"type": "pause", "timestamp": TS}),
    (Resume(timestamp=TS), {"type": "resume", "timestamp": TS}),
    (Ping(timestamp=TS), {"type": "ping", "timestamp": TS}),
    (Pong(timestamp=TS), {"type": "pong", "timestamp": TS}),
    (
        ErrorMessage(timestamp=TS, code="PROTOCOL_MISMATCH", message="bad", fatal=True),
        {
            "type": "error",
            "timestamp": TS,
            "code": "PROTOCOL_MISMATCH",
            "message": "bad",
            "fatal": True,
        },
    ),
]
EXAMPLE_IDS = [type(m).__name__ for m, _ in EXAMPLES]

# Keys that hold the peer's free-form JSON: their contents need not be camelCase.
FREE_FORM_KEYS = {"trustPolicy"}
CAMEL_CASE = re.compile(r"^[a-z][a-zA-Z]*$")


def wire_keys(value: Any) -> set[str]:
    """Every object key in a decoded JSON value, not descending into free-form fields."""
    keys: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            keys.add(key)
            if key not in FREE_FORM_KEYS:
                keys |= wire_keys(item)
    elif isinstance(value, list):
        for item in value:
            keys |= wire_keys(item)
    return keys


def example_json(message_type: str) -> dict[str, Any]:
    """A fresh copy of the wire form of the example of ``message_type``."""
    for _, wire in EXAMPLES:
        if wire["type"] == message_type:
            return copy.deepcopy(wire)
    raise KeyError(message_type)


def codec_error(text: str | bytes) -> CodecError:
    with pytest.raises(CodecError) as info:
        decode(text)
    return info.value


# --- round trips -------------------------------------------------------------------------


def test_message_strategies_cover_every_message_class() -> None:
    assert set(MESSAGE_STRATEGIES) == set(MESSAGE_TYPES.values())
    assert len(MESSAGE_TYPES) == 16  # v1's 14, and deltas / deltas_ack (extension batch)
    assert {wire["type"] for _, wire in EXAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("cls", list(MESSAGE_STRATEGIES), ids=lambda c: c.__name__)
@deterministic(max_examples=40)
@given(data=st.data())
def test_every_message_class_round_trips(cls: type[Any], data: st.DataObject) -> None:
    message = data.draw(MESSAGE_STRATEGIES[cls])
    text = encode(message)
    decoded = decode(text)
    assert type(decoded) is cls
    assert decoded == message
    # Equality cannot tell 1 from 1.0 or True; the re-encoded text can.
    assert encode(decoded) == text
    assert type(decoded.timestamp) is type(message.timestamp)


@deterministic()
@given(messages())
def test_any_message_round_trips_through_bytes_too(message: Any) -> None:
    text = encode(message)
    assert decode(text.encode()) == message
    assert decode(text) == message


@deterministic()
@given(messages())
def test_encoded_keys_are_camel_case(message: Any) -> None:
    wire = json.loads(encode(message))
    assert wire["type"] == message.__struct_config__.tag
    bad = {key for key in wire_keys(wire) if not CAMEL_CASE.match(key)}
    assert not bad


@pytest.mark.parametrize(("message", "wire"), EXAMPLES, ids=EXAMPLE_IDS)
def test_encode_uses_the_wire_names(message: Any, wire: dict[str, Any]) -> None:
    assert json.loads(encode(message)) == wire


@pytest.mark.parametrize(("message", "wire"), EXAMPLES, ids=EXAMPLE_IDS)
def test_decode_reads_the_wire_names(message: Any, wire: dict[str, Any]) -> None:
    assert decode(json.dumps(wire)) == message


def test_hello_always_carries_protocol_and_config() -> None:
    # A v1 peer compares `protocol` with its own string and reads `config`: both must be sent
    # even when they hold their default values.
    wire = json.loads(encode(Hello(timestamp=TS, system_id="c")))
    assert wire["protocol"] == PROTOCOL_VERSION
    assert wire["config"] == {}
    ack = json.loads(encode(HelloAck(timestamp=TS, system_id="s", link_id="l")))
    assert ack["protocol"] == PROTOCOL_VERSION


def test_extension_fields_of_the_handshake() -> None:
    hello = Hello(timestamp=TS, system_id="c", extensions=("batch", "credit"), window=500)
    assert json.loads(encode(hello)) == {
        "type": "hello",
        "timestamp": TS,
        "systemId": "c",
        "config": {},
        "protocol": PROTOCOL_VERSION,
        "extensions": ["batch", "credit"],
        "window": 500,
    }
    ack = HelloAck(timestamp=TS, system_id="s", link_id="l", extensions=("credit",), window=7)
    assert json.loads(encode(ack)) == {
        "type": "hello_ack",
        "timestamp": TS,
        "systemId": "s",
        "linkId": "l",
        "protocol": PROTOCOL_VERSION,
        "extensions": ["credit"],
        "window": 7,
    }
    assert decode(encode(hello)) == hello and decode(encode(ack)) == ack
    # absent unless set: a v1 hello has neither field
    assert "window" not in json.loads(encode(Hello(timestamp=TS, system_id="c")))


def test_optional_fields_are_omitted_when_absent() -> None:
    assert json.loads(encode(SyncRequest(timestamp=TS))) == {
        "type": "sync_request",
        "timestamp": TS,
    }
    assert json.loads(encode(ErrorMessage(timestamp=TS, code="X", message="m"))) == {
        "type": "error",
        "timestamp": TS,
        "code": "X",
        "message": "m",
    }
    assert "fatal" in json.loads(
        encode(ErrorMessage(timestamp=TS, code="X", message="m", fatal=False))
    )


def test_int_timestamps_stay_int_and_float_stay_float() -> None:
    as_int = decode(f'{{"type":"ping","timestamp":{TS}}}')
    as_float = decode(f'{{"type":"ping","timestamp":{TS}.5}}')
    whole_float = decode('{"type":"ping","timestamp":5.0}')
    assert type(as_int.timestamp) is int and as_int.timestamp == TS
    assert type(as_float.timestamp) is float and as_float.timestamp == TS + 0.5
    assert type(whole_float.timestamp) is float
    assert encode(whole_float) == '{"type":"ping","timestamp":5.0}'
    assert encode(as_int) == f'{{"type":"ping","timestamp":{TS}}}'

    delta_json = json.dumps(DELTA_JSON | {"timestamp": 7.0})
    message = decode(f'{{"type":"delta","timestamp":1,"delta":{delta_json}}}')
    assert isinstance(message, DeltaMessage)
    assert type(message.delta.timestamp) is float
    assert type(message.timestamp) is int
    assert json.loads(encode(message))["delta"]["timestamp"] == 7.0


def test_pointer_targets_keep_their_json_type() -> None:
    message = decode(json.dumps({"type": "delta", "timestamp": TS, "delta": DELTA_JSON}))
    assert isinstance(message, DeltaMessage)
    targets = [p.target for p in message.delta.pointers]
    assert [type(t) for t in targets] == [Reference, Reference, str, int, float, bool]
    assert targets[1] == Reference("m2") and targets[1].context is None


def test_unknown_extra_fields_are_ignored() -> None:
    for message, wire in EXAMPLES:
        extended = wire | {
            "laterExtension": ["x"],
            "someFutureField": {"nested": [1, 2, None]},
            "x": None,
        }
        assert decode(json.dumps(extended)) == message
    # ... on a delta, too (they are dropped), but for our ``signature``, which is kept
    delta = DELTA_JSON | {"comment": "abc", "extra": [1]}
    decoded = decode(json.dumps({"type": "delta", "timestamp": TS, "delta": delta}))
    assert isinstance(decoded, DeltaMessage)
    assert decoded.delta == DELTA
    assert "comment" not in encode(decoded) and "signature" not in encode(decoded)
    signed = decode(
        json.dumps({"type": "delta", "timestamp": TS, "delta": delta | {"signature": "s"}})
    )
    assert isinstance(signed, DeltaMessage) and signed.delta.signature == "s"
    assert '"signature":"s"' in encode(signed)


# --- nothing but CodecError escapes --------------------------------------------------------


def assert_decodes_or_codec_error(text: str | bytes) -> None:
    try:
        message = decode(text)
    except CodecError as exc:
        assert isinstance(exc.code, ErrorCode)
        return
    assert type(message) in MESSAGE_TYPES.values()
    assert decode(encode(message)) == message


@deterministic(max_examples=200)
@given(st.text())
def test_arbitrary_text_raises_only_codec_error(text: str) -> None:
    assert_decodes_or_codec_error(text)


@deterministic(max_examples=200)
@given(st.binary())
def test_arbitrary_bytes_raise_only_codec_error(data: bytes) -> None:
    assert_decodes_or_codec_error(data)


@deterministic(max_examples=200)
@given(json_values(finite=False))
def test_arbitrary_json_values_raise_only_codec_error(value: Any) -> None:
    # allow_nan: json.dumps writes NaN/Infinity literals for non-finite floats.
    assert_decodes_or_codec_error(json.dumps(value, allow_nan=True))


WIRE_FIELD_NAMES = sorted(wire_keys([wire for _, wire in EXAMPLES]) - {"type"})


@deterministic(max_examples=150)
@given(
    st.sampled_from(sorted(MESSAGE_TYPES)),
    st.dictionaries(
        st.sampled_from(WIRE_FIELD_NAMES) | st.text(max_size=6).filter(lambda k: k != "type"),
        json_values(),
        max_size=6,
    ),
)
def test_typed_objects_with_random_fields_raise_only_codec_error(
    message_type: str, fields: dict[str, Any]
) -> None:
    text = json.dumps({"type": message_type, **fields}, allow_nan=False)
    try:
        message = decode(text)
    except CodecError as exc:
        assert exc.message_type == message_type
        assert exc.code in (ErrorCode.MESSAGE_ERROR, ErrorCode.INVALID_DELTA)
        return
    assert type(message) is MESSAGE_TYPES[message_type]
    assert decode(encode(message)) == message


@deterministic(max_examples=120)
@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.data())
def test_valid_messages_with_one_field_replaced_raise_only_codec_error(
    message_type: str, data: st.DataObject
) -> None:
    wire = example_json(message_type)
    key = data.draw(st.sampled_from(sorted(wire)))
    wire[key] = data.draw(json_values(finite=False))
    assert_decodes_or_codec_error(json.dumps(wire, allow_nan=True))


# --- error codes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "not json",
        '{"type": "ping", "timestamp": 1',
        '{"type": "ping", "timestamp": 1}}',
        '{"type": "ping", "timestamp": 1} x',
        "{'type': 'ping', 'timestamp': 1}",
        '{"type": "ping", "timestamp": 01}',
        '{"type": "ping", "timestamp": 1,}',
    ],
)
def test_not_json_is_message_error(text: str) -> None:
    error = codec_error(text)
    assert error.code == ErrorCode.MESSAGE_ERROR
    assert error.delta_id is None


@pytest.mark.parametrize(
    "text", ["[]", '[{"type": "ping", "timestamp": 1}]', '"ping"', "1", "null", "true"]
)
def test_not_an_object_is_message_error(text: str) -> None:
    error = codec_error(text)
    assert error.code == ErrorCode.MESSAGE_ERROR
    assert error.message_type is None


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        '{"timestamp": 1}',
        '{"type": null, "timestamp": 1}',
        '{"type": 7, "timestamp": 1}',
        '{"type": ["ping"], "timestamp": 1}',
        '{"Type": "ping", "timestamp": 1}',
    ],
)
def test_no_type_is_message_error(text: str) -> None:
    error = codec_error(text)
    assert error.code == ErrorCode.MESSAGE_ERROR
    assert error.message_type is None


@pytest.mark.parametrize("message_type", ["PING", "hello-ack", "", "batch", "sync_batches", "é"])
def test_unknown_type_is_unknown_message_type(message_type: str) -> None:
    error = codec_error(json.dumps({"type": message_type, "timestamp": 1}))
    assert error.code == ErrorCode.UNKNOWN_MESSAGE_TYPE
    assert error.message_type == message_type
    assert error.delta_id is None


def test_unknown_type_is_reported_even_without_timestamp() -> None:
    error = codec_error('{"type": "gossip"}')
    assert error.code == ErrorCode.UNKNOWN_MESSAGE_TYPE
    assert error.message_type == "gossip"


@pytest.mark.parametrize(
    ("message_type", "field", "value"),
    [
        ("hello", "systemId", 5),
        ("hello", "systemId", ""),
        ("hello", "config", "bidirectional"),
        ("hello", "protocol", None),
        ("hello", "window", 0),
        ("hello", "window", 1.5),
        ("hello", "window", "10"),
        ("hello_ack", "linkId", 1),
        ("hello_ack", "window", -1),
        ("deltas", "deltas", {}),
        ("deltas", "deltas", []),
        ("deltas", "deltas", "d1"),
        ("deltas_ack", "upTo", -1),
        ("deltas_ack", "upTo", "3"),
        ("deltas_ack", "upTo", 2.5),
        ("delta_ack", "deltaId", None),
        ("delta_nack", "reason", ["no"]),
        ("sync_request", "filter", []),
        ("sync_request", "fromTimestamp", "0"),
        ("sync_start", "totalDeltas", -1),
        ("sync_start", "batchSize", 0),
        ("sync_start", "totalDeltas", 1.5),
        ("sync_batch", "deltas", {}),
        ("sync_batch", "isLastBatch", "true"),
        ("sync_batch", "batchNumber", None),
        ("sync_complete", "deltasProcessed", "3"),
        ("error", "fatal", 1),
        ("error", "code", None),
    ],
)
def test_wrong_field_types_are_message_error(message_type: str, field: str, value: Any) -> None:
    wire = example_json(message_type)
    wire[field] = value
    error = codec_error(json.dumps(wire))
    assert error.code == ErrorCode.MESSAGE_ERROR
    assert error.message_type == message_type
    assert field in str(error)


@pytest.mark.parametrize(
    ("message_type", "field"),
    [
        ("hello", "systemId"),
        ("hello_ack", "systemId"),
        ("hello_ack", "linkId"),
        ("delta", "delta"),
        ("delta_ack", "deltaId"),
        ("delta_nack", "reason"),
        ("deltas", "deltas"),
        ("deltas_ack", "upTo"),
        ("sync_start", "batchSize"),
        ("sync_batch", "deltas"),
        ("sync_batch", "isLastBatch"),
        ("sync_complete", "deltasProcessed"),
        ("error", "code"),
        ("error", "message"),
    ],
)
def test_missing_required_field_is_message_error(message_type: str, field: str) -> None:
    wire = example_json(message_type)
    del wire[field]
    error = codec_error(json.dumps(wire))
    assert error.code == ErrorCode.MESSAGE_ERROR
    assert error.message_type == message_type
    assert field in str(error)


def test_invalid_delta_in_a_sync_batch_is_message_error() -> None:
    wire = example_json("sync_batch")
    wire["deltas"][0]["author"] = ""
    error = codec_error(json.dumps(wire))
    assert error.code == ErrorCode.MESSAGE_ERROR
    assert error.message_type == "sync_batch"
    assert "$.deltas[0].author" in str(error)


@pytest.mark.parametrize("message_type", sorted(MESSAGE_TYPES))
@pytest.mark.parametrize(
    "timestamp", ["missing", 0, 0.0, -1, -0.5, None, "1", True, [1], 2**53, 1e300]
)
def test_bad_message_timestamp_is_rejected(message_type: str, timestamp: Any) -> None:
    wire = example_json(message_type)
    if timestamp == "missing":
        del wire["timestamp"]
    else:
        wire["timestamp"] = timestamp
    error = codec_error(json.dumps(wire))
    assert error.code == ErrorCode.MESSAGE_ERROR
    assert error.message_type == message_type
    assert "timestamp" in str(error)


def test_largest_timestamp_is_accepted() -> None:
    assert decode(f'{{"type":"ping","timestamp":{2**53 - 1}}}') == Ping(timestamp=2**53 - 1)
    assert decode('{"type":"ping","timestamp":5e-324}') == Ping(timestamp=5e-324)


INVALID_DELTAS_WITH_ID: list[tuple[dict[str, Any], str]] = [
    ({"author": ""}, "$.delta.author"),
    ({"system": ""}, "$.delta.system"),
    ({"author": 3}, "$.delta.author"),
    ({"timestamp": 0}, "$.delta.timestamp"),
    ({"timestamp": -1.5}, "$.delta.timestamp"),
    ({"timestamp": "now"}, "$.delta.timestamp"),
    ({"timestamp": 2**53}, "$.delta.timestamp"),
    ({"pointers": None}, "$.delta.pointers"),
    ({"pointers": {"role": "r", "target": 1}}, "$.delta.pointers"),
    ({"pointers": [{"role": "", "target": 1}]}, "$.delta.pointers[0].role"),
    ({"pointers": [{"target": 1}]}, "$.delta.pointers[0]"),
    ({"pointers": [{"role": "r", "target": 1}, {"role": "r"}]}, "$.delta.pointers[1]"),
    ({"pointers": [{"role": "r", "target": None}]}, "$.delta.pointers[0].target"),
    ({"pointers": [{"role": "r", "target": [1]}]}, "$.delta.pointers[0].target"),
    ({"pointers": [{"role": "r", "target": {"a": 1}}]}, "$.delta.pointers[0].target"),
    ({"pointers": [{"role": "r", "target": {"id": ""}}]}, "$.delta.pointers[0].target.id"),
    (
        {"pointers": [{"role": "r", "target": {"id": "x", "context": ""}}]},
        "$.delta.pointers[0].target.context",
    ),
    (
        {"pointers": [{"role": "r", "target": {"id": "x", "context": "c", "more": 1}}]},
        "$.delta.pointers[0].target",
    ),
    (
        {"pointers": [{"role": "r", "target": {"id": {"id": "x"}}}]},
        "$.delta.pointers[0].target.id",
    ),
]


@pytest.mark.parametrize(("change", "path"), INVALID_DELTAS_WITH_ID)
def test_invalid_delta_with_readable_id(change: dict[str, Any], path: str) -> None:
    wire = {"type": "delta", "timestamp": TS, "delta": DELTA_JSON | change}
    error = codec_error(json.dumps(wire))
    assert error.code == ErrorCode.INVALID_DELTA
    assert error.message_type == "delta"
    assert error.delta_id == "d1"
    assert f"`{path}`" in str(error)


@pytest.mark.parametrize(
    "delta",
    [
        DELTA_JSON | {"id": ""},
        DELTA_JSON | {"id": 7},
        DELTA_JSON | {"id": None},
        {key: value for key, value in DELTA_JSON.items() if key != "id"},
        {key: value for key, value in DELTA_JSON.items() if key != "id"} | {"author": ""},
        None,
        "d1",
        ["d1"],
    ],
)
def test_invalid_delta_with_unreadable_id(delta: Any) -> None:
    error = codec_error(json.dumps({"type": "delta", "timestamp": TS, "delta": delta}))
    assert error.code == ErrorCode.INVALID_DELTA
    assert error.message_type == "delta"
    assert error.delta_id is None


def test_invalid_deltas_in_a_deltas_message_are_judged_one_by_one() -> None:
    wire = example_json("deltas")
    wire["deltas"] = [
        DELTA_JSON,
        DELTA_JSON | {"id": "bad-1", "author": ""},
        7,
        {"author": "x"},
        DELTA_2_JSON,
    ]
    error = codec_error(json.dumps(wire))
    assert error.code == ErrorCode.INVALID_DELTA
    assert error.message_type == "deltas"
    assert error.delta_id is None
    assert "`$.deltas[1].author`" in str(error)
    assert error.items is not None
    first, bad, seven, no_id, last = error.items
    assert (first, last) == (DELTA, DELTA_2)
    assert isinstance(bad, CodecError) and isinstance(seven, CodecError)
    assert isinstance(no_id, CodecError)
    assert [(e.code, e.message_type, e.delta_id) for e in (bad, seven, no_id)] == [
        (ErrorCode.INVALID_DELTA, "deltas", "bad-1"),
        (ErrorCode.INVALID_DELTA, "deltas", None),
        (ErrorCode.INVALID_DELTA, "deltas", None),
    ]
    assert str(bad) == "invalid delta: Expected `str` of length >= 1 - at `$.deltas[1].author`"
    assert str(seven) == "invalid delta: Expected `object`, got `int` - at `$.deltas[2]`"
    assert "`$.deltas[3]`" in str(no_id) and "id" in str(no_id)


@pytest.mark.parametrize(
    "wire",
    [
        {"type": "deltas", "timestamp": 0, "deltas": [{"id": "x"}]},
        {"type": "deltas", "deltas": [{"id": "x"}]},
        {"type": "deltas", "timestamp": TS, "deltas": [{"id": "x"}], "extra": 1}
        | {"timestamp": "1"},
    ],
)
def test_a_deltas_message_with_a_bad_envelope_is_refused_whole(wire: dict[str, Any]) -> None:
    error = codec_error(json.dumps(wire))
    assert error.code == ErrorCode.MESSAGE_ERROR
    assert error.message_type == "deltas"
    assert error.items is None and error.delta_id is None


def test_the_errors_of_v1_messages_have_no_items() -> None:
    wire = {"type": "delta", "timestamp": TS, "delta": DELTA_JSON | {"author": ""}}
    assert codec_error(json.dumps(wire)).items is None
    batch = example_json("sync_batch")
    batch["deltas"][0]["author"] = ""
    assert codec_error(json.dumps(batch)).items is None


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"ping","timestamp":NaN}',
        '{"type":"ping","timestamp":Infinity}',
        '{"type":"ping","timestamp":-Infinity}',
        '{"type":"ping","timestamp":1e400}',
        '{"type":"ping","timestamp":1, "x": NaN}',
        '{"type":"sync_request","timestamp":1,"fromTimestamp":1e400}',
        '{"type":"hello","timestamp":1,"systemId":"c","config":{"trustPolicy":{"n":Infinity}}}',
        '{"type":"hello","timestamp":1,"systemId":"c","config":{"trustPolicy":{"n":-1e999}}}',
        '{"type":"ping","timestamp":' + "9" * 30 + "}",
        '{"type":"ping","timestamp":-' + "9" * 30 + "}",
        '{"type":"sync_complete","timestamp":1,"deltasProcessed":' + "9" * 5000 + "}",
        '{"type":"ping","timestamp":' + "9" * 100_000 + "}",
        '{"type":"hello","timestamp":1,"systemId":"c","config":{"trustPolicy":{"n":'
        + "9" * 100_000
        + "}}}",
    ],
)
def test_non_finite_and_huge_numbers_are_codec_errors(text: str) -> None:
    assert codec_error(text).code == ErrorCode.MESSAGE_ERROR


def test_huge_number_in_a_delta_is_refused() -> None:
    delta = json.dumps(DELTA_JSON).replace('"target": 4', '"target": 1e400')
    assert "1e400" in delta
    codec_error(f'{{"type":"delta","timestamp":1,"delta":{delta}}}')


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_deep_nesting_is_a_codec_error(depth: int, opening: str) -> None:
    closing = "]" if opening == "[" else "}"
    nested = opening * depth + "1" + closing * depth
    for text in (
        nested,
        f'{{"type":"ping","timestamp":1,"x":{nested}}}',
        f'{{"type":"hello","timestamp":1,"systemId":"c","config":{{"trustPolicy":{{"p":{nested}}}}}}}',
    ):
        assert codec_error(text).code == ErrorCode.MESSAGE_ERROR
        assert codec_error(text.encode()).code == ErrorCode.MESSAGE_ERROR


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"error","timestamp":1,"code":"\\ud800","message":"m"}',
        '{"type":"error","timestamp":1,"code":"\\udc00","message":"m"}',
        '{"type":"error","timestamp":1,"code":"\\ud800\\u0041","message":"m"}',
        '{"type":"ping","timestamp":1,"x":"\\udfff"}',
        '{"type":"error","timestamp":1,"code":"\ud800","message":"m"}',
        '{"type":"ping","timestamp":1,"x":"\udc80"}',
        '{"type":"pi\ud800ng","timestamp":1}',
    ],
)
def test_lone_surrogates_are_codec_errors(text: str) -> None:
    assert codec_error(text).code == ErrorCode.MESSAGE_ERROR


def test_escaped_surrogate_pair_is_fine() -> None:
    message = decode('{"type":"error","timestamp":1,"code":"\\ud83d\\ude00","message":"m"}')
    assert isinstance(message, ErrorMessage)
    assert message.code == "\N{GRINNING FACE}"


@pytest.mark.parametrize(
    "data",
    [
        b"\xff",
        b'{"type":"pi\xffng","timestamp":1}',
        b'{"type":"error","timestamp":1,"code":"\xff","message":"m"}',
        b'{"type":"error","timestamp":1,"code":"\xed\xa0\x80","message":"m"}',
        b'{"type":"error","timestamp":1,"code":"c","message":"\xc0\xaf"}',
        b'{"type":"ping","timestamp":1\x00}',
        b'\xef\xbb\xbf{"type":"ping","timestamp":1}',
    ],
)
def test_invalid_utf8_bytes_are_codec_errors(data: bytes) -> None:
    assert codec_error(data).code == ErrorCode.MESSAGE_ERROR


def test_codec_error_is_a_value_error_with_defaults() -> None:
    error = CodecError("boom")
    assert isinstance(error, ValueError)
    assert error.code == ErrorCode.MESSAGE_ERROR
    assert error.message_type is None and error.delta_id is None


def test_public_names() -> None:
    assert rp.decode is decode and rp.encode is encode
    assert MESSAGE_TYPES["delta"] is DeltaMessage
    assert MESSAGE_TYPES["deltas"] is DeltasMessage
    assert MESSAGE_TYPES["deltas_ack"] is DeltasAck
    assert rp.DeltasMessage is DeltasMessage and rp.DeltasAck is DeltasAck
    assert MESSAGE_TYPES["error"] is ErrorMessage
