"""Extensions at the message level: negotiation, ``cursor``, ``batch`` and ``credit``.

``batch`` and ``credit`` are tested on pairs of :class:`FederationProtocol` (exact messages and
events), with Hypothesis over random interleavings of sends, answers, pauses and partial
delivery, against v1 peers (who must see exactly the v1 messages), and on a pair of
:class:`FederationConnection` (bytes, split invariance).
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.events import CloseConnection

from rhizome_proto import (
    DEFAULT_MAX_BATCH,
    DEFAULT_RECEIVE_WINDOW,
    Closed,
    Delta,
    DeltaAcked,
    DeltaReceived,
    DeltaRejected,
    ErrorCode,
    Event,
    FederationConnection,
    FederationProtocol,
    HandshakeComplete,
    LocalProtocolError,
    Paused,
    ProtocolViolation,
    Resumed,
    Role,
    State,
    SyncBatchReceived,
    SyncCompleted,
    SyncRequested,
    decode,
)
from tests.harness import (
    SIDES,
    ConnectionPair,
    FakeClock,
    ProtocolPair,
    RawClient,
    Side,
    decode_output,
    delta_json,
    dumps,
    feed,
    make_client,
    make_delta,
    make_server,
    other,
)
from tests.strategies import deterministic

BOTH = ("batch", "credit")


def pair(
    client: tuple[str, ...],
    server: tuple[str, ...],
    client_options: dict[str, Any] | None = None,
    server_options: dict[str, Any] | None = None,
) -> ProtocolPair:
    return ProtocolPair.opened(
        client_options={"extensions": client, **(client_options or {})},
        server_options={"extensions": server, **(server_options or {})},
    )


def opened(
    client: tuple[str, ...] = BOTH, server: tuple[str, ...] = BOTH, **windows: int
) -> ProtocolPair:
    """An open pair speaking ``client`` / ``server``; ``client_window=`` / ``server_window=``
    set each side's receive window. The handshake messages are drained."""
    p = pair(
        client,
        server,
        {"receive_window": windows.get("client_window", DEFAULT_RECEIVE_WINDOW)},
        {"receive_window": windows.get("server_window", DEFAULT_RECEIVE_WINDOW)},
    )
    p.take_sent("client")
    p.take_sent("server")
    return p


def wire(p: ProtocolPair, side: Side) -> list[dict[str, Any]]:
    """What ``side`` sends now, without timestamps (not delivered)."""
    return [{k: v for k, v in m.items() if k != "timestamp"} for m in p.take_sent(side)]


def deliver(p: ProtocolPair, side: Side) -> list[dict[str, Any]]:
    """Take what ``side`` sends now, deliver it to the peer, return it (without timestamps)."""
    out = p.proto(side).messages_to_send()
    p.sent[side].extend(out)
    for text in out:
        p.inject(other(side), text)
    return [{k: v for k, v in json.loads(m).items() if k != "timestamp"} for m in out]


def deltas_msg(*ids: str) -> dict[str, Any]:
    return {"type": "deltas", "deltas": [json.loads(dumps(delta_json(i))) for i in ids]}


def batch_of(*ids: str) -> dict[str, Any]:
    """The wire form (without timestamp) of a ``deltas`` message of ``make_delta`` deltas."""
    return {
        "type": "deltas",
        "deltas": [json.loads(msgspec.json.encode(make_delta(i))) for i in ids],
    }


def inject(p: ProtocolPair, receiver: Side, obj: dict[str, Any]) -> None:
    p.inject(receiver, dumps({"timestamp": 5, **obj}))


def test_both_agree_on_what_both_listed() -> None:
    p = pair(("cursor", "future"), ("cursor", "other"))
    assert p.client.extensions_agreed == p.server.extensions_agreed == frozenset({"cursor"})
    [hs] = [e for e in p.events["client"] if isinstance(e, HandshakeComplete)]
    assert hs.extensions == frozenset({"cursor"})
    hello, ack = (json.loads(p.sent[side][0]) for side in ("client", "server"))
    assert hello["extensions"] == ["cursor", "future"]
    assert ack["extensions"] == ["cursor"]


@pytest.mark.parametrize(
    ("client", "server"), [((), ("cursor",)), (("cursor",), ()), ((), ())], ids=str
)
def test_without_a_list_on_either_side_nothing_is_agreed(
    client: tuple[str, ...], server: tuple[str, ...]
) -> None:
    p = pair(client, server)
    assert p.client.extensions_agreed == p.server.extensions_agreed == frozenset()
    hello, ack = (json.loads(p.sent[side][0]) for side in ("client", "server"))
    assert ("extensions" in hello) == bool(client)
    assert ack.get("extensions", []) == []
    assert ("extensions" in ack) == bool(client)  # only a client that asked gets a list


def test_a_server_cannot_impose_an_extension_the_client_did_not_offer() -> None:
    p = ProtocolPair(client_options={"extensions": ()})
    p.client.messages_to_send()
    p.inject(
        "client",
        json.dumps(
            {
                "type": "hello_ack",
                "timestamp": 1,
                "systemId": "s",
                "linkId": "l",
                "protocol": "rhizomedb-federation-v1",
                "extensions": ["cursor"],
            }
        ),
    )
    assert p.client.is_open and p.client.extensions_agreed == frozenset()


def test_cursor_fields_travel_when_agreed() -> None:
    p = pair(("cursor",), ("cursor",))
    p.client.request_sync(from_cursor="store:7")
    p.transfer()
    [req] = [e for e in p.new_events("server") if isinstance(e, SyncRequested)]
    assert req.from_cursor == "store:7"
    p.server.start_sync(total_deltas=1, batch_size=10)
    p.server.send_sync_batch([make_delta("x")], last=True, cursor="store:8")
    p.server.complete_sync(cursor="store:8")
    p.transfer()
    events = p.new_events("client")
    [batch] = [e for e in events if isinstance(e, SyncBatchReceived)]
    [done] = [e for e in events if isinstance(e, SyncCompleted)]
    assert batch.cursor == done.cursor == "store:8"


