"""The transition table of ``FederationProtocol``, walked pair by pair.

Every (role, state, sync progress) is reached by real calls and messages on a
:class:`ProtocolPair`; then every input of the table is applied: an application call the table
refuses raises :class:`LocalProtocolError` and leaves the object exactly as it was (every
attribute compared); a peer's message it refuses is answered per docs/state-table.md; anything
the table allows ends in the row's next state and sync progress.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rhizome_proto import (
    DeltaMessage,
    DeltaReceived,
    ErrorCode,
    FederationProtocol,
    LocalProtocolError,
    ProtocolViolation,
    RemoteProtocolError,
    Role,
    State,
    SyncBatchReceived,
)
from rhizome_proto._protocol import (
    ACK,
    CALL_INPUTS,
    CLOSE,
    COMPLETE_SYNC,
    CONNECTION_CLOSED,
    ERROR_SYNC,
    FATAL,
    HANDSHAKE_STATES,
    INPUTS,
    MESSAGE_INPUTS,
    NACK,
    PAUSE,
    PEER_SILENT,
    PING_DUE,
    REJECT_SYNC,
    REQUEST_SYNC,
    RESUME,
    SEND_DELTA,
    SEND_ERROR,
    SEND_FATAL_ERROR,
    SEND_LAST_SYNC_BATCH,
    SEND_SYNC_BATCH,
    START,
    START_SYNC,
    SYNC_BATCH_LAST,
    TRANSITIONS,
    SyncProgress,
)
from tests.harness import ProtocolPair, Side, dumps, make_delta, sample_messages

Y = SyncProgress
_SYNC_STEPS = (Y.NONE, Y.REQUESTED, Y.STARTED, Y.BATCHES, Y.DONE)

#: every (role, state, sync progress) a link can be in
REACHABLE: list[tuple[Role, State, SyncProgress]] = [
    (Role.CLIENT, State.IDLE, Y.NONE),
    (Role.CLIENT, State.HELLO_SENT, Y.NONE),
    (Role.SERVER, State.AWAITING_HELLO, Y.NONE),
    *(
        (role, state, sync)
        for role in Role
        for state in (State.OPEN, State.CLOSING, State.CLOSED)
        for sync in SyncProgress
    ),
]
PAIRS = [(*where, name) for where in REACHABLE for name in INPUTS]
EXTENSIONS = [(), ("batch",), ("batch", "credit", "cursor")]


def reach(
    role: Role,
    state: State,
    sync: SyncProgress,
    *,
    extensions: tuple[str, ...] = (),
    start_server: bool = True,
    peer_paused: bool = False,
) -> tuple[ProtocolPair, FederationProtocol]:
    """A pair whose ``role`` side is in ``state`` with ``sync``, got there by real calls."""
    options = {"extensions": extensions}
    pair = ProtocolPair(start=False, client_options=options, server_options=options)
    side: Side = "client" if role is Role.CLIENT else "server"
    proto = pair.proto(side)
    if state is State.IDLE:
        return pair, proto
    if start_server:
        pair.server.start(pair.now)
    if state is State.AWAITING_HELLO:
        return pair, proto
    pair.client.start(pair.now)
    if state is State.HELLO_SENT:
        pair.take_sent("client")  # the hello is lost: the client waits for hello_ack
        return pair, proto
    pair.handshake()
    if peer_paused:
        pair.proto("server" if side == "client" else "client").pause()
        pair.transfer()
    steps = _SYNC_STEPS.index(sync)
    if steps >= 1:
        pair.client.request_sync()
        pair.transfer()
    if steps >= 2:
        pair.server.start_sync(2, 1)
        pair.transfer()
    if steps >= 3:
        pair.server.send_sync_batch([make_delta("b0")], last=False)
        pair.transfer()
    if steps >= 4:
        pair.server.send_sync_batch([make_delta("b1")], last=True)
        pair.transfer()
    if state in (State.CLOSING, State.CLOSED):
        proto.close()
    if state is State.CLOSED:
        proto.connection_closed(1000)
    pair.collect()
    proto.messages_to_send()
    assert (proto.state, proto._sync) == (state, sync)
    return pair, proto


def snapshot(proto: FederationProtocol) -> dict[str, Any]:
    """Every attribute of ``proto``, copied (the clock by its reading, the table by identity)."""
    out: dict[str, Any] = {}
    for name, value in vars(proto).items():
        if name == "_clock":
            out[name] = value.ms
        elif name == "_rows":
            out[name] = id(value)
        else:
            out[name] = copy.deepcopy(value)
    return out


def call(proto: FederationProtocol, name: str, now: float) -> None:
    """Make the application call ``name`` with valid arguments."""
    calls: dict[str, Any] = {
        START: lambda: proto.start(now),
        SEND_DELTA: lambda: proto.send_delta(make_delta("new-1")),
        ACK: lambda: proto.ack("x"),
        NACK: lambda: proto.nack("x", "no"),
        PAUSE: proto.pause,
        RESUME: proto.resume,
        REQUEST_SYNC: proto.request_sync,
        START_SYNC: lambda: proto.start_sync(2, 1),
        SEND_SYNC_BATCH: lambda: proto.send_sync_batch([make_delta("s1")], last=False),
        SEND_LAST_SYNC_BATCH: lambda: proto.send_sync_batch([make_delta("s1")], last=True),
        COMPLETE_SYNC: proto.complete_sync,
        REJECT_SYNC: lambda: proto.reject_sync("no"),
        SEND_ERROR: lambda: proto.send_error("X", "y"),
        SEND_FATAL_ERROR: lambda: proto.send_error("X", "y", fatal=True),
        CLOSE: lambda: proto.close(1001, "bye"),
    }
    calls[name]()


def message(proto: FederationProtocol, name: str) -> str:
    """A valid message for the peer's input ``name`` (the next batch number for a batch)."""
    samples = sample_messages()
    if name in ("sync_batch", SYNC_BATCH_LAST):
        msg = dict(samples["sync_batch"])
        msg.update(batchNumber=proto._sync_next_batch, isLastBatch=name == SYNC_BATCH_LAST)
    elif name == ERROR_SYNC:
        msg = dict(samples["error"], code="SYNC_ERROR")
    elif name == "deltas":
        msg = {"type": "deltas", "timestamp": 1, "deltas": [samples["delta"]["delta"]]}
    elif name == "deltas_ack":
        msg = {"type": "deltas_ack", "timestamp": 1, "upTo": 0}
    else:
        msg = samples[name]
    return dumps(msg)


