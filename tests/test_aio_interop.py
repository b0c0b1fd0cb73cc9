"""The asyncio adapter against an independent WebSocket implementation (``websockets``), speaking
v1 JSON by hand: our server with their client, their server with our client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from rhizome_adapters.aio import FederatedRhizomeDB
from rhizome_proto import DeltaFilter, LinkConfig, ReconnectPolicy
from tests.aio_support import on_asyncio as deadline
from tests.aio_support import wait_until

PROTOCOL = "rhizomedb-federation-v1"


def now() -> int:
    return int(time.time() * 1000)


def hello(protocol: str = PROTOCOL, **config: Any) -> str:
    config = {"mode": "bidirectional", "initialSync": "full", **config}
    return json.dumps(
        {
            "type": "hello",
            "timestamp": now(),
            "systemId": "ws-client",
            "config": config,
            "protocol": protocol,
        }
    )


async def receive(ws: ClientConnection | ServerConnection) -> dict[str, Any]:
    message = await ws.recv()
    assert isinstance(message, str)
    decoded: dict[str, Any] = json.loads(message)
    assert isinstance(decoded["timestamp"], int) and decoded["timestamp"] > 0
    return decoded


@asynccontextmanager
async def our_server(deltas: int = 0) -> AsyncIterator[tuple[FederatedRhizomeDB, str]]:
    async with FederatedRhizomeDB(system_id="py-server", batch_size=2) as db:
        for i in range(deltas):
            delta = db.create_delta("alice", [{"role": "n", "target": i}], timestamp=1000 + i)
            await db.persist_delta(delta)
        yield db, await db.enable_server(port=0)


@asynccontextmanager
async def their_client(url: str) -> AsyncIterator[ClientConnection]:
    async with connect(url, proxy=None, compression=None) as ws:
        yield ws


# ---------------------------------------------------------------- our server, their client


@deadline()
async def test_hello_gets_hello_ack() -> None:
    async with our_server() as (db, url), their_client(url) as ws:
        await ws.send(hello())
        ack = await receive(ws)
        assert set(ack) == {"type", "timestamp", "systemId", "linkId", "protocol"}
        assert ack["type"] == "hello_ack" and ack["systemId"] == "py-server"
        assert ack["protocol"] == PROTOCOL
        (link,) = db.get_federation_links()
        assert ack["linkId"] == link.id
        await wait_until(lambda: link.status == "connected")
        assert link.remote_system_id == "ws-client"


@deadline()
async def test_sync_request_streams_batches_with_exact_fields() -> None:
    async with our_server(deltas=3) as (_, url), their_client(url) as ws:
        await ws.send(hello())
        await receive(ws)
        await ws.send(json.dumps({"type": "sync_request", "timestamp": now()}))
        start = await receive(ws)
        assert start.keys() == {"type", "timestamp", "totalDeltas", "batchSize"}
        assert (start["type"], start["totalDeltas"], start["batchSize"]) == ("sync_start", 3, 2)
        batches = [await receive(ws), await receive(ws)]
        for number, batch in enumerate(batches):
            assert batch.keys() == {"type", "timestamp", "deltas", "batchNumber", "isLastBatch"}
            assert batch["type"] == "sync_batch" and batch["batchNumber"] == number
            assert batch["isLastBatch"] is (number == 1)
        sent = [d for batch in batches for d in batch["deltas"]]
        assert [d["timestamp"] for d in sent] == [1000, 1001, 1002]
        assert sent[0].keys() == {"id", "timestamp", "author", "system", "pointers"}
        assert sent[0]["pointers"] == [{"role": "n", "target": 0}]
        complete = await receive(ws)
        assert complete.keys() == {"type", "timestamp", "deltasProcessed"}
        assert (complete["type"], complete["deltasProcessed"]) == ("sync_complete", 3)


@deadline()
async def test_delta_gets_delta_ack_and_is_stored() -> None:
    async with our_server() as (db, url), their_client(url) as ws:
        await ws.send(hello(initialSync="none"))
        await receive(ws)
        delta = {"id": "d1", "timestamp": 5, "author": "a", "system": "ws-client", "pointers": []}
        await ws.send(json.dumps({"type": "delta", "timestamp": now(), "delta": delta}))
        ack = await receive(ws)
        assert ack.keys() == {"type", "timestamp", "deltaId"}
        assert (ack["type"], ack["deltaId"]) == ("delta_ack", "d1")
        stored = db.get_delta_by_id("d1")
        assert stored is not None and stored.author == "a"


@deadline()
async def test_invalid_json_gets_message_error_and_ping_gets_pong() -> None:
    async with our_server() as (_, url), their_client(url) as ws:
        await ws.send(hello())
        await receive(ws)
        await ws.send("{not json")
        error = await receive(ws)
        assert (error["type"], error["code"]) == ("error", "MESSAGE_ERROR")
        assert not error.get("fatal")
        await ws.send(json.dumps({"type": "ping", "timestamp": now()}))
        pong = await receive(ws)
        assert pong.keys() == {"type", "timestamp"} and pong["type"] == "pong"


@deadline()
async def test_wrong_protocol_is_fatal_then_closed() -> None:
    async with our_server() as (db, url), their_client(url) as ws:
        await ws.send(hello(protocol="rhizomedb-federation-v0"))
        error = await receive(ws)
        assert error["type"] == "error" and error["code"] == "PROTOCOL_MISMATCH"
        assert error["fatal"] is True
        assert "rhizomedb-federation-v0" in error["message"]
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1002
        await wait_until(lambda: db.get_federation_links() == [])


@deadline()
async def test_a_silent_peer_is_dropped_after_the_ping_timeout() -> None:
    async with FederatedRhizomeDB(ping_interval=0.05, ping_timeout=0.3) as db:
        url = await db.enable_server(port=0)
        errors: list[str | None] = []
        db.on_federation_event(
            lambda e: errors.append(e.reason) if e.type == "link:error" else None
        )
        async with their_client(url) as ws:  # its own keepalive pings only every 20 s
            await ws.send(hello(initialSync="none"))
            types: list[str] = []
            with pytest.raises(ConnectionClosed):
                while True:
                    types.append((await receive(ws))["type"])
        assert types[0] == "hello_ack" and types.count("ping") >= 3
        assert errors == ["ping timeout"]
        await wait_until(lambda: db.get_federation_links() == [])


# ---------------------------------------------------------------- their server, our client


@deadline()
async def test_our_client_against_a_websockets_server() -> None:
    received: list[dict[str, Any]] = []
    closed = asyncio.Event()
    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        first = await receive(ws)
        received.append(first)
        ack = {"type": "hello_ack", "timestamp": now(), "systemId": "ws-server"}
        await ws.send(json.dumps({**ack, "linkId": "L1", "protocol": PROTOCOL}))
        request = await receive(ws)
        received.append(request)
        delta = {"id": "s1", "timestamp": 7, "author": "alice", "system": "ws-server"}
        await ws.send(
            json.dumps(
                {"type": "sync_start", "timestamp": now(), "totalDeltas": 1, "batchSize": 100}
            )
        )
        batch = {"deltas": [{**delta, "pointers": []}], "batchNumber": 0, "isLastBatch": True}
        await ws.send(json.dumps({"type": "sync_batch", "timestamp": now(), **batch}))
        await ws.send(
            json.dumps({"type": "sync_complete", "timestamp": now(), "deltasProcessed": 1})
        )
        try:
            async for raw in ws:
                message = json.loads(raw)
                received.append(message)
                if message["type"] == "delta":
                    ack = {"type": "delta_ack", "timestamp": now()}
                    await ws.send(json.dumps({**ack, "deltaId": message["delta"]["id"]}))
        finally:
            closed.set()

    async with (
        serve(handler, "127.0.0.1", 0, compression=None) as server,
        FederatedRhizomeDB(system_id="py-client") as db,
    ):
        port = server.sockets[0].getsockname()[1]
        config = LinkConfig(
            pull_filter=DeltaFilter(authors=("alice",)),
            reconnect=ReconnectPolicy(initial_delay=0.5, max_delay=4),
        )
        link = await db.connect_to_remote(f"ws://127.0.0.1:{port}/federation?x=1", config)
        assert link.remote_system_id == "ws-server"
        await wait_until(lambda: db.get_delta_by_id("s1") is not None)
        mine = db.create_delta("alice", [{"role": "n", "target": 1}])
        await db.persist_delta(mine)
        await wait_until(lambda: link.stats.deltas_sent == 1)
        await link.disconnect()
        await closed.wait()

    assert paths == ["/federation?x=1"]
    first, request, *rest = received
    assert first["type"] == "hello" and first["systemId"] == "py-client"
    assert first["protocol"] == PROTOCOL
    assert first["config"]["mode"] == "bidirectional"
    assert first["config"]["initialSync"] == "full"
    assert first["config"]["pullFilter"] == {"authors": ["alice"]}
    assert first["config"]["reconnect"] == {
        "enabled": True,
        "maxAttempts": 0,
        "initialDelay": 500,
        "maxDelay": 4000,
        "backoffMultiplier": 2.0,
    }
    assert request["type"] == "sync_request" and request["filter"] == {"authors": ["alice"]}
    assert "fromTimestamp" not in request
    assert [m["type"] for m in rest] == ["delta"]
    assert rest[0]["delta"]["id"] == mine.id