def test_cursor_calls_without_agreement_are_refused_and_change_nothing() -> None:
    p = pair((), ())
    with pytest.raises(LocalProtocolError, match="cursor"):
        p.client.request_sync(from_cursor="store:1")
    assert not p.client.syncing
    p.client.request_sync()
    p.transfer()
    p.server.start_sync(total_deltas=0)
    with pytest.raises(LocalProtocolError, match="cursor"):
        p.server.send_sync_batch([], last=True, cursor="store:1")
    with pytest.raises(LocalProtocolError, match="cursor"):
        p.server.complete_sync(cursor="store:1")
    p.server.complete_sync()
    p.transfer()
    [done] = [e for e in p.new_events("client") if isinstance(e, SyncCompleted)]
    assert done.cursor is None


# ---------------------------------------------------------------------- batch and credit: handshake


def test_windows_travel_with_credit_and_each_side_learns_the_other() -> None:
    p = pair(BOTH, BOTH, {"receive_window": 5}, {"receive_window": 7})
    hello, ack = (json.loads(p.sent[side][0]) for side in ("client", "server"))
    assert (hello["extensions"], hello["window"]) == (["batch", "credit"], 5)
    assert (ack["extensions"], ack["window"]) == (["batch", "credit"], 7)
    assert p.client.extensions_agreed == p.server.extensions_agreed == frozenset(BOTH)
    assert (p.client.send_window, p.server.send_window) == (7, 5)
    assert (p.client.receive_window, p.server.receive_window) == (5, 7)


@pytest.mark.parametrize(
    ("client", "server", "in_hello", "in_ack"),
    [
        (("batch",), BOTH, False, False),
        (BOTH, ("batch",), True, False),
        (("credit",), ("credit",), True, True),
        ((), BOTH, False, False),
    ],
    ids=str,
)
def test_a_window_is_sent_only_with_credit(
    client: tuple[str, ...], server: tuple[str, ...], in_hello: bool, in_ack: bool
) -> None:
    p = pair(client, server)
    hello, ack = (json.loads(p.sent[side][0]) for side in ("client", "server"))
    assert ("window" in hello, "window" in ack) == (in_hello, in_ack)
    expected = DEFAULT_RECEIVE_WINDOW if in_ack else None
    assert p.client.send_window == p.server.send_window == expected


def test_no_credit_without_the_peers_window() -> None:
    # a hello that offers credit without a window: the server does not agree to credit
    server = FederationProtocol(
        Role.SERVER, system_id="s", link_id="l", clock=FakeClock(), extensions=BOTH
    )
    server.receive_message(
        dumps(
            {
                "type": "hello",
                "timestamp": 1,
                "systemId": "c",
                "config": {},
                "protocol": "rhizomedb-federation-v1",
                "extensions": ["credit", "batch"],
            }
        )
    )
    (ack,) = [json.loads(m) for m in server.messages_to_send()]
    assert ack["extensions"] == ["batch"] and "window" not in ack
    assert server.extensions_agreed == frozenset({"batch"}) and server.send_window is None
    # a hello_ack that agrees to credit without a window: the client drops credit
    p = ProtocolPair(client_options={"extensions": BOTH})
    p.take_sent("client")
    inject(
        p,
        "client",
        {
            "type": "hello_ack",
            "systemId": "s",
            "linkId": "l",
            "protocol": "rhizomedb-federation-v1",
            "extensions": ["batch", "credit"],
        },
    )
    assert p.client.extensions_agreed == frozenset({"batch"})
    assert p.client.send_window is None


def test_constructor_checks_and_defaults() -> None:
    clock = FakeClock()
    for options in ({"receive_window": 0}, {"max_batch": 0}):
        with pytest.raises(ValueError):
            FederationProtocol(Role.CLIENT, system_id="c", clock=clock, **options)
        with pytest.raises(ValueError):
            FederationConnection(Role.CLIENT, system_id="c", clock=clock, **options)
    proto = FederationProtocol(Role.CLIENT, system_id="c", clock=clock)
    assert (proto.receive_window, proto.max_batch) == (10_000, 1000)
    assert (DEFAULT_RECEIVE_WINDOW, DEFAULT_MAX_BATCH) == (10_000, 1000)
    assert proto.send_window is None
    conn = make_client(receive_window=3, max_batch=2, extensions=BOTH)
    assert (conn.receive_window, conn.max_batch, conn.extensions_offered) == (3, 2, BOTH)


# ---------------------------------------------------------------------- batch: sending


def test_live_deltas_are_coalesced_into_one_deltas_message_when_output_is_taken() -> None:
    p = opened(("batch",), ("batch",))
    for i in (1, 2, 3):
        p.client.send_delta(make_delta(f"d{i}"))
    assert p.client.unacknowledged == (make_delta("d1"), make_delta("d2"), make_delta("d3"))
    assert p.client.pending_count == 3 and p.client.is_pending("d2")
    assert p.client.held == ()
    assert deliver(p, "client") == [batch_of("d1", "d2", "d3")]
    assert p.new_events("server") == [
        DeltaReceived(delta=make_delta("d1")),
        DeltaReceived(delta=make_delta("d2")),
        DeltaReceived(delta=make_delta("d3")),
    ]
    assert p.server.unanswered == frozenset({"d1", "d2", "d3"})
    assert p.client.messages_to_send() == []


def test_at_most_max_batch_deltas_per_message() -> None:
    p = pair(("batch",), ("batch",), {"max_batch": 2})
    p.take_sent("client")
    for i in range(5):
        p.client.send_delta(make_delta(f"d{i}"))
    sent = p.take_sent("client")
    assert [[d["id"] for d in m["deltas"]] for m in sent] == [["d0", "d1"], ["d2", "d3"], ["d4"]]
    assert len({m["timestamp"] for m in sent}) == 1  # made together, at one take


def test_other_messages_keep_their_place_between_batches() -> None:
    p = opened(("batch",), ("batch",))
    p.client.send_delta(make_delta("d1"))
    p.client.pause()
    p.client.send_delta(make_delta("d2"))
    p.client.send_delta(make_delta("d3"))
    p.client.send_error("X", "y")
    assert [m["type"] for m in wire(p, "client")] == ["deltas", "pause", "deltas", "error"]


