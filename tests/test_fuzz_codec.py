"""The codec fuzzing invariant (fuzz/invariants.py) under Hypothesis: CI runs it without atheris."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz.invariants import DICTIONARY, check_codec, check_decoded, seed_inputs
from rhizome_proto import CodecError, ErrorCode, Ping, encode
from tests.strategies import deterministic, messages

SEEDS = seed_inputs()


def test_seeds_are_the_recorded_messages() -> None:
    assert len(SEEDS) == 22
    assert all(not isinstance(check_decoded(seed), CodecError) for seed in SEEDS)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: json.loads(s)["type"])
def test_seeds_hold_the_invariant(seed: bytes) -> None:
    check_codec(seed)


@deterministic(max_examples=300)
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data: bytes) -> None:
    check_codec(data)


@st.composite
def mutated_seeds(draw: st.DrawFn) -> bytes:
    """A recorded message with a few byte-level edits (what a mutational fuzzer would try)."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        position = draw(st.integers(min_value=0, max_value=len(data)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "token", "truncate"]))
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
    return bytes(data)


@deterministic(max_examples=400)
@given(mutated_seeds())
def test_mutated_seeds(data: bytes) -> None:
    check_codec(data)


@deterministic()
@given(messages())
def test_valid_messages(message: object) -> None:
    check_codec(encode(message).encode())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\xff\xfe",
        b"{}",
        b'{"type":"ping","timestamp":1}',
        b'{"type":"ping","timestamp":1,"x":"\xff"}',
        b'{"type":"delta","timestamp":1,"delta":{"id":"d","timestamp":0}}',
        b'{"type":"gossip"}',
        b"[" * 50_000,
        b'{"type":"ping","timestamp":1e400}',
        b'{"type":"error","timestamp":1,"code":"\\ud800","message":""}',
    ],
)
def test_edge_inputs(data: bytes) -> None:
    check_codec(data)


def test_check_decoded_reports_codec_errors() -> None:
    error = check_decoded(b'{"type":"gossip","timestamp":1}')
    assert isinstance(error, CodecError)
    assert error.code == ErrorCode.UNKNOWN_MESSAGE_TYPE


def test_the_invariant_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    import fuzz.invariants as inv

    def escapes(text: str | bytes) -> object:
        raise KeyError("boom")

    monkeypatch.setattr(inv, "decode", escapes)
    with pytest.raises(KeyError):
        check_codec(b"{}")

    def lossy(text: str | bytes) -> object:
        return Ping(timestamp=1 if text == encode(Ping(timestamp=2)) else 2)

    monkeypatch.setattr(inv, "decode", lossy)
    with pytest.raises(AssertionError):
        check_codec(b"{}")
