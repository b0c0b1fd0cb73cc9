"""Wire vectors recorded from the TypeScript reference: we read them and write them back alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rhizome_proto import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    CodecError,
    DeltaAck,
    DeltaMessage,
    ErrorCode,
    ErrorMessage,
    Hello,
    HelloAck,
    Ping,
    Pong,
    Reference,
    SyncBatch,
    SyncComplete,
    SyncRequest,
    SyncStart,
    decode,
    encode,
    validate_delta,
)

VECTORS = Path(__file__).parent / "vectors"


def load_lines(name: str) -> list[dict[str, Any]]:
    with (VECTORS / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


SESSION = load_lines("reference-session.jsonl")
ANNOTATED = load_lines("reference-session-annotated.jsonl")
SESSION_MESSAGES = [entry["msg"] for entry in SESSION]
ANNOTATED_MESSAGES = [entry["msg"] for entry in ANNOTATED if "msg" in entry]


def message_id(msg: dict[str, Any]) -> str:
    return str(msg["type"])


def test_the_recordings_are_there() -> None:
    assert len(SESSION_MESSAGES) == 22
    assert len(ANNOTATED_MESSAGES) == len(SESSION_MESSAGES)
    # The annotated file interleaves other lines (steps, events) with the same messages.
    assert len(ANNOTATED) > len(ANNOTATED_MESSAGES)
    assert ANNOTATED_MESSAGES == SESSION_MESSAGES
    assert {entry["dir"] for entry in SESSION} == {"c2s", "s2c"}


@pytest.mark.parametrize("msg", SESSION_MESSAGES, ids=message_id)
def test_session_messages_decode_and_reencode_identically(msg: dict[str, Any]) -> None:
    text = json.dumps(msg, separators=(",", ":"), ensure_ascii=False)
    message = decode(text)
    assert type(message) is MESSAGE_TYPES[msg["type"]]
    assert json.loads(encode(message)) == msg
    assert decode(text.encode()) == message


@pytest.mark.parametrize("msg", ANNOTATED_MESSAGES, ids=message_id)
def test_annotated_messages_decode_and_reencode_identically(msg: dict[str, Any]) -> None:
    message = decode(json.dumps(msg))
    assert type(message) is MESSAGE_TYPES[msg["type"]]
    assert json.loads(encode(message)) == msg


def test_non_message_lines_are_not_messages() -> None:
    for entry in ANNOTATED:
        if "msg" not in entry:
            with pytest.raises(CodecError):
                decode(json.dumps(entry))


def test_the_recording_has_every_v1_type_but_delta_nack() -> None:
    recorded = {msg["type"] for msg in SESSION_MESSAGES}
    # deltas and deltas_ack are ours (extension batch): the reference never sends them
    assert recorded == set(MESSAGE_TYPES) - {"delta_nack", "deltas", "deltas_ack"}


def decoded(index: int) -> Any:
    return decode(json.dumps(SESSION_MESSAGES[index]))


def test_hello() -> None:
    hello = decoded(0)
    assert isinstance(hello, Hello)
    assert hello.system_id == "ref-client-001"
    assert hello.protocol == PROTOCOL_VERSION
    assert hello.config.mode == "bidirectional"
    assert hello.config.initial_sync == "full"
    assert hello.config.reconnect is not None
    assert hello.config.reconnect.enabled is True
    assert hello.config.reconnect.max_attempts == 5
    assert hello.config.reconnect.backoff_multiplier == 2
    assert hello.config.push_filter is None and hello.config.trust_policy is None
    assert type(hello.timestamp) is int and hello.timestamp == 1795624086459


def test_hello_ack_and_sync() -> None:
    ack = decoded(1)
    assert isinstance(ack, HelloAck)
    assert ack.link_id == "6ca716cb-ade3-4f83-847f-3f1fc7ec1503"
    request = decoded(2)
    assert isinstance(request, SyncRequest)
    assert request.filter is None and request.from_timestamp is None
    start = decoded(3)
    assert isinstance(start, SyncStart)
    assert (start.total_deltas, start.batch_size) == (3, 100)
    complete = decoded(5)
    assert isinstance(complete, SyncComplete) and complete.deltas_processed == 3


def test_sync_batch() -> None:
    batch = decoded(4)
    assert isinstance(batch, SyncBatch)
    assert len(batch.deltas) == 3
    assert batch.is_last_batch is True
    assert batch.batch_number == 0
    first = batch.deltas[0]
    assert first.author == "server-author" and first.system == "ref-server-001"
    movie, text, rating = first.pointers
    assert movie.target == Reference("movie-db6410f9-0583-4a18-a959-b88d091ab0f7", "reviews")
    assert text.target == "great great great review #0"
    assert rating.role == "rating"
    assert rating.target == 1 and type(rating.target) is int
    assert [len(d.pointers) for d in batch.deltas] == [3, 2, 3]
    assert [validate_delta(d) for d in batch.deltas] == list(batch.deltas)


def test_live_delta_and_ack() -> None:
    message = decoded(6)
    assert isinstance(message, DeltaMessage)
    ack = decoded(7)
    assert isinstance(ack, DeltaAck)
    assert ack.delta_id == message.delta.id == "e3c88926-2261-40ec-bbd8-c75bbdfb6caa"


def test_ping_pong() -> None:
    assert isinstance(decoded(-4), Ping)
    assert isinstance(decoded(-3), Pong)


def test_protocol_mismatch() -> None:
    bad_hello = decoded(-2)
    assert isinstance(bad_hello, Hello)
    assert bad_hello.protocol == "rhizomedb-federation-v0"
    error = decoded(-1)
    assert isinstance(error, ErrorMessage)
    assert error.code == ErrorCode.PROTOCOL_MISMATCH
    assert error.fatal is True
    assert error.message == "Unsupported protocol: rhizomedb-federation-v0"