def test_cumulative_ack_covers_the_contiguous_answered_prefix() -> None:
    p = opened(("batch",), ("batch",))
    for i in (1, 2, 3, 4):
        p.client.send_delta(make_delta(f"d{i}"))
    deliver(p, "client")
    p.new_events("server")
    p.server.ack("d2")  # out of order: nothing to acknowledge yet
    assert deliver(p, "server") == []
    p.server.ack("d1")
    assert deliver(p, "server") == [{"type": "deltas_ack", "upTo": 2}]
    assert p.new_events("client") == [DeltaAcked(delta_id="d1"), DeltaAcked(delta_id="d2")]
    p.server.ack("d4")
    p.server.nack("d3", "untrusted")  # a nack goes at once, before the cumulative ack
    assert deliver(p, "server") == [
        {"type": "delta_nack", "deltaId": "d3", "reason": "untrusted"},
        {"type": "deltas_ack", "upTo": 4},
    ]
    assert p.new_events("client") == [
        DeltaRejected(delta_id="d3", reason="untrusted"),
        DeltaAcked(delta_id="d4"),
    ]
    assert p.client.unacknowledged == () and p.client.pending_count == 0
    assert p.server.unanswered == frozenset()
    assert p.client.stray_acks == p.server.stray_acks == 0


def test_the_count_continues_across_deltas_messages_and_directions_are_separate() -> None:
    p = opened(("batch",), ("batch",))
    p.client.send_delta(make_delta("c1"))
    deliver(p, "client")
    p.client.send_delta(make_delta("c2"))
    p.client.send_delta(make_delta("c3"))
    deliver(p, "client")
    p.server.send_delta(make_delta("s1"))
    deliver(p, "server")
    p.client.ack("s1")
    for delta_id in ("c1", "c2", "c3"):
        p.server.ack(delta_id)
    assert deliver(p, "server") == [{"type": "deltas_ack", "upTo": 3}]
    assert deliver(p, "client") == [{"type": "deltas_ack", "upTo": 1}]
    assert [e for e in p.new_events("client") if isinstance(e, DeltaAcked)] == [
        DeltaAcked(delta_id="c1"),
        DeltaAcked(delta_id="c2"),
        DeltaAcked(delta_id="c3"),
    ]
    assert [e for e in p.new_events("server") if isinstance(e, DeltaAcked)] == [
        DeltaAcked(delta_id="s1")
    ]


def test_a_deltas_ack_beyond_what_was_sent_or_backwards_is_counted_and_ignored() -> None:
    p = opened(("batch",), ("batch",))
    p.client.send_delta(make_delta("d1"))
    p.client.send_delta(make_delta("d2"))
    p.take_sent("client")
    p.client.send_delta(make_delta("d3"))  # committed, not yet taken: not sent
    inject(p, "client", {"type": "deltas_ack", "upTo": 9})
    assert p.new_events("client") == [DeltaAcked(delta_id="d1"), DeltaAcked(delta_id="d2")]
    assert p.client.stray_acks == 1
    assert p.client.unacknowledged == (make_delta("d3"),)
    for up_to in (2, 1, 0):  # backwards, or no progress
        inject(p, "client", {"type": "deltas_ack", "upTo": up_to})
    assert p.new_events("client") == []
    assert p.client.stray_acks == 4
    assert [m["type"] for m in p.take_sent("client")] == ["deltas"]  # no error for these
    inject(p, "client", {"type": "deltas_ack", "upTo": 3})
    assert p.new_events("client") == [DeltaAcked(delta_id="d3")]
    assert p.client.stray_acks == 4 and p.client.pending_count == 0


def test_a_peer_may_settle_batched_deltas_by_id() -> None:
    p = opened(("batch",), ("batch",))
    for i in (1, 2, 3):
        p.client.send_delta(make_delta(f"d{i}"))
    p.take_sent("client")
    inject(p, "client", {"type": "delta_ack", "deltaId": "d2"})
    inject(p, "client", {"type": "delta_nack", "deltaId": "d1", "reason": "no"})
    inject(p, "client", {"type": "deltas_ack", "upTo": 3})
    assert p.new_events("client") == [
        DeltaAcked(delta_id="d2"),
        DeltaRejected(delta_id="d1", reason="no"),
        DeltaAcked(delta_id="d3"),
    ]
    assert p.client.stray_acks == 0 and p.client.pending_count == 0
    # every batched delta settled by id: later cumulative acks still line up
    p.client.send_delta(make_delta("d4"))
    p.take_sent("client")
    inject(p, "client", {"type": "delta_ack", "deltaId": "d4"})
    p.client.send_delta(make_delta("d5"))
    p.take_sent("client")
    inject(p, "client", {"type": "deltas_ack", "upTo": 5})
    assert p.new_events("client") == [DeltaAcked(delta_id="d4"), DeltaAcked(delta_id="d5")]
    assert p.client.stray_acks == 0


def test_a_delta_sent_again_after_a_nack_is_settled_by_its_new_number() -> None:
    p = opened(("batch",), ("batch",))
    p.client.send_delta(make_delta("d1"))
    p.client.send_delta(make_delta("d2"))
    p.take_sent("client")
    inject(p, "client", {"type": "delta_nack", "deltaId": "d1", "reason": "later"})
    p.client.send_delta(make_delta("d1"))  # number 3
    p.take_sent("client")
    inject(p, "client", {"type": "deltas_ack", "upTo": 2})
    assert p.new_events("client") == [
        DeltaRejected(delta_id="d1", reason="later"),
        DeltaAcked(delta_id="d2"),
    ]
    assert p.client.unacknowledged == (make_delta("d1"),)
    inject(p, "client", {"type": "deltas_ack", "upTo": 3})
    assert p.new_events("client") == [DeltaAcked(delta_id="d1")]


def test_pause_holds_batched_deltas_and_resume_sends_them_in_one_message() -> None:
    p = opened(("batch",), ("batch",))
    p.server.pause()
    p.transfer()
    for i in (1, 2, 3):
        p.client.send_delta(make_delta(f"d{i}"))
    assert p.client.held == (make_delta("d1"), make_delta("d2"), make_delta("d3"))
    assert p.client.unacknowledged == () and p.client.pending_count == 3
    assert p.take_sent("client") == []
    p.server.resume()
    deliver(p, "server")
    assert deliver(p, "client") == [batch_of("d1", "d2", "d3")]
    assert p.client.held == () and len(p.client.unacknowledged) == 3


def test_deltas_sent_before_the_handshake_go_out_batched() -> None:
    p = ProtocolPair(client_options={"extensions": BOTH}, server_options={"extensions": BOTH})
    p.client.send_delta(make_delta("early-1"))
    p.client.send_delta(make_delta("early-2"))
    assert p.client.held == (make_delta("early-1"), make_delta("early-2"))
    p.transfer()
    assert [json.loads(m)["type"] for m in p.sent["client"]] == ["hello", "deltas"]
    assert json.loads(p.sent["client"][1])["deltas"] == batch_of("early-1", "early-2")["deltas"]


