"""The async adapter over real sockets on 127.0.0.1 (port 0), every test on asyncio and on trio
(the asyncio and the trio adapter users import) under a deadline."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from rhizome_adapters import aio
from rhizome_adapters.anyio_adapter import FederatedRhizomeDB
from rhizome_adapters.storage import SQLiteStore
from rhizome_proto import (
    SYNC_CURSOR_KEY,
    Delta,
    DeltaFilter,
    FederationEvent,
    InvalidDeltaError,
    LinkConfig,
    Pointer,
    ReconnectPolicy,
    Reference,
    TrustPolicy,
    combine_trust_policies,
    create_author_trust_policy,
    create_custom_trust_policy,
    create_system_trust_policy,
)
from tests.adapter_support import Recorder, ids, reserved_port
from tests.aio_support import deadline, instance, wait_until

FAST_RETRY = ReconnectPolicy(initial_delay=0.02, max_delay=0.1)


async def settle(seconds: float = 0.2) -> None:
    """Time for anything that should not arrive to arrive anyway."""
    await anyio.sleep(seconds)


@contextlib.asynccontextmanager
async def pair(
    **server_kwargs: Any,
) -> AsyncIterator[tuple[FederatedRhizomeDB, FederatedRhizomeDB, str]]:
    async with (
        instance(system_id="server", **server_kwargs) as server,
        instance(system_id="client") as client,
    ):
        url = await server.enable_server(port=0)
        yield server, client, url


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


# ---------------------------------------------------------------- the local API


@deadline()
async def test_create_persist_get_scan() -> None:
    async with instance(system_id="me") as db:
        delta = db.create_delta(
            "alice",
            [
                {"role": "movie", "target": {"id": "m1", "context": "reviews"}},
                {"role": "rating", "target": 5},
                Pointer(role="ok", target=True),
                {"role": "text", "target": "great"},
            ],
        )
        assert delta.system == "me" and delta.pointers[0].target == Reference(
            id="m1", context="reviews"
        )
        assert await db.persist_delta(delta) is True
        assert await db.persist_delta(delta) is False
        assert db.get_delta_by_id(delta.id) == delta
        more = await put(db, 3, author="bob")
        assert db.scan_deltas() == [delta, *more]
        assert db.scan_deltas(DeltaFilter(authors=("bob",)), limit=2) == more[:2]
        with pytest.raises(InvalidDeltaError):
            db.create_delta("", [])
        with pytest.raises(InvalidDeltaError, match=r"pointers\[0\]"):
            db.create_delta("alice", [{"role": "x", "target": None}])


@deadline()
async def test_bad_urls_and_busy_port() -> None:
    async with instance() as a, instance() as b:
        for url in ("http://x/federation", "ws:///nohost", "wss:///nohost"):
            with pytest.raises(ValueError):
                await a.connect_to_remote(url)
        url = await a.enable_server(port=0)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert a.server_url == url == f"ws://127.0.0.1:{port}/federation"
        with pytest.raises(
            OSError, match=f"cannot listen on 127.0.0.1:{port}: the address is in use"
        ):
            await b.enable_server(port=port)


# ---------------------------------------------------------------- modes and initial sync


@pytest.mark.parametrize("mode", ["push", "pull", "bidirectional"])
@deadline()
async def test_modes(mode: str) -> None:
    async with pair() as (server, client, url):
        server_old = await put(server, 2, author="s")
        link = await client.connect_to_remote(url, LinkConfig(mode=mode))  # type: ignore[arg-type]
        assert link.status == "connected" and link.remote_system_id == "server"
        server_new = await put(server, 2, author="s", start=10)
        client_new = await put(client, 2, author="c", start=20)
        if mode != "pull":
            await wait_until(lambda: ids(server) >= {d.id for d in client_new})
        if mode != "push":
            await wait_until(lambda: ids(client) >= {d.id for d in server_old + server_new})
        await settle()
        assert len(server.scan_deltas()) == 4 + (2 if mode != "pull" else 0)
        assert len(client.scan_deltas()) == 2 + (4 if mode != "push" else 0)
        assert link.stats.bytes_sent > 0 and link.stats.bytes_received > 0


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (LinkConfig(initial_sync="full"), range(1, 11)),
        (LinkConfig(initial_sync="from_timestamp", sync_from_timestamp=1006), range(6, 11)),
        (LinkConfig(initial_sync="none"), range(0)),
    ],
    ids=["full", "from_timestamp", "none"],
)
@deadline()
async def test_initial_sync_strategies(config: LinkConfig, expected: range) -> None:
    async with pair() as (server, client, url):
        old = await put(server, 10)
        events = Recorder(client)
        await client.connect_to_remote(url, config)
        if config.initial_sync != "none":
            await wait_until(lambda: bool(events.of("sync:completed")))
        live = await put(server, 1, start=50)
        await wait_until(lambda: live[0].id in ids(client))
        await settle(0.1)
        assert client.scan_deltas() == [old[i - 1] for i in expected] + live
        assert bool(events.of("sync:started")) == (config.initial_sync != "none")


@deadline()
async def test_pull_filter_is_applied_by_the_server() -> None:
    async with pair() as (server, client, url):
        await put(server, 3, author="alice")
        await put(server, 3, author="bob", start=10)
        events = Recorder(client)
        only_alice = DeltaFilter(authors=("alice",))
        link = await client.connect_to_remote(url, LinkConfig(mode="pull", pull_filter=only_alice))
        await wait_until(lambda: bool(events.of("sync:completed")))
        assert events.of("sync:started")[0].total == 3
        await put(server, 1, author="bob", start=20)
        late = await put(server, 1, author="alice", start=21)
        await wait_until(lambda: late[0].id in ids(client))
        await settle(0.1)
        assert {d.author for d in client.scan_deltas()} == {"alice"}
        assert len(client.scan_deltas()) == 4
        assert link.stats.deltas_rejected == 0  # the server never sent bob's deltas


@deadline()
async def test_push_filter() -> None:
    async with pair() as (server, client, url):
        only_alice = DeltaFilter(authors=("alice",))
        await client.connect_to_remote(url, LinkConfig(mode="push", push_filter=only_alice))
        await put(client, 2, author="bob")
        alice = await put(client, 2, author="alice", start=10)
        await wait_until(lambda: ids(server) >= {d.id for d in alice})
        await settle(0.1)
        assert ids(server) == {d.id for d in alice}
        assert server.get_federation_links()[0].stats.deltas_rejected == 0


# ---------------------------------------------------------------- trust


def foreign(author: str, system: str, i: int) -> Delta:
    return Delta(id=f"{system}-{author}-{i}", timestamp=5000 + i, author=author, system=system)


TRUST_CASES: dict[str, tuple[TrustPolicy, list[Delta], list[Delta]]] = {
    "author": (
        create_author_trust_policy(["alice"]),
        [foreign("alice", "client", 1)],
        [foreign("mallory", "client", 2)],
    ),
    "system": (
        create_system_trust_policy(["client"]),
        [foreign("anyone", "client", 1)],
        [foreign("anyone", "elsewhere", 2)],
    ),
    "custom": (
        create_custom_trust_policy(lambda d: d.timestamp < 5002, "too new"),
        [foreign("a", "client", 1)],
        [foreign("a", "client", 2)],
    ),
    "combined": (
        combine_trust_policies(
            create_author_trust_policy(["alice"]), create_system_trust_policy(["client"])
        ),
        [foreign("alice", "client", 1)],
        [foreign("alice", "elsewhere", 2), foreign("mallory", "client", 3)],
    ),
}


@pytest.mark.parametrize("case", list(TRUST_CASES))
@deadline()
async def test_trust_policy_at_the_receiving_server(case: str) -> None:
    policy, trusted, untrusted = TRUST_CASES[case]
    async with pair(trust_policy=policy) as (server, client, url):
        server_events, client_events = Recorder(server), Recorder(client)
        link = await client.connect_to_remote(url, LinkConfig(mode="push"))
        for delta in untrusted + trusted:
            await client.persist_delta(delta)
        await wait_until(lambda: len(client_events.of("delta:rejected")) == len(untrusted))
        await wait_until(lambda: link.stats.deltas_sent == len(trusted))
        assert ids(server) == {d.id for d in trusted}
        (incoming,) = server.get_federation_links()
        assert incoming.stats.deltas_rejected == len(untrusted)
        assert incoming.stats.deltas_received == len(trusted)
        rejected = server_events.of("delta:rejected")
        assert [e.delta.id for e in rejected if e.delta] == [d.id for d in untrusted]
        assert link.stats.deltas_rejected_by_peer == len(untrusted)


@deadline()
async def test_trust_policy_of_a_client_link_during_sync() -> None:
    async with pair() as (server, client, url):
        good = await put(server, 2, author="alice")
        await put(server, 2, author="mallory", start=10)
        events = Recorder(client)
        config = LinkConfig(trust_policy=create_author_trust_policy(["alice"]))
        link = await client.connect_to_remote(url, config)
        await wait_until(lambda: bool(events.of("sync:completed")))
        assert client.scan_deltas() == good
        assert link.stats.deltas_rejected == 2 and len(events.of("delta:rejected")) == 2


# ---------------------------------------------------------------- topologies


@deadline()
async def test_hub_and_spoke_converges() -> None:
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
        await settle()
        assert all(len(db.scan_deltas()) == 3 for db in (hub, *spokes))


@deadline()
async def test_two_hubs_linked_both_ways_do_not_loop() -> None:
    async with instance(system_id="a") as a, instance(system_id="b") as b:
        url_a, url_b = await a.enable_server(port=0), await b.enable_server(port=0)
        await a.connect_to_remote(url_b)
        await b.connect_to_remote(url_a)
        events_a, events_b = Recorder(a), Recorder(b)
        await put(a, 1, author="a")
        await put(b, 1, author="b", start=2)
        await wait_until(lambda: len(ids(a)) == 2 and len(ids(b)) == 2)
        await settle(0.3)
        traffic = [link.stats.bytes_received for link in a.get_federation_links()]
        await settle(0.2)
        assert len(a.scan_deltas()) == 2 and len(b.scan_deltas()) == 2
        assert len(events_a.of("delta:received")) == 1
        assert len(events_b.of("delta:received")) == 1
        assert traffic == [link.stats.bytes_received for link in a.get_federation_links()]


# ---------------------------------------------------------------- link control


@deadline()
async def test_enable_server_auto_broadcast_false_relays_nothing() -> None:
    async with (
        instance(system_id="hub") as hub,
        instance(system_id="a") as a,
        instance(system_id="b") as b,
    ):
        url = await hub.enable_server(port=0, auto_broadcast=False)
        await a.connect_to_remote(url)
        synced = Recorder(b)
        await b.connect_to_remote(url)
        # b's initial sync is over before a's deltas reach the hub (else the sync, which may
        # rightly carry what the hub stored, races with them)
        await wait_until(lambda: bool(synced.of("sync:completed")))
        sent = await put(a, 2, author="a")
        await wait_until(lambda: ids(hub) == {d.id for d in sent})
        await settle()
        assert ids(b) == set()  # the hub stored them but relayed nothing


@pytest.mark.parametrize("extensions", [(), ("cursor",)], ids=["v1", "cursor"])
@deadline()
async def test_extensions_are_the_instances_choice(extensions: tuple[str, ...]) -> None:
    async with (
        instance(system_id="server") as server,
        instance(system_id="client", extensions=extensions) as client,
    ):
        url = await server.enable_server(port=0)
        sent = await put(server, 3)
        events = Recorder(client)
        await client.connect_to_remote(url)
        await wait_until(lambda: len(events.of("sync:completed")) == 1)
        assert ids(client) == {d.id for d in sent}
        cursor = client.store.get_meta(SYNC_CURSOR_KEY.format("server", ""))
        assert (cursor is not None) == bool(extensions)  # kept only when cursor was agreed


@deadline()
async def test_pause_and_resume_over_sockets() -> None:
    async with pair() as (server, client, url):
        server_events = Recorder(server)
        link = await client.connect_to_remote(url)
        await link.pause()
        statuses = [link.status]
        await wait_until(lambda: bool(server_events.of("link:paused")))
        held = await put(server, 3)
        await settle()
        assert ids(client) == set()
        await link.resume()
        statuses.append(link.status)
        assert statuses == ["paused", "connected"]
        await wait_until(lambda: ids(client) == {d.id for d in held})
        assert server_events.of("link:resumed")


@deadline()
async def test_events_handlers_sync_async_failing_and_unsubscribe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with pair() as (server, client, url):
        seen: list[str] = []
        later: list[str] = []

        def broken(event: FederationEvent) -> None:
            raise RuntimeError("handler bug")

        async def slow(event: FederationEvent) -> None:
            await anyio.sleep(0)
            later.append(event.type)

        client.on_federation_event(broken)
        client.on_federation_event(slow)
        unsubscribe = client.on_federation_event(lambda e: seen.append(e.type))
        link = await client.connect_to_remote(url)
        assert seen[:2] == ["link:connecting", "link:connected"]
        await wait_until(lambda: "link:connected" in later)
        unsubscribe()
        count = len(seen)
        delta = (await put(server, 1))[0]
        await wait_until(lambda: delta.id in ids(client))
        assert len(seen) == count and link.status == "connected"
    assert "federation event handler failed on link:connected" in caplog.text


@deadline()
async def test_send_delta_on_one_link_and_disconnect() -> None:
    async with pair() as (server, client, url):
        server_events = Recorder(server)
        link = await client.connect_to_remote(url, LinkConfig(initial_sync="none"))
        assert client.get_federation_link(link.id) is link
        only_here = client.create_delta("alice", [])
        await link.send_delta(only_here)
        await wait_until(lambda: ids(server) == {only_here.id})
        assert client.get_delta_by_id(only_here.id) is None  # sent, not stored
        await client.disconnect_from_remote(link.id)
        assert link.status == "disconnected" and client.get_federation_links() == []
        await wait_until(lambda: bool(server_events.of("link:disconnected")))
        assert server.get_federation_links() == []
        with pytest.raises(ConnectionError):
            await link.send_delta(only_here)


@deadline()
async def test_pings_keep_a_quiet_link_alive() -> None:
    async with (
        pair(ping_interval=0.05, ping_timeout=0.25) as (server, _, url),
        instance(ping_interval=0.05, ping_timeout=0.25) as client,
    ):
        link = await client.connect_to_remote(url, LinkConfig(initial_sync="none"))
        received = link.stats.bytes_received
        await anyio.sleep(0.6)
        assert link.status == "connected" and len(server.get_federation_links()) == 1
        assert link.stats.bytes_received > received  # the server's pings and pongs


# ---------------------------------------------------------------- reconnection


@deadline(20)
async def test_reconnect_after_server_restart_loses_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "server.db")
    config = LinkConfig(reconnect=FAST_RETRY)
    async with instance(system_id="client") as client:
        events = Recorder(client)
        async with instance(system_id="server", storage="sqlite", path=path) as server:
            url = await server.enable_server(port=0)
            before = await put(server, 3, author="s")
            link = await client.connect_to_remote(url, config)
            early = await put(client, 2, author="c", start=10)
            await wait_until(lambda: ids(server) >= {d.id for d in early})
            last_words = await put(server, 2, author="s", start=30)  # live, or by the next sync
        await wait_until(lambda: link.status == "reconnecting")
        while_down = await put(client, 3, author="c", start=20)  # held in the link's outbox
        with SQLiteStore(path) as store:  # the server's owner adds deltas while it is down
            offline = [
                Delta(id=f"offline-{i}", timestamp=3000 + i, author="s", system="server")
                for i in range(2)
            ]
            store.put_many(offline)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        async with instance(system_id="server", storage="sqlite", path=path) as server:
            assert await server.enable_server(port=port) == url
            everything = {d.id for d in before + early + last_words + while_down + offline}
            await wait_until(lambda: ids(server) == everything and ids(client) == everything)
            assert link.status == "connected"
            assert len(events.of("link:connected")) == 2


@deadline()
async def test_a_restarted_client_offers_what_it_stored_while_down(tmp_path: Path) -> None:
    """The client's outbox is memory; after a restart the push catch-up (a cursor kept in
    the client's SQLite file) offers the server what it never acknowledged."""
    client_path = str(tmp_path / "client.db")
    async with instance(system_id="server") as server:
        url = await server.enable_server(port=0)
        async with instance(system_id="client", storage="sqlite", path=client_path) as client:
            await client.connect_to_remote(url, LinkConfig(reconnect=FAST_RETRY))
            first = await put(client, 2, author="c")
            await wait_until(lambda: ids(server) >= {d.id for d in first})
        # the client is gone; it authors more offline (another process, the same file)
        with SQLiteStore(client_path) as store:
            offline = [
                Delta(id=f"offline-{i}", timestamp=5000 + i, author="c", system="client")
                for i in range(3)
            ]
            store.put_many(offline)
        async with instance(system_id="client", storage="sqlite", path=client_path) as client:
            await client.connect_to_remote(url, LinkConfig(reconnect=FAST_RETRY))
            everything = {d.id for d in first + offline}
            await wait_until(lambda: ids(server) == everything)


