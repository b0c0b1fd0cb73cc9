"""Admission over real sockets on 127.0.0.1, in every runtime (asyncio, trio, threads): a real
client gets in and syncs while idle connections flood the server; open links are limited per
client address (HTTP 503 with ``Retry-After``); a connection that never completes its upgrade
is closed at its deadline, and the oldest pending one makes room for a new one."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from rhizome_adapters import threaded
from rhizome_proto import LinkConfig, ReconnectPolicy
from rhizome_proto._admission import AdmissionLimits
from tests.adapter_support import ids
from tests.aio_support import deadline, instance, wait_until

ONE_RETRY = LinkConfig(
    reconnect=ReconnectPolicy(max_attempts=1, initial_delay=0.02, max_delay=0.05)
)
#: idle connections the flood opens as fast as it can (and keeps open, never sending)
FLOOD = 300
DELTAS = 20


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


class Flood:
    """A thread opening idle TCP connections to a port as fast as it can, keeping them open."""

    def __init__(self, port: int, count: int = FLOOD) -> None:
        self.port, self.count = port, count
        self.socks: list[socket.socket] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for _ in range(self.count):
                self.socks.append(socket.create_connection(("127.0.0.1", self.port), timeout=5))
        finally:
            self.done.set()

    def __enter__(self) -> Flood:
        self.thread.start()
        while len(self.socks) < self.count // 3 and not self.done.is_set():
            time.sleep(0.001)  # the flood is well under way before the real client comes
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.thread.join()
        for sock in self.socks:
            sock.close()


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the server closes ``sock`` (which sends nothing) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def upgrade(port: int, source: str = "127.0.0.1") -> bytes:
    """A WebSocket upgrade request from ``source``: the status line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(
            f"GET /federation HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := s.recv(4096)):
            answer += chunk
        return answer


# ---------------------------------------------------------------- asyncio and trio


@deadline(60)
async def test_a_real_client_gets_in_during_an_idle_flood() -> None:
    async with instance(system_id="hub") as hub, instance(system_id="spoke") as spoke:
        for i in range(DELTAS):
            await hub.persist_delta(hub.create_delta("alice", [{"role": "n", "target": i}]))
        url = await hub.enable_server(port=0)
        with Flood(_port(url)) as flood:
            await spoke.connect_to_remote(url)
            await wait_until(lambda: ids(spoke) == ids(hub), 20)
            await anyio.to_thread.run_sync(flood.thread.join)
            await wait_until(lambda: hub.admission.evicted >= FLOOD - 64, 20)
        assert hub.admission.pending <= 64


@deadline(20)
async def test_open_links_are_limited_per_address() -> None:
    limits = AdmissionLimits(max_links=10, max_links_per_address=2)
    async with instance(system_id="hub") as hub, instance(system_id="spoke") as spoke:
        url = await hub.enable_server(port=0, limits=limits)
        await spoke.connect_to_remote(url)
        await spoke.connect_to_remote(url)
        with pytest.raises(ConnectionError, match="503"):
            await spoke.connect_to_remote(url, ONE_RETRY)
        answer = await anyio.to_thread.run_sync(upgrade, _port(url))
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 5" in answer.lower()
        assert b"max_links_per_address 2" in answer
        other = await anyio.to_thread.run_sync(upgrade, _port(url), "127.0.0.2")
        assert other.startswith(b"HTTP/1.1 101 ")  # another address still gets in
        assert hub.admission.refused == 3  # two attempts of the link, one raw request


@deadline(20)
async def test_an_idle_connection_is_closed_at_the_pending_deadline() -> None:
    limits = AdmissionLimits(pending_timeout=0.3, max_pending=2)
    async with instance(system_id="hub") as hub:
        url = await hub.enable_server(port=0, limits=limits)
        await _pending_checks(hub, _port(url))


async def _pending_checks(hub: Any, port: int) -> None:
    def check() -> None:
        with contextlib.ExitStack() as stack:
            idle = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
            partial = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
            partial.sendall(b"GET /federation HTTP/1.1\r\n")
            assert closed_by_server(idle) and closed_by_server(partial)
        # the oldest pending connection is closed to make room for a new one
        with contextlib.ExitStack() as stack:
            socks = [
                stack.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(3)
            ]
            assert closed_by_server(socks[0], 0.25)

    await anyio.to_thread.run_sync(check)
    await wait_until(lambda: hub.admission.timed_out >= 2 and hub.admission.evicted >= 1)


# ---------------------------------------------------------------- threads


@contextlib.contextmanager
def threaded_pair(**server: Any) -> Iterator[tuple[threaded.FederatedRhizomeDB, ...]]:
    with (
        threaded.FederatedRhizomeDB(system_id="hub") as hub,
        threaded.FederatedRhizomeDB(system_id="spoke") as spoke,
    ):
        yield hub, spoke


def _wait(predicate: Any, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_threaded_real_client_gets_in_during_an_idle_flood() -> None:
    with threaded_pair() as (hub, spoke):
        for i in range(DELTAS):
            hub.persist_delta(hub.create_delta("alice", [{"role": "n", "target": i}]))
        url = hub.enable_server(port=0)
        with Flood(_port(url)) as flood:
            spoke.connect_to_remote(url, timeout=20)
            _wait(lambda: ids(spoke) == ids(hub))
            flood.thread.join()
            _wait(lambda: hub.admission.evicted >= FLOOD - 64)
        assert hub.admission.pending <= 64


def test_threaded_open_links_are_limited_per_address() -> None:
    limits = AdmissionLimits(max_links=10, max_links_per_address=2)
    with threaded_pair() as (hub, spoke):
        url = hub.enable_server(port=0, limits=limits)
        spoke.connect_to_remote(url, timeout=5)
        spoke.connect_to_remote(url, timeout=5)
        with pytest.raises(ConnectionError, match="503"):
            spoke.connect_to_remote(url, ONE_RETRY, timeout=5)
        answer = upgrade(_port(url))
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 5" in answer.lower()
        assert upgrade(_port(url), "127.0.0.2").startswith(b"HTTP/1.1 101 ")
        assert hub.admission.refused == 3  # two attempts of the link, one raw request


def test_threaded_idle_connection_is_closed_at_the_pending_deadline() -> None:
    limits = AdmissionLimits(pending_timeout=0.3, max_pending=2)
    with threaded_pair() as (hub, _):
        url = hub.enable_server(port=0, limits=limits)
        anyio.run(_pending_checks, hub, _port(url))


def test_max_connections_is_max_links() -> None:
    with threaded_pair() as (hub, _):
        hub.enable_server(port=0, max_connections=7, limits=AdmissionLimits(max_pending=3))
        assert hub.admission.limits == AdmissionLimits(max_pending=3, max_links=7)