def test_closed_unsettled_holds_batched_waiting_and_held_deltas_in_order() -> None:
    p = opened(server_window=2)
    for i in (1, 2):
        p.client.send_delta(make_delta(f"u{i}"))
    deliver(p, "client")
    p.client.send_delta(make_delta("w1"))  # no room: waits
    inject(p, "client", {"type": "pause"})
    p.client.send_delta(make_delta("h1"))  # paused: held
    inject(p, "client", {"type": "deltas_ack", "upTo": 1})  # room, but paused
    assert p.client.held == (make_delta("w1"), make_delta("h1"))
    p.client.close(1001, "bye")
    p.client.connection_closed(1001, "bye")
    assert p.new_events("client")[-1] == Closed(
        code=1001,
        reason="bye",
        unsettled=(make_delta("u2"), make_delta("w1"), make_delta("h1")),
    )
    assert p.client.pending_count == 0 and p.client.held == ()


def size(*ids: str) -> int:
    """The bytes of JSON of ``make_delta`` deltas."""
    return sum(len(msgspec.json.encode(make_delta(i))) for i in ids)


def test_pending_bytes_count_batched_waiting_and_held_deltas_until_settled() -> None:
    p = opened(server_window=2)
    for i in (1, 2):
        p.client.send_delta(make_delta(f"u{i}"))
    assert p.client.pending_bytes == size("u1", "u2")
    deliver(p, "client")
    p.client.send_delta(make_delta("w1"))  # no room: waits
    inject(p, "client", {"type": "pause"})
    p.client.send_delta(make_delta("h1"))  # paused: held
    assert p.client.pending_bytes == size("u1", "u2", "w1", "h1")
    inject(p, "client", {"type": "deltas_ack", "upTo": 1})
    assert p.client.pending_bytes == size("u2", "w1", "h1")
    inject(p, "client", {"type": "resume"})  # w1 and h1 committed: still pending
    assert p.client.pending_bytes == size("u2", "w1", "h1")
    p.client.close(1001, "bye")
    p.client.connection_closed(1001, "bye")
    assert p.client.pending_bytes == 0


@pytest.mark.parametrize("answer", ["delta_ack", "delta_nack"])
def test_pending_bytes_of_v1_deltas_go_with_their_answer(answer: str) -> None:
    p = opened((), ())
    p.client.send_delta(make_delta("a"))
    p.client.send_delta(make_delta("bb"))
    assert p.client.pending_bytes == size("a", "bb")
    deliver(p, "client")
    inject(p, "client", {"type": answer, "deltaId": "bb", "reason": "no"})
    assert p.client.pending_bytes == size("a")
    inject(p, "client", {"type": answer, "deltaId": "bb", "reason": "no"})  # stray
    assert p.client.pending_bytes == size("a")


def test_deltas_committed_before_close_still_go_out_with_the_answers() -> None:
    p = opened(("batch",), ("batch",))
    p.client.send_delta(make_delta("d1"))
    deliver(p, "client")
    p.server.send_delta(make_delta("s1"))
    p.server.ack("d1")
    p.server.close()
    assert [m["type"] for m in wire(p, "server")] == ["deltas", "deltas_ack"]
    p.server.ack("d1")  # closing: answers do nothing
    assert p.take_sent("server") == []


# ---------------------------------------------------------------------- batch: receiving


def test_v1_deltas_are_still_acknowledged_one_by_one() -> None:
    p = opened(("batch",), ("batch",))
    inject(p, "server", {"type": "delta", "delta": delta_json("v1")})
    inject(p, "server", deltas_msg("b1"))
    assert p.server.unanswered == frozenset({"v1", "b1"})
    p.server.ack("b1")
    p.server.ack("v1")
    assert wire(p, "server") == [
        {"type": "delta_ack", "deltaId": "v1"},
        {"type": "deltas_ack", "upTo": 1},
    ]
    p.server.ack("sync-delta")  # not a live delta of the peer: acknowledged by id, as in v1
    assert wire(p, "server") == [{"type": "delta_ack", "deltaId": "sync-delta"}]


def test_duplicate_ids_in_deltas_are_each_numbered_and_answered() -> None:
    p = opened(("batch",), ("batch",))
    inject(p, "server", deltas_msg("x", "x", "y"))
    assert [type(e) for e in p.new_events("server")] == [DeltaReceived] * 3
    p.server.ack("x")
    assert wire(p, "server") == [{"type": "deltas_ack", "upTo": 1}]
    assert p.server.unanswered == frozenset({"x", "y"})
    p.server.ack("y")
    assert wire(p, "server") == []  # number 2 (the second x) is unanswered
    p.server.nack("x", "dup")
    assert wire(p, "server") == [
        {"type": "delta_nack", "deltaId": "x", "reason": "dup"},
        {"type": "deltas_ack", "upTo": 3},
    ]
    assert p.server.unanswered == frozenset()


def test_an_id_pending_three_times_is_answered_oldest_first() -> None:
    p = opened(("batch",), ("batch",))
    inject(p, "server", deltas_msg("x", "y"))
    # the same id again, in a message whose other element is invalid
    inject(p, "server", {"type": "deltas", "deltas": [delta_json("x"), delta_json("z", id="")]})
    inject(p, "server", deltas_msg("x"))
    assert [type(e) for e in p.new_events("server")] == [
        DeltaReceived,
        DeltaReceived,
        DeltaReceived,
        ProtocolViolation,
        DeltaReceived,
    ]
    assert [m["code"] for m in wire(p, "server")] == ["INVALID_DELTA"]
    p.server.ack("x")  # number 1
    assert wire(p, "server") == [{"type": "deltas_ack", "upTo": 1}]
    p.server.ack("y")  # number 2, while x is still pending twice
    assert wire(p, "server") == [{"type": "deltas_ack", "upTo": 2}]
    assert p.server.unanswered == frozenset({"x"})
    p.server.ack("x")  # number 3 (4, the invalid one, was answered at once)
    assert wire(p, "server") == [{"type": "deltas_ack", "upTo": 4}]
    p.server.nack("x", "again")  # number 5
    assert wire(p, "server") == [
        {"type": "delta_nack", "deltaId": "x", "reason": "again"},
        {"type": "deltas_ack", "upTo": 5},
    ]
    assert p.server.unanswered == frozenset()


