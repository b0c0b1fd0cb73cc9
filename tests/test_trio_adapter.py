"""The async adapter's instances over real sockets on 127.0.0.1 (port 0), as the trio tests had
them, now on asyncio and on trio (each under a deadline); and a trio server with an asyncio
client (run in its own thread with its own loop)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio

from rhizome_adapters import aio, anyio_adapter
from rhizome_adapters.anyio_adapter import FederatedRhizomeDB
from rhizome_adapters.storage import SQLiteStore
from rhizome_proto import (
    Delta,
    FederationEvent,
    LinkConfig,
    ReconnectPolicy,
    create_author_trust_policy,
)
from tests.adapter_support import Recorder, ids, reserved_port
from tests.aio_support import deadline, instance, wait_until

FAST_RETRY = ReconnectPolicy(initial_delay=0.02, max_delay=0.1)


@contextlib.asynccontextmanager
async def pair(
    **server_kwargs: Any,
) -> AsyncIterator[tuple[FederatedRhizomeDB, FederatedRhizomeDB, str]]:
    async with (
        instance(system_id="server", **server_kwargs) as server,
        instance(system_id="client") as client,
    ):
        yield server, client, await server.enable_server(port=0)


async def put(
    db: FederatedRhizomeDB, n: int = 1, *, author: str = "alice", start: int = 1
) -> list[Delta]:
    deltas = [
        db.create_delta(author, [{"role": "n", "target": i}], timestamp=1000 + i)
        for i in range(start, start + n)
    ]
    for delta in deltas:
        assert await db.persist_delta(delta)
    return deltas


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


@deadline()
async def test_handshake_initial_sync_and_live_deltas_both_ways() -> None:
    async with pair() as (server, client, url):
        old = await put(server, 3, author="s")
        events = Recorder(client)
        link = await client.connect_to_remote(url)
        assert link.status == "connected" and link.remote_system_id == "server"
        assert events.of("link:connecting") and events.of("link:connected")
        await wait_until(lambda: bool(events.of("sync:completed")))
        assert client.scan_deltas() == old
        from_client = await put(client, 2, author="c", start=10)
        from_server = await put(server, 2, author="s", start=20)
        await wait_until(lambda: ids(server) >= {d.id for d in from_client})
        await wait_until(lambda: ids(client) >= {d.id for d in from_server})
        await wait_until(lambda: link.stats.deltas_sent == 2)
        assert link.stats.bytes_sent > 0 and link.stats.bytes_received > 0
        (incoming,) = server.get_federation_links()
        assert incoming.remote_system_id == "client" and not incoming.outgoing
        statuses = [link.status]
        await client.disconnect_from_remote(link.id)
        statuses.append(link.status)
        assert statuses == ["connected", "disconnected"] and client.get_federation_links() == []
        await wait_until(lambda: server.get_federation_links() == [])


@pytest.mark.parametrize("mode", ["push", "pull"])
@deadline()
async def test_modes(mode: str) -> None:
    async with pair() as (server, client, url):
        server_old = await put(server, 2, author="s")
        await client.connect_to_remote(url, LinkConfig(mode=mode))  # type: ignore[arg-type]
        server_new = await put(server, 2, author="s", start=10)
        client_new = await put(client, 2, author="c", start=20)
        if mode == "push":
            await wait_until(lambda: ids(server) >= {d.id for d in client_new})
        else:
            await wait_until(lambda: ids(client) >= {d.id for d in server_old + server_new})
        await anyio.sleep(0.2)  # what should not arrive has had time to
        assert len(server.scan_deltas()) == 4 + (2 if mode == "push" else 0)
        assert len(client.scan_deltas()) == 2 + (4 if mode == "pull" else 0)


@deadline()
async def test_trust_rejection_is_counted() -> None:
    policy = create_author_trust_policy(["alice"])
    async with pair(trust_policy=policy) as (server, client, url):
        client_events = Recorder(client)
        link = await client.connect_to_remote(url, LinkConfig(mode="push"))
        await put(client, 2, author="mallory")
        trusted = await put(client, 1, author="alice", start=10)
        await wait_until(lambda: len(client_events.of("delta:rejected")) == 2)
        await wait_until(lambda: link.stats.deltas_sent == 1)
        assert ids(server) == {d.id for d in trusted}
        (incoming,) = server.get_federation_links()
        assert incoming.stats.deltas_rejected == 2 and incoming.stats.deltas_received == 1
        assert link.stats.deltas_rejected_by_peer == 2


@deadline()
async def test_hub_and_spoke_with_three_spokes_converges() -> None:
    async with contextlib.AsyncExitStack() as stack:
        hub = await stack.enter_async_context(instance(system_id="hub"))
        url = await hub.enable_server(port=0)
        spokes = [
            await stack.enter_async_context(instance(system_id=f"spoke{i}")) for i in range(3)
        ]
        for spoke in spokes:
            await spoke.connect_to_remote(url)
        authored = [(await put(spoke, 1, author=spoke.system_id))[0] for spoke in spokes]
        everything = {d.id for d in authored}
        for db in (hub, *spokes):
            await wait_until(lambda db=db: ids(db) == everything)  # type: ignore[misc]
        await anyio.sleep(0.2)
        assert all(len(db.scan_deltas()) == 3 for db in (hub, *spokes))


@deadline(20)
async def test_reconnect_after_server_restart_loses_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "server.db")
    async with instance(system_id="client") as client:
        events = Recorder(client)
        async with instance(system_id="server", storage="sqlite", path=path) as server:
            url = await server.enable_server(port=0)
            before = await put(server, 3, author="s")
            link = await client.connect_to_remote(url, LinkConfig(reconnect=FAST_RETRY))
            early = await put(client, 2, author="c", start=10)
            await wait_until(lambda: ids(server) >= {d.id for d in early})
            last_words = await put(server, 2, author="s", start=30)
        await wait_until(lambda: link.status == "reconnecting")
        while_down = await put(client, 3, author="c", start=20)  # held in the link's outbox
        with SQLiteStore(path) as store:  # the server's owner adds deltas while it is down
            offline = [
                Delta(id=f"offline-{i}", timestamp=3000 + i, author="s", system="server")
                for i in range(2)
            ]
            store.put_many(offline)
        async with instance(system_id="server", storage="sqlite", path=path) as server:
            assert await server.enable_server(port=port_of(url)) == url
            everything = {d.id for d in before + early + last_words + while_down + offline}
            await wait_until(lambda: ids(server) == everything and ids(client) == everything)
            assert link.status == "connected"
            assert len(events.of("link:connected")) == 2


@deadline()
async def test_pause_and_resume() -> None:
    async with pair() as (server, client, url):
        server_events = Recorder(server)
        link = await client.connect_to_remote(url)
        await link.pause()
        statuses = [link.status]
        await wait_until(lambda: bool(server_events.of("link:paused")))
        held = await put(server, 3)
        await anyio.sleep(0.2)
        assert ids(client) == set()
        await link.resume()
        statuses.append(link.status)
        assert statuses == ["paused", "connected"]
        await wait_until(lambda: ids(client) == {d.id for d in held})
        assert server_events.of("link:resumed")


@deadline()
async def test_pings_keep_a_quiet_link_alive() -> None:
    quick: dict[str, Any] = {"ping_interval": 0.05, "ping_timeout": 0.25}
    async with pair(**quick) as (server, _, url), instance(**quick) as client:
        link = await client.connect_to_remote(url, LinkConfig(initial_sync="none"))
        received = link.stats.bytes_received
        await anyio.sleep(0.6)
        assert link.status == "connected" and len(server.get_federation_links()) == 1
        assert link.stats.bytes_received > received  # the server's pings and pongs


@deadline()
async def test_handlers_sync_async_failing_and_send_delta(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with pair() as (server, client, url):
        later: list[str] = []

        def broken(event: FederationEvent) -> None:
            raise RuntimeError("handler bug")

        async def slow(event: FederationEvent) -> None:
            await anyio.sleep(0)
            later.append(event.type)

        client.on_federation_event(broken)
        unsubscribe = client.on_federation_event(slow)
        link = await client.connect_to_remote(url, LinkConfig(initial_sync="none"))
        await wait_until(lambda: "link:connected" in later)
        unsubscribe()
        only_here = client.create_delta("alice", [])
        await link.send_delta(only_here)
        await wait_until(lambda: ids(server) == {only_here.id})
        assert client.get_delta_by_id(only_here.id) is None  # sent, not stored
        assert "delta:sent" not in later
    assert "federation event handler failed on link:connected" in caplog.text


@deadline()
async def test_give_up_503_and_usage_errors() -> None:
    with reserved_port() as closed_port:
        policy = ReconnectPolicy(max_attempts=1, initial_delay=0.01, max_delay=0.02)
        async with instance() as client, instance() as server:
            with pytest.raises(ConnectionError, match=r"gave up after 2 failed attempt"):
                await client.connect_to_remote(
                    f"ws://127.0.0.1:{closed_port}/federation", LinkConfig(reconnect=policy)
                )
            assert client.get_federation_links() == []
            url = await server.enable_server(port=0, max_connections=1)
            with pytest.raises(RuntimeError, match="already running"):
                await server.enable_server(port=0)
            with pytest.raises(OSError, match="the address is in use"):
                await client.enable_server(port=port_of(url))
            await client.connect_to_remote(url)
            response = b""
            async with await anyio.connect_tcp("127.0.0.1", port_of(url)) as stream:
                await stream.send(b"GET /federation HTTP/1.1\r\nHost: x\r\n\r\n")
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        response += await stream.receive()
            assert response.startswith(b"HTTP/1.1 503 ")
            assert len(server.get_federation_links()) == 1
        with pytest.raises(RuntimeError, match="closed"):
            await client.connect_to_remote(url)
        with pytest.raises(RuntimeError, match="async with"):  # asyncio's aio needs none
            await anyio_adapter.FederatedRhizomeDB().enable_server(port=0)


@deadline()
async def test_cancelled_connect_leaves_nothing_behind() -> None:
    with reserved_port() as port:
        url = f"ws://127.0.0.1:{port}/federation"
        slow = LinkConfig(reconnect=ReconnectPolicy(initial_delay=5, max_delay=5))
        async with instance() as client:
            with anyio.move_on_after(0.2):
                await client.connect_to_remote(url, slow)
            assert client.get_federation_links() == []
            link = await client.connect_to_remote(url, slow, wait=False)
            await anyio.sleep(0.1)
            with anyio.fail_after(1):
                await client.close()  # does not wait out the 5 s backoff
            assert link.status == "disconnected"


@deadline()
async def test_wss_between_instances() -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    async with (
        instance(system_id="server") as server,
        instance(system_id="client") as client,
    ):
        url = await server.enable_server(port=0, ssl=server_tls)
        assert url.startswith("wss://127.0.0.1:") and server.server_url == url
        old = await put(server, 2)
        link = await client.connect_to_remote(url, ssl=client_tls)
        assert link.status == "connected"
        await wait_until(lambda: ids(client) == {d.id for d in old})
        once = LinkConfig(reconnect=ReconnectPolicy(enabled=False))
        with pytest.raises(ConnectionError, match="certificate verify failed"):
            await client.connect_to_remote(url, once)  # the system's trust store: not our CA
        with pytest.raises(ValueError, match="needs a wss:// URL"):
            await client.connect_to_remote(url.replace("wss:", "ws:"), once, ssl=client_tls)


# ---------------------------------------------------------------- across runtimes


def asyncio_client(url: str) -> tuple[list[str], int]:
    """In a thread of its own with its own loop: connect, sync, push two deltas, wait for a live
    one; returns the ids it holds and how many of its deltas the server acknowledged."""

    async def main() -> tuple[list[str], int]:
        async with aio.FederatedRhizomeDB(system_id="aio-client") as db:
            link = await db.connect_to_remote(url)
            for i in range(2):
                await db.persist_delta(db.create_delta("aio", [{"role": "n", "target": i}]))
            async with asyncio.timeout(8):
                while "live" not in {d.author for d in db.scan_deltas()}:
                    await asyncio.sleep(0.005)
                while link.stats.deltas_sent < 2:
                    await asyncio.sleep(0.005)
            return [d.id for d in db.scan_deltas()], link.stats.deltas_sent

    return asyncio.run(main())


@deadline(backends=("trio",))
async def test_trio_server_with_an_asyncio_client() -> None:
    async with instance(system_id="trio-server") as server:
        url = await server.enable_server(port=0)
        old = await put(server, 3, author="s")
        result: list[tuple[list[str], int]] = []

        async def client() -> None:
            result.append(await trio.to_thread.run_sync(asyncio_client, url))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await wait_until(lambda: {"aio"} <= {d.author for d in server.scan_deltas()})
            await wait_until(lambda: len(server.scan_deltas()) == 5)
            live = await put(server, 1, author="live", start=50)
        client_ids, acked = result[0]
        assert set(client_ids) == ids(server) >= {d.id for d in old + live}
        assert len(client_ids) == 6 and acked == 2
        await wait_until(lambda: server.get_federation_links() == [])


def test_importing_the_package_does_not_import_trio() -> None:
    import subprocess
    import sys

    code = "import sys, rhizome_adapters, rhizome_adapters.threaded; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
