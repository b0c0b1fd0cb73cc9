"""Bad input (issue #8, item 6, finding 6): whatever a peer sends, handling it never drops the
link without an ``error`` and a close; ids, authors and system ids have a length cap."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rhizome_proto import (
    CloseCode,
    ErrorCode,
    FederationConnection,
    RemoteProtocolError,
    Role,
    State,
)
from tests.harness import ConnectionPair
from tests.hostile_peers import T0, HostileServer, delta_dict


def of(messages: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == kind]


@pytest.mark.parametrize(
    "cursor",
    ["x:" + "9" * 400, "x:\u0661\u0662\u0663", "x:-1", "x:", "\u00e9" * 5000, "s:" + "9" * 19],
)
def test_finding_6_a_bad_sync_cursor_is_refused_not_raised(cursor: str) -> None:
    server = HostileServer()
    conn = server.connect("p", "peer", extensions=("cursor",))
    server.read("p")
    server.send("p", {"type": "sync_request", "timestamp": T0, "fromCursor": cursor})
    [error] = of(server.read("p"), "error")
    assert error["code"] == "SYNC_ERROR" and "invalid cursor" in error["message"]
    assert conn.is_open
    server.send("p", {"type": "sync_request", "timestamp": T0})  # the link still works
    server.node.sync_step("p")
    assert of(server.read("p"), "sync_complete")


def test_a_long_author_or_system_is_nacked_naming_the_rule() -> None:
    server = HostileServer()
    server.connect("p", "peer")
    server.read("p")
    server.send(
        "p",
        {"type": "delta", "timestamp": T0, "delta": delta_dict("a", author="x" * 4097)},
        {"type": "delta", "timestamp": T0, "delta": delta_dict("b", system="y" * 5000)},
        {"type": "delta", "timestamp": T0, "delta": delta_dict("c", author="z" * 4096)},
    )
    out = server.read("p")
    nacks = {m["deltaId"]: m["reason"] for m in of(out, "delta_nack")}
    assert nacks == {
        "a": "invalid delta: delta author of 4097 characters: longer than 4096",
        "b": "invalid delta: delta system of 5000 characters: longer than 4096",
    }
    assert [m["deltaId"] for m in of(out, "delta_ack")] == ["c"]
    assert server.store.count() == 1


def test_a_long_id_is_answered_without_echoing_it() -> None:
    server = HostileServer()
    server.connect("p", "peer")
    server.read("p")
    server.send("p", {"type": "delta", "timestamp": T0, "delta": delta_dict("i" * 100_000)})
    [error] = of(server.read("p"), "error")
    assert error["code"] == "INVALID_DELTA" and len(json.dumps(error)) < 500
    assert server.store.count() == 0


def test_the_cap_is_configurable() -> None:
    server = HostileServer()
    server.connect("p", "peer", max_id_length=8)
    server.read("p")
    server.send("p", {"type": "delta", "timestamp": T0, "delta": delta_dict("123456789")})
    assert of(server.read("p"), "error")
    server.send("p", {"type": "delta", "timestamp": T0, "delta": delta_dict("12345678")})
    assert of(server.read("p"), "delta_ack")


def test_long_deltas_in_a_batch_are_answered_one_by_one() -> None:
    server = HostileServer()
    server.connect("p", "peer", extensions=("batch",))
    server.read("p")
    deltas = [delta_dict("ok1"), delta_dict("bad", author="a" * 5000), delta_dict("ok2")]
    server.send("p", {"type": "deltas", "timestamp": T0, "deltas": deltas})
    out = server.read("p")
    assert [m["deltaId"] for m in of(out, "delta_nack")] == ["bad"]
    assert of(out, "deltas_ack")[-1]["upTo"] == 3  # every number answered
    assert server.store.count() == 2


def test_a_long_delta_in_a_sync_batch_is_refused_and_the_rest_stored() -> None:
    from rhizome_proto import FederationProtocol
    from tests.harness import FakeClock

    server = HostileServer()
    # our client side: a link to a hostile server that syncs a long delta
    client = FederationProtocol(Role.CLIENT, system_id="server2", clock=FakeClock())
    node = server.node
    node.add_link("out", outgoing=True, remote_url="ws://x")
    node.attach("out", client)
    client.start(0)
    client.messages_to_send()
    send = client.receive_message
    send(json.dumps({"type": "hello_ack", "timestamp": T0, "systemId": "h", "linkId": "l"}))
    node.handle_events("out")
    send(json.dumps({"type": "sync_start", "timestamp": T0, "totalDeltas": 2, "batchSize": 2}))
    batch = [delta_dict("fine"), delta_dict("long", system="s" * 5000)]
    send(
        json.dumps(
            {
                "type": "sync_batch",
                "timestamp": T0,
                "deltas": batch,
                "batchNumber": 0,
                "isLastBatch": True,
            }
        )
    )
    node.handle_events("out")
    out = [json.loads(t) for t in client.messages_to_send()]
    assert [m["deltaId"] for m in of(out, "delta_nack")] == ["long"]
    assert server.store.get("fine") is not None and server.store.get("long") is None


def test_a_long_hello_is_refused() -> None:
    server = HostileServer()
    with pytest.raises(RemoteProtocolError):
        server.connect("p", "s" * 5000)
    [error] = of(server.read("p"), "error")
    assert error["fatal"] and "systemId of 5000 characters" in error["message"]
    assert server.conns["p"].state is State.CLOSING


def test_an_exception_in_a_handler_becomes_an_error_and_a_close() -> None:
    """Acting on the peer's input raised (here the store fails on a sync request): the peer
    gets a fatal error and the link closes; the application gets link:error."""
    server = HostileServer()
    conn = server.connect("p", "peer")
    server.read("p")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("the store cannot scan this")

    server.store.count = broken  # type: ignore[method-assign]
    server.send("p", {"type": "sync_request", "timestamp": T0})
    [error] = of(server.read("p"), "error")
    assert error["fatal"] and error["code"] == "MESSAGE_ERROR"
    assert "SyncRequested" in error["message"]
    assert conn.state is State.CLOSING and conn.close_code == CloseCode.INTERNAL_ERROR
    [event] = server.of_type("link:error")
    assert event.fatal and "the store cannot scan this" in event.reason


def test_a_trust_policy_that_raises_refuses_the_delta() -> None:
    from rhizome_proto import create_custom_trust_policy

    def policy(delta: Any) -> bool:
        raise KeyError("oops")

    server = HostileServer(trust_policy=create_custom_trust_policy(policy))
    conn = server.connect("p", "peer")
    server.read("p")
    server.send("p", {"type": "delta", "timestamp": T0, "delta": delta_dict("d")})
    [nack] = of(server.read("p"), "delta_nack")
    assert "trust policy failed" in nack["reason"]
    assert conn.is_open


def test_an_exception_below_the_protocol_becomes_an_error_and_a_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pair = ConnectionPair.opened()
    server: FederationConnection = pair.server

    def boom(*args: Any, **kwargs: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(server._proto, "receive_message", boom)
    pair.client.send_delta(delta_dict_obj())
    data = pair.client.data_to_send()
    with pytest.raises(RemoteProtocolError) as caught:
        server.receive_data(data, pair.now)
    assert caught.value.code is ErrorCode.MESSAGE_ERROR
    assert caught.value.close_code == CloseCode.INTERNAL_ERROR
    out = server.data_to_send()
    assert b'"fatal":true' in out and b"internal error" in out
    assert server.state is State.CLOSING


def delta_dict_obj() -> Any:
    from tests.harness import make_delta

    return make_delta("x")
