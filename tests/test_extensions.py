"""Extension negotiation and the cursor fields at the message level."""

from __future__ import annotations

import json

import pytest

from rhizome_proto import (
    HandshakeComplete,
    LocalProtocolError,
    SyncBatchReceived,
    SyncCompleted,
    SyncRequested,
)
from tests.harness import ProtocolPair, make_delta


def pair(client: tuple[str, ...], server: tuple[str, ...]) -> ProtocolPair:
    return ProtocolPair.opened(
        client_options={"extensions": client}, server_options={"extensions": server}
    )


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