@pytest.mark.parametrize("mtype", ["deltas", "deltas_ack"])
@pytest.mark.parametrize("extensions", [(), ("credit", "cursor")], ids=str)
def test_batch_messages_without_agreement_are_unexpected_not_fatal(
    mtype: str, extensions: tuple[str, ...]
) -> None:
    p = opened(extensions, extensions)
    message = deltas_msg("d1") if mtype == "deltas" else {"type": "deltas_ack", "upTo": 1}
    inject(p, "server", message)
    assert p.errors["server"] == []
    (sent,) = wire(p, "server")
    text = f"unexpected {mtype} for a server in state open: extension batch not agreed"
    assert sent == {"type": "error", "code": "UNEXPECTED_MESSAGE", "message": text}
    assert p.new_events("server") == [ProtocolViolation(code="UNEXPECTED_MESSAGE", message=text)]
    assert p.server.state is State.OPEN and p.server.unanswered == frozenset()
    # a deltas message holding an invalid delta gets the same answer
    bad = deltas_msg("d2") | {"deltas": [delta_json("d2", author="")]}
    inject(p, "server", bad)
    if mtype == "deltas":
        text = "unexpected deltas for a server in state open: extension batch not agreed"
        assert wire(p, "server") == [
            {"type": "error", "code": "UNEXPECTED_MESSAGE", "message": text}
        ]


@pytest.mark.parametrize("mtype", ["deltas", "deltas_ack"])
def test_batch_messages_before_the_handshake_are_fatal(mtype: str) -> None:
    p = ProtocolPair(server_options={"extensions": BOTH})
    p.take_sent("client")
    message = deltas_msg("d1") if mtype == "deltas" else {"type": "deltas_ack", "upTo": 1}
    inject(p, "server", message)
    assert [e.code for e in p.errors["server"]] == [ErrorCode.UNEXPECTED_MESSAGE]
    assert p.server.state is State.CLOSING


def test_invalid_deltas_inside_a_deltas_message_keep_their_numbers() -> None:
    p = opened(("batch",), ("batch",))
    items = [delta_json("ok-1"), delta_json("bad-1", author=""), 7, delta_json("ok-2")]
    inject(p, "server", {"type": "deltas", "deltas": items})
    events = p.new_events("server")
    assert [type(e) for e in events] == [
        DeltaReceived,
        ProtocolViolation,
        ProtocolViolation,
        DeltaReceived,
    ]
    assert [e.code for e in events if isinstance(e, ProtocolViolation)] == ["INVALID_DELTA"] * 2
    sent = wire(p, "server")
    assert sent == [
        {
            "type": "delta_nack",
            "deltaId": "bad-1",
            "reason": "invalid delta: Expected `str` of length >= 1 - at `$.deltas[1].author`",
        },
        {
            "type": "error",
            "code": "INVALID_DELTA",
            "message": "invalid delta: Expected `object`, got `int` - at `$.deltas[2]`",
        },
    ]
    assert p.server.unanswered == frozenset({"ok-1", "ok-2"})
    p.server.ack("ok-1")
    assert wire(p, "server") == [{"type": "deltas_ack", "upTo": 3}]
    p.server.ack("ok-2")
    assert wire(p, "server") == [{"type": "deltas_ack", "upTo": 4}]


def test_a_bad_deltas_envelope_is_refused_whole_and_numbers_nothing() -> None:
    p = opened(("batch",), ("batch",))
    inject(p, "server", {"type": "deltas", "deltas": []})
    (sent,) = wire(p, "server")
    assert (sent["type"], sent["code"]) == ("error", "MESSAGE_ERROR")
    inject(p, "server", deltas_msg("d1"))
    p.server.ack("d1")
    assert wire(p, "server") == [{"type": "deltas_ack", "upTo": 1}]


# ---------------------------------------------------------------------- credit


def test_the_peers_window_bounds_what_is_in_flight() -> None:
    p = opened(server_window=2)
    for i in range(1, 6):
        p.client.send_delta(make_delta(f"d{i}"))
    assert p.client.unacknowledged == (make_delta("d1"), make_delta("d2"))
    assert p.client.held == tuple(make_delta(f"d{i}") for i in (3, 4, 5))
    assert p.client.pending_count == 5
    assert all(p.client.is_pending(f"d{i}") for i in range(1, 6))
    assert deliver(p, "client") == [batch_of("d1", "d2")]
    p.server.ack("d1")
    assert deliver(p, "server") == [{"type": "deltas_ack", "upTo": 1}]
    assert p.new_events("client") == [DeltaAcked(delta_id="d1")]
    assert deliver(p, "client") == [batch_of("d3")]  # one freed, one more goes
    p.server.nack("d2", "no")
    p.server.ack("d3")
    deliver(p, "server")
    assert deliver(p, "client") == [batch_of("d4", "d5")]
    assert p.client.held == () and len(p.client.unacknowledged) == 2
    assert [e for e in p.new_events("server") if isinstance(e, ProtocolViolation)] == []


def test_credit_alone_works_with_v1_delta_messages() -> None:
    p = opened(("credit",), ("credit",), server_window=1)
    for i in (1, 2, 3):
        p.client.send_delta(make_delta(f"d{i}"))
    assert [m["type"] for m in wire(p, "client")] == ["delta"]
    inject(p, "client", {"type": "delta_ack", "deltaId": "d1"})
    assert [m["delta"]["id"] for m in wire(p, "client")] == ["d2"]
    inject(p, "client", {"type": "delta_nack", "deltaId": "d2", "reason": "r"})
    assert [m["delta"]["id"] for m in wire(p, "client")] == ["d3"]
    assert p.client.held == () and p.client.unacknowledged == (make_delta("d3"),)


