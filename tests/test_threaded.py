"""The threaded adapter over real sockets on 127.0.0.1 (port 0): every wait has a timeout, every
instance is closed in ``finally`` (its threads are daemons); and a threaded client with an
asyncio server running in its own thread with its own loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from rhizome_adapters import aio
from rhizome_adapters.storage import SQLiteStore
from rhizome_adapters.threaded import FederatedRhizomeDB
from rhizome_proto import (
    Delta,
    FederationEvent,
    LinkConfig,
    ReconnectPolicy,
    create_author_trust_policy,
)
from tests.adapter_support import Recorder, ids, reserved_port

FAST_RETRY = ReconnectPolicy(initial_delay=0.02, max_delay=0.1)
T = TypeVar("T")


def deadline(seconds: float = 10.0) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Run the test in a daemon thread and fail it if it has not finished after ``seconds``."""

    def decorate(test: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> None:
            outcome: list[BaseException | None] = []

            def body() -> None:
                try:
                    test(*args, **kwargs)
                except BaseException as exc:
                    outcome.append(exc)
                else:
                    outcome.append(None)

            thread = threading.Thread(target=body, daemon=True, name="test-body")
            thread.start()
            thread.join(seconds)
            if thread.is_alive():
                pytest.fail(f"still running after {seconds} s")
            if outcome[0] is not None:
                raise outcome[0]

        return run

    return decorate


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not met in time")
        time.sleep(0.005)


@contextlib.contextmanager
def instances(*system_ids: str, **kwargs: Any) -> Iterator[list[FederatedRhizomeDB]]:
    dbs: list[FederatedRhizomeDB] = []
    try:
        for system_id in system_ids:
            dbs.append(FederatedRhizomeDB(system_id=system_id, **kwargs))
        yield dbs
    finally:
        for db in reversed(dbs):
            db.close()


@contextlib.contextmanager
def pair(**server_kwargs: Any) -> Iterator[tuple[FederatedRhizomeDB, FederatedRhizomeDB, str]]:
    with instances("server", **server_kwargs) as (server,), instances("client") as (client,):
        yield server, client, server.enable_server(port=0)


def put(
    db: FederatedRhizomeDB, n: int = 1, *, author: str = "alice", start: int = 1
) -> list[Delta]:
    deltas = [
        db.create_delta(author, [{"role": "n", "target": i}], timestamp=1000 + i)
        for i in range(start, start + n)
    ]
    for delta in deltas:
        assert db.persist_delta(delta)
    return deltas


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


@deadline()
def test_handshake_initial_sync_and_live_deltas_both_ways() -> None:
    with pair() as (server, client, url):
        old = put(server, 3, author="s")
        events = Recorder(client)
        link = client.connect_to_remote(url, timeout=5)
        assert link.status == "connected" and link.remote_system_id == "server"
        wait_until(lambda: bool(events.of("sync:completed")))
        assert client.scan_deltas() == old
        from_client = put(client, 2, author="c", start=10)
        from_server = put(server, 2, author="s", start=20)
        wait_until(lambda: ids(server) >= {d.id for d in from_client})
        wait_until(lambda: ids(client) >= {d.id for d in from_server})
        wait_until(lambda: link.stats.deltas_sent == 2)
        assert link.stats.bytes_sent > 0 and link.stats.bytes_received > 0
        assert [e.type for e in events.events[:2]] == ["link:connecting", "link:connected"]
        statuses = [link.status]
        client.disconnect_from_remote(link.id)
        statuses.append(link.status)
        assert statuses == ["connected", "disconnected"] and client.get_federation_links() == []
        wait_until(lambda: server.get_federation_links() == [])


@pytest.mark.parametrize("mode", ["push", "pull"])
@deadline()
def test_modes(mode: str) -> None:
    with pair() as (server, client, url):
        server_old = put(server, 2, author="s")
        client.connect_to_remote(url, LinkConfig(mode=mode), timeout=5)  # type: ignore[arg-type]
        server_new = put(server, 2, author="s", start=10)
        client_new = put(client, 2, author="c", start=20)
        if mode == "push":
            wait_until(lambda: ids(server) >= {d.id for d in client_new})
        else:
            wait_until(lambda: ids(client) >= {d.id for d in server_old + server_new})
        time.sleep(0.2)  # what should not arrive has had time to
        assert len(server.scan_deltas()) == 4 + (2 if mode == "push" else 0)
        assert len(client.scan_deltas()) == 2 + (4 if mode == "pull" else 0)


@deadline()
def test_trust_rejection_is_counted() -> None:
    with pair(trust_policy=create_author_trust_policy(["alice"])) as (server, client, url):
        client_events = Recorder(client)
        link = client.connect_to_remote(url, LinkConfig(mode="push"), timeout=5)
        put(client, 2, author="mallory")
        trusted = put(client, 1, author="alice", start=10)
        wait_until(lambda: len(client_events.of("delta:rejected")) == 2)
        wait_until(lambda: link.stats.deltas_sent == 1)
        assert ids(server) == {d.id for d in trusted}
        (incoming,) = server.get_federation_links()
        assert incoming.stats.deltas_rejected == 2 and incoming.stats.deltas_received == 1
        assert link.stats.deltas_rejected_by_peer == 2


@deadline()
def test_hub_and_spoke_with_three_spokes_converges() -> None:
    with instances("hub", "spoke0", "spoke1", "spoke2") as (hub, *spokes):
        url = hub.enable_server(port=0)
        for spoke in spokes:
            spoke.connect_to_remote(url, timeout=5)
        authored = [put(spoke, 1, author=spoke.system_id)[0] for spoke in spokes]
        everything = {d.id for d in authored}
        for db in (hub, *spokes):
            wait_until(lambda db=db: ids(db) == everything)  # type: ignore[misc]
        time.sleep(0.2)
        assert all(len(db.scan_deltas()) == 3 for db in (hub, *spokes))


@deadline(20)
def test_reconnect_after_server_restart_loses_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "server.db")
    with instances("client") as (client,):
        events = Recorder(client)
        with instances("server", storage="sqlite", path=path) as (server,):
            url = server.enable_server(port=0)
            before = put(server, 3, author="s")
            link = client.connect_to_remote(url, LinkConfig(reconnect=FAST_RETRY), timeout=5)
            early = put(client, 2, author="c", start=10)
            wait_until(lambda: ids(server) >= {d.id for d in early})
            last_words = put(server, 2, author="s", start=30)
        wait_until(lambda: link.status == "reconnecting")
        while_down = put(client, 3, author="c", start=20)  # held in the link's outbox
        with SQLiteStore(path) as store:  # the server's owner adds deltas while it is down
            offline = [
                Delta(id=f"offline-{i}", timestamp=3000 + i, author="s", system="server")
                for i in range(2)
            ]
            store.put_many(offline)
        with instances("server", storage="sqlite", path=path) as (server,):
            assert server.enable_server(port=port_of(url)) == url
            everything = {d.id for d in before + early + last_words + while_down + offline}
            wait_until(lambda: ids(server) == everything and ids(client) == everything)
            assert link.status == "connected"
            assert len(events.of("link:connected")) == 2