def check_pair(
    role: Role,
    state: State,
    sync: SyncProgress,
    name: str,
    *,
    extensions: tuple[str, ...] = (),
    peer_paused: bool = False,
) -> None:
    # START is tried on a server not started yet (a started one refuses it: a check)
    pair, proto = reach(
        role,
        state,
        sync,
        extensions=extensions,
        start_server=name != START,
        peer_paused=peer_paused,
    )
    row = TRANSITIONS.get((role, state, sync, name))
    before = snapshot(proto)
    now = pair.now + 1.0
    if name in CALL_INPUTS:
        if row is None:
            with pytest.raises(LocalProtocolError):
                call(proto, name, now)
            assert snapshot(proto) == before, "a refused call changed something"
            return
        call(proto, name, now)
    elif name in MESSAGE_INPUTS:
        refused = row is None or bool(row.extension and row.extension not in extensions)
        try:
            proto.receive_message(message(proto, name))
        except RemoteProtocolError as exc:
            assert refused and state in HANDSHAKE_STATES, exc
            assert exc.code is ErrorCode.UNEXPECTED_MESSAGE
            assert (proto.state, proto._sync) == (State.CLOSING, sync)
            return
        if refused:
            assert state not in HANDSHAKE_STATES
            violations = [e for e in proto.events() if isinstance(e, ProtocolViolation)]
            assert [v.code for v in violations] == [ErrorCode.UNEXPECTED_MESSAGE]
            assert (proto.state, proto._sync) == (state, sync)
            return
    elif name in (PING_DUE, PEER_SILENT):
        if proto._last_heard is None or proto._next_ping is None:
            return  # not started: no timer runs
        due = proto._next_ping if name == PING_DUE else proto._last_heard + proto.ping_timeout
        assert proto._next_ping < proto._last_heard + proto.ping_timeout
        proto.handle_timer(due)
        if row is None:
            assert snapshot(proto) == before
            return
    elif name == FATAL:
        proto.fail(1002, "fatal")
    else:
        assert name == CONNECTION_CLOSED
        proto.connection_closed(1000, "")
    assert row is not None, (role, state, sync, name)
    assert (proto.state, proto._sync) == (row.next_state, row.next_sync)
    if not row.effect:  # ignored: nothing at all happened
        assert snapshot(proto) == before


def test_every_row_is_walked() -> None:
    walked = set(PAIRS)
    assert set(TRANSITIONS) <= walked
    assert len(set(INPUTS)) == len(INPUTS)


@pytest.mark.parametrize(("role", "state", "sync", "name"), PAIRS)
def test_every_state_and_input(role: Role, state: State, sync: SyncProgress, name: str) -> None:
    check_pair(role, state, sync, name)


@given(
    where=st.sampled_from(PAIRS),
    extensions=st.sampled_from(EXTENSIONS),
    peer_paused=st.booleans(),
)
def test_every_state_and_input_with_extensions_and_pauses(
    where: tuple[Role, State, SyncProgress, str],
    extensions: tuple[str, ...],
    peer_paused: bool,
) -> None:
    check_pair(*where, extensions=extensions, peer_paused=peer_paused)


# ---------------------------------------------------------------------- reproduced bugs


def test_a_server_completing_in_the_wrong_phase_changes_nothing() -> None:
    """complete_sync() between batches used to set the sync to 'batches done', then raise;
    a refused call must change nothing."""
    pair, server = reach(Role.SERVER, State.OPEN, Y.BATCHES)
    before = snapshot(server)
    with pytest.raises(LocalProtocolError) as info:
        server.complete_sync()
    assert info.value.code is ErrorCode.SYNC_ERROR
    assert snapshot(server) == before
    server.send_sync_batch([make_delta("b1")], last=True)
    server.complete_sync()
    pair.transfer()
    assert not pair.client.syncing and not server.syncing


def test_a_client_completing_a_sync_changes_nothing() -> None:
    """A client calling complete_sync() used to set 'batches done' and raise; the server's next
    valid sync_batch was then refused."""
    pair, client = reach(Role.CLIENT, State.OPEN, Y.STARTED)
    pair.new_events("client")
    before = snapshot(client)
    with pytest.raises(LocalProtocolError):
        client.complete_sync()
    assert snapshot(client) == before
    pair.server.send_sync_batch([make_delta("b0")], last=True)
    pair.transfer()
    events = pair.new_events("client")
    assert [type(e) for e in events] == [SyncBatchReceived]
    assert pair.take_sent("client") == []


def test_hot_inputs_take_one_lookup() -> None:
    """The rows of the live path are found by message class in the per-state cache."""
    pair, server = reach(Role.SERVER, State.OPEN, Y.NONE)
    rows = server._rows
    assert rows[DeltaMessage] is TRANSITIONS[(Role.SERVER, State.OPEN, Y.NONE, "delta")]
    pair.client.send_delta(make_delta("d1"))
    pair.transfer()
    assert pair.new_events("server") == [DeltaReceived(delta=make_delta("d1"))]