@deadline()
async def test_first_connect_is_retried_until_the_server_appears() -> None:
    connected: list[Any] = []
    with reserved_port() as port:
        url = f"ws://127.0.0.1:{port}/federation"
        async with instance(system_id="client") as client, anyio.create_task_group() as tasks:
            events = Recorder(client)

            async def connect() -> None:
                connected.append(
                    await client.connect_to_remote(url, LinkConfig(reconnect=FAST_RETRY))
                )

            tasks.start_soon(connect)
            await wait_until(lambda: len(events.of("link:error")) >= 2)
            (pending,) = client.get_federation_links()
            assert pending.status == "connecting" and not connected
            async with instance(system_id="server") as server:
                await server.enable_server(port=port)
                await wait_until(lambda: bool(connected))
                (link,) = connected
                assert link is pending and link.status == "connected"


@deadline()
async def test_give_up_raises_connection_error() -> None:
    policy = ReconnectPolicy(max_attempts=2, initial_delay=0.01, max_delay=0.02)
    with reserved_port() as port:
        await give_up(f"ws://127.0.0.1:{port}/federation", policy)


async def give_up(url: str, policy: ReconnectPolicy) -> None:
    async with instance() as client:
        events = Recorder(client)
        with pytest.raises(ConnectionError, match=r"gave up after 3 failed attempt"):
            await client.connect_to_remote(url, LinkConfig(reconnect=policy))
        assert len(events.of("link:connecting")) == 3
        assert client.get_federation_links() == []
        link = await client.connect_to_remote(url, LinkConfig(reconnect=policy), wait=False)
        assert link.status == "connecting"
        await wait_until(lambda: link.status == "failed")
        assert link.failure is not None and "gave up" in link.failure