def test_waiting_deltas_stay_while_paused_and_keep_their_order() -> None:
    p = opened(server_window=1)
    p.client.send_delta(make_delta("d1"))
    p.client.send_delta(make_delta("d2"))  # waits for room
    p.take_sent("client")
    inject(p, "client", {"type": "pause"})
    p.client.send_delta(make_delta("d3"))  # held by the pause
    inject(p, "client", {"type": "deltas_ack", "upTo": 1})  # room, but paused
    assert p.take_sent("client") == []
    assert p.client.held == (make_delta("d2"), make_delta("d3"))
    inject(p, "client", {"type": "resume"})
    assert wire(p, "client") == [batch_of("d2")]
    assert p.client.held == (make_delta("d3"),)
    inject(p, "client", {"type": "deltas_ack", "upTo": 2})
    assert wire(p, "client") == [batch_of("d3")]


def test_sync_batches_do_not_wait_behind_deltas_waiting_for_credit() -> None:
    p = opened(client_window=1)
    p.server.send_delta(make_delta("live-1"))
    p.server.send_delta(make_delta("live-2"))  # waits for room
    p.client.request_sync()
    deliver(p, "client")
    p.server.start_sync(total_deltas=1)
    p.server.send_sync_batch([make_delta("synced")], last=True)
    p.server.complete_sync()
    assert [m["type"] for m in wire(p, "server")] == [
        "deltas",
        "sync_start",
        "sync_batch",
        "sync_complete",
    ]
    assert p.server.held == (make_delta("live-2"),)


def test_a_peer_beyond_our_window_is_reported_once_per_excursion_and_still_heard() -> None:
    p = opened(server_window=2)
    text = "3 unacknowledged live deltas in flight, beyond the window of 2"
    inject(p, "server", deltas_msg("a", "b", "c"))
    assert p.new_events("server") == [
        ProtocolViolation(code="FLOW_CONTROL", message=text),
        *(DeltaReceived(delta=decode_delta(i)) for i in ("a", "b", "c")),
    ]
    assert wire(p, "server") == [{"type": "error", "code": "FLOW_CONTROL", "message": text}]
    inject(p, "server", {"type": "delta", "delta": delta_json("d")})  # still beyond: no repeat
    assert [type(e) for e in p.new_events("server")] == [DeltaReceived]
    for delta_id in ("a", "b", "c", "d"):
        p.server.ack(delta_id)
    assert [m["type"] for m in wire(p, "server")] == ["delta_ack", "deltas_ack"]
    inject(p, "server", deltas_msg("e", "f"))  # exactly the window: fine
    assert [type(e) for e in p.new_events("server")] == [DeltaReceived] * 2
    inject(p, "server", {"type": "delta", "delta": delta_json("g")})  # a new excursion
    events = p.new_events("server")
    assert [type(e) for e in events] == [ProtocolViolation, DeltaReceived]
    assert events[0] == ProtocolViolation(
        code="FLOW_CONTROL",
        message="3 unacknowledged live deltas in flight, beyond the window of 2",
    )
    assert p.server.state is State.OPEN


def test_without_credit_no_window_is_enforced() -> None:
    p = opened(("batch",), ("batch",), server_window=1)
    inject(p, "server", deltas_msg("a", "b", "c"))
    assert [type(e) for e in p.new_events("server")] == [DeltaReceived] * 3
    p.client.send_delta(make_delta("x"))
    p.client.send_delta(make_delta("y"))
    assert len(p.client.unacknowledged) == 2 and p.client.send_window is None


def decode_delta(delta_id: str) -> Delta:
    message = decode(dumps({"type": "delta", "timestamp": 1, "delta": delta_json(delta_id)}))
    assert hasattr(message, "delta")
    delta = message.delta
    assert isinstance(delta, Delta)
    return delta


# ---------------------------------------------------------------------- properties


class Link:
    """Two :class:`FederationProtocol` joined by two in-order channels that deliver only when
    told to (so acks, pauses and deltas cross each other), checking as events arrive:

    * each delta is delivered at most once, and only one its peer sent;
    * nothing new reaches a side that paused: once the pause reached the sender and until it
      resumes, only deltas the sender had committed before may arrive;
    * no violation of any kind between two of ours (``FLOW_CONTROL`` included), no stray ack.
    """

    def __init__(self, client: dict[str, Any], server: dict[str, Any]) -> None:
        clock = FakeClock()
        self.procs: dict[Side, FederationProtocol] = {
            "client": FederationProtocol(Role.CLIENT, system_id="c", clock=clock, **client),
            "server": FederationProtocol(
                Role.SERVER, system_id="s", link_id="l", clock=clock, **server
            ),
        }
        self.wires: dict[Side, deque[str]] = {"client": deque(), "server": deque()}
        self.log: dict[Side, list[str]] = {"client": [], "server": []}
        self.sent: dict[Side, list[str]] = {"client": [], "server": []}
        self.acked: dict[Side, set[str]] = {"client": set(), "server": set()}
        self.rejected: dict[Side, set[str]] = {"client": set(), "server": set()}
        self.delivered: dict[Side, set[str]] = {"client": set(), "server": set()}
        self.at_pause: dict[Side, set[str] | None] = {"client": None, "server": None}
        self.counter = 0
        for side in SIDES:
            self.procs[side].start(0.0)
        self.take("client")

    def take(self, side: Side) -> None:
        out = self.procs[side].messages_to_send()
        self.log[side].extend(out)
        self.wires[side].extend(out)

    def deliver(self, side: Side, count: int | None = None) -> None:
        self.take(side)
        wire = self.wires[side]
        for _ in range(len(wire) if count is None else min(count, len(wire))):
            receiver = other(side)
            self.procs[receiver].receive_message(wire.popleft(), 0.0)
            self.on_events(receiver, self.procs[receiver].events())

    def on_events(self, side: Side, events: list[Event]) -> None:
        proto = self.procs[side]
        for event in events:
            assert not isinstance(event, ProtocolViolation | Closed), event
            if isinstance(event, DeltaAcked):
                self.acked[side].add(event.delta_id)
            elif isinstance(event, DeltaRejected):
                self.rejected[side].add(event.delta_id)
            elif isinstance(event, Paused):
                self.at_pause[side] = {d.id for d in proto.unacknowledged}
            elif isinstance(event, Resumed):
                self.at_pause[side] = None
            elif isinstance(event, DeltaReceived):
                delta_id, sender = event.delta.id, other(side)
                assert delta_id in self.sent[sender]
                assert delta_id not in self.delivered[side], f"{delta_id} delivered twice"
                self.delivered[side].add(delta_id)
                window = self.at_pause[sender]
                if proto.paused and window is not None:
                    assert delta_id in window, f"{sender} sent {delta_id} to a paused {side}"

    def send(self, side: Side, count: int) -> None:
        for _ in range(count):
            self.counter += 1
            delta = make_delta(f"{side[0]}{self.counter}")
            self.procs[side].send_delta(delta)
            self.sent[side].append(delta.id)

    def answer(self, side: Side, pick: int, accept: bool) -> None:
        proto = self.procs[side]
        pending = sorted(proto.unanswered)
        if pending and proto.is_open:
            delta_id = pending[pick % len(pending)]
            if accept:
                proto.ack(delta_id)
            else:
                proto.nack(delta_id, "rejected by the test")
            assert delta_id not in proto.unanswered

    def check(self) -> None:
        for side in SIDES:
            proto = self.procs[side]
            if proto.send_window is not None:
                assert len(proto.unacknowledged) <= proto.send_window
            pending = {d.id for d in proto.unacknowledged} | {d.id for d in proto.held}
            assert len(pending) == proto.pending_count
            assert all(proto.is_pending(i) for i in pending)
            acked, rejected = self.acked[side], self.rejected[side]
            assert not (acked & rejected) and not ((acked | rejected) & pending)
            assert set(self.sent[side]) == acked | rejected | pending
            assert proto.stray_acks == 0

    def run(self, ops: list[tuple[Any, ...]]) -> None:
        for op in ops:
            name, side, *args = op
            proto = self.procs[side]
            if name == "send":
                self.send(side, args[0])
            elif name == "answer":
                self.answer(side, args[0], args[1])
            elif name == "pause" and proto.is_open:
                proto.pause()
            elif name == "resume" and proto.is_open:
                proto.resume()
            elif name == "deliver":
                self.deliver(side, args[0])
            elif name == "take":
                self.take(side)
            self.check()

    def settle(self) -> None:
        """Resume, deliver and accept everything until quiet."""
        for side in SIDES:
            if self.procs[side].paused:
                self.procs[side].resume()
        for _ in range(200):
            for side in SIDES:
                for delta_id in sorted(self.procs[side].unanswered):
                    self.procs[side].ack(delta_id)
                self.deliver(side)
            self.check()
            if not any(self.wires.values()) and not any(
                p.unanswered or p.pending_count for p in self.procs.values()
            ):
                return
        raise AssertionError("the link did not settle")


