"""The invariants checked on arbitrary input, as plain functions (no atheris needed): the
atheris targets (fuzz/fuzz_*.py) and the test suite call them.

Codec: ``check_codec(data)`` — ``decode`` returns a message that round-trips exactly, or raises
a well-formed ``CodecError``. Connection: the ``check_*`` functions below are asserted by the
harness (fuzz/harness.py) after every call it makes on a ``FederationConnection`` fed
arbitrary bytes: ``receive_data`` raises nothing but ``RemoteProtocolError`` (and then the
link is closing), the other calls raise nothing, no event follows ``Closed``, exactly one
``Closed`` once the stream ended, a timer always moves on, and with extension ``credit`` no
more than the peer's window is in flight. Each function returns (the invariant holds) or
raises ``AssertionError``; nothing here catches more than the documented ``CodecError``.
"""

from __future__ import annotations

import json
from typing import Any

import rhizome_proto
from fuzz.seeds import DICTIONARY, VECTORS, seed_inputs
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
    Event,
    FederationConnection,
    Hello,
    HelloAck,
    Pause,
    Ping,
    Pong,
    RemoteProtocolError,
    Resume,
    State,
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
    "check_ended",
    "check_error",
    "check_event",
    "check_message",
    "check_output",
    "check_remote_error",
    "check_timer",
    "seed_inputs",
]


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
# FederationConnection


def check_event(event: object, closed_before: int) -> None:
    """Every event is an ``Event``, and none follows ``Closed``."""
    assert isinstance(event, Event), event
    assert closed_before == 0, f"{event!r} after Closed"


def check_output(conn: FederationConnection, out: object) -> None:
    """After taking the output: bytes; with ``credit`` never more than the peer's window in
    flight; once closed, the transport is to be closed and no timer runs."""
    assert isinstance(out, bytes)
    window = conn.send_window
    if window is not None:
        assert len(conn.unacknowledged) <= window
    if conn.closed:
        assert conn.should_close
        assert conn.get_timer() is None


def check_remote_error(conn: FederationConnection, exc: RemoteProtocolError) -> None:
    """A fatal error of the peer carries a code, and the link is closing or closed."""
    assert isinstance(exc.code, ErrorCode)
    assert conn.state in (State.CLOSING, State.CLOSED), conn.state


def check_timer(fired_at: float, later: float | None) -> None:
    """``handle_timer`` always moves its deadline on (no busy loop)."""
    assert later is None or later > fired_at, (fired_at, later)


def check_ended(conn: FederationConnection, closed: int) -> None:
    """Once the stream ended: exactly one ``Closed``, and the transport is to be closed."""
    assert closed == 1, closed
    assert conn.should_close