@deadline()
async def test_cancelled_connect_and_close_while_reconnecting_leave_nothing_behind() -> None:
    """On asyncio without ``async with`` (it needs none), on trio inside it."""
    slow = LinkConfig(reconnect=ReconnectPolicy(initial_delay=5, max_delay=5))
    with reserved_port() as port:
        url = f"ws://127.0.0.1:{port}/federation"
        client = instance()
        async with contextlib.AsyncExitStack() as stack:
            if not isinstance(client, aio.FederatedRhizomeDB):
                await stack.enter_async_context(client)
            with pytest.raises(TimeoutError), anyio.fail_after(0.2):
                await client.connect_to_remote(url, slow)
            assert client.get_federation_links() == []
            link = await client.connect_to_remote(url, slow, wait=False)
            await anyio.sleep(0.1)
            with anyio.fail_after(1):
                await client.close()  # does not wait out the 5 s backoff
            assert link.status == "disconnected"
            with pytest.raises(RuntimeError, match="closed"):
                await client.connect_to_remote(url)


# ---------------------------------------------------------------- volume and HTTP


@deadline(30)
async def test_large_sync_arrives_complete_and_in_order() -> None:
    async with pair(batch_size=100) as (server, client, url):
        deltas = [
            server.create_delta("alice", [{"role": "n", "target": i}], timestamp=1000 + i)
            for i in range(5000)
        ]
        server.node.store.put_many(deltas)
        events = Recorder(client)
        await client.connect_to_remote(url)
        await wait_until(lambda: bool(events.of("sync:completed")), timeout=25)
        assert client.scan_deltas() == deltas
        assert len(events.of("sync:progress")) == 50