_sides = st.sampled_from(SIDES)
#: what the applications and the network do, in any order (answers and deliveries weigh double)
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), _sides, st.integers(1, 4)),
        st.tuples(st.just("answer"), _sides, st.integers(0, 1000), st.booleans()),
        st.tuples(st.just("answer"), _sides, st.integers(0, 1000), st.booleans()),
        st.tuples(st.just("pause"), _sides),
        st.tuples(st.just("resume"), _sides),
        st.tuples(st.just("deliver"), _sides, st.integers(0, 4)),
        st.tuples(st.just("deliver"), _sides, st.integers(0, 4)),
        st.tuples(st.just("take"), _sides),
    ),
    min_size=20,
    max_size=80,
)


@deterministic(max_examples=200)
@given(
    ops=OPERATIONS,
    windows=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    max_batch=st.integers(1, 3),
    deliver_handshake_first=st.booleans(),
)
def test_with_batch_and_credit_nothing_is_lost_and_windows_hold(
    ops: list[tuple[Any, ...]],
    windows: tuple[int, int],
    max_batch: int,
    deliver_handshake_first: bool,
) -> None:
    client = {"extensions": BOTH, "receive_window": windows[0], "max_batch": max_batch}
    server = {"extensions": BOTH, "receive_window": windows[1], "max_batch": max_batch}
    link = Link(client, server)
    if deliver_handshake_first:
        link.deliver("client")
        link.deliver("server")
    link.run(ops)
    link.settle()
    assert link.procs["client"].send_window == windows[1]
    assert link.procs["server"].send_window == windows[0]
    for side in SIDES:
        assert set(link.sent[side]) == link.acked[side] | link.rejected[side]
        assert link.delivered[other(side)] == set(link.sent[side])
        for text in link.log[side]:
            if json.loads(text)["type"] == "deltas":
                assert len(json.loads(text)["deltas"]) <= max_batch


def _without_extension_fields(text: str) -> dict[str, Any]:
    message = json.loads(text)
    if message["type"] in ("hello", "hello_ack"):
        message.pop("extensions", None)
        message.pop("window", None)
    return message


@deterministic(max_examples=50)
@given(ops=OPERATIONS)
def test_a_v1_peer_sees_exactly_the_v1_messages(ops: list[tuple[Any, ...]]) -> None:
    logs = []
    for client, server in [((), ()), (BOTH, ()), ((), BOTH), (("cursor", *BOTH), ("cursor",))]:
        link = Link({"extensions": client}, {"extensions": server})
        link.deliver("client")
        link.deliver("server")
        link.run(ops)
        link.settle()
        assert link.procs["client"].extensions_agreed <= {"cursor"}
        logs.append(
            {side: [_without_extension_fields(t) for t in link.log[side]] for side in SIDES}
        )
        types = {m["type"] for side in SIDES for m in logs[-1][side]}
        assert not types & {"deltas", "deltas_ack"}
    assert all(log == logs[0] for log in logs[1:])


# ---------------------------------------------------------------------- over WebSocket


def test_many_live_deltas_travel_in_few_frames_and_are_all_acknowledged() -> None:
    options = {"extensions": BOTH}
    p = ConnectionPair(client_options=options, server_options=options)
    p.transfer()

    def answer(side: Side, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DeltaReceived):
                p.conn(side).ack(event.delta.id)

    p.listener = answer
    sent = [make_delta(f"d{i}") for i in range(2500)]
    for delta in sent:
        p.client.send_delta(delta)
    data = p.client.data_to_send()
    frames = decode_output(data, from_server=False)
    assert [len(json.loads(f[5:])["deltas"]) for f in frames] == [1000, 1000, 500]
    p.pipes["client"] += data
    p.transfer()
    acks = decode_output(bytes(p.received["client"]), from_server=True)[2:]
    assert [json.loads(f[5:]) for f in acks] == [
        {"type": "deltas_ack", "timestamp": json.loads(acks[0][5:])["timestamp"], "upTo": 2500}
    ]
    acked = [e.delta_id for e in p.client_events if isinstance(e, DeltaAcked)]
    assert acked == [d.id for d in sent]
    assert p.client.pending_count == 0 and p.server.unanswered == frozenset()