@deadline()
def test_pause_and_resume() -> None:
    with pair() as (server, client, url):
        server_events = Recorder(server)
        link = client.connect_to_remote(url, timeout=5)
        link.pause()
        statuses = [link.status]
        wait_until(lambda: bool(server_events.of("link:paused")))
        held = put(server, 3)
        time.sleep(0.2)
        assert ids(client) == set()
        link.resume()
        statuses.append(link.status)
        assert statuses == ["paused", "connected"]
        wait_until(lambda: ids(client) == {d.id for d in held})
        assert server_events.of("link:resumed")


@deadline()
def test_pings_keep_a_quiet_link_alive() -> None:
    quick: dict[str, Any] = {"ping_interval": 0.05, "ping_timeout": 0.25}
    with pair(**quick) as (server, _, url), instances("quick", **quick) as (client,):
        link = client.connect_to_remote(url, LinkConfig(initial_sync="none"), timeout=5)
        received = link.stats.bytes_received
        time.sleep(0.6)
        assert link.status == "connected" and len(server.get_federation_links()) == 1
        assert link.stats.bytes_received > received  # the server's pings and pongs


@deadline()
def test_handlers_run_in_order_one_at_a_time_and_may_call_the_instance(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pair() as (server, client, url):
        seen: list[str] = []
        threads: set[str] = set()
        busy = threading.Lock()

        def handler(event: FederationEvent) -> None:
            assert busy.acquire(blocking=False), "handlers ran concurrently"
            try:
                threads.add(threading.current_thread().name)
                seen.append(event.type)
                if event.type == "delta:received" and event.delta is not None:
                    reply = client.create_delta("echo", [{"role": "of", "target": event.delta.id}])
                    client.persist_delta(reply)  # calling the instance from a handler is fine
            finally:
                busy.release()

        def broken(event: FederationEvent) -> None:
            raise RuntimeError("handler bug")

        async def coroutine_handler(event: FederationEvent) -> None:
            pass

        with pytest.raises(TypeError, match="coroutines"):
            client.on_federation_event(coroutine_handler)
        client.on_federation_event(broken)
        client.on_federation_event(handler)
        client.connect_to_remote(url, timeout=5)
        sent = put(server, 3)
        wait_until(lambda: len(ids(server)) == 6)
        assert {d.author for d in server.scan_deltas()} == {"alice", "echo"}
        wait_until(lambda: seen.count("delta:sent") == 3)
        assert seen[:2] == ["link:connecting", "link:connected"]
        assert seen.count("delta:received") == len(sent)
        assert "test-body" not in threads  # called from the adapter's threads
    assert "federation event handler failed on link:connected" in caplog.text


@deadline()
def test_give_up_timeout_503_and_usage_errors() -> None:
    with reserved_port() as port:
        closed = f"ws://127.0.0.1:{port}/federation"
        once = LinkConfig(
            reconnect=ReconnectPolicy(max_attempts=1, initial_delay=0.01, max_delay=0.02)
        )
        slow = LinkConfig(reconnect=ReconnectPolicy(initial_delay=5, max_delay=5))
        with pair() as (server, client, url), instances("other") as (other,):
            with pytest.raises(ConnectionError, match=r"gave up after 2 failed attempt"):
                client.connect_to_remote(closed, once)
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                client.connect_to_remote(closed, slow, timeout=0.2)
            assert time.monotonic() - started < 2  # the 5 s backoff is not waited out
            assert client.get_federation_links() == []
            with pytest.raises(ConnectionError, match="SSL"):  # TLS to a plain server
                client.connect_to_remote(url.replace("ws:", "wss:"), once)
            with pytest.raises(OSError, match="the address is in use"):
                other.enable_server(port=port_of(url))
            with pytest.raises(RuntimeError, match="already running"):
                server.enable_server(port=0)
            limited = other.enable_server(port=0, max_connections=1)
            client.connect_to_remote(limited, timeout=5)
            with socket.create_connection(("127.0.0.1", port_of(limited)), timeout=5) as sock:
                sock.sendall(b"GET /federation HTTP/1.1\r\nHost: x\r\n\r\n")
                response = b""
                while chunk := sock.recv(4096):
                    response += chunk
            assert response.startswith(b"HTTP/1.1 503 ")
            assert len(other.get_federation_links()) == 1
            link = client.connect_to_remote(closed, slow, wait=False)
        assert link.status == "disconnected"  # close() did not wait out the backoff either
        with pytest.raises(RuntimeError, match="closed"):
            client.connect_to_remote(url)


# ---------------------------------------------------------------- across runtimes


class LoopThread:
    """An asyncio event loop running in a thread of its own; ``run`` waits for a coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@deadline()
def test_threaded_client_with_an_asyncio_server() -> None:
    loop = LoopThread()
    server = aio.FederatedRhizomeDB(system_id="aio-server")
    try:

        async def start() -> tuple[str, list[Delta]]:
            url = await server.enable_server(port=0)
            old = [server.create_delta("s", [{"role": "n", "target": i}]) for i in range(3)]
            for delta in old:
                await server.persist_delta(delta)
            return url, old

        async def server_ids() -> set[str]:
            return ids(server)

        async def server_put(delta: Delta) -> None:
            await server.persist_delta(delta)

        url, old = loop.run(start())
        with instances("threaded-client") as (client,):
            link = client.connect_to_remote(url, timeout=5)
            wait_until(lambda: ids(client) == {d.id for d in old})
            mine = put(client, 2, author="c")
            wait_until(lambda: loop.run(server_ids()) >= {d.id for d in mine})
            live = server.create_delta("live", [])
            loop.run(server_put(live))
            wait_until(lambda: live.id in ids(client))
            wait_until(lambda: link.stats.deltas_sent == 2)
            assert ids(client) == loop.run(server_ids())
        assert loop.run(server_ids()) == {d.id for d in [*old, *mine, live]}
    finally:
        loop.run(server.close())
        loop.stop()