async def raw_request(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    response = b""
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(request)
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            while True:
                response += await stream.receive()
    return response


@deadline()
async def test_plain_http_get_gets_426() -> None:
    async with instance() as server:
        url = await server.enable_server(port=0)
        response = await raw_request(url, b"GET /federation HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 426 ")
        await wait_until(lambda: server.get_federation_links() == [])


@deadline()
async def test_connections_beyond_the_limit_get_503() -> None:
    async with pair() as (_, client, _url), instance() as server:
        url = await server.enable_server(port=0, max_connections=1)
        await client.connect_to_remote(url)
        response = await raw_request(url, b"GET /federation HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 503 ")
        assert len(server.get_federation_links()) == 1


# ---------------------------------------------------------------- the hot path


@pytest.mark.slow
@deadline(60)
async def test_two_stored_deltas_of_9_mib_sync_in_separate_messages(tmp_path: Path) -> None:
    """Each fits the 16 MiB message limit, both together do not: they go in two batches."""
    big = "x" * (9 * 1024 * 1024)
    async with pair(storage="sqlite", path=str(tmp_path / "server.db")) as (server, client, url):
        for i in range(2):
            await server.persist_delta(
                server.create_delta("alice", [{"role": "text", "target": big}], id=f"big-{i}")
            )
        events = Recorder(client)
        await client.connect_to_remote(url)
        await wait_until(lambda: bool(events.of("sync:completed")), timeout=50)
        assert ids(client) == {"big-0", "big-1"}
        assert [e.count for e in events.of("sync:progress")] == [1, 1]


@deadline(30)
async def test_a_delta_too_large_for_the_peer_is_reported_not_retried() -> None:
    async with pair(max_message_size=64 * 1024) as (server, client, url):
        server.node.store.put_many(
            [
                server.create_delta("alice", [{"role": "n", "target": 1}], id="small"),
                server.create_delta("alice", [{"role": "t", "target": "x" * 100_000}], id="huge"),
            ]
        )
        errors: list[FederationEvent] = []
        server.on_federation_event(errors.append, ["link:error"])
        synced = Recorder(client)
        await client.connect_to_remote(url)
        await wait_until(lambda: bool(synced.of("sync:completed")))
        assert ids(client) == {"small"}
        assert [e.delta_id for e in errors] == ["huge"]


@deadline()
async def test_handlers_get_only_the_event_types_they_ask_for() -> None:
    async with pair() as (server, client, url):
        await put(server, 3)
        only: list[FederationEvent] = []
        everything = Recorder(client)
        client.on_federation_event(only.append, ["sync:completed", "link:connected"])
        await client.connect_to_remote(url)
        await wait_until(lambda: bool(only) and only[-1].type == "sync:completed")
        assert [e.type for e in only] == ["link:connected", "sync:completed"]
        assert len(everything.of("delta:received")) == 3


@deadline()
async def test_persist_deltas_stores_many_in_one_transaction_and_sends_each(
    tmp_path: Path,
) -> None:
    async with (
        pair() as (server, _client, url),
        instance(system_id="writer", storage="sqlite", path=str(tmp_path / "w.db")) as writer,
    ):
        await writer.connect_to_remote(url, LinkConfig(mode="push", initial_sync="none"))
        made = [
            writer.create_delta("alice", [{"role": "n", "target": i}], id=f"m{i}")
            for i in range(300)
        ]
        assert await writer.persist_deltas([*made, made[0]]) == [True] * 300 + [False]
        await wait_until(lambda: len(server.store) == 300)
        assert [d.id for d in writer.scan_deltas()] == [d.id for d in made]
        with pytest.raises(InvalidDeltaError):
            await writer.persist_deltas([Delta(id="", timestamp=1, author="a", system="s")])


@deadline()
async def test_per_delta_events_are_made_only_while_a_handler_wants_them() -> None:
    async with instance() as db:
        node = db.node
        assert (node.report_received, node.report_sent) == (False, False)
        unsubscribe = db.on_federation_event(lambda e: None, ["link:connected"])
        assert (node.report_received, node.report_sent) == (False, False)
        sent = db.on_federation_event(lambda e: None, ["delta:sent"])
        assert (node.report_received, node.report_sent) == (False, True)
        everything = db.on_federation_event(lambda e: None)
        assert (node.report_received, node.report_sent) == (True, True)
        everything()
        sent()
        unsubscribe()
        assert (node.report_received, node.report_sent) == (False, False)