def test_a_connection_within_the_default_window_sends_as_fast_as_acks_come() -> None:
    options = {"extensions": BOTH, "receive_window": 3}
    p = ConnectionPair(client_options=options, server_options=options)
    p.transfer()
    for i in range(10):
        p.server.send_delta(make_delta(f"s{i}"))
    for _ in range(4):
        p.transfer()
        assert len(p.server.unacknowledged) <= 3
        for delta_id in sorted(p.client.unanswered):
            p.client.ack(delta_id)
    p.transfer()
    assert [e.delta_id for e in p.server_events if isinstance(e, DeltaAcked)] == [
        f"s{i}" for i in range(10)
    ]


def _batch_server_script() -> bytes:
    """What a raw client speaking batch and credit (window 2) sends for a whole session."""
    scratch = make_server()
    scratch.start(0.0)
    raw = RawClient()
    data = raw.request()
    feed(scratch, data, 0.0)
    raw.receive(scratch.data_to_send())
    data += raw.hello(extensions=["batch", "credit"], window=2)
    data += raw.send_json({"type": "deltas", "timestamp": 5, "deltas": [delta_json("w1")]})
    data += raw.send_json({"type": "deltas_ack", "timestamp": 6, "upTo": 1})
    bad = [delta_json("w2"), delta_json("w3", author=""), delta_json("w4"), delta_json("w5")]
    data += raw.send_json({"type": "deltas", "timestamp": 7, "deltas": bad})
    data += raw.send_json({"type": "pause", "timestamp": 8})
    data += raw.send_json({"type": "delta_nack", "timestamp": 9, "deltaId": "m2", "reason": "r"})
    data += raw.send_json({"type": "deltas_ack", "timestamp": 10, "upTo": 7})
    data += raw.send_json({"type": "resume", "timestamp": 11})
    data += raw.send_json({"type": "deltas_ack", "timestamp": 12, "upTo": 4})
    data += raw.send_json({"type": "ping", "timestamp": 13})
    data += raw.send(CloseConnection(code=1000, reason="bye"))
    return data


BATCH_SCRIPT = _batch_server_script()


def _run_batch_script(chunks: list[bytes], react: bool = False) -> tuple[list[Event], list[str]]:
    conn = make_server(extensions=BOTH, receive_window=3)
    conn.start(0.0)
    for name in ("m1", "m2", "m3", "m4"):
        conn.send_delta(make_delta(name))  # held until the handshake, then 2 in flight
    events: list[Event] = []
    out = bytearray()
    for chunk in chunks:
        assert feed(conn, chunk, 1.0) is None
        for event in conn.events():
            events.append(event)
            if react and isinstance(event, DeltaReceived):
                conn.ack(event.delta.id)
        out += conn.data_to_send()
        assert len(conn.unacknowledged) <= 2
    events += conn.events()
    return events, decode_output(bytes(out), from_server=True)


def test_batch_and_credit_split_invariance() -> None:
    whole = _run_batch_script([BATCH_SCRIPT])
    events, out = whole
    assert [type(e).__name__ for e in events] == [
        "HandshakeComplete",
        "DeltaReceived",  # w1
        "DeltaAcked",  # m1: room for m3
        "ProtocolViolation",  # 5 deltas unanswered, window 3
        "DeltaReceived",  # w2
        "ProtocolViolation",  # w3 is invalid
        "DeltaReceived",  # w4
        "DeltaReceived",  # w5
        "Paused",
        "DeltaRejected",  # m2
        "DeltaAcked",  # m3 (upTo 7 > 3 sent: the excess is ignored)
        "Resumed",  # m4 goes
        "DeltaAcked",  # m4
        "Closed",
    ]
    violations = [e for e in events if isinstance(e, ProtocolViolation)]
    assert [v.code for v in violations] == ["FLOW_CONTROL", "INVALID_DELTA"]
    assert violations[0].message == "5 unacknowledged live deltas in flight, beyond the window of 3"
    assert [e.delta_id for e in events if isinstance(e, DeltaAcked)] == ["m1", "m3", "m4"]
    assert events[-1] == Closed(code=1000, reason="bye")
    texts = [json.loads(x[5:]) for x in out if x.startswith("text:")]
    assert [(m["type"], [d["id"] for d in m.get("deltas", [])]) for m in texts] == [
        ("hello_ack", []),
        ("deltas", ["m1", "m2"]),
        ("deltas", ["m3"]),
        ("error", []),
        ("delta_nack", []),
        ("deltas", ["m4"]),
        ("pong", []),
    ]
    assert (texts[3]["code"], texts[4]["deltaId"]) == ("FLOW_CONTROL", "w3")
    assert out[-1] == "close:1000:bye"
    assert texts[0]["window"] == 3 and texts[0]["extensions"] == ["batch", "credit"]
    assert _run_batch_script([BATCH_SCRIPT[i : i + 1] for i in range(len(BATCH_SCRIPT))]) == whole
    for offset in range(1, len(BATCH_SCRIPT), 13):
        assert _run_batch_script([BATCH_SCRIPT[:offset], BATCH_SCRIPT[offset:]]) == whole, offset
    # an application that answers as events arrive sees the same events, except that w1 was
    # answered before the 4 more came
    every7 = [BATCH_SCRIPT[i : i + 7] for i in range(0, len(BATCH_SCRIPT), 7)]
    reacting = _run_batch_script(every7, react=True)[0]
    assert [type(e) for e in reacting] == [type(e) for e in events]
    assert reacting[3] == ProtocolViolation(
        code="FLOW_CONTROL",
        message="4 unacknowledged live deltas in flight, beyond the window of 3",
    )
    assert reacting[:3] + reacting[4:] == events[:3] + events[4:]


def test_send_delta_may_skip_validation_for_deltas_valid_by_construction() -> None:
    p = opened(("batch",), ("batch",))
    received = decode_delta("from-the-wire")
    p.client.send_delta(received, validate=False)
    assert p.client.unacknowledged[0] is received  # not even copied
    with pytest.raises(LocalProtocolError, match="invalid delta"):
        p.client.send_delta(make_delta("bad", author=""))
    with pytest.raises(LocalProtocolError, match="already pending"):
        p.client.send_delta(received, validate=False)
    assert p.client.unacknowledged == (received,)
