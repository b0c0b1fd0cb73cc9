"""The connection fuzzing invariants (fuzz/invariants.py, driven by fuzz/harness.py) under
Hypothesis, so CI covers them even where atheris does not build: arbitrary bytes, the seeds,
seeds mutated byte by byte, and frames made by a raw wsproto peer then mutated.

Setup byte (the first of each input; see ``fuzz.harness._Options``): 0x01 upgrade already
done (server) / ``hello_ack`` already received (client), 0x02 ``hello`` already received
(server), 0x04 compression, 0x08 a 256-byte size limit, 0x10 the client requested a sync,
0x20 we paused the peer, 0x40 a delta of ours is pending (three with 0x80), 0x80 we speak the
``batch`` and ``credit`` extensions with a receive window of 3 (and the ``hello`` /
``hello_ack`` fed by 0x01 / 0x02 agree to them, with a window of 2). The second byte places
the chunk boundaries.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from fuzz.harness import (
    check_client_connection,
    check_server_connection,
    run_client_connection,
    run_server_connection,
)
from fuzz.seeds import (
    DICTIONARY,
    UPGRADE_REQUEST,
    batch_messages,
    client_seed_inputs,
    masked_frame,
    server_seed_inputs,
)
from rhizome_proto import Closed, DeltaReceived, HandshakeComplete, ProtocolViolation
from tests.harness import RawClient, RawServer, delta_json, dumps, reference_session
from tests.strategies import deterministic

SERVER_SEEDS = server_seed_inputs()
CLIENT_SEEDS = client_seed_inputs()

#: inputs that once broke the invariant (found by the atheris targets)
REGRESSIONS: list[tuple[str, bytes]] = [
    # a WebSocket ping arriving after our close frame: answering it raised inside wsproto
    ("client", b"\x00\xa7\x82\x01\x00\x89\x01p"),
    ("server", b"\x01\xa7" + masked_frame(b"\x00", opcode=0x2) + masked_frame(b"p", opcode=0x9)),
    # a non-ASCII byte in the Connection header: wsproto raised UnicodeDecodeError
    (
        "server",
        b"\x00\x00" + UPGRADE_REQUEST.replace(b"Connection: Upgrade", b"Connection: Up\xba"),
    ),
]

CHECKS: dict[str, Callable[[bytes], None]] = {
    "server": check_server_connection,
    "client": check_client_connection,
}


def test_seeds_reach_deep_states() -> None:
    """The seeds are useful starting points: they open the link and deliver deltas."""
    for run, seeds in (
        (run_server_connection, SERVER_SEEDS),
        (run_client_connection, CLIENT_SEEDS),
    ):
        kinds = [{type(e) for e in run(seed)} for seed in seeds]
        assert all(Closed in k for k in kinds)
        assert sum(HandshakeComplete in k for k in kinds) >= len(seeds) - 1
        assert any(DeltaReceived in k for k in kinds)
        assert any(ProtocolViolation in k for k in kinds)


def test_the_reference_session_as_a_seed() -> None:
    events = run_server_connection(SERVER_SEEDS[0])
    assert [type(e).__name__ for e in events] == [
        "HandshakeComplete",
        "SyncRequested",
        "DeltaReceived",
        "Paused",
        "Resumed",
        "DeltaReceived",
        "Closed",
    ]
    assert events[-1] == Closed(code=1000, reason="bye")
    client_events = run_client_connection(CLIENT_SEEDS[1])
    assert [type(e).__name__ for e in client_events][:4] == [
        "HandshakeComplete",
        "SyncStarted",
        "SyncBatchReceived",
        "SyncCompleted",
    ]


def test_the_batch_seeds_reach_the_extensions() -> None:
    server = run_server_connection(SERVER_SEEDS[-2])
    client = run_client_connection(CLIENT_SEEDS[-1])
    for events in (server, client):
        first = events[0]
        assert isinstance(first, HandshakeComplete)
        assert first.extensions == frozenset({"batch", "credit"})
        assert [e.code for e in events if isinstance(e, ProtocolViolation)] == [
            "FLOW_CONTROL",  # 5 deltas in flight, window 3
            "INVALID_DELTA",  # answered with delta_nack
            "INVALID_DELTA",  # its id cannot be read
            "FLOW_CONTROL",  # back within the window, then beyond it again
            "MESSAGE_ERROR",  # a deltas message needs at least one delta
        ]
        assert [type(e).__name__ for e in events].count("DeltaReceived") == 7
        assert isinstance(events[-1], Closed)
    # without the extensions, the same messages are unexpected
    plain = run_server_connection(SERVER_SEEDS[-1])
    assert [e.code for e in plain if isinstance(e, ProtocolViolation)] == [
        "UNEXPECTED_MESSAGE"
    ] * 5 + ["MESSAGE_ERROR"]


def test_frames_right_behind_the_upgrade_request_are_not_lost() -> None:
    hello = masked_frame(b'{"type":"hello","timestamp":1,"systemId":"x","config":{}}')
    events = run_server_connection(b"\x00\x00" + UPGRADE_REQUEST + hello)
    assert [type(e) for e in events] == [HandshakeComplete, Closed]


@pytest.mark.parametrize("seed", SERVER_SEEDS)
def test_server_seeds(seed: bytes) -> None:
    check_server_connection(seed)


@pytest.mark.parametrize("seed", CLIENT_SEEDS)
def test_client_seeds(seed: bytes) -> None:
    check_client_connection(seed)


@pytest.mark.parametrize(("role", "data"), REGRESSIONS)
def test_regressions(role: str, data: bytes) -> None:
    CHECKS[role](data)


@deterministic(max_examples=200)
@given(st.binary(max_size=600))
def test_server_arbitrary_bytes(data: bytes) -> None:
    check_server_connection(data)


@deterministic(max_examples=200)
@given(st.binary(max_size=600))
def test_client_arbitrary_bytes(data: bytes) -> None:
    check_client_connection(data)


def _mutate(draw: st.DrawFn, data: bytearray, keep: int) -> bytes:
    """A few byte-level edits past the first ``keep`` bytes, as a mutational fuzzer does."""
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        position = draw(st.integers(min_value=keep, max_value=max(keep, len(data))))
        action = draw(st.sampled_from(["flip", "insert", "delete", "token", "truncate", "dup"]))
        if action == "flip" and position < len(data):
            data[position] = draw(st.integers(min_value=0, max_value=255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif action == "delete":
            del data[position : position + draw(st.integers(min_value=1, max_value=8))]
        elif action == "token":
            data[position:position] = draw(st.sampled_from(DICTIONARY)).encode()
        elif action == "truncate":
            del data[position:]
        elif action == "dup":
            data[position:position] = data[position : position + 16]
    return bytes(data)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    if draw(st.booleans()):
        data[0] = draw(st.integers(min_value=0, max_value=255))  # another setup
        data[1] = draw(st.integers(min_value=0, max_value=255))  # other chunks
    return _mutate(draw, data, keep=2)


@deterministic(max_examples=200)
@given(mutated(SERVER_SEEDS))
def test_server_mutated_seeds(data: bytes) -> None:
    check_server_connection(data)


@deterministic(max_examples=200)
@given(mutated(CLIENT_SEEDS))
def test_client_mutated_seeds(data: bytes) -> None:
    check_client_connection(data)


# ---------------------------------------------------------------------- frames from raw wsproto


def _raw_frames(from_client: bool) -> list[bytes]:
    """Valid frames of every kind, as a raw wsproto peer makes them (random masks)."""
    peer: RawClient | RawServer = RawClient(opened=True) if from_client else RawServer(opened=True)
    direction = "c2s" if from_client else "s2c"
    frames = [peer.send_json(x["msg"]) for x in reference_session() if x["dir"] == direction]
    frames += [peer.send_text(m.decode()) for m in batch_messages()]
    text = dumps({"type": "delta", "timestamp": 9, "delta": delta_json("raw-1")})
    frames += [
        peer.send(TextMessage(data=text[:30], message_finished=False))
        + peer.send(TextMessage(data=text[30:], message_finished=True)),
        peer.send(BytesMessage(data=b"\x01\x02")),
        peer.send(Ping(payload=b"hb")),
        peer.send(CloseConnection(code=1001, reason="going")),
    ]
    return frames


SERVER_FRAMES = _raw_frames(from_client=True)
CLIENT_FRAMES = _raw_frames(from_client=False)


@st.composite
def framed(draw: st.DrawFn, frames: list[bytes], setups: list[int]) -> bytes:
    """A setup byte, a chunking byte, then a few raw frames in any order, maybe mutated."""
    body = b"".join(draw(st.lists(st.sampled_from(frames), min_size=1, max_size=6)))
    head = bytes([draw(st.sampled_from(setups)), draw(st.integers(min_value=0, max_value=255))])
    data = bytearray(head + body)
    if draw(st.booleans()):
        return _mutate(draw, data, keep=2)
    return bytes(data)


@deterministic(max_examples=150)
@given(framed(SERVER_FRAMES, setups=[0x03, 0x0B, 0x23, 0x43, 0x63, 0x83, 0xC3, 0xE3]))
def test_server_raw_frames(data: bytes) -> None:
    check_server_connection(data)


@deterministic(max_examples=150)
@given(framed(CLIENT_FRAMES, setups=[0x00, 0x01, 0x09, 0x11, 0x21, 0x41, 0x71, 0x81, 0xC1]))
def test_client_raw_frames(data: bytes) -> None:
    check_client_connection(data)
